"""Vanilla SGD with a large lr (paper: sgdl_vanilla_sgd_large_lr.txt, Section 6 and Appendix A.3.1)
with :class:`autolr_fused.FusedSGDL`.

Section 6.1 / Appendix A.3.1 on CIFAR: batch-normalised networks (Kaiming init, BN, no dropout),
batch size 256, 150 epochs, lr divided by 10 at epochs 50 and 100; SGDL = vanilla SGD at lr 1.0-1.3
with weight decay 5e-3 (Table 1: "SGDL >= 10 x lr(SGDM)", gamma = 0.005); SGDM at lr 0.1 (0.05 for
VGG16), momentum 0.9, weight decay 5e-3. Claim: "our method still works fairly well and has the same or
even better performance in comparison to SGDM" (Figure 4), and converges smoothly (Section 7).

Protocol, scaled down: the demo's batch-normalised CNN on the 8x8 digits (no augmentation: the paper's
flips and crops do not suit digits), batch size 256 (6 steps per epoch), 30 epochs with the same
1/3 and 2/3 anneal (FusedSGDL's ``total_steps``; MultiStepLR at the same steps for the baselines).
SGDL is ``FusedSGDL(lr=1.0, weight_decay=5e-3)``; SGDM is torch.optim.SGD(lr=0.1, momentum=0.9,
weight_decay=5e-3); for context, vanilla SGD at SGDM's lr 0.1 (Table 1's "SGD" row). Each seed gives
every method the same initial weights and batches.

Pre-registered reading of the claims:

* "trains stably": no non-finite minibatch loss, and the last epoch's mean training loss is at most
  10% of the first epoch's.
* "comparable accuracy": SGDL's mean test accuracy over seeds is at least SGDM's minus 2 percentage
  points (7 of the 360 test digits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

import autolr_fused as alr
from autolr_fused.validation.common import digits, evaluate, small_cnn, steps_per_epoch, train_epoch

BATCH_SIZE = 256
WEIGHT_DECAY = 5e-3
SGDL_LR, SGDM_LR = 1.0, 0.1
MILESTONES = (1 / 3, 2 / 3)
METHODS = ("sgdl", "sgdm", "sgd")

LOSS_FRACTION = 0.1
ACCURACY_MARGIN = 0.02


@dataclass(frozen=True)
class SGDLRun:
    method: str
    seed: int
    step_losses: np.ndarray
    epoch_losses: np.ndarray
    test_accuracy: float

    @property
    def stable(self) -> bool:
        return bool(np.all(np.isfinite(self.step_losses))) and (
            self.epoch_losses[-1] <= LOSS_FRACTION * self.epoch_losses[0]
        )


def train_cnn(method: str, epochs: int = 30, seed: int = 0) -> SGDLRun:
    data = digits()
    model = small_cnn(seed)
    total = epochs * steps_per_epoch(len(data.x_train), BATCH_SIZE)
    scheduler = None
    if method == "sgdl":
        optimizer: torch.optim.Optimizer = alr.FusedSGDL(
            model.parameters(), lr=SGDL_LR, weight_decay=WEIGHT_DECAY, total_steps=total, milestones=MILESTONES
        )
    else:
        # "torch_sgdl" is SGDL's recipe in plain torch: it tells the recipe's outcome from the package's.
        momentum = 0.9 if method == "sgdm" else 0.0
        lr = SGDL_LR if method == "torch_sgdl" else SGDM_LR
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=WEIGHT_DECAY)
        # FusedSGDL anneals once ceil(m * total) steps are done; MultiStepLR at the same step counts.
        steps = [math.ceil(m * total - 1e-9) for m in MILESTONES]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=0.1)
    generator = torch.Generator().manual_seed(seed)
    step_losses: list[float] = []
    epoch_losses = []
    for _ in range(epochs):
        losses = train_epoch(
            model,
            optimizer,
            data.x_train,
            data.y_train,
            BATCH_SIZE,
            generator,
            after_step=scheduler.step if scheduler is not None else None,
        )
        step_losses += losses
        epoch_losses.append(float(np.mean(losses)))
    _, accuracy = evaluate(model, data.x_test, data.y_test)
    return SGDLRun(method, seed, np.array(step_losses), np.array(epoch_losses), accuracy)


@dataclass(frozen=True)
class SGDLCheck:
    runs: dict[str, list[SGDLRun]]

    def mean_accuracy(self, method: str) -> float:
        return float(np.mean([r.test_accuracy for r in self.runs[method]]))

    @property
    def stable(self) -> bool:
        return all(r.stable for r in self.runs["sgdl"])

    @property
    def comparable(self) -> bool:
        return self.mean_accuracy("sgdl") >= self.mean_accuracy("sgdm") - ACCURACY_MARGIN


def torch_equivalence(epochs: int = 30, seed: int = 0) -> float:
    """Largest difference between FusedSGDL's minibatch losses and torch.optim.SGD's with the same recipe
    (lr 1.0, weight decay 5e-3, x0.1 at the same steps): ~0 when the package does what the recipe says."""
    ours, theirs = train_cnn("sgdl", epochs, seed), train_cnn("torch_sgdl", epochs, seed)
    return float(np.max(np.abs(ours.step_losses - theirs.step_losses)))


def sgdl_check(epochs: int = 30, seeds: Sequence[int] = (0, 1, 2, 3, 4), methods: Sequence[str] = METHODS) -> SGDLCheck:
    return SGDLCheck({m: [train_cnn(m, epochs, s) for s in seeds] for m in methods})
