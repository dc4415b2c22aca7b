"""The update directions the optimizers are built on: torch.optim.SGD's and torch.optim.Adam's.

A direction is what the base optimizer multiplies by the learning rate. These
small frozen records carry the hyperparameters of one direction to a backend's
fused primitives (see ``autolr_fused.backends.reference`` for their semantics).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SGDConfig:
    """torch.optim.SGD's direction: regularized gradient ``r = (-g if maximize else g) + weight_decay * p``;
    with momentum ``buf = r`` (first step) or ``momentum * buf + (1 - dampening) * r``, and
    ``d = r + momentum * buf`` (Nesterov) or ``buf``; without momentum ``d = r``."""

    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    @classmethod
    def of_group(cls, group: dict[str, Any]) -> SGDConfig:
        return cls(
            momentum=float(group["momentum"]),
            dampening=float(group["dampening"]),
            weight_decay=float(group["weight_decay"]),
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
        )


@dataclass(frozen=True)
class AdamConfig:
    """torch.optim.Adam's direction ``d = m_hat / (sqrt(v_hat) + eps)``; with
    ``decoupled_weight_decay`` (AdamW) weight decay is ``p *= 1 - lr * weight_decay``
    instead of a gradient term."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    maximize: bool = False

    @classmethod
    def of_group(cls, group: dict[str, Any]) -> AdamConfig:
        beta1, beta2 = group["betas"]
        return cls(
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
            maximize=bool(group["maximize"]),
        )
