"""Trainable Learning Rate's change factor (paper: trainable_learning_rate.txt, efficient variant).

From two "gradients" ``a`` (newer) and ``b`` (older), with ``h = <a, b>`` and
``q = ||a||^2`` and the bound ``c``:

    den    = max(4 (q - h), h / c)
    factor = 1 + h / den      if den > 0 and everything is finite, else 1

so one update multiplies the lr by at most (1 + c) and shrinks it by less than
25%; ``scale_lr`` keeps an lr whose product with the factor would overflow.
Step mode uses consecutive regularized gradients; window mode uses
consecutive window displacements divided by the window's lr (Section 4).
"""

from __future__ import annotations

import torch
from torch import Tensor


def change_factor(h: Tensor, q: Tensor, bound: float) -> Tensor:
    """The factor for float32 tensors ``h`` and ``q`` (any matching shape), on their device."""
    den = torch.maximum(4 * (q - h), h / bound)
    ok = (den > 0) & torch.isfinite(h) & torch.isfinite(q) & torch.isfinite(den)
    safe_den = torch.where(ok, den, torch.ones_like(den))
    return torch.where(ok, 1 + h / safe_den, torch.ones_like(den))


def scale_lr(lr: Tensor, factor: Tensor) -> Tensor:
    """``lr * factor``, or ``lr`` where that product overflows (an lr never becomes inf)."""
    new = lr * factor
    return torch.where(torch.isfinite(new), new, lr)


def window_length(steps_per_epoch: int, update_fraction: float) -> int:
    """K = max(1, round(p * steps_per_epoch)) steps per window."""
    return max(1, round(update_fraction * steps_per_epoch))
