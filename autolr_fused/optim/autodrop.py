"""FusedAutoDropSGD: SGD whose lr drops by itself when the angular velocity saturates."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from autolr_fused._validation import PARAMETER_SHAPED, check_int, check_range
from autolr_fused.backends.primitives import Boundary, lr_vector
from autolr_fused.controllers import autodrop
from autolr_fused.directions import SGDConfig
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

    Non-finite gradients: an angle that is not finite never triggers a drop
    (the lr stays), and the epoch end that meets one emits one RuntimeWarning.
    ``skip_nonfinite=True`` skips every step whose gradients hold inf or NaN
    (nothing changes, the epoch's step count included, as a step GradScaler
    skips), at the cost of one fused pass over the gradients and one
    device-to-host read per step.

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
    _state_schema = {
        **SGDDirectionOptimizer._state_schema,
        "snapshot": PARAMETER_SHAPED,
        "prev_displacement": PARAMETER_SHAPED,
        "average": PARAMETER_SHAPED,
    }

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
        skip_nonfinite: bool = False,
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
        super().__init__(params, defaults, backend, skip_nonfinite=skip_nonfinite)

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

    def _late_state_keys(self) -> dict[str, torch.dtype | None]:
        return {"prev_displacement": None, "average": torch.float32}  # from the first epoch end; while pending

    def _step(self) -> None:
        ops, config, c = self._ops, self.defaults, self._controller
        self._take_first_snapshots()
        c["step_in_epoch"] += 1
        at_end = c["step_in_epoch"] >= config["steps_per_epoch"]
        # While a drop is pending, this epoch end accumulates z += k * x_e with k known now.
        weight = c["k"] + 1 if c["drop_pending"] else 0
        stats, order = [], []  # the epoch-end rows and the tensors they belong to, in the same order
        for group in self.param_groups:
            params = self._grad_params(group)
            fused = at_end and len(params) == len(group["params"])
            cfg, lr = SGDConfig.of_group(group), lr_vector(group["lr"], self._device())
            for unit in self._units(group, params):
                out = ops.sgd_step(
                    unit.params,
                    unit.grads,
                    unit.buffers,
                    lr,
                    cfg,
                    first_step=unit.first_step,
                    boundary=self._boundary(unit.params, weight) if fused else None,
                    grad_scale=self._grad_scale,
                )
                if fused:
                    stats.append(out)
                    order += unit.params
            if at_end and not fused and group["params"]:
                stats.append(ops.boundary_pass(group["params"], self._boundary(group["params"], weight)))
                order += group["params"]
        if at_end:
            c["step_in_epoch"] = 0
            rows = self._global_rows(torch.cat(stats), [order]) if stats else None
            if rows is not None:
                self._statistics["boundary"] = self._in_parameter_order(rows, order)
            self._end_epoch(rows, weight)

    def _in_parameter_order(self, rows: Tensor, order: list[Tensor]) -> Tensor:
        """``rows`` (one per tensor of ``order``, a permutation of all parameters) in parameter order.

        Kept for ``stats(per_tensor=True)``: the rows exist anyway, so keeping them
        costs no work; only a step where the momentum units split a group (a
        parameter's first step) needs a device-side reordering.
        """
        params = self._all_params()
        if all(a is b for a, b in zip(order, params)):
            return rows
        position = {id(p): i for i, p in enumerate(params)}
        index = torch.tensor([position[id(p)] for p in order], device=rows.device)
        return torch.empty_like(rows).index_copy_(0, index, rows)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's; a group added while a drop is pending joins that drop's average.

        Its tensors' averages start as if they had held their current values at the k
        epoch ends accumulated so far (z = (1 + ... + k) * x_now), so that at the drop
        they too become a weighted average of where they have been, with the same
        normalisation as every other tensor.
        """
        super().add_param_group(param_group)
        c = self._controller
        if c["drop_pending"]:
            accumulated = c["k"] * (c["k"] + 1) / 2
            for p in self.param_groups[-1]["params"]:
                self.state[p]["average"] = p.detach().to(torch.float32, copy=True).mul_(accumulated)

    def _boundary(self, params: list[Tensor], weight: int) -> Boundary:
        """The epoch-end pass: s_e = x_e - x_{e-1} into ``prev_displacement``, and z += k * x_e if pending."""
        return Boundary(
            snapshots=[self.state[p]["snapshot"] for p in params],
            prev_displacements=self._prevs(params, "prev_displacement"),
            accumulators=[self.state[p]["average"] for p in params] if weight else None,
            accumulate_weight=float(weight),
        )

    def _end_epoch(self, stats: Tensor | None, weight: int) -> None:
        config, c = self.defaults, self._controller
        params = self._all_params()
        dot, sq_norm, sq_norm_prev = (0.0, 0.0, 0.0) if stats is None else stats.sum(0).tolist()  # the one sync
        # A non-finite angle never saturates (comparisons with NaN are False), so the lr stays; say so once.
        self._warn_nonfinite(seen=not all(map(math.isfinite, (dot, sq_norm, sq_norm_prev))))
        decision = autodrop.end_epoch(
            c,
            dot,
            sq_norm,
            sq_norm_prev if c["epoch"] >= 1 else None,  # s_{e-1} exists from the second epoch end on
            angle_window=config["angle_window"],
            drop_delay=config["drop_delay"],
            drop_factor=config["drop_factor"],
            max_threshold=config["max_threshold"],
        )
        if decision.accumulate_weight == 1:  # the trigger epoch: z = 1 * x_e
            for p in params:
                self.state[p]["average"] = p.detach().to(torch.float32, copy=True)
        elif decision.accumulate_weight != weight:  # pragma: no cover - the controller and the pass disagree
            raise RuntimeError("AutoDrop accumulated the average with a weight the controller did not choose")
        if decision.drop:
            n_d = config["drop_delay"]
            for p in params:
                state = self.state[p]
                p.copy_(state.pop("average") / (n_d * (n_d + 1) / 2))
                state["snapshot"].copy_(p)  # the replaced parameters are x_e for the next s
            for group in self.param_groups:
                new_lr = max(config["min_lr"], config["drop_factor"] * float(group["lr"]))
                if isinstance(group["lr"], Tensor):
                    group["lr"].fill_(new_lr)
                else:
                    group["lr"] = new_lr

    def _summary_stats(self) -> dict[str, float]:
        c = self._controller
        return {
            **super()._summary_stats(),
            "angle": c["angle"],
            "angle_mean": c["angle_mean"],
            "theta": c["theta"],
            "drop_pending": c["drop_pending"],
            "k": c["k"],
            "epoch": c["epoch"],
            "drops": c["drops"],
        }

    def _per_tensor_stats(self) -> dict[str, float]:
        """The per-tensor lrs, and ``"angle/<i>"``: the spec's angle formula on tensor i's s_e and s_{e-1}."""
        out = super()._per_tensor_stats()
        rows = self._statistics.get("boundary")
        rows = rows.tolist() if rows is not None and self._controller["epoch"] >= 2 else []
        for i in range(len(self._all_params())):
            out[f"angle/{i}"] = autodrop.angle_degrees(*rows[i]) if i < len(rows) else math.nan
        return out
