"""Train a torchvision ResNet on ImageNet with any autolr_fused method (single process or torchrun DDP).

    torchrun --nproc_per_node 8 examples/imagenet.py --data /data/imagenet --optimizer autodrop
    python examples/imagenet.py --data /data/imagenet --optimizer tlr --device cpu   # one process

``--data`` holds ``train/`` and ``val/`` in torchvision ``ImageFolder`` layout (one folder per class).
Training uses RandomResizedCrop(``--image-size``, 224 by default), horizontal flips and ImageNet
normalisation; validation resizes to 256/224 of the image size and centre-crops. DDP uses NCCL on CUDA
and Gloo on CPU; ``--batch-size`` is the global batch, split over the processes. bf16 autocast is on by
default on CUDA (``--amp/--no-amp``), channels_last on by default (``--no-channels-last``).

Every epoch writes ``OUT/checkpoint.pt`` (model, optimizer state_dict, epoch scheduler, AALR state, epoch,
step, every rank's RNG state; ``--keep-checkpoints`` also keeps ``checkpoint-epochN.pt``) and ``--resume
CHECKPOINT`` continues exactly where it stopped, given the same number of processes. Rank 0 prints and
appends to ``OUT/metrics.jsonl`` a ``"kind": "step"`` record every ``--log-every`` steps (loss and
``optimizer.stats()``: lr, AutoDrop's angle, TLR's factor, ...) and a ``"kind": "epoch"`` record per epoch
(train loss/accuracy, validation loss/top-1/top-5, stats); ``lr_per_rank`` holds the lr each rank has.

Settings (``--optimizer``; ``--lr``, ``--momentum``, ``--weight-decay``, ``--batch-size``, ``--epochs``
override them). Papers are in ``shared/papers/``; "He" is He et al. 2016 (the ResNet paper), whose
ImageNet recipe (batch 256, lr 0.1, momentum 0.9, weight decay 1e-4) AutoDrop's ImageNet runs follow
(autodrop.txt, C.2) and which fills in what a paper does not give for ImageNet:

=========  =====  ====  ======  =====  ======  ===============================  ============================
method     lr     mom.  wd      batch  epochs  method's own                     where the numbers come from
=========  =====  ====  ======  =====  ======  ===============================  ============================
sgd        0.1    0.9   1e-4    256    105     x0.1 at epochs 30, 60, 90        AutoDrop's ImageNet baseline
                                                                                (autodrop.txt Table 1: rho
                                                                                0.1, 105 epochs; C.2: He);
                                                                                the drop epochs are the
                                                                                usual fixed reading of He's
                                                                                "divide by 10 on plateaus"
sgdl       1.1    0     5e-3    256    120     x0.1 at 1/4, 1/2, 3/4 (every 30  sgdl paper, ImageNet32
                                               epochs)                          (6.2: 120 epochs, /10 every
                                                                                30; A.3.1: lr 1.1; Table 1:
                                                                                wd 0.005; 6.1: batch 256)
autodrop   0.1    0.9   1e-4    256    105     rho 0.1, min_lr 1e-4, theta0     autodrop.txt Table 1
                                               0.01 deg, theta max 1 deg, n_d   (ResNet-18 ImageNet: rho 0.1,
                                               20                               105 epochs), Section 4
                                                                                (min_lr, thetas, n_d), C.2
                                                                                (He: lr, momentum, wd, batch)
tlr,       0.1    0.8   5e-4    96     80      c 0.25, p 0.33 (window mode,     TLR paper Section 5
tlr-layer                                      steps_per_epoch from the         (ResNet50 ImageNet: batch 96,
                                               loader); tlr-layer per tensor    80 epochs), App. D (momentum
                                                                                0.8, wd 5e-4, p 1/3); no
                                                                                ImageNet lr given: 0.1, its
                                                                                CIFAR runs' (App. D, Fig. 8)
rdbd       0.005  0     0       256    90      meta_lr 0.01, base SGD           rdbd.txt D.1 (alpha0 0.005,
                                                                                eta 0.01; its runs are MNIST
                                                                                and CIFAR-10 only, batch 16);
                                                                                batch, epochs: He's
rdbd-adam  0.001  -     0       256    90      base Adam, betas (0.05, 0.99),   rdbd.txt D.1 (betas, eta); its
                                               meta_lr 5e-7, no lr upper bound  Adam alpha0 and upper bound
                                                                                are not given: 0.001 is
                                                                                Adam's default (and the sgdl
                                                                                paper's ImageNet Adam lr, A.3.1)
sgdhd      0.1    0.9   1e-4    256    90      hypergrad_lr 1e-5                no ImageNet run in any paper
                                                                                here: He's base; beta 1e-5,
                                                                                the steadiest of the grid the
                                                                                TLR paper compares (Fig. 2)
aalr       0.1    0.9   1e-4    256    90      AALR patience 10 around          aalr.txt Algorithm 1 (eta0
                                               FusedSGD                         0.1, momentum 0.9, patience
                                                                                10); no ImageNet run: wd,
                                                                                batch, epochs He's
=========  =====  ====  ======  =====  ======  ===============================  ============================

The architecture defaults to ResNet-50 (``--arch``, any torchvision ResNet); the papers' ImageNet runs use
ResNet-18 (AutoDrop), ResNet-50 (TLR) and ResNet56-x4 on 32x32 ImageNet32 (sgdl).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

if str(Path(__file__).resolve().parent) not in sys.path:  # run from anywhere, or loaded by the tests
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402
from _common import Setting  # noqa: E402

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_HE = dict(momentum=0.9, weight_decay=1e-4, batch_size=256)

SETTINGS: dict[str, Setting] = {
    "sgd": Setting(lr=0.1, epochs=105, milestones=(30 / 105, 60 / 105, 90 / 105), gamma=0.1, **_HE),
    "sgdl": Setting(lr=1.1, momentum=0.0, weight_decay=5e-3, batch_size=256, epochs=120, milestones=(0.25, 0.5, 0.75)),
    "autodrop": Setting(
        lr=0.1,
        epochs=105,
        extra=dict(drop_factor=0.1, min_lr=1e-4, threshold=0.01, max_threshold=1.0, drop_delay=20),
        **_HE,
    ),
    "tlr": Setting(
        lr=0.1, momentum=0.8, weight_decay=5e-4, batch_size=96, epochs=80, extra=dict(bound=0.25, update_fraction=0.33)
    ),
    "rdbd": Setting(lr=0.005, momentum=0.0, weight_decay=0.0, batch_size=256, epochs=90, extra=dict(meta_lr=0.01)),
    "rdbd-adam": Setting(
        lr=0.001,
        weight_decay=0.0,
        batch_size=256,
        epochs=90,
        extra=dict(meta_lr=5e-7, betas=(0.05, 0.99), lr_bounds=(0.0, None)),
    ),
    "sgdhd": Setting(lr=0.1, epochs=90, extra=dict(hypergrad_lr=1e-5), **_HE),
    "aalr": Setting(lr=0.1, epochs=90, extra=dict(patience=10), **_HE),
}
SETTINGS["tlr-layer"] = SETTINGS["tlr"]

# torchvision's ImageNet normalisation.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder holding train/ and val/ (ImageFolder)")
    parser.add_argument("--arch", choices=ARCHS, default="resnet50", help="torchvision ResNet (default resnet50)")
    parser.add_argument(
        "--image-size", type=int, default=224, help="training crop; validation resizes to 256/224 of it (224)"
    )
    _common.add_common_arguments(parser, default_log_every=100)
    return parser.parse_args(argv)


def build_datasets(data: Path, image_size: int) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """ImageFolder train and val sets with the standard ImageNet augmentation and evaluation transforms."""
    torchvision = _common.import_torchvision()
    transforms = torchvision.transforms
    normalize = transforms.Normalize(MEAN, STD)
    train = torchvision.datasets.ImageFolder(
        str(data / "train"),
        transforms.Compose(
            [
                transforms.RandomResizedCrop(image_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        ),
    )
    val = torchvision.datasets.ImageFolder(
        str(data / "val"),
        transforms.Compose(
            [
                transforms.Resize(round(image_size * 256 / 224)),
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                normalize,
            ]
        ),
    )
    if val.classes != train.classes:
        raise SystemExit(f"{data}/train and {data}/val hold different classes")
    return train, val


def build_model(arch: str, num_classes: int) -> nn.Module:
    """A freshly initialised torchvision ResNet (no pretrained weights: nothing is downloaded)."""
    torchvision = _common.import_torchvision()
    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = _common.setup_distributed(args.device)
    try:
        setting = _common.resolve_setting(args, SETTINGS[args.optimizer])
        train_set, val_set = build_datasets(args.data, args.image_size)
        num_classes = len(train_set.classes)
        _common.seed_everything(args.seed)  # the same initial weights on every rank
        model = build_model(args.arch, num_classes)
        checkpoint = None
        if args.resume is not None:
            checkpoint = _common.load_checkpoint(args.resume, torch.device("cpu"))
            model.load_state_dict(checkpoint["model"])
        memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
        model = model.to(env.device, memory_format=memory_format)
        _common.run_training(
            args,
            script="imagenet",
            env=env,
            model=model,
            train_set=train_set,
            val_set=val_set,
            num_classes=num_classes,
            setting=setting,
            describe=f"{args.arch}, {len(train_set)} training images in {num_classes} classes",
            checkpoint=checkpoint,
        )
    finally:
        _common.cleanup_distributed()


if __name__ == "__main__":
    main()
