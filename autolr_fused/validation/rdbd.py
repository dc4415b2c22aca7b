"""Regrettable Delta-Bar-Delta (paper: rdbd.txt, Section 5 and Appendix D) with :class:`autolr_fused.FusedRDBD`.

Section 5.1 (Figure 2): RDBD "plays a pivotal role in significantly accelerating the convergence speed
of both SGD and Adam", judged on the training loss "within the first 3750 steps for the MNIST data set".
Section 5.2 (Figure 3): against plain delta-bar-delta (DBD), RDBD "significantly suppresses inaccurate
learning rate updates ... enables a more pronounced descent".

Appendix D.1's settings: a "3-layer linear network with the ReLU activation" on MNIST, batch size 16,
alpha_0 = 0.005, eta = 0.01; Adam+RDBD with betas (0.05, 0.99) and eta = 5e-7 and "an upper bound for
alpha_t" whose value the paper does not give.

Protocol, scaled to the 8x8 digits: MLP 64-256-128-10 (three linear layers, ReLU); batch size 16
(90 steps per epoch); the first 3750 steps, as on MNIST. Compared, from the same initial weights and on
the same batches for each seed:

* ``sgd``: torch.optim.SGD(lr=0.005);  ``dbd``: FusedRDBD(regret=False);  ``rdbd``: FusedRDBD();
* ``adam``: torch.optim.Adam(lr=0.005, betas=(0.05, 0.99)) (Appendix D.1's lr and Adam betas);
  ``rdbd_adam``: FusedRDBD(base="adam", lr=0.005, betas=(0.05, 0.99), meta_lr=5e-7), unbounded (the
  package default), and ``rdbd_adam_bounded``: the same with ``lr_bounds=(0, 0.05)``, a bound fixed at
  10 x alpha_0 before measuring since the paper gives none.

The measure is the mean minibatch training loss over the first ``steps`` steps (the area under the
paper's early-training curves). "Below, averaged over several seeds" is read as: the mean over seeds
of the paired difference (other - RDBD) is positive and at least 2 standard errors of that mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

import autolr_fused as alr
from autolr_fused.validation.common import digits, mlp, train_epoch

WIDTHS = (64, 256, 128, 10)
BATCH_SIZE = 16
LR, META_LR = 0.005, 0.01
ADAM_BETAS, ADAM_META_LR = (0.05, 0.99), 5e-7
ADAM_LR_BOUND = 10 * LR
MIN_T = 2.0  # paired difference >= 2 standard errors

Builder = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]

METHODS: dict[str, Builder] = {
    "sgd": lambda p: torch.optim.SGD(p, lr=LR),
    "dbd": lambda p: alr.FusedRDBD(p, lr=LR, meta_lr=META_LR, regret=False),
    "rdbd": lambda p: alr.FusedRDBD(p, lr=LR, meta_lr=META_LR),
    "adam": lambda p: torch.optim.Adam(p, lr=LR, betas=ADAM_BETAS),
    "rdbd_adam": lambda p: alr.FusedRDBD(p, lr=LR, meta_lr=ADAM_META_LR, base="adam", betas=ADAM_BETAS),
    "rdbd_adam_bounded": lambda p: alr.FusedRDBD(
        p, lr=LR, meta_lr=ADAM_META_LR, base="adam", betas=ADAM_BETAS, lr_bounds=(0.0, ADAM_LR_BOUND)
    ),
}

# (RDBD variant, the method it should beat)
COMPARISONS = (("rdbd", "sgd"), ("rdbd", "dbd"), ("rdbd_adam", "adam"), ("rdbd_adam_bounded", "adam"))


@dataclass(frozen=True)
class EarlyRun:
    method: str
    seed: int
    losses: np.ndarray  # minibatch loss of each step (before its update)
    lrs: np.ndarray  # mean lr over tensors after each step
    lr_max: np.ndarray  # largest per-tensor lr after each step

    @property
    def mean_loss(self) -> float:
        return float(np.mean(self.losses)) if np.all(np.isfinite(self.losses)) else math.inf


def _lr_stats(optimizer: torch.optim.Optimizer) -> tuple[float, float]:
    """(mean, max) lr over tensors: FusedRDBD.stats() for the per-tensor lrs, the group lr otherwise."""
    if hasattr(optimizer, "stats"):
        stats = optimizer.stats()
        return float(stats["lr"]), float(stats["lr_max"])
    lr = float(optimizer.param_groups[0]["lr"])
    return lr, lr


def early_training(method: str, steps: int = 3750, seed: int = 0) -> EarlyRun:
    """The first ``steps`` minibatch losses of one method (Appendix D.1 settings)."""
    data = digits().flat()
    model = mlp(WIDTHS, seed)
    optimizer = METHODS[method](list(model.parameters()))
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    lrs: list[tuple[float, float]] = []

    def record() -> None:
        lrs.append(_lr_stats(optimizer))

    while len(losses) < steps:
        losses += train_epoch(model, optimizer, data.x_train, data.y_train, BATCH_SIZE, generator, record)
    mean_lr, max_lr = (np.array(c[:steps]) for c in zip(*lrs))
    return EarlyRun(method, seed, np.array(losses[:steps]), mean_lr, max_lr)


@dataclass(frozen=True)
class PairedComparison:
    better: str  # the RDBD variant
    other: str
    differences: np.ndarray  # per seed: other's mean loss - RDBD's

    @property
    def mean(self) -> float:
        return float(self.differences.mean())

    @property
    def se(self) -> float:
        n = len(self.differences)
        return float(self.differences.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf

    @property
    def t(self) -> float:
        if not np.all(np.isfinite(self.differences)):
            return -math.inf if np.any(self.differences == -math.inf) else math.inf
        return self.mean / self.se if self.se > 0 else math.copysign(math.inf, self.mean)

    @property
    def reproduced(self) -> bool:
        return self.mean > 0 and self.t >= MIN_T


def compare(runs: dict[str, list[EarlyRun]], better: str, other: str) -> PairedComparison:
    diffs = [o.mean_loss - b.mean_loss for b, o in zip(runs[better], runs[other])]
    return PairedComparison(better, other, np.array(diffs))


def early_loss_check(
    methods: Sequence[str] = tuple(METHODS), steps: int = 3750, seeds: Sequence[int] = (0, 1, 2, 3, 4)
) -> dict[str, list[EarlyRun]]:
    """Every method on every seed; feed the result to :func:`compare`."""
    return {m: [early_training(m, steps, s) for s in seeds] for m in methods}
