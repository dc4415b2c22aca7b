"""Argument checks shared by every optimizer.

Every check runs before any state changes and raises an error that names the
offending argument. Type problems raise :class:`ArgumentTypeError`, which is both
a ``TypeError`` and a ``ValueError`` so that callers catching either see it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Real
from typing import Any

import torch
from torch import Tensor

try:  # the per-step gradient check in C++ (csrc/bindings.cpp); Python where the extension is not built
    from autolr_fused._C import first_bad_gradient as _first_bad_gradient
except ImportError:
    _first_bad_gradient = None


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


def check_parameters(params: list, existing: list) -> None:
    """Tensors an optimizer can step: real floating point, dense, all on one device, none listed twice.

    ``params`` is a new group's list, ``existing`` every parameter the optimizer
    has already; the fused primitives take tensor lists on one device.
    """
    seen = {id(p) for p in existing}
    device = existing[0].device if existing else None
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise ArgumentTypeError(f"optimizer can only optimize Tensors, but one of the params is {type(p).__name__}")
        if id(p) in seen:
            raise ValueError("some parameters appear in more than one parameter group")
        if p.layout is not torch.strided:
            raise ArgumentTypeError(
                f"autolr_fused optimizers take dense (strided) parameters, got a {p.layout} parameter of shape "
                f"{tuple(p.shape)}"
            )
        if p.is_complex():
            raise ArgumentTypeError(
                f"autolr_fused optimizers do not support complex parameters (got a {p.dtype} parameter of shape "
                f"{tuple(p.shape)}); keep the parameter real with a trailing dimension of 2 and use "
                "torch.view_as_complex(param) in the forward pass"
            )
        if device is None:
            device = p.device
        elif p.device != device:
            raise ValueError(
                f"all parameters of an autolr_fused optimizer must be on one device, got {device} and {p.device} "
                "(use one optimizer per device)"
            )


def gradients_are_finite(param_groups: list[dict], local: Callable[[Tensor], Tensor] = lambda g: g) -> Tensor:
    """A 0-dim bool device tensor: every gradient is free of inf and NaN (one fused max-abs pass over all).

    ``local`` maps a gradient to the part this process holds (a DTensor's local shard).
    """
    grads = [local(p.grad) for group in param_groups for p in group["params"] if p.grad is not None]
    grads = [g for g in grads if g.numel()]
    if not grads:
        return torch.tensor(True)
    # The max-abs norm of finite values is finite in their own dtype (a 2-norm could overflow), and
    # inf/NaN anywhere make it inf/NaN. Mixed dtypes are compared in float64, which holds them all.
    mixed = any(g.dtype != grads[0].dtype for g in grads)
    norms = torch._foreach_norm(grads, float("inf"), dtype=torch.float64 if mixed else None)
    return torch.stack(norms).isfinite().all()


# Kinds of per-parameter state (check_state_dict): a tensor of the parameter's shape (momentum
# buffer, previous direction, ...), a 1-element float tensor (a per-tensor lr or statistic), or a
# Python int step count.
PARAMETER_SHAPED = "parameter-shaped"
SCALAR = "scalar"
COUNT = "count"


def check_state_dict(
    state_dict: Any,
    param_groups: list[dict],
    *,
    schema: dict[str, str],
    bundles: tuple[tuple[str, ...], ...],
    optional_group_keys: tuple[str, ...],
    required_group_keys: tuple[str, ...],
    owner: str,
) -> None:
    """Refuse, with a ValueError naming what is wrong, a state_dict that does not fit these param groups.

    Checks the layout (``state`` and ``param_groups``), the number of groups and
    of parameters per group, each group's hyperparameter keys and finite lr, the
    parameter ids, and every per-parameter state entry against ``schema`` (key
    -> kind; keys of one of ``bundles`` come together). Reads nothing but the
    saved lrs back from a device.
    """
    hint = f"was it saved from this {owner} with the same parameters?"
    if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("state_dict must be a dict with 'state' and 'param_groups' (from optimizer.state_dict())")
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(saved_groups, (list, tuple)) or not isinstance(saved_state, dict):
        raise ValueError("state_dict['param_groups'] must be a list of dicts and state_dict['state'] a dict")
    if len(saved_groups) != len(param_groups):
        raise ValueError(
            f"state_dict has {len(saved_groups)} parameter group(s), this {owner} has {len(param_groups)}; {hint}"
        )
    params_of: dict[Any, torch.Tensor] = {}
    required = set(required_group_keys) - set(optional_group_keys)
    for i, (saved, group) in enumerate(zip(saved_groups, param_groups)):
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), (list, tuple)):
            raise ValueError(f"state_dict['param_groups'][{i}] must be a dict with a 'params' list")
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(
                f"state_dict's parameter group {i} has {len(saved['params'])} parameter(s), this {owner}'s has "
                f"{len(group['params'])}; {hint}"
            )
        missing = sorted(required - set(saved))
        if missing:
            raise ValueError(f"state_dict's parameter group {i} lacks {missing}; was it saved from another optimizer?")
        as_float(f"state_dict's parameter group {i} lr", saved["lr"])
        for pid, p in zip(saved["params"], group["params"]):
            if pid in params_of:
                raise ValueError(f"state_dict lists parameter id {pid!r} more than once")
            params_of[pid] = p
    for pid, entry in saved_state.items():
        if pid not in params_of:
            raise ValueError(f"state_dict has state for parameter id {pid!r}, which no parameter group lists")
        if not isinstance(entry, dict):
            raise ValueError(f"state_dict['state'][{pid!r}] must be a dict, got {type(entry).__name__}")
        p = params_of[pid]
        unknown = sorted(set(entry) - set(schema), key=str)
        if unknown:
            raise ValueError(
                f"state_dict's state of parameter {pid!r} has {unknown}, which a {owner} does not keep "
                f"(it keeps {sorted(schema)}); was it saved from another optimizer?"
            )
        for bundle in bundles:
            absent = sorted(set(bundle) - set(entry))
            if absent and len(absent) != len(bundle):
                raise ValueError(f"state_dict's state of parameter {pid!r} lacks {absent}, which come with the others")
        for key, value in entry.items():
            _check_state_value(pid, key, value, schema[key], p)


def _check_state_value(pid: Any, key: str, value: Any, kind: str, p: torch.Tensor) -> None:
    where = f"state_dict's state[{pid!r}][{key!r}]"
    if kind == COUNT:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where} must be an int >= 0, got {value!r}")
        return
    if value is None and key == "momentum_buffer":  # torch.optim.SGD saved None before its first step
        return
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise ValueError(f"{where} must be a real floating-point tensor, got {_describe(value)}")
    if kind == PARAMETER_SHAPED and value.shape != p.shape:
        raise ValueError(f"{where} has shape {tuple(value.shape)}, its parameter has shape {tuple(p.shape)}")
    if kind == SCALAR and value.numel() != 1:
        raise ValueError(f"{where} must hold one number, got shape {tuple(value.shape)}")


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor"
    return type(value).__name__


def check_gradients(param_groups: list[dict]) -> None:
    """Refuse sparse and complex gradients, and gradients of another shape, before a step changes anything.

    One cheap test per tensor on the hot path (in C++ where the extension is built, instead of several
    attribute lookups per tensor in Python), the detailed checks and the message only when it fails.
    """
    if _first_bad_gradient is not None:
        params = [p for group in param_groups for p in group["params"]]
        bad = _first_bad_gradient(params)
        if bad >= 0:
            _refuse_gradient(params[bad], params[bad].grad)
        return
    strided = torch.strided
    for group in param_groups:
        for p in group["params"]:
            g = p.grad
            if g is not None and (
                g.layout is not strided or g.dtype.is_complex or p.dtype.is_complex or g.shape != p.shape
            ):
                _refuse_gradient(p, g)


def _refuse_gradient(p: torch.Tensor, g: torch.Tensor) -> None:
    if not isinstance(p, torch.Tensor):
        raise ArgumentTypeError(f"a param group holds a {type(p).__name__} where a parameter tensor belongs")
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
