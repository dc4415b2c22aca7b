"""Backend registry.

A backend implements the fused primitives the optimizers are built from (see
``primitives.py`` for the list and ``reference.py`` for their exact semantics):

* ``reference``: plain PyTorch ops, any device, always available;
* ``cpu``: the C++ extension (``autolr_fused._C``, OpenMP), CPU tensors;
* ``cuda``: the same extension's CUDA kernels, CUDA tensors;
* ``triton``: Triton kernels, CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``).

``"auto"`` picks, for the device of the parameters, the first available of
cuda, triton (CUDA) or cpu, and falls back quietly to reference; the
environment variable ``AUTOLR_FUSED_BACKEND`` overrides ``"auto"``. An
explicitly requested backend that cannot run here raises
:class:`BackendUnavailableError`.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from autolr_fused._validation import ArgumentTypeError

ENV_VAR = "AUTOLR_FUSED_BACKEND"
KNOWN_BACKENDS = ("reference", "cpu", "triton", "cuda")
_MODULES = {
    "reference": "autolr_fused.backends.reference",
    "cpu": "autolr_fused.backends.cpu",
    "triton": "autolr_fused.backends.triton",
    "cuda": "autolr_fused.backends.cuda",
}


class BackendUnavailableError(RuntimeError, ValueError):
    """A known backend was requested that cannot run here."""


def _module(name: str) -> ModuleType | None:
    """The backend's module if it can run in this process, else None."""
    try:
        module = importlib.import_module(_MODULES[name])
    except ImportError:
        return None
    return module if getattr(module, "available", lambda: True)() else None


def available_backends() -> tuple[str, ...]:
    """Names of the backends that can run in this process."""
    return tuple(name for name in KNOWN_BACKENDS if _module(name) is not None)


def _load(name: str) -> ModuleType:
    module = _module(name)
    if module is None:
        raise BackendUnavailableError(
            f"backend={name!r} is not available in this build of autolr_fused; "
            "available backends: " + ", ".join(repr(b) for b in available_backends())
        )
    return module


def _auto(device: torch.device) -> str:
    preference = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    for name in preference:
        module = _module(name)
        if module is not None and getattr(module, "supports", lambda d: True)(device):
            return name
    return "reference"


def resolve_backend(name: object, device: torch.device | None = None) -> tuple[str, ModuleType]:
    """Validate a ``backend=`` argument and return ``(name, module)`` for parameters on ``device``."""
    if not isinstance(name, str):
        raise ArgumentTypeError(f"backend must be a string, got {type(name).__name__}")
    if name == "auto":
        override = os.environ.get(ENV_VAR, "").strip()
        if override and override != "auto":
            if override not in KNOWN_BACKENDS:
                raise ValueError(
                    f"environment variable {ENV_VAR}={override!r} names no backend; "
                    f"choose one of {('auto',) + KNOWN_BACKENDS}"
                )
            return override, _load(override)
        chosen = _auto(device if device is not None else torch.device("cpu"))
        return chosen, _load(chosen)
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend={name!r}; choose one of {('auto',) + KNOWN_BACKENDS}")
    return name, _load(name)
