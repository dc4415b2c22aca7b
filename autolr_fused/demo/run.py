"""Train a small CNN on scikit-learn's 8x8 digits with every method and compare them.

The dataset ships inside scikit-learn, so nothing is downloaded. Each method
trains the same network from the same initial weights on the same batches; the
command prints a table (final training loss, test accuracy, wall time, final and
peak lr) and writes PNG figures of the loss curves, the lr trajectories and
AutoDrop's angle per epoch.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

import autolr_fused as alr


def load_digits(seed: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Digits as (N, 1, 8, 8) float tensors scaled to [0, 1], split 80/20 with a seeded shuffle."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    mean, std = x[:split].mean(), x[:split].std()
    x = (x - mean) / std
    return tuple(t.to(device) for t in (x[:split], y[:split], x[split:], y[split:]))


class SmallCNN(nn.Module):
    """Two batch-normalised conv layers and a linear classifier (~7k parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


@dataclass
class Method:
    """How to build one method's optimizer (and AALR controller) for a model."""

    label: str
    build: Callable[[nn.Module, int, int], torch.optim.Optimizer]  # (model, steps/epoch, epochs)
    scheduler: Callable[[torch.optim.Optimizer, int, int], object] | None = None
    aalr: dict | None = None


def methods() -> dict[str, Method]:
    """The compared methods; settings from each paper where it gives them, scaled to a short run."""
    return {
        "sgd-multistep": Method(
            "SGD momentum + multistep (hand-tuned)",
            lambda m, spe, ep: torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4),
            scheduler=lambda o, spe, ep: torch.optim.lr_scheduler.MultiStepLR(
                o, milestones=[int(0.5 * ep * spe), int(0.75 * ep * spe)], gamma=0.1
            ),
        ),
        "adam": Method("Adam", lambda m, spe, ep: torch.optim.Adam(m.parameters(), lr=1e-3)),
        "sgdl": Method(
            "FusedSGDL (lr 1.0, wd 5e-3)",
            lambda m, spe, ep: alr.FusedSGDL(m.parameters(), total_steps=spe * ep),
        ),
        "autodrop": Method(
            "FusedAutoDropSGD",
            lambda m, spe, ep: alr.FusedAutoDropSGD(
                m.parameters(),
                lr=0.05,
                momentum=0.9,
                weight_decay=5e-4,
                steps_per_epoch=spe,
                threshold=1.0,
                max_threshold=5.0,
                drop_delay=2,
            ),
        ),
        "tlr": Method(
            "FusedTLR (global, window)",
            lambda m, spe, ep: alr.FusedTLR(
                m.parameters(), lr=0.01, momentum=0.8, weight_decay=5e-4, steps_per_epoch=spe
            ),
        ),
        "tlr-layer": Method(
            "FusedTLR (per layer, window)",
            lambda m, spe, ep: alr.FusedTLR(
                m.parameters(), lr=0.01, momentum=0.8, weight_decay=5e-4, steps_per_epoch=spe, per_layer=True
            ),
        ),
        "rdbd": Method(
            "FusedRDBD (SGD base)", lambda m, spe, ep: alr.FusedRDBD(m.parameters(), lr=0.005, meta_lr=0.01)
        ),
        "rdbd-adam": Method(
            "FusedRDBD (Adam base)",
            lambda m, spe, ep: alr.FusedRDBD(m.parameters(), lr=1e-3, meta_lr=5e-7, base="adam", betas=(0.05, 0.99)),
        ),
        "sgdhd": Method(
            "FusedSGDHD",
            lambda m, spe, ep: alr.FusedSGDHD(m.parameters(), lr=0.01, momentum=0.9, hypergrad_lr=1e-3),
        ),
        "aalr": Method(
            "AALR (SGD momentum)",
            lambda m, spe, ep: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
            aalr=dict(initial_lr=0.1, patience=3),
        ),
    }


@dataclass
class Result:
    label: str
    step_loss: list[float] = field(default_factory=list)
    epoch_loss: list[float] = field(default_factory=list)
    epoch_lr: list[float] = field(default_factory=list)
    angles: list[float] = field(default_factory=list)
    test_accuracy: float = math.nan
    seconds: float = 0.0


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    if hasattr(optimizer, "stats"):
        return float(optimizer.stats()["lr"])
    return float(optimizer.param_groups[0]["lr"])


def train(method: Method, data: tuple, epochs: int, batch_size: int, seed: int, progress) -> Result:
    x_train, y_train, x_test, y_test = data
    device = x_train.device
    torch.manual_seed(seed)
    model = SmallCNN().to(device)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    optimizer = method.build(model, steps_per_epoch, epochs)
    scheduler = method.scheduler(optimizer, steps_per_epoch, epochs) if method.scheduler else None
    controller = alr.AALR(model, optimizer, **method.aalr) if method.aalr else None
    batches = torch.Generator().manual_seed(seed)
    result = Result(method.label)
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=batches).to(device)
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * batch_size : (i + 1) * batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(loss.detach())
            progress.update(1)
        epoch_losses = torch.stack(losses).tolist()
        result.step_loss += epoch_losses
        result.epoch_loss.append(sum(epoch_losses) / len(epoch_losses))
        if controller is not None:
            controller.epoch_end(result.epoch_loss[-1])
        result.epoch_lr.append(current_lr(optimizer))
        if isinstance(optimizer, alr.FusedAutoDropSGD):
            result.angles.append(optimizer.stats()["angle"])
    result.seconds = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        result.test_accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    return result


def table(results: list[Result]) -> str:
    header = f"{'method':40s} {'train loss':>10s} {'test acc':>9s} {'time s':>7s} {'final lr':>10s} {'peak lr':>10s}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.label:40s} {r.epoch_loss[-1]:10.4f} {100 * r.test_accuracy:8.1f}% {r.seconds:7.1f} "
            f"{r.epoch_lr[-1]:10.3g} {max(r.epoch_lr):10.3g}"
        )
    return "\n".join(lines)


def plot(results: list[Result], out: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        window = 10
        smooth = [
            sum(r.step_loss[max(0, i - window + 1) : i + 1]) / min(window, i + 1) for i in range(len(r.step_loss))
        ]
        ax.plot(smooth, label=r.label, lw=1.2)
    ax.set(xlabel="step", ylabel="training loss (10-step mean)", yscale="log", title="Training loss")
    ax.legend(fontsize=7)
    paths.append(os.path.join(out, "loss.png"))
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        ax.plot(range(1, len(r.epoch_lr) + 1), r.epoch_lr, marker=".", label=r.label, lw=1.2)
    ax.set(
        xlabel="epoch", ylabel="learning rate (end of epoch; mean over tensors)", yscale="log", title="Learning rates"
    )
    ax.legend(fontsize=7)
    paths.append(os.path.join(out, "lr.png"))
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close(fig)

    for r in results:
        if r.angles:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.plot(range(1, len(r.angles) + 1), r.angles, marker="o")
            ax.set(
                xlabel="epoch", ylabel="angle between epoch displacements (degrees)", title="AutoDrop angular velocity"
            )
            paths.append(os.path.join(out, "autodrop_angle.png"))
            fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
            plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> int:
    available = methods()
    parser = argparse.ArgumentParser(prog="python -m autolr_fused demo", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="all", help=f"comma-separated subset of: {', '.join(available)}")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="demo_output", help="folder for the PNG figures")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    names = list(available) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(available)}")
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")
    from tqdm.auto import tqdm

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    device = torch.device(args.device)
    data = load_digits(args.seed, device)
    steps = math.ceil(len(data[0]) / args.batch_size) * args.epochs
    results = []
    with tqdm(total=steps * len(names), unit="step", desc="training") as progress:
        for name in names:
            progress.set_postfix_str(name)
            results.append(train(available[name], data, args.epochs, args.batch_size, args.seed, progress))
    print()
    print(f"8x8 digits ({len(data[0])} train / {len(data[2])} test), {args.epochs} epochs, seed {args.seed}, {device}")
    print(table(results))
    if not args.no_plots:
        os.makedirs(args.out, exist_ok=True)
        for path in plot(results, args.out):
            print(f"wrote {path}")
    return 0
