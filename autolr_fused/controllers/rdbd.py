"""Regrettable Delta-Bar-Delta's per-tensor rule (paper: rdbd.txt, Algorithm 1).

Per tensor, at step t, with ``d_t`` the base optimizer's update direction:

    h_t = <d_t, d_{t-1}>                          (0 at the first step)
    if regret and h_t * h_{t-1} < 0:              # the last lr change was biased
        p  += delta_{t-1} * d_{t-1}               # undo its effect on the parameters
        lr -= delta_{t-1}
    new = clamp(lr + eta * h_t, lo, hi)
    delta_t = new - lr;  lr = new
    p -= lr * d_t

A non-finite h_t leaves the lr unchanged (delta_t = 0), regrets nothing, and is
remembered as h_t = 0 so that it cannot trigger a regret at the next step. A
finite h_t whose update would overflow the lr leaves it unchanged too (after
the regret, which is finite).
All quantities are float32 tensors with one entry per tensor; nothing here
touches parameter memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RDBDUpdate:
    regret_delta: Tensor  # per tensor: delta_{t-1} where a regret fires, else 0
    lr: Tensor  # the lr this step's update uses
    delta: Tensor  # delta_t
    h: Tensor  # h_t as remembered for the next step (0 where not finite)


def update(
    h: Tensor,
    prev_h: Tensor,
    prev_delta: Tensor,
    lr: Tensor,
    *,
    meta_lr: float,
    low: float | None,
    high: float | None,
    regret: bool,
) -> RDBDUpdate:
    """One RDBD lr update for a batch of tensors sharing eta, the bounds and the regret switch."""
    finite = torch.isfinite(h)
    h = torch.where(finite, h, torch.zeros_like(h))
    fires = finite & (h * prev_h < 0) if regret else torch.zeros_like(finite)
    regret_delta = torch.where(fires, prev_delta, torch.zeros_like(prev_delta))
    lr = lr - regret_delta
    new = lr + meta_lr * h
    if low is not None or high is not None:
        new = new.clamp(min=low, max=high)
    new = torch.where(finite & torch.isfinite(new), new, lr)
    return RDBDUpdate(regret_delta=regret_delta, lr=new, delta=new - lr, h=h)
