"""FusedRDBD: Regrettable Delta-Bar-Delta."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from autolr_fused._validation import (
    COUNT,
    PARAMETER_SHAPED,
    SCALAR,
    ArgumentTypeError,
    as_float,
    check_bool,
    check_range,
    check_sgd_arguments,
)
from autolr_fused.backends.primitives import DIRECTION
from autolr_fused.controllers import rdbd
from autolr_fused.directions import AdamConfig, SGDConfig
from autolr_fused.optim.base import AutoLROptimizer, lr_tensor
from autolr_fused.optim.sgd import (
    PREV_DIRECTION,
    PrevCall,
    Unit,
    direction_calls,
    drop_replaced_prevs,
    momentum_units,
    zero_rows,
)

BASES = ("sgd", "adam")
SCALARS = ("lr", "prev_h", "prev_delta")  # per-tensor float32 state, views of one vector each (_flat_state)


class FusedRDBD(AutoLROptimizer):
    """Regrettable Delta-Bar-Delta (paper: rdbd.txt, Algorithm 1).

    Every tensor has its own lr (``optimizer.state[p]["lr"]``, a 0-dim float32
    tensor starting at its group's ``lr``), moved by ``meta_lr`` (eta) times the
    inner product of consecutive update directions, and a change that the next
    inner product shows was biased (the sign flipped) is regretted: undone on the
    lr and on the parameters. See ``autolr_fused.controllers.rdbd``.

    ``base="sgd"`` takes torch.optim.SGD's arguments (``momentum``,
    ``dampening``, ``weight_decay``, ``nesterov``); ``base="adam"`` takes
    torch.optim.Adam's (``betas``, ``eps``, ``weight_decay``, and
    ``decoupled_weight_decay`` for AdamW); an argument of the other base would be
    ignored, so it raises ValueError. ``regret=False`` is plain
    delta-bar-delta. ``lr_bounds=(low, high)`` clamps every lr (None: unbounded).

    Defaults: ``lr=0.005`` (alpha_0), ``meta_lr=0.01`` (eta), as in the paper's
    SGD runs; its Adam runs use ``betas=(0.05, 0.99)`` and ``meta_lr=5e-7``.

    Non-finite gradients: a statistic that is not finite never reaches an lr
    (the lr stays for that update) and the first ``stats()`` or ``state_dict()``
    after it emits one RuntimeWarning. ``skip_nonfinite=True`` skips such steps
    entirely (nothing changes, as a step GradScaler skips), at the cost of one
    fused pass over the gradients and one device-to-host read per step.

    Extra memory per parameter: the previous direction (1 x parameter size;
    none for SGD with momentum without nesterov, whose momentum buffer is that
    direction), plus the momentum buffer (SGD with momentum) or the two moments (Adam);
    and per tensor three float32 scalars (its lr, the last h and the last lr
    change), views of three shared vectors.
    """

    _global_keys = ("base",)
    _float32_state_keys = SCALARS
    _state_schema = {
        "lr": SCALAR,
        "prev_h": SCALAR,
        "prev_delta": SCALAR,
        "prev_direction": PARAMETER_SHAPED,
        "momentum_buffer": PARAMETER_SHAPED,  # base="sgd"
        "exp_avg": PARAMETER_SHAPED,  # base="adam"
        "exp_avg_sq": PARAMETER_SHAPED,
        "step": COUNT,
    }
    _state_bundles = (SCALARS, ("exp_avg", "exp_avg_sq", "step"))

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.005,
        meta_lr: float = 0.01,
        base: str = "sgd",
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        decoupled_weight_decay: bool = False,
        regret: bool = True,
        lr_bounds: tuple[float | None, float | None] = (0.0, None),
        *,
        maximize: bool = False,
        backend: str = "auto",
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            meta_lr=meta_lr,
            base=base,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            betas=betas,
            eps=eps,
            decoupled_weight_decay=decoupled_weight_decay,
            regret=regret,
            lr_bounds=lr_bounds,
            maximize=maximize,
        )
        super().__init__(params, defaults, backend, skip_nonfinite=skip_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        check_sgd_arguments(group)  # lr, momentum, dampening, weight_decay, nesterov, maximize
        check_range("meta_lr", group["meta_lr"], 0.0)
        if not isinstance(group["base"], str):
            raise ArgumentTypeError(f"base must be a string, got {type(group['base']).__name__}")
        if group["base"] not in BASES:
            raise ValueError(f"unknown base={group['base']!r}; choose one of {BASES}")
        if group["base"] == "adam" and (group["momentum"] != 0 or group["nesterov"]):
            raise ValueError("momentum and nesterov apply to base='sgd'; base='adam' uses betas")
        if group["base"] == "adam" and group["dampening"] != 0:
            raise ValueError("dampening applies to base='sgd' (its momentum); base='adam' has none")
        betas = group["betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ArgumentTypeError(f"betas must be a pair of floats, got {betas!r}")
        check_range("betas[0]", betas[0], 0.0, 1.0, high_open=True)
        check_range("betas[1]", betas[1], 0.0, 1.0, high_open=True)
        check_range("eps", group["eps"], 0.0)
        check_bool("decoupled_weight_decay", group["decoupled_weight_decay"])
        if group["base"] == "sgd":  # Adam's arguments would be ignored: refuse them unless left at their defaults
            adam_only = {"betas": (0.9, 0.999), "eps": 1e-8, "decoupled_weight_decay": False}
            for key, default in adam_only.items():
                value = tuple(group[key]) if key == "betas" else group[key]
                if value != default:
                    raise ValueError(f"{key} applies to base='adam'; base='sgd' would ignore {key}={group[key]!r}")
        check_bool("regret", group["regret"])
        bounds = group["lr_bounds"]
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ArgumentTypeError(f"lr_bounds must be a pair (low, high), each a float or None, got {bounds!r}")
        low, high = (None if b is None else as_float("lr_bounds", b) for b in bounds)
        if low is not None and high is not None and low > high:
            raise ValueError(f"lr_bounds=(low, high) needs low <= high, got {bounds!r}")

    # --------------------------------------------------------------------- step
    def _units(self, group: dict[str, Any], params: list[Tensor]) -> list[Unit]:
        """SGD base: momentum units. Adam base: units of equal step count, ``buffers`` = exp_avg + exp_avg_sq."""
        if group["base"] == "sgd":
            return momentum_units(self, group, params)
        by_step: dict[int, tuple[list[Tensor], ...]] = {}  # step -> (params, grads, exp_avgs, exp_avg_sqs)
        for p in params:
            s = self.state[p]
            if "exp_avg" not in s:
                s["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                s["step"] = 0
            s["step"] += 1
            lists = by_step.get(s["step"]) or by_step.setdefault(s["step"], ([], [], [], []))
            lists[0].append(p)
            lists[1].append(p.grad)
            lists[2].append(s["exp_avg"])
            lists[3].append(s["exp_avg_sq"])
        return [Unit(ps, grads, exp_avgs + exp_avg_sqs, False) for ps, grads, exp_avgs, exp_avg_sqs in by_step.values()]

    def _primitive_args(self, group: dict[str, Any], unit: Unit) -> tuple[list, Any, dict[str, Any]]:
        """(state lists, config, keywords) of the SGD or Adam primitives for ``unit``."""
        if group["base"] == "sgd":
            return [unit.buffers], SGDConfig.of_group(group), {"first_step": unit.first_step}
        n = len(unit.params)
        step = self.state[unit.params[0]]["step"]
        return [unit.buffers[:n], unit.buffers[n:]], AdamConfig.of_group(group), {"step": step}

    def _step(self) -> None:
        ops, grad_scale = self._ops, self._grad_scale
        work: list[PrevCall] = []
        groups = [(group, self._grad_params(group)) for group in self.param_groups]
        ids = tuple(map(id, itertools.chain.from_iterable(params for _, params in groups)))
        created = self._cached_flat_state(ids, SCALARS) is not None  # the usual step: no state to create
        for group, params in groups:
            for p in () if created else params:
                state = self.state[p]
                if "lr" not in state:
                    state["lr"] = lr_tensor(group["lr"], p.device)
                    state["prev_h"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["prev_delta"] = torch.zeros((), dtype=torch.float32, device=p.device)
            units = self._units(group, params)
            if group["base"] == "sgd":  # d_{t-1} is the momentum buffer where it can be (direction_calls)
                work += direction_calls(self, group, units)
            else:
                work += [PrevCall(group, unit, self._prevs(unit.params, PREV_DIRECTION)) for unit in units]
        if not work:
            return
        rows = []  # (h_t, ||d_t||^2) per tensor, h_t = <d_t, d_{t-1}>: 0 where d_{t-1} does not exist yet
        for call in work:
            group, unit = call.group, call.unit
            if call.prevs is None:
                rows.append(zero_rows(unit.params))
                continue
            lists, cfg, kw = self._primitive_args(group, unit)
            reduce = ops.sgd_reduce if group["base"] == "sgd" else ops.adam_reduce
            of = {"of": DIRECTION} if group["base"] == "sgd" else {}
            rows.append(reduce(unit.params, unit.grads, *lists, call.prevs, cfg, grad_scale=grad_scale, **kw, **of))
        params = [p for call in work for p in call.unit.params]
        h_all = self._global_rows(torch.cat(rows), [params])[:, 0]
        flat = self._flat_state(params, SCALARS)
        prev_h, prev_delta, old_lr = flat["prev_h"], flat["prev_delta"], flat["lr"]
        self._note_nonfinite(h_all)
        updates, start = [], 0
        for call in work:
            group = call.group
            end = start + len(call.unit.params)
            low, high = (None if b is None else float(b) for b in group["lr_bounds"])
            updates.append(
                rdbd.update(
                    h_all[start:end],
                    prev_h[start:end],
                    prev_delta[start:end],
                    old_lr[start:end],
                    meta_lr=float(group["meta_lr"]),
                    low=low,
                    high=high,
                    regret=bool(group["regret"]),
                )
            )
            start = end
        for key, field in (("lr", "lr"), ("prev_delta", "delta"), ("prev_h", "h")):
            flat[key].copy_(torch.cat([getattr(u, field) for u in updates]))
        for call, u in zip(work, updates):
            group, unit = call.group, call.unit
            lists, cfg, kw = self._primitive_args(group, unit)
            # Without d_{t-1} there is nothing to regret (h_{t-1} is 0 then, so is the regret).
            regret = u.regret_delta if group["regret"] and call.prevs is not None else None
            prevs = None if call.from_buffer else call.prevs  # from the buffers: the kernel reads them in place
            if group["base"] == "sgd":
                kw["store"] = DIRECTION if call.store else None
            step = ops.sgd_step if group["base"] == "sgd" else ops.adam_step
            step(unit.params, unit.grads, *lists, u.lr, cfg, prevs=prevs, regret=regret, grad_scale=grad_scale, **kw)
        drop_replaced_prevs(self, work)

    def _summary_stats(self) -> dict[str, float]:
        lrs = [self.state[p]["lr"] for p in self._all_params() if "lr" in self.state[p]]
        if not lrs:
            return {**super()._summary_stats(), "inner_product": 0.0}
        h = torch.stack(
            [self.state[p]["prev_h"].to(lrs[0].device) for p in self._all_params() if "lr" in self.state[p]]
        )
        return {**self._lr_summary(lrs), "inner_product": h.double().sum().item()}
