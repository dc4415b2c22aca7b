"""Backend registry.

A backend implements the fused primitives the optimizers are built from (see
``reference.py`` for the list and their exact semantics). ``"auto"`` picks the
fastest available backend for the parameters, unless the environment variable
``AUTOLR_FUSED_BACKEND`` names one; an explicitly requested backend that is not
available raises :class:`BackendUnavailableError`.
"""

from __future__ import annotations

import os
from types import ModuleType

from autolr_fused._validation import ArgumentTypeError

ENV_VAR = "AUTOLR_FUSED_BACKEND"
KNOWN_BACKENDS = ("reference", "cpu", "triton", "cuda")


class BackendUnavailableError(RuntimeError, ValueError):
    """A known backend was requested that cannot run here."""


def _load(name: str) -> ModuleType:
    if name == "reference":
        from autolr_fused.backends import reference

        return reference
    raise BackendUnavailableError(
        f"backend={name!r} is not available in this build of autolr_fused; "
        "available backends: " + ", ".join(repr(b) for b in available_backends())
    )


def available_backends() -> tuple[str, ...]:
    """Names of the backends that can run in this process."""
    return ("reference",)


def resolve_backend(name: object) -> tuple[str, ModuleType]:
    """Validate a ``backend=`` argument and return ``(name, module)``."""
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
        return "reference", _load("reference")
    if name not in KNOWN_BACKENDS:
        raise ValueError(f"unknown backend={name!r}; choose one of {('auto',) + KNOWN_BACKENDS}")
    return name, _load(name)
