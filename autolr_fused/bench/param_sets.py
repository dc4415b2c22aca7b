"""The parameter sets optimizer steps are timed on (shared/spec/performance.md).

Each set is a list of shapes; tensors are created on demand so that a set costs
memory only while it is timed.
"""

from __future__ import annotations

import torch


def resnet50_shapes() -> list[tuple[int, ...]]:
    """The 161 parameter tensors of torchvision's ResNet-50 (25.6 M parameters), in model order."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    in_channels = 64
    for planes, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for block in range(blocks):
            shapes += [(planes, in_channels, 1, 1), (planes,), (planes,)]
            shapes += [(planes, planes, 3, 3), (planes,), (planes,)]
            shapes += [(planes * 4, planes, 1, 1), (planes * 4,), (planes * 4,)]
            if block == 0:  # the downsample projection
                shapes += [(planes * 4, in_channels, 1, 1), (planes * 4,), (planes * 4,)]
            in_channels = planes * 4
    return shapes + [(1000, 2048), (1000,)]


def transformer350m_shapes() -> list[tuple[int, ...]]:
    """24 layers of d_model 1024 (QKV, out, two MLP matrices, biases, two LayerNorms) + a 50k x 1024 embedding."""
    d = 1024
    layer = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    return [(50_000, d)] + layer * 24


def many_small_shapes(seed: int = 0) -> list[tuple[int, ...]]:
    """2,000 tensors of 1 to 4,096 elements (launch-overhead bound)."""
    g = torch.Generator().manual_seed(seed)
    return [(int(n),) for n in torch.randint(1, 4097, (2000,), generator=g)]


def tiny_shapes() -> list[tuple[int, ...]]:
    """A few odd shapes, for checking the benchmark command itself quickly."""
    return [(7,), (33, 17), (1031,), (4, 3, 5, 5)]


PARAM_SETS = {
    "resnet50": resnet50_shapes,
    "transformer350m": transformer350m_shapes,
    "many_small": many_small_shapes,
    "tiny": tiny_shapes,
}


def numel(shapes: list[tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes:
        n = 1
        for s in shape:
            n *= s
        total += n
    return total
