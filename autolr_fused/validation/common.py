"""Data, models and training loops shared by the validation experiments.

Everything runs on the CPU in seconds to minutes: the data set is scikit-learn's bundled 8x8 digits
(1437 training / 360 test images after the demo's seeded 80/20 split; nothing is downloaded), loaded
through the demo's :func:`autolr_fused.demo.run.load_digits`, and the batch-normalised CNN is the demo's
:class:`autolr_fused.demo.run.SmallCNN`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from autolr_fused.demo.run import SmallCNN, load_digits

# One fixed train/test split for every experiment: seeds vary the initial weights and the batch order,
# so that differences between seeds are optimizer noise, not a different data set.
DATA_SEED = 0


@dataclass(frozen=True)
class Digits:
    """The digits split: images (N, 1, 8, 8), standardised with the training mean and std."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def flat(self) -> Digits:
        """The same split with each image flattened to 64 inputs (for MLPs)."""
        return Digits(self.x_train.flatten(1), self.y_train, self.x_test.flatten(1), self.y_test)


_DIGITS: dict[int, Digits] = {}


def digits(data_seed: int = DATA_SEED) -> Digits:
    """The demo's digits split (cached: loading is the slowest part of the short test runs)."""
    if data_seed not in _DIGITS:
        _DIGITS[data_seed] = Digits(*load_digits(data_seed, torch.device("cpu")))
    return _DIGITS[data_seed]


def mlp(widths: Sequence[int], seed: int) -> nn.Sequential:
    """A ReLU MLP with layer widths ``widths`` (input first, classes last), seeded PyTorch init."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def small_cnn(seed: int) -> SmallCNN:
    """The demo's batch-normalised CNN (~7k parameters), seeded."""
    torch.manual_seed(seed)
    return SmallCNN()


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    after_step: Callable[[], None] | None = None,
) -> list[float]:
    """One shuffled pass over (x, y) (last batch partial); returns each minibatch's loss before its step."""
    model.train()
    order = torch.randperm(len(x), generator=generator)
    losses = []
    for i in range(steps_per_epoch(len(x), batch_size)):
        idx = order[i * batch_size : (i + 1) * batch_size]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if after_step is not None:
            after_step()
    return torch.stack(losses).tolist()


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) of ``model`` on (x, y) in eval mode; the loss may be inf or NaN."""
    model.eval()
    logits = model(x)
    loss = F.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(1) == y).double().mean().item()
    model.train()
    return loss, accuracy


def finite_or_nan(value: float) -> float:
    return value if math.isfinite(value) else math.nan


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one CPU thread: these models are too small to gain from more, and on a shared
    machine intra-op threads that wait for busy cores made a CNN step 6x slower (25 ms -> 164 ms)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
