"""Trainable Learning Rate (paper: trainable_learning_rate.txt, Section 5) with :class:`autolr_fused.FusedTLR`.

"Robustness to hyperparameters" (Section 5, Figure 1; Appendix D.5, Figure 10): on MNIST with "a
multi-layer perceptron (MLP) with a hidden layer of width 1000", initial lrs {0.001, 0.01, 0.1} and batch
sizes {64, 128, 256, 512}, TLR's loss curves "converge considerably fast into a common behavior for
all the considered settings", whereas constant-lr SGD "may perform poorly if we do not choose an
appropriate learning rate and batch size"; and "the rate initially increases ... and then decreases in
an exponential manner".

Protocol, scaled to the 8x8 digits (64 inputs, 1437 training images): MLP 64-1000-10; Appendix D's
settings for every SGD-based optimizer (momentum 0.8, weight decay 5e-4); TLR in the SGD variant of
Section 4 (window mode, ``steps_per_epoch`` = batches per epoch, p = 0.33, global lr, c = 0.25); the
baseline is torch.optim.SGD with the same momentum and weight decay at the constant initial lr. The
paper trains 80 epochs; so does the full run. For each batch size both methods start from the same
weights and see the same batches. The training loss is the full training set's cross-entropy after the
last epoch.

Pre-registered reading of the claims:

* "much smaller spread": for every batch size, the spread (max - min over the three initial lrs) of
  TLR's final training losses is at most a quarter of SGD's (a factor of 4, not a mere "smaller").
* "first rises, then decays": TLR's lr peaks at >= 1.25 x its initial value (at least one maximal
  increase, 1 + c) and ends at <= half its peak.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

import autolr_fused as alr
from autolr_fused.validation.common import digits, evaluate, mlp, steps_per_epoch, train_epoch

LRS = (0.001, 0.01, 0.1)
BATCH_SIZES = (64, 128, 256, 512)
HIDDEN = 1000
MOMENTUM, WEIGHT_DECAY = 0.8, 5e-4  # Appendix D: every SGD-based optimizer

SPREAD_RATIO_MAX = 0.25
LR_RISE_FACTOR = 1.25
LR_DECAY_FRACTION = 0.5


@dataclass(frozen=True)
class TLRRun:
    method: str  # "sgd" or "tlr"
    lr0: float
    batch_size: int
    final_loss: float  # full training set, after the last epoch (inf/NaN if it diverged)
    test_accuracy: float
    epoch_losses: np.ndarray  # mean minibatch loss of each epoch
    lrs: np.ndarray  # the lr after each step

    @property
    def lr_peak(self) -> float:
        return float(self.lrs.max())

    @property
    def lr_rises(self) -> bool:
        return self.lr_peak >= LR_RISE_FACTOR * self.lr0

    @property
    def lr_decays(self) -> bool:
        return float(self.lrs[-1]) <= LR_DECAY_FRACTION * self.lr_peak


def train_mlp(method: str, lr0: float, batch_size: int, epochs: int, seed: int, momentum: float = MOMENTUM) -> TLRRun:
    """One run of the Section 5 robustness grid."""
    data = digits().flat()
    model = mlp([64, HIDDEN, 10], seed)
    spe = steps_per_epoch(len(data.x_train), batch_size)
    if method == "sgd":
        optimizer: torch.optim.Optimizer = torch.optim.SGD(
            model.parameters(), lr=lr0, momentum=momentum, weight_decay=WEIGHT_DECAY
        )
    elif method == "tlr":
        optimizer = alr.FusedTLR(
            model.parameters(), lr=lr0, momentum=momentum, weight_decay=WEIGHT_DECAY, steps_per_epoch=spe
        )
    else:
        raise ValueError(f"unknown method {method!r}")
    generator = torch.Generator().manual_seed(seed)
    lrs: list[float] = []
    epoch_losses = []
    for _ in range(epochs):
        losses = train_epoch(
            model,
            optimizer,
            data.x_train,
            data.y_train,
            batch_size,
            generator,
            after_step=lambda: lrs.append(float(optimizer.param_groups[0]["lr"])),
        )
        epoch_losses.append(float(np.mean(losses)))
    final_loss, _ = evaluate(model, data.x_train, data.y_train)
    _, accuracy = evaluate(model, data.x_test, data.y_test)
    return TLRRun(method, lr0, batch_size, final_loss, accuracy, np.array(epoch_losses), np.array(lrs))


@dataclass(frozen=True)
class SpreadCheck:
    batch_size: int
    sgd: list[TLRRun]  # one per initial lr
    tlr: list[TLRRun]

    @staticmethod
    def _spread(runs: list[TLRRun]) -> float:
        losses = [r.final_loss for r in runs]
        if not all(math.isfinite(v) for v in losses):
            return math.inf  # a diverged run is as far from the others as it gets
        return max(losses) - min(losses)

    @property
    def sgd_spread(self) -> float:
        return self._spread(self.sgd)

    @property
    def tlr_spread(self) -> float:
        return self._spread(self.tlr)

    @property
    def ratio(self) -> float:
        return self.tlr_spread / self.sgd_spread if self.sgd_spread > 0 else math.inf

    @property
    def reproduced(self) -> bool:
        return self.ratio <= SPREAD_RATIO_MAX


def robustness_check(
    lrs: Sequence[float] = LRS,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    epochs: int = 80,
    seed: int = 0,
    momentum: float = MOMENTUM,
) -> list[SpreadCheck]:
    """Section 5's grid: final training-loss spread over the initial lrs, per batch size and method.

    ``momentum=0`` is a post-hoc diagnostic, not the paper's protocol (see :func:`factor_trace`).
    """
    return [
        SpreadCheck(
            batch_size=bs,
            sgd=[train_mlp("sgd", lr, bs, epochs, seed, momentum) for lr in lrs],
            tlr=[train_mlp("tlr", lr, bs, epochs, seed, momentum) for lr in lrs],
        )
        for bs in batch_sizes
    ]


@dataclass(frozen=True)
class FactorTrace:
    """Every window end of one FusedTLR run, recomputed from the parameters through the public API."""

    window: int  # K, steps per window
    steps: np.ndarray  # step count at each window end (from the second window on)
    losses: np.ndarray  # that step's minibatch loss
    lrs: np.ndarray  # the lr used in the window
    factors: np.ndarray  # the optimizer's new lr / old lr
    spec_factors: np.ndarray  # the spec's factor from the recomputed window displacements
    cosines: np.ndarray  # cosine between consecutive window displacements
    overflow: np.ndarray  # h or q overflows float32 (the spec then leaves the lr unchanged)

    @property
    def max_deviation(self) -> float:
        """Largest |optimizer - spec| factor over the windows whose float32 sums are finite."""
        ok = np.isfinite(self.factors) & np.isfinite(self.spec_factors) & ~self.overflow
        return float(np.max(np.abs(self.factors[ok] - self.spec_factors[ok]))) if ok.any() else math.nan

    def climb_end(self, loss_limit: float = 10.0) -> int:
        """The first window whose loss exceeds ``loss_limit`` or is not finite (len if none)."""
        bad = np.flatnonzero(~(self.losses <= loss_limit))
        return int(bad[0]) if len(bad) else len(self.losses)


def factor_trace(
    lr0: float = 0.01, batch_size: int = 128, epochs: int = 80, seed: int = 0, momentum: float = MOMENTUM
) -> FactorTrace:
    """Diagnose a window-mode run: recompute the spec's factor (algorithms.md, FusedTLR) independently.

    ``u_j = (x_end - x_start) / lr_j`` from the flattened parameters in float64, then
    ``factor = 1 + h / max(4 (q - h), h / c)`` with ``h = <u_j, u_{j-1}>``, ``q = ||u_j||^2``, c = 0.25;
    compared with the ratio of the lrs the optimizer used before and after the window end.
    """
    data = digits().flat()
    model = mlp([64, HIDDEN, 10], seed)
    spe = steps_per_epoch(len(data.x_train), batch_size)
    optimizer = alr.FusedTLR(
        model.parameters(), lr=lr0, momentum=momentum, weight_decay=WEIGHT_DECAY, steps_per_epoch=spe
    )
    window = max(1, round(0.33 * spe))  # the FusedTLR default update_fraction
    generator = torch.Generator().manual_seed(seed)

    def flat() -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in model.parameters()]).double()

    state = {"step": 0, "snap": flat(), "prev": None, "lr": lr0, "loss": math.nan}
    rows: list[tuple[float, ...]] = []

    def after_step() -> None:
        state["step"] += 1
        if state["step"] % window:
            return
        x = flat()
        u = (x - state["snap"]) / state["lr"]
        new_lr = float(optimizer.param_groups[0]["lr"])
        prev = state["prev"]
        if prev is not None:
            h, q = float(u @ prev), float(u @ u)
            den = max(4 * (q - h), h / 0.25)
            ok = den > 0 and all(math.isfinite(v) for v in (h, q, den))
            norms = math.sqrt(q * float(prev @ prev))
            u32, prev32 = u.float(), prev.float()
            overflow = not (torch.isfinite(u32 @ prev32) and torch.isfinite(u32 @ u32))
            rows.append(
                (
                    state["step"],
                    state["loss"],
                    state["lr"],
                    new_lr / state["lr"],
                    1 + h / den if ok else 1.0,
                    h / norms if norms > 0 else math.nan,
                    overflow,
                )
            )
        state.update(snap=x, prev=u, lr=new_lr)

    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(data.x_train), generator=generator)
        for i in range(spe):
            idx = order[i * batch_size : (i + 1) * batch_size]
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            loss.backward()
            optimizer.step()
            state["loss"] = loss.item()
            after_step()
    columns = [np.array(c, dtype=float) for c in zip(*rows)]
    return FactorTrace(window, *columns[:-1], overflow=columns[-1].astype(bool))
