"""FusedTLR: Trainable Learning Rate, the efficient variant."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from autolr_fused._validation import check_bool, check_int, check_range
from autolr_fused.controllers import tlr
from autolr_fused.optim.base import lr_tensor
from autolr_fused.optim.sgd import SGDDirectionOptimizer, sgd_defaults


class FusedTLR(SGDDirectionOptimizer):
    """Trainable Learning Rate (paper: trainable_learning_rate.txt, Algorithm 2 and Section 4).

    The lr is multiplied by a change factor in [0.75, 1 + c] computed from two
    consecutive "gradients" (see ``autolr_fused.controllers.tlr``):

    * step mode (``steps_per_epoch=None``): at every step t >= 2, from this and
      the previous step's regularized gradient, before this step's update;
    * window mode (``steps_per_epoch`` given): at the end of every window of
      ``K = max(1, round(update_fraction * steps_per_epoch))`` steps, from the
      last two window displacements divided by their lr; the new lr applies
      from the next step on.

    ``per_layer=False`` sums the statistics over all tensors and multiplies every
    group's lr by one factor; the group lr is then a 0-dim float32 tensor on the
    parameters' device, updated there. ``per_layer=True`` gives each tensor its
    own lr (``optimizer.state[p]["lr"]``, starting at its group's lr) and factor.

    Defaults: ``bound=0.25`` (c), ``update_fraction=0.33`` (p); the SGD
    arguments keep torch.optim.SGD's defaults (the paper's runs use momentum 0.8
    and weight decay 5e-4).

    Extra memory per parameter: step mode, the previous regularized gradient
    (1 x parameter size); window mode, the window snapshot and the previous
    scaled displacement (2 x); plus the momentum buffer.
    """

    _global_keys = ("per_layer", "bound", "steps_per_epoch", "update_fraction")
    _float32_state_keys = ("lr",)

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        per_layer: bool = False,
        bound: float = 0.25,
        steps_per_epoch: int | None = None,
        update_fraction: float = 0.33,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
    ) -> None:
        defaults = sgd_defaults(
            lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, differentiable, fused
        )
        defaults.update(
            per_layer=per_layer, bound=bound, steps_per_epoch=steps_per_epoch, update_fraction=update_fraction
        )
        super().__init__(params, defaults, backend)

    @property
    def _lr_on_device(self) -> bool:  # type: ignore[override]
        return not self.defaults["per_layer"]

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_bool("per_layer", group["per_layer"])
        check_range("bound", group["bound"], 0.0, low_open=True)
        if group["steps_per_epoch"] is not None:
            check_int("steps_per_epoch", group["steps_per_epoch"], 1)
        check_range("update_fraction", group["update_fraction"], 0.0, 1.0, low_open=True)

    def _initial_controller_state(self, defaults: dict[str, Any]) -> dict[str, Any]:
        return {"step": 0, "step_in_window": 0, "windows": 0}

    # ------------------------------------------------------------------ helpers
    def _lrs(self, group: dict[str, Any], params: list[Tensor]) -> Tensor | list[Tensor]:
        """The lr each of ``params`` is updated with (per-layer: created from the group lr)."""
        if not self.defaults["per_layer"]:
            return self._lr_tensor(group)
        lrs = []
        for p in params:
            state = self.state[p]
            if "lr" not in state:
                state["lr"] = lr_tensor(group["lr"], p.device)
            lrs.append(state["lr"])
        return lrs

    def _apply_factor(self, h: Tensor, q: Tensor, lrs: list[Tensor]) -> None:
        """Multiply ``lrs`` (one per tensor in h, q; or the group lrs when global) by the change factor."""
        bound = self.defaults["bound"]
        if self.defaults["per_layer"]:
            if len(lrs):
                factor = tlr.change_factor(h, q, bound)
                torch._foreach_mul_(lrs, list(factor.unbind(0)))
                self._statistics["factor"] = factor
        else:
            factor = tlr.change_factor(h.sum(), q.sum(), bound)
            for group in self.param_groups:
                self._lr_tensor(group).mul_(factor)
            self._statistics["factor"] = factor

    # --------------------------------------------------------------------- step
    def _step(self) -> None:
        self._controller["step"] += 1
        if self.defaults["steps_per_epoch"] is None:
            self._step_mode()
        else:
            self._window_mode()

    def _step_mode(self) -> None:
        """Algorithm 2: scale the lr by the factor of <r_t, r_{t-1}> before the update."""
        ops, device = self._ops, self._device()
        work = []  # (params, regularized, directions, group) of every group with gradients
        newer, older, lrs = [], [], []
        for group in self.param_groups:
            params = self._grad_params(group)
            if not params:
                continue
            regularized, directions = self._directions(group, params)
            group_lrs = self._lrs(group, params)
            work.append((params, regularized, directions, group_lrs))
            for i, (p, r) in enumerate(zip(params, regularized)):
                if "prev_grad" in self.state[p]:
                    newer.append(r)
                    older.append(self.state[p]["prev_grad"])
                    if self.defaults["per_layer"]:
                        lrs.append(group_lrs[i])
        if newer:
            self._apply_factor(ops.dots(newer, older, device), ops.squared_norms(newer, device), lrs)
        for params, regularized, directions, group_lrs in work:
            ops.apply_update(params, directions, group_lrs)
            prev = [self.state[p].get("prev_grad") for p in params]
            ops.copy_into(prev, regularized)
            for p, buf in zip(params, prev):
                self.state[p]["prev_grad"] = buf

    def _window_mode(self) -> None:
        """Section 4: the factor of consecutive window displacements, at window ends."""
        for group in self.param_groups:
            for p in group["params"]:
                if "snapshot" not in self.state[p]:
                    self.state[p]["snapshot"] = p.detach().clone(memory_format=torch.preserve_format)
            params = self._grad_params(group)
            if params:
                _, directions = self._directions(group, params)
                self._ops.apply_update(params, directions, self._lrs(group, params))
        self._controller["step_in_window"] += 1
        window = tlr.window_length(self.defaults["steps_per_epoch"], self.defaults["update_fraction"])
        if self._controller["step_in_window"] >= window:
            self._controller["step_in_window"] = 0
            self._controller["windows"] += 1
            self._end_window()

    def _end_window(self) -> None:
        ops, device = self._ops, self._device()
        params, lrs = [], []
        for group in self.param_groups:
            group_params = [p for p in group["params"] if "snapshot" in self.state[p]]
            params += group_params
            group_lrs = self._lrs(group, group_params)
            lrs += group_lrs if isinstance(group_lrs, list) else [group_lrs] * len(group_params)
        states = [self.state[p] for p in params]
        scaled = ops.displacements(params, [s["snapshot"] for s in states], lrs)  # u_j
        with_prev = [i for i, s in enumerate(states) if "prev_update" in s]
        if with_prev:
            newer = [scaled[i] for i in with_prev]
            self._apply_factor(
                ops.dots(newer, [states[i]["prev_update"] for i in with_prev], device),
                ops.squared_norms(newer, device),
                [lrs[i] for i in with_prev],
            )
        for p, s, u in zip(params, states, scaled):
            s["snapshot"].copy_(p)
            if "prev_update" in s:
                s["prev_update"].copy_(u)
            else:
                s["prev_update"] = u.to(p.dtype)

    def stats(self) -> dict[str, float]:
        lrs = [self.state[p]["lr"] for p in self._all_params() if "lr" in self.state[p]]
        if lrs:
            out = self._lr_summary(lrs)
        else:
            out = super().stats()
        factor = self._statistics.get("factor")
        out["factor"] = 1.0 if factor is None else factor.double().mean().item()
        return out
