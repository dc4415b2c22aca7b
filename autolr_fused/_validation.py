"""Argument checks shared by every optimizer.

Every check runs before any state changes and raises an error that names the
offending argument. Type problems raise :class:`ArgumentTypeError`, which is both
a ``TypeError`` and a ``ValueError`` so that callers catching either see it.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import torch


class ArgumentTypeError(TypeError, ValueError):
    """An argument has the wrong type (also a ``ValueError`` for convenience)."""


def _is_real_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def as_float(name: str, value: Any) -> float:
    """``value`` as a finite Python float, or an error naming ``name``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        if value.is_complex() or value.dtype == torch.bool:
            raise ArgumentTypeError(f"{name} must be real, got a {value.dtype} tensor")
        value = value.detach().to("cpu").item()
    if not _is_real_number(value):
        raise ArgumentTypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_lr(value: Any, name: str = "lr") -> None:
    """A learning rate: a finite number >= 0, or a 1-element tensor holding one."""
    if as_float(name, value) < 0.0:
        raise ValueError(f"Invalid learning rate: {name}={float(value)} (must be >= 0)")


def check_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number within [low, high] (or open ends); returns it as float."""
    v = as_float(name, value)
    lo_bad = low is not None and (v <= low if low_open else v < low)
    hi_bad = high is not None and (v >= high if high_open else v > high)
    if lo_bad or hi_bad:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = (
            ("(" if low_open or low is None else "[") + f"{lo}, {hi}" + (")" if high_open or high is None else "]")
        )
        raise ValueError(f"Invalid {name} value: {name}={v} (must be in {interval})")
    return v


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ArgumentTypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ArgumentTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"Invalid {name} value: {name}={value} (must be >= {minimum})")
    return value


def check_sgd_arguments(group: dict) -> None:
    """torch.optim.SGD's arguments, with momentum restricted to [0, 1)."""
    check_lr(group["lr"])
    check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
    check_range("dampening", group["dampening"], 0.0, 1.0)
    check_range("weight_decay", group["weight_decay"], 0.0)
    check_bool("nesterov", group["nesterov"])
    check_bool("maximize", group["maximize"])
    if group.get("differentiable", False):
        raise ValueError("differentiable=True is not supported by autolr_fused optimizers; use torch.optim.SGD")
    if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
        raise ValueError(
            "nesterov=True requires momentum > 0 and dampening == 0 "
            "(Nesterov momentum requires a momentum and zero dampening)"
        )


def check_gradients(param_groups: list[dict]) -> None:
    """Refuse sparse and complex gradients before a step changes anything."""
    strided = torch.strided
    for group in param_groups:
        for p in group["params"]:
            g = p.grad
            # One cheap test per tensor on the hot path; the detailed checks only when it fails.
            if g is not None and (
                g.layout is not strided or g.dtype.is_complex or p.dtype.is_complex or g.shape != p.shape
            ):
                _refuse_gradient(p, g)


def _refuse_gradient(p: torch.Tensor, g: torch.Tensor) -> None:
    if g.is_sparse or g.layout != torch.strided:
        raise SparseGradientError(
            "autolr_fused optimizers do not support sparse gradients "
            f"(a parameter of shape {tuple(p.shape)} has a {g.layout} gradient); "
            "use dense gradients, e.g. nn.Embedding(sparse=False)"
        )
    if p.is_complex() or g.is_complex():
        raise ArgumentTypeError(
            "autolr_fused optimizers do not support complex parameters; pass real views instead (torch.view_as_real)"
        )
    raise ValueError(f"a gradient has shape {tuple(g.shape)} but its parameter has shape {tuple(p.shape)}")


class SparseGradientError(RuntimeError, ValueError):
    """Raised when a parameter has a sparse gradient."""
