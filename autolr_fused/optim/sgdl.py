"""FusedSGDL: vanilla SGD with a large learning rate and a built-in step anneal.

Paper: "Vanilla SGD with a large learning rate" (shared/papers/sgdl_vanilla_sgd_large_lr.txt).
Its recipe, the defaults here: no momentum, ``lr=1.0``, ``weight_decay=5e-3``,
and the lr multiplied by ``gamma=0.1`` at 1/3 and 2/3 of training.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor

from autolr_fused._validation import ArgumentTypeError, check_int, check_range
from autolr_fused.optim.sgd import FusedSGD


class FusedSGDL(FusedSGD):
    """Vanilla SGD with the paper's large-lr recipe.

    Everything is as :class:`FusedSGD` (momentum is allowed but defaults to 0),
    plus a step anneal: once the number of completed steps ``s`` reaches
    ``m * total_steps`` for a milestone fraction ``m`` (``s >= m * total_steps``),
    every group's lr is multiplied by ``gamma``, once per milestone, at the end
    of that step. ``total_steps=None`` disables the anneal. The anneal composes
    with torch LR schedulers (it multiplies whatever lr the group has then).
    ``skip_nonfinite`` is as :class:`FusedSGD`'s (a skipped step is not counted).

    Extra memory per parameter: none (one momentum buffer if momentum is set).
    """

    _torch_layout = False  # its state_dict carries the anneal's counters

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1.0,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 5e-3,
        nesterov: bool = False,
        total_steps: int | None = None,
        milestones: Sequence[float] = (1 / 3, 2 / 3),
        gamma: float = 0.1,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
        skip_nonfinite: bool = False,
    ) -> None:
        if total_steps is not None:
            check_int("total_steps", total_steps, 1)
        if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
            raise ArgumentTypeError(f"milestones must be a sequence of fractions, got {type(milestones).__name__}")
        fractions = tuple(check_range("milestones", m, 0.0, 1.0, low_open=True) for m in milestones)
        if list(fractions) != sorted(fractions):
            raise ValueError(f"milestones must be increasing, got {milestones}")
        check_range("gamma", gamma, 0.0, 1.0, low_open=True)
        self._anneal_extra = dict(total_steps=total_steps, milestones=fractions, gamma=float(gamma))
        super().__init__(
            params,
            lr,
            momentum,
            dampening,
            weight_decay,
            nesterov,
            maximize=maximize,
            foreach=foreach,
            differentiable=differentiable,
            fused=fused,
            backend=backend,
            skip_nonfinite=skip_nonfinite,
        )

    def _initial_controller_state(self, defaults: dict[str, Any]) -> dict[str, Any]:
        return {"step": 0, "milestones_passed": 0}

    def _milestone_steps(self) -> list[int]:
        """The step counts at which the lr is annealed: ``ceil(m * total_steps)``."""
        total = self._anneal_extra["total_steps"]
        if total is None:
            return []
        # The tolerance absorbs binary rounding (1/3 * 300 is not exactly 100).
        return [max(1, math.ceil(m * total - 1e-9)) for m in self._anneal_extra["milestones"]]

    def _step(self) -> None:
        super()._step()
        state = self._controller
        state["step"] += 1
        milestones = self._milestone_steps()
        while state["milestones_passed"] < len(milestones) and state["step"] >= milestones[state["milestones_passed"]]:
            state["milestones_passed"] += 1
            for group in self.param_groups:
                if isinstance(group["lr"], Tensor):
                    group["lr"].mul_(self._anneal_extra["gamma"])
                else:
                    group["lr"] = group["lr"] * self._anneal_extra["gamma"]

    def _summary_stats(self) -> dict[str, float]:
        return {**super()._summary_stats(), "step": self._controller["step"]}
