"""FusedAutoDropSGD: SGD whose lr drops by itself when the angular velocity saturates."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from autolr_fused._validation import check_int, check_range
from autolr_fused.controllers import autodrop
from autolr_fused.optim.sgd import SGDDirectionOptimizer, sgd_defaults


class FusedAutoDropSGD(SGDDirectionOptimizer):
    """AutoDrop (paper: autodrop.txt, Algorithm 1) on top of torch.optim.SGD.

    Every ``steps_per_epoch`` steps (an "epoch", the measurement interval) the
    optimizer measures the angle between the last two displacements of the whole
    parameter vector; when the angle stops changing (``|w_e - w_{e-1}| < theta``)
    it averages the parameters over ``drop_delay`` more epochs (linearly weighted),
    replaces them by the average and multiplies every group's lr by
    ``drop_factor`` (rho), never below ``min_lr``. See the controller
    ``autolr_fused.controllers.autodrop`` for the exact rule.

    Defaults follow the paper's Section 4 recommendation (``min_lr=1e-4``,
    ``threshold=0.01`` degrees (theta_0), ``max_threshold=1.0``, ``drop_delay=20``
    (n_d)) and its ResNet/CIFAR runs (``lr=0.1``, ``momentum=0.9``,
    ``drop_factor=0.2``). ``angle_window`` W > 1 compares means of the last W
    angles (the paper's noisy quadratic runs use W = 20, one step per epoch).

    The lr is a Python float in ``param_groups`` and changes only at epoch ends;
    the epoch end reads three numbers back from the device (one synchronisation
    per epoch, none in other steps).

    Extra memory per parameter: the snapshot x_{e-1} and the previous
    displacement s_{e-1} (2 x parameter size, parameter dtype), plus a float32
    average while a drop is pending; and the momentum buffer.
    """

    _global_keys = (
        "steps_per_epoch",
        "drop_factor",
        "min_lr",
        "threshold",
        "max_threshold",
        "drop_delay",
        "angle_window",
    )

    _float32_state_keys = ("average",)

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 0.1,
        momentum: float = 0.9,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        steps_per_epoch: int | None = None,
        drop_factor: float = 0.2,
        min_lr: float = 1e-4,
        threshold: float = 0.01,
        max_threshold: float = 1.0,
        drop_delay: int = 20,
        angle_window: int = 1,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        backend: str = "auto",
    ) -> None:
        if steps_per_epoch is None:
            raise TypeError(
                "FusedAutoDropSGD requires steps_per_epoch (an int >= 1: the measurement interval in steps)"
            )
        defaults = sgd_defaults(
            lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, differentiable, fused
        )
        defaults.update(
            steps_per_epoch=steps_per_epoch,
            drop_factor=drop_factor,
            min_lr=min_lr,
            threshold=threshold,
            max_threshold=max_threshold,
            drop_delay=drop_delay,
            angle_window=angle_window,
        )
        super().__init__(params, defaults, backend)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        check_int("steps_per_epoch", group["steps_per_epoch"], 1)
        check_range("drop_factor", group["drop_factor"], 0.0, 1.0, low_open=True, high_open=True)
        check_range("min_lr", group["min_lr"], 0.0)
        threshold = check_range("threshold", group["threshold"], 0.0, low_open=True)
        max_threshold = check_range("max_threshold", group["max_threshold"], 0.0, low_open=True)
        if threshold > max_threshold:
            raise ValueError(f"threshold={threshold} must not exceed max_threshold={max_threshold}")
        check_int("drop_delay", group["drop_delay"], 1)
        check_int("angle_window", group["angle_window"], 1)

    def _initial_controller_state(self, defaults: dict[str, Any]) -> dict[str, Any]:
        return autodrop.initial_state(float(defaults["threshold"]))

    def _step(self) -> None:
        params = self._all_params()
        for p in params:
            if "snapshot" not in self.state[p]:  # x_0: the parameters before their first step
                self.state[p]["snapshot"] = p.detach().clone(memory_format=torch.preserve_format)
        for group in self.param_groups:
            self._sgd_group_step(group)
        self._controller["step_in_epoch"] += 1
        if self._controller["step_in_epoch"] >= self.defaults["steps_per_epoch"]:
            self._controller["step_in_epoch"] = 0
            self._end_epoch(params)

    def _end_epoch(self, params: list[Tensor]) -> None:
        ops, device, config = self._ops, self._device(), self.defaults
        states = [self.state[p] for p in params]
        displacement = ops.displacements(params, [s["snapshot"] for s in states])
        with_prev = [i for i, s in enumerate(states) if "prev_displacement" in s]
        sums = torch.stack(
            [
                ops.dots(
                    [displacement[i] for i in with_prev], [states[i]["prev_displacement"] for i in with_prev], device
                ).sum(),
                ops.squared_norms(displacement, device).sum(),
                ops.squared_norms([states[i]["prev_displacement"] for i in with_prev], device).sum(),
            ]
        )
        dot, sq_norm, sq_norm_prev = sums.tolist()  # the one synchronisation of the epoch
        decision = autodrop.end_epoch(
            self._controller,
            dot,
            sq_norm,
            sq_norm_prev if with_prev else None,
            angle_window=config["angle_window"],
            drop_delay=config["drop_delay"],
            drop_factor=config["drop_factor"],
            max_threshold=config["max_threshold"],
        )
        if decision.accumulate_weight:
            if decision.accumulate_weight == 1:  # z = 0 at the trigger, then z += 1 * x_e
                for p, s in zip(params, states):
                    s["average"] = p.detach().to(torch.float32, copy=True)
            else:
                ops.accumulate_weighted([s["average"] for s in states], params, float(decision.accumulate_weight))
        if decision.drop:
            n_d = config["drop_delay"]
            ops.replace_with_average(params, [s.pop("average") for s in states], n_d * (n_d + 1) / 2)
            for group in self.param_groups:
                new_lr = max(config["min_lr"], config["drop_factor"] * float(group["lr"]))
                if isinstance(group["lr"], Tensor):
                    group["lr"].fill_(new_lr)
                else:
                    group["lr"] = new_lr
        for p, s, disp in zip(params, states, displacement):
            s["snapshot"].copy_(p)
            if "prev_displacement" in s:
                s["prev_displacement"].copy_(disp)
            else:
                s["prev_displacement"] = disp.to(p.dtype)

    def stats(self) -> dict[str, float]:
        c = self._controller
        return {
            **super().stats(),
            "angle": c["angle"],
            "angle_mean": c["angle_mean"],
            "theta": c["theta"],
            "drop_pending": c["drop_pending"],
            "k": c["k"],
            "epoch": c["epoch"],
            "drops": c["drops"],
        }
