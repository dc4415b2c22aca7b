"""FusedSGD, a drop-in torch.optim.SGD, and the base of the SGD-direction optimizers."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor

from autolr_fused._validation import check_sgd_arguments
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


def sgd_group_directions(
    optimizer: AutoLROptimizer, group: dict[str, Any], params: list[Tensor]
) -> tuple[list[Tensor], list[Tensor]]:
    """torch.optim.SGD's (regularized gradients, directions) for ``params`` of ``group``.

    Momentum buffers live in ``optimizer.state[p]["momentum_buffer"]`` (torch's layout).
    """
    momentum = group["momentum"]
    buffers = [optimizer.state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
    regularized, directions = optimizer._ops.sgd_directions(
        params,
        [p.grad for p in params],
        buffers,
        momentum=momentum,
        dampening=group["dampening"],
        weight_decay=group["weight_decay"],
        nesterov=group["nesterov"],
        maximize=group["maximize"],
    )
    for p, buf in zip(params, buffers):
        optimizer.state[p]["momentum_buffer"] = buf
    return regularized, directions


class SGDDirectionOptimizer(AutoLROptimizer):
    """Base of the optimizers whose update direction is torch.optim.SGD's."""

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

    def _directions(self, group: dict[str, Any], params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """(regularized gradients, update directions) of ``params``; advances momentum buffers."""
        return sgd_group_directions(self, group, params)

    def _sgd_group_step(self, group: dict[str, Any]) -> None:
        """One torch.optim.SGD step of a group at the group's current lr."""
        params = self._grad_params(group)
        if params:
            _, directions = self._directions(group, params)
            self._ops.apply_update(params, directions, group["lr"])


class FusedSGD(SGDDirectionOptimizer):
    """Stochastic gradient descent with torch.optim.SGD's exact semantics.

    Same constructor, defaults, ``param_groups`` and ``state_dict`` layout as
    ``torch.optim.SGD`` (a state_dict saved from one loads into the other), and
    the same parameters after every step. ``lr`` may be a float or a 1-element
    tensor. ``foreach`` and ``fused`` are accepted for compatibility (the backend
    decides how the step runs); ``differentiable=True`` is refused. Unlike
    torch.optim.SGD, ``momentum`` must lie in [0, 1).

    Extra memory per parameter: one momentum buffer when ``momentum != 0``.
    """

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
    ) -> None:
        defaults = sgd_defaults(
            lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, differentiable, fused
        )
        super().__init__(params, defaults, backend)

    def _step(self) -> None:
        for group in self.param_groups:
            self._sgd_group_step(group)
