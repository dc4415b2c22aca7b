"""The ``cuda`` backend: the C++/CUDA extension's multi-tensor kernels (``csrc/cuda``) for CUDA tensors."""

from __future__ import annotations

import torch

from autolr_fused.backends import _ops
from autolr_fused.backends._ops import adam_reduce, adam_step, boundary_pass, sgd_reduce, sgd_step

__all__ = ["adam_reduce", "adam_step", "available", "boundary_pass", "sgd_reduce", "sgd_step", "supports"]


def available() -> bool:
    return torch.cuda.is_available() and _ops.has_kernel("cuda")


def supports(device: torch.device) -> bool:
    return device.type == "cuda"
