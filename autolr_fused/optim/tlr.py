"""FusedTLR: Trainable Learning Rate, the efficient variant."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from autolr_fused._validation import PARAMETER_SHAPED, SCALAR, check_bool, check_int, check_range
from autolr_fused.backends.primitives import REGULARIZED, Boundary
from autolr_fused.controllers import tlr
from autolr_fused.directions import SGDConfig
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

    Non-finite gradients: a statistic that is not finite never reaches an lr
    (the lr stays for that update) and the first ``stats()`` or ``state_dict()``
    after it emits one RuntimeWarning. ``skip_nonfinite=True`` skips such steps
    entirely (nothing changes, as a step GradScaler skips), at the cost of one
    fused pass over the gradients and one device-to-host read per step.

    Extra memory per parameter: step mode, the previous regularized gradient
    (1 x parameter size); window mode, the window snapshot and the previous
    scaled displacement (2 x); plus the momentum buffer. ``per_layer=True``
    adds one float32 scalar per tensor (its lr, a view of one shared vector).
    """

    _global_keys = ("per_layer", "bound", "steps_per_epoch", "update_fraction")
    _float32_state_keys = ("lr",)
    _state_schema = {
        **SGDDirectionOptimizer._state_schema,
        "prev_grad": PARAMETER_SHAPED,  # step mode
        "snapshot": PARAMETER_SHAPED,  # window mode
        "prev_update": PARAMETER_SHAPED,  # window mode
        "lr": SCALAR,  # per layer
    }

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
        skip_nonfinite: bool = False,
    ) -> None:
        defaults = sgd_defaults(
            lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, differentiable, fused
        )
        defaults.update(
            per_layer=per_layer, bound=bound, steps_per_epoch=steps_per_epoch, update_fraction=update_fraction
        )
        super().__init__(params, defaults, backend, skip_nonfinite=skip_nonfinite)

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

    def _late_state_keys(self) -> dict[str, torch.dtype | None]:
        return {"prev_update": None} if self.defaults["steps_per_epoch"] is not None else {}  # window mode

    # ------------------------------------------------------------------ helpers
    def _lrs(self, group: dict[str, Any], params: list[Tensor]) -> Tensor:
        """The lrs ``params`` are updated with, as the primitives take them (per layer: one per tensor)."""
        if not self.defaults["per_layer"]:
            return self._lr_tensor(group).reshape(1)
        flat, where = self._layer_lrs(params)
        return flat[where]

    def _layer_lrs(self, params: list[Tensor]) -> tuple[Tensor, slice | Tensor]:
        """The vector of every tensor's lr (views of ``state[p]["lr"]``) and where ``params`` are in it: a
        slice when they are consecutive (every tensor of the optimizer, in the usual step), else an index."""
        everything = self._all_params()
        ids = tuple(map(id, everything))
        if self._cached_flat_state(ids, ("lr",)) is None:
            for group in self.param_groups:
                for p in group["params"]:
                    if "lr" not in self.state[p]:
                        self.state[p]["lr"] = lr_tensor(group["lr"], p.device)
        flat = self._flat_state(everything, ("lr",), ids)["lr"]
        if len(params) == len(ids) and tuple(map(id, params)) == ids:
            return flat, slice(0, len(ids))
        position = {i: k for k, i in enumerate(ids)}
        positions = [position[id(p)] for p in params]
        start = positions[0]
        if positions == list(range(start, start + len(positions))):
            return flat, slice(start, start + len(positions))
        return flat, torch.tensor(positions, device=flat.device)

    def _apply_factor(self, stats: Tensor, params: list[Tensor]) -> None:
        """Multiply the lrs by the change factor of ``stats`` rows ``(h, q)``, one row per tensor of ``params``."""
        bound = self.defaults["bound"]
        self._note_nonfinite(stats)
        if self.defaults["per_layer"]:
            factor = tlr.change_factor(stats[:, 0], stats[:, 1], bound)
            flat, where = self._layer_lrs(params)
            if isinstance(where, slice):
                lrs = flat[where]
                lrs.copy_(tlr.scale_lr(lrs, factor))
            else:
                flat.index_copy_(0, where, tlr.scale_lr(flat[where], factor))
        else:
            factor = tlr.change_factor(stats[:, 0].sum(), stats[:, 1].sum(), bound)
            for group in self.param_groups:
                lr = self._lr_tensor(group)
                lr.copy_(tlr.scale_lr(lr, factor))
        self._statistics["factor"] = factor

    # --------------------------------------------------------------------- step
    def _step(self) -> None:
        if self.defaults["steps_per_epoch"] is None:
            self._step_mode()
        else:
            self._window_mode()

    def _step_mode(self) -> None:
        """Algorithm 2: scale the lr by the factor of <r_t, r_{t-1}> before the update."""
        work = self._prev_work("prev_grad")
        if not work:
            return
        if self._controller["step"] >= 1:  # t >= 2
            self._apply_factor(self._reduce_against_prev(work), [p for call in work for p in call.unit.params])
        self._controller["step"] += 1
        self._step_storing_prev(work, lambda group, unit: self._lrs(group, unit.params), REGULARIZED)

    def _window_mode(self) -> None:
        """Section 4: the factor of consecutive window displacements, at window ends.

        The window's last update and the snapshot pass run as one primitive call
        where every tensor of a group has a gradient.
        """
        ops, grad_scale = self._ops, self._grad_scale
        self._controller["step"] += 1
        self._controller["step_in_window"] += 1
        window = tlr.window_length(self.defaults["steps_per_epoch"], self.defaults["update_fraction"])
        at_end = self._controller["step_in_window"] >= window
        self._take_first_snapshots()
        stats, stepped = [], []
        for group in self.param_groups:
            all_params = group["params"]
            params = self._grad_params(group)
            fused = at_end and len(params) == len(all_params)
            for unit in self._units(group, params):
                lrs = self._lrs(group, unit.params)
                boundary = self._boundary(unit.params, lrs) if fused else None
                out = ops.sgd_step(
                    unit.params,
                    unit.grads,
                    unit.buffers,
                    lrs,
                    SGDConfig.of_group(group),
                    first_step=unit.first_step,
                    boundary=boundary,
                    grad_scale=grad_scale,
                )
                if fused:
                    stats.append(out)
                    stepped += unit.params
            if at_end and not fused and all_params:
                stats.append(ops.boundary_pass(all_params, self._boundary(all_params, self._lrs(group, all_params))))
                stepped += all_params
        if at_end:
            self._controller["step_in_window"] = 0
            self._controller["windows"] += 1
            if self._controller["windows"] >= 2 and stepped:  # j >= 2: u_{j-1} exists
                self._apply_factor(self._global_rows(torch.cat(stats), [stepped])[:, :2], stepped)

    def _boundary(self, params: list[Tensor], lrs: Tensor) -> Boundary:
        """The window-end pass: u_j = (x_now - x_snap) / lr_j into ``prev_update``."""
        return Boundary(
            snapshots=[self.state[p]["snapshot"] for p in params],
            prev_displacements=self._prevs(params, "prev_update"),
            scale=lrs,
        )

    def _summary_stats(self) -> dict[str, float]:
        lrs = [self.state[p]["lr"] for p in self._all_params() if "lr" in self.state[p]]
        if lrs:
            out = self._lr_summary(lrs)
        else:
            out = super()._summary_stats()
        factor = self._statistics.get("factor")
        out["factor"] = 1.0 if factor is None else factor.double().mean().item()
        return out
