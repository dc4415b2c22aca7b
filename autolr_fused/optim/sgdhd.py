"""FusedSGDHD: SGD with hypergradient descent on the learning rate."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from autolr_fused._validation import PARAMETER_SHAPED, check_range
from autolr_fused.backends.primitives import DIRECTION
from autolr_fused.controllers import hypergradient
from autolr_fused.optim.sgd import SGDDirectionOptimizer, sgd_defaults


class FusedSGDHD(SGDDirectionOptimizer):
    """SGD-HD (Baydin et al. 2018): the lr follows its own hypergradient.

    At every step t >= 2 each group's lr grows by ``hypergrad_lr`` (beta) times
    the inner product of this step's regularized gradient with the previous
    step's update direction, summed over all parameters, before the update (see
    ``autolr_fused.controllers.hypergradient``). With no momentum this is
    global delta-bar-delta. The group lr is a 0-dim float32 tensor on the
    parameters' device, updated there.

    Defaults: torch.optim.SGD's, and ``hypergrad_lr=1e-6`` (beta).

    Non-finite gradients: a statistic that is not finite never reaches an lr
    (the lr stays for that update) and the first ``stats()`` or ``state_dict()``
    after it emits one RuntimeWarning. ``skip_nonfinite=True`` skips such steps
    entirely (nothing changes, as a step GradScaler skips), at the cost of one
    fused pass over the gradients and one device-to-host read per step.

    Extra memory per parameter: the previous update direction (1 x parameter
    size), plus the momentum buffer. With momentum and without nesterov the
    momentum buffer is the previous direction and nothing else is kept
    (1 x parameter size in all).
    """

    _lr_on_device = True
    _state_schema = {**SGDDirectionOptimizer._state_schema, "prev_direction": PARAMETER_SHAPED}

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        hypergrad_lr: float = 1e-6,
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
        defaults["hypergrad_lr"] = hypergrad_lr
        super().__init__(params, defaults, backend, skip_nonfinite=skip_nonfinite)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_range("hypergrad_lr", group["hypergrad_lr"], 0.0)

    def _initial_controller_state(self, defaults: dict[str, Any]) -> dict[str, Any]:
        return {"step": 0}

    def _step(self) -> None:
        work = self._direction_work()
        if not work:
            return
        if self._controller["step"] >= 1:  # t >= 2: <r_t, d_{t-1}> (0 for a tensor without d_{t-1})
            h = self._reduce_against_prev(work)[:, 0].sum()
            self._note_nonfinite(h)
            for group in self.param_groups:
                lr = self._lr_tensor(group)
                lr.copy_(hypergradient.update(lr, h.to(lr.device), float(group["hypergrad_lr"])))
            self._statistics["inner_product"] = h
        self._controller["step"] += 1
        self._step_storing_prev(work, lambda group, _: self._lr_tensor(group).reshape(1), DIRECTION)

    def _summary_stats(self) -> dict[str, float]:
        h = self._statistics.get("inner_product")
        h = 0.0 if h is None else h.item()
        return {**super()._summary_stats(), "inner_product": h}
