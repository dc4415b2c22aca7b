"""Hypergradient descent's lr rule (Baydin et al. 2018, "Online learning rate
adaptation with hypergradient descent"), the classic baseline.

At step t >= 2, with r_t this step's regularized gradient and d_{t-1} the
previous step's update direction, summed over every tensor:

    lr += hypergrad_lr * <r_t, d_{t-1}>

before this step's update. A non-finite inner product leaves the lr unchanged,
and so does a finite one that would make the lr overflow.
"""

from __future__ import annotations

import torch
from torch import Tensor


def update(lr: Tensor, h: Tensor, hypergrad_lr: float) -> Tensor:
    """The new lr (float32 tensor) from the old one and the inner product ``h``."""
    new = lr + hypergrad_lr * h  # inf or NaN exactly when h is not finite or the sum overflows
    return torch.where(torch.isfinite(new), new, lr)
