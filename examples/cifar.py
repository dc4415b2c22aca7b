"""Train ResNet-18/34 (CIFAR variant) or a WideResNet on CIFAR-10/100 with any autolr_fused method.

    python examples/cifar.py --data ~/cifar --dataset cifar10 --optimizer autodrop      # a local copy
    torchrun --nproc_per_node 2 examples/cifar.py --synthetic 512 --arch wrn --depth 16 --width 4
    python examples/cifar.py --synthetic 256 --device cpu --epochs 1                     # random data

``--data PATH`` reads a local copy with ``torchvision.datasets.CIFAR10``/``CIFAR100`` (``download=False``:
nothing is fetched); without it, ``--synthetic N`` generates N random 32x32 training images with random
labels (and N // 5 for evaluation), enough to exercise the whole pipeline. Augmentation is the papers'
standard one: 4-pixel padded random crops and horizontal flips, then per-channel normalisation.

Models: ``resnet18``/``resnet34`` are torchvision's ResNets with the CIFAR stem (a 3x3 stride-1 first
convolution, no max-pool); ``wrn`` is WRN-``--depth``-``--width`` (WRN-28-10 by default, ``--dropout``
0 as in AutoDrop's runs; the AALR paper's WRN-28-10 runs use 0.3 with Cutout).

Everything else (DDP, bf16 autocast, channels_last, checkpoints and ``--resume``, metrics.jsonl) is as
in ``imagenet.py``, shared through ``_common.py``.

Settings (``--optimizer``; ``--lr``, ``--momentum``, ``--weight-decay``, ``--batch-size``, ``--epochs``
override them). Papers are in ``shared/papers/``. "Cutout" is the code base (DeVries & Taylor 2017) that
the AALR paper (5.1) uses for ResNet-18 and WRN, and "Zhang/ZK" the ResNet and WRN setups (Zhang et al.
2019, Zagoruyko & Komodakis 2016) that AutoDrop's CIFAR runs follow (autodrop.txt C.2): momentum 0.9,
weight decay 5e-4, batch 128, lr 0.1 x0.2 at epochs 60, 120, 160 of 200.

=========  =======  ====  ======  =====  ======  ============================  ================================
method     lr       mom.  wd      batch  epochs  method's own                  where the numbers come from
=========  =======  ====  ======  =====  ======  ============================  ================================
sgd        0.1      0.9   5e-4    128    200     x0.2 at epochs 60, 120, 160   AutoDrop's CIFAR baselines
                                                                               (autodrop.txt Table 1: rho 0.2,
                                                                               200 epochs; C.2: Zhang/ZK)
sgdl       1.0      0     5e-3    256    150     x0.1 at epochs 50, 100        sgdl paper 6.1 and A.3.1
           (1.3 on                                                             (ResNet56: lr 1.0 on CIFAR-10,
           CIFAR-                                                              1.3 on CIFAR-100; batch 256;
           100)                                                                150 epochs, /10 at 50 and 100;
                                                                               Table 1: wd 0.005)
autodrop   0.1      0.9   5e-4    128    200     rho 0.2, min_lr 1e-4, theta0  autodrop.txt Table 1 (rho 0.2,
                                                 0.01 deg, theta max 1 deg,    200 epochs), Section 4 (min_lr,
                                                 n_d 20                        thetas, n_d), C.2 (Zhang/ZK);
                                                                               Table 2: lr 0.1
tlr,       0.1      0.8   5e-4    256    80      c 0.25, p 0.33 (window mode)  TLR paper App. D (80 epochs,
tlr-layer                                                                      momentum 0.8, wd 5e-4, p 1/3;
                                                                               batch 256 and lr 0.1 in the
                                                                               WRN-16-4 runs of Fig. 8 and 9)
rdbd       0.005    0     0       16     10      meta_lr 0.01, base SGD        rdbd.txt D.1 (CIFAR-10: batch
                                                                               16, alpha0 0.005, eta 0.01) and
                                                                               D.2 (Fig. 5: first 10 epochs)
rdbd-adam  0.001    -     0       16     10      base Adam, betas (0.05,       rdbd.txt D.1 (betas, eta); Adam's
                                                 0.99), meta_lr 5e-7, no lr    alpha0 and upper bound are not
                                                 upper bound                   given: 0.001, Adam's default and
                                                                               the sgdl paper's Adam lr (A.3.1)
sgdhd      0.1      0.8   5e-4    256    80      hypergrad_lr 1e-5             the TLR paper's SGD-HD comparison
                                                                               (Fig. 2: beta grid 1e-5..1e-3,
                                                                               1e-5 the steadiest) on its base
                                                                               setting (App. D)
aalr       0.1      0.9   5e-4    128    200     AALR patience 10 around       aalr.txt 5.1 (ResNet-18/WRN: 200
                                                 FusedSGD                      epochs, batch 128), Algorithm 1
                                                                               (eta0 0.1, momentum 0.9, patience
                                                                               10); wd 5e-4 from Cutout
=========  =======  ====  ======  =====  ======  ============================  ================================

The papers' CIFAR models: ResNet-18 and WRN-28-10 (AutoDrop CIFAR-10, AALR), ResNet-34 and WRN-40-10
(AutoDrop CIFAR-100), WRN-16-4 (TLR), ResNet56 (sgdl), a 3-layer CNN (RDBD).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

if str(Path(__file__).resolve().parent) not in sys.path:  # run from anywhere, or loaded by the tests
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import Setting  # noqa: E402

ARCHS = ("resnet18", "resnet34", "wrn")
_ZHANG = dict(momentum=0.9, weight_decay=5e-4, batch_size=128, epochs=200)
_TLR = dict(momentum=0.8, weight_decay=5e-4, batch_size=256, epochs=80)

SETTINGS: dict[str, Setting] = {
    "sgd": Setting(lr=0.1, milestones=(0.3, 0.6, 0.8), gamma=0.2, **_ZHANG),
    "sgdl": Setting(lr=1.0, weight_decay=5e-3, batch_size=256, epochs=150, milestones=(1 / 3, 2 / 3), gamma=0.1),
    "autodrop": Setting(
        lr=0.1, extra=dict(drop_factor=0.2, min_lr=1e-4, threshold=0.01, max_threshold=1.0, drop_delay=20), **_ZHANG
    ),
    "tlr": Setting(lr=0.1, extra=dict(bound=0.25, update_fraction=0.33), **_TLR),
    "rdbd": Setting(lr=0.005, batch_size=16, epochs=10, extra=dict(meta_lr=0.01)),
    "rdbd-adam": Setting(
        lr=0.001, batch_size=16, epochs=10, extra=dict(meta_lr=5e-7, betas=(0.05, 0.99), lr_bounds=(0.0, None))
    ),
    "sgdhd": Setting(lr=0.1, extra=dict(hypergrad_lr=1e-5), **_TLR),
    "aalr": Setting(lr=0.1, extra=dict(patience=10), **_ZHANG),
}
SETTINGS["tlr-layer"] = SETTINGS["tlr"]

# The sgdl paper's CIFAR-100 lr for ResNet56 (A.3.1); every other setting is the same on both datasets.
CIFAR100_OVERRIDES: dict[str, dict[str, Any]] = {"sgdl": {"lr": 1.3}}

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}


def setting_for(method: str, dataset: str) -> Setting:
    """The paper setting of ``method`` on ``dataset`` (before command-line overrides)."""
    setting = SETTINGS[method]
    if dataset == "cifar100":
        setting = dataclasses.replace(setting, **CIFAR100_OVERRIDES.get(method, {}))
    return setting


# ------------------------------------------------------------------------------------------------ models
def cifar_resnet(arch: str, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18/34 with the CIFAR stem: 3x3 stride-1 first convolution and no max-pool."""
    torchvision = _common.import_torchvision()
    model = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision inits
    model.maxpool = nn.Identity()
    return model


class WideBasic(nn.Module):
    """The pre-activation block of Wide Residual Networks (BN-ReLU-conv, twice, dropout in between)."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(x))
        # A projection shortcut takes the pre-activated input, as in Zagoruyko & Komodakis' code.
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(torch.relu(self.bn2(out))))
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis 2016) for 32x32 inputs; depth = 6n + 4."""

    def __init__(self, depth: int = 28, width: int = 10, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6 or depth < 10:
            raise ValueError(f"WideResNet depth must be 6n + 4 with n >= 1, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * width, 32 * width, 64 * width)
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        layers: list[nn.Module] = []
        in_planes = widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                layers.append(WideBasic(in_planes, planes, stride if i == 0 else 1, dropout))
                in_planes = planes
        self.blocks = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.blocks(self.conv1(x))
        out = torch.relu(self.bn(out))
        out = nn.functional.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    if args.arch == "wrn":
        return WideResNet(args.depth, args.width, num_classes, args.dropout)
    return cifar_resnet(args.arch, num_classes)


# -------------------------------------------------------------------------------------------------- data
class SyntheticCIFAR(Dataset):
    """``n`` random 32x32 RGB images with random labels, the same for a given seed; returns PIL images."""

    def __init__(self, n: int, num_classes: int, seed: int, transform: Any) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=generator)
        self.targets = torch.randint(0, num_classes, (n,), generator=generator).tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        from PIL import Image

        image = Image.fromarray(self.images[index].numpy())
        return self.transform(image), self.targets[index]


def build_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    """CIFAR train and test sets from ``--data`` (no download), or ``--synthetic`` random ones."""
    torchvision = _common.import_torchvision()
    transforms = torchvision.transforms
    normalize = transforms.Normalize(MEAN[args.dataset], STD[args.dataset])
    train_transform = transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            normalize,
        ]
    )
    test_transform = transforms.Compose([transforms.ToTensor(), normalize])
    num_classes = NUM_CLASSES[args.dataset]
    if args.data is not None:
        cls = torchvision.datasets.CIFAR10 if args.dataset == "cifar10" else torchvision.datasets.CIFAR100
        try:
            train = cls(str(args.data), train=True, transform=train_transform, download=False)
            test = cls(str(args.data), train=False, transform=test_transform, download=False)
        except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
            raise SystemExit(f"{args.data}: {error} (this script never downloads; use --synthetic N)") from error
        return train, test
    n = args.synthetic
    return (
        SyntheticCIFAR(n, num_classes, args.seed, train_transform),
        SyntheticCIFAR(max(n // 5, 1), num_classes, args.seed + 1, test_transform),
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=tuple(NUM_CLASSES), default="cifar10")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, default=None, help="a local CIFAR copy (torchvision layout)")
    source.add_argument(
        "--synthetic", type=int, default=None, metavar="N", help="N random images instead of CIFAR (default 1024)"
    )
    parser.add_argument("--arch", choices=ARCHS, default="resnet18")
    parser.add_argument("--depth", type=int, default=28, help="WRN depth, 6n + 4 (default 28)")
    parser.add_argument("--width", type=int, default=10, help="WRN widening factor (default 10)")
    parser.add_argument("--dropout", type=float, default=0.0, help="WRN dropout (default 0)")
    _common.add_common_arguments(parser, default_log_every=50)
    args = parser.parse_args(argv)
    if args.data is None and args.synthetic is None:
        args.synthetic = 1024
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = _common.setup_distributed(args.device)
    try:
        setting = _common.resolve_setting(args, setting_for(args.optimizer, args.dataset))
        train_set, test_set = build_datasets(args)
        num_classes = NUM_CLASSES[args.dataset]
        _common.seed_everything(args.seed)  # the same initial weights on every rank
        model = build_model(args, num_classes)
        checkpoint = None
        if args.resume is not None:
            checkpoint = _common.load_checkpoint(args.resume, torch.device("cpu"))
            model.load_state_dict(checkpoint["model"])
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        model = model.to(env.device, memory_format=memory_format)
        arch = f"WRN-{args.depth}-{args.width}" if args.arch == "wrn" else f"{args.arch} (CIFAR stem)"
        data = f"{args.dataset} from {args.data}" if args.data else f"{args.synthetic} synthetic images"
        _common.run_training(
            args,
            script="cifar",
            env=env,
            model=model,
            train_set=train_set,
            val_set=test_set,
            num_classes=num_classes,
            setting=setting,
            describe=f"{arch}, {data}",
            checkpoint=checkpoint,
        )
    finally:
        _common.cleanup_distributed()


if __name__ == "__main__":
    main()
