"""FusedSGD, a drop-in torch.optim.SGD, and the base of the SGD-direction optimizers."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from autolr_fused._validation import PARAMETER_SHAPED, check_sgd_arguments
from autolr_fused.backends.primitives import REGULARIZED, lr_vector
from autolr_fused.directions import SGDConfig
from autolr_fused.optim.base import AutoLROptimizer


def sgd_defaults(
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
    foreach: bool | None,
    differentiable: bool,
    fused: bool | None,
) -> dict[str, Any]:
    """torch.optim.SGD's param-group defaults, after the checks torch makes at construction."""
    if differentiable:
        raise ValueError("differentiable=True is not supported by autolr_fused optimizers; use torch.optim.SGD")
    if foreach and fused:
        raise ValueError("fused=True and foreach=True cannot be set together")
    return dict(
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        maximize=maximize,
        foreach=foreach,
        differentiable=differentiable,
        fused=fused,
    )


@dataclass
class Unit:
    """Tensors of one group stepped by one primitive call: their momentum buffers are all new or all old."""

    params: list[Tensor]
    grads: list[Tensor]
    buffers: list[Tensor]  # empty without momentum
    first_step: bool  # the buffers are new (uninitialised) and become this step's r

    def subset(self, indices: list[int]) -> Unit:
        """The unit of the tensors at ``indices``."""
        return Unit(
            [self.params[i] for i in indices],
            [self.grads[i] for i in indices],
            [self.buffers[i] for i in indices] if self.buffers else [],
            self.first_step,
        )


def zero_rows(params: list[Tensor]) -> Tensor:
    """The ``(n, 2)`` float32 statistics of tensors without a previous vector: zeros."""
    return torch.zeros((len(params), 2), dtype=torch.float32, device=params[0].device)


def momentum_units(optimizer: AutoLROptimizer, group: dict[str, Any], params: list[Tensor]) -> list[Unit]:
    """Split ``params`` of ``group`` into at most two units (new and existing momentum buffers).

    New buffers are allocated here, in ``optimizer.state[p]["momentum_buffer"]``
    (torch.optim.SGD's layout); the primitive fills them.
    """
    if not params:
        return []
    grads = [p.grad for p in params]
    if group["momentum"] == 0:
        return [Unit(params, grads, [], False)]
    state = optimizer.state
    buffers = [state[p].get("momentum_buffer") for p in params]
    if all(b is not None for b in buffers):  # the usual step: one unit
        return [Unit(params, grads, buffers, False)]
    units = []
    old = [i for i, b in enumerate(buffers) if b is not None]
    if old:
        units.append(Unit([params[i] for i in old], [grads[i] for i in old], [buffers[i] for i in old], False))
    new = [i for i, b in enumerate(buffers) if b is None]
    for i in new:
        buffers[i] = state[params[i]]["momentum_buffer"] = torch.empty_like(
            params[i], memory_format=torch.preserve_format
        )
    units.append(Unit([params[i] for i in new], [grads[i] for i in new], [buffers[i] for i in new], True))
    return units


PREV_DIRECTION = "prev_direction"


@dataclass
class PrevCall:
    """One primitive call's tensors and where their previous vector (``d_{t-1}`` or ``r_{t-1}``) is.

    ``prevs`` holds it, one tensor per parameter of ``unit``, or is None when no tensor of
    the unit has one yet (its inner products are 0). ``store``: the step writes this
    step's vector into ``prevs``. ``from_buffer``: ``prevs`` are the unit's momentum
    buffers, read in place (the step stores nothing; a regret reads the buffers before
    the update). ``drop``: ``prevs`` are ``state[p]["prev_direction"]`` tensors that the
    momentum buffers replace after this step.
    """

    group: dict[str, Any]
    unit: Unit
    prevs: list[Tensor] | None
    store: bool = True
    from_buffer: bool = False
    drop: bool = False


def buffer_is_direction(group: dict[str, Any]) -> bool:
    """Whether torch.optim.SGD's direction is its momentum buffer (momentum without nesterov)."""
    return group["momentum"] != 0 and not group["nesterov"]


def _copy_of_buffer(state: dict[str, Any]) -> Tensor | None:
    buffer = state.get("momentum_buffer")
    return None if buffer is None else buffer.clone(memory_format=torch.preserve_format)


def direction_calls(optimizer: AutoLROptimizer, group: dict[str, Any], units: list[Unit]) -> list[PrevCall]:
    """The calls of an SGD group's ``units`` that read the previous update direction ``d_{t-1}``.

    With momentum and without nesterov, torch.optim.SGD's direction *is* the momentum
    buffer: before this step's update the buffer holds ``d_{t-1}``, so no copy is kept
    (one parameter-sized tensor less, and the update pass writes nothing more than
    torch.optim.SGD's). Otherwise ``d_{t-1}`` is kept in ``state[p]["prev_direction"]``
    and each step stores its direction there. When a group switches between the two
    (its ``momentum`` or ``nesterov`` changed), the first step after the switch reads
    ``d_{t-1}`` where the last step left it: a new ``prev_direction`` starts as a copy
    of the buffer, and a ``prev_direction`` left over is read once more and dropped.
    """
    calls = []
    for unit in units:
        if not buffer_is_direction(group):
            # An old buffer without a prev_direction beside it holds the last direction; else zeros.
            seed = None if unit.first_step else _copy_of_buffer
            calls.append(PrevCall(group, unit, optimizer._prevs(unit.params, PREV_DIRECTION, seed)))
            continue
        state = optimizer.state
        kept = [i for i, p in enumerate(unit.params) if PREV_DIRECTION in state[p]]
        if kept:
            prevs = [state[unit.params[i]][PREV_DIRECTION] for i in kept]
            calls.append(PrevCall(group, unit.subset(kept), prevs, store=False, drop=True))
            if len(kept) == len(unit.params):
                continue
        rest = unit.subset([i for i, p in enumerate(unit.params) if PREV_DIRECTION not in state[p]]) if kept else unit
        if unit.first_step:  # new buffers: no previous direction yet
            calls.append(PrevCall(group, rest, None, store=False))
        else:
            calls.append(PrevCall(group, rest, rest.buffers, store=False, from_buffer=True))
    return calls


def drop_replaced_prevs(optimizer: AutoLROptimizer, calls: list[PrevCall]) -> None:
    """After the step: the ``prev_direction`` tensors that the momentum buffers now replace go."""
    for call in calls:
        if call.drop:
            for p in call.unit.params:
                del optimizer.state[p][PREV_DIRECTION]


class SGDDirectionOptimizer(AutoLROptimizer):
    """Base of the optimizers whose update direction is torch.optim.SGD's."""

    _state_schema = {"momentum_buffer": PARAMETER_SHAPED}
    # torch.optim.SGD's __setstate__ fills these in param groups saved by older torch versions, and so does ours.
    _optional_group_keys = ("nesterov", "maximize", "foreach", "differentiable", "fused")

    def _check_group(self, group: dict[str, Any]) -> None:
        check_sgd_arguments(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def _take_first_snapshots(self) -> None:
        """``state[p]["snapshot"]`` of every tensor that has none: x_0, the parameters before this step.

        For the boundary methods (AutoDrop, TLR window mode). Once every parameter has
        one, a step only compares a count: the number of tensors known to have a
        snapshot is kept with the state it was counted in (load_state_dict brings a
        new state object, which is counted again).
        """
        params = self._all_params()
        counted = getattr(self, "_snapshots_taken", None)
        if counted is not None and counted[0] is self.state and counted[1] == len(params):
            return
        for p in params:
            if "snapshot" not in self.state[p]:
                self.state[p]["snapshot"] = p.detach().clone(memory_format=torch.preserve_format)
        self._snapshots_taken = (self.state, len(params))

    def _units(self, group: dict[str, Any], params: list[Tensor]) -> list[Unit]:
        return momentum_units(self, group, params)

    def _prev_work(self, key: str) -> list[PrevCall]:
        """The calls of every group with gradients, each tensor's previous vector kept in ``state[p][key]``."""
        return [
            PrevCall(group, unit, self._prevs(unit.params, key))
            for group in self.param_groups
            for unit in self._units(group, self._grad_params(group))
        ]

    def _direction_work(self) -> list[PrevCall]:
        """The calls of every group with gradients, reading the previous update direction (``direction_calls``)."""
        return [
            call
            for group in self.param_groups
            for call in direction_calls(self, group, self._units(group, self._grad_params(group)))
        ]

    def _reduce_against_prev(self, work: list[PrevCall]) -> Tensor:
        """Rows ``(<r_t, prev>, ||r_t||^2)``, one per tensor of ``work`` in order, r_t the regularized gradient.

        A call without previous vectors gives rows of zeros.
        """
        rows = torch.cat(
            [
                self._ops.sgd_reduce(
                    call.unit.params,
                    call.unit.grads,
                    call.unit.buffers,
                    call.prevs,
                    SGDConfig.of_group(call.group),
                    first_step=call.unit.first_step,
                    of=REGULARIZED,
                    grad_scale=self._grad_scale,
                )
                if call.prevs is not None
                else zero_rows(call.unit.params)
                for call in work
            ]
        )
        return self._global_rows(rows, [call.unit.params for call in work])

    def _step_storing_prev(self, work: list[PrevCall], lrs: Callable[[dict, Unit], Tensor], store: str) -> None:
        """The update of every call at ``lrs(group, unit)``, storing this step's ``store`` vector where it keeps one."""
        for call in work:
            self._ops.sgd_step(
                call.unit.params,
                call.unit.grads,
                call.unit.buffers,
                lrs(call.group, call.unit),
                SGDConfig.of_group(call.group),
                first_step=call.unit.first_step,
                prevs=call.prevs if call.store else None,
                store=store if call.store else None,
                grad_scale=self._grad_scale,
            )
        drop_replaced_prevs(self, work)

    def _sgd_group_step(self, group: dict[str, Any]) -> None:
        """One torch.optim.SGD step of a group at the group's current lr."""
        params = self._grad_params(group)
        if not params:
            return
        cfg, lr = SGDConfig.of_group(group), lr_vector(group["lr"], params[0].device)
        for unit in self._units(group, params):
            self._ops.sgd_step(
                unit.params,
                unit.grads,
                unit.buffers,
                lr,
                cfg,
                first_step=unit.first_step,
                grad_scale=self._grad_scale,
            )


class FusedSGD(SGDDirectionOptimizer):
    """Stochastic gradient descent with torch.optim.SGD's exact semantics.

    Same constructor, defaults, ``param_groups`` and ``state_dict`` layout as
    ``torch.optim.SGD`` (a state_dict saved from one loads into the other), and
    the same parameters after every step. ``lr`` may be a float or a 1-element
    tensor. ``foreach`` and ``fused`` are accepted for compatibility (the backend
    decides how the step runs); ``differentiable=True`` is refused. Unlike
    torch.optim.SGD, ``momentum`` must lie in [0, 1).

    ``skip_nonfinite=True`` skips every step whose gradients hold inf or NaN: it
    changes nothing then (parameters, buffers, statistics, lrs, counters), as a
    step GradScaler skips; checking costs one fused pass over the gradients and
    one device-to-host read per step. Without it such a step runs as
    torch.optim.SGD's would (the parameters may become inf/NaN).

    Extra memory per parameter: one momentum buffer when ``momentum != 0``.
    """

    _torch_layout = True

    def __init__(
        self,
        params: Iterable,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
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
        super().__init__(params, defaults, backend, skip_nonfinite=skip_nonfinite)

    def _step(self) -> None:
        for group in self.param_groups:
            self._sgd_group_step(group)
