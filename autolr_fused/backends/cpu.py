"""The ``cpu`` backend: the C++ extension's OpenMP kernels (``csrc/cpu``) for CPU tensors."""

from __future__ import annotations

import torch

from autolr_fused.backends import _ops
from autolr_fused.backends._ops import adam_reduce, adam_step, boundary_pass, sgd_reduce, sgd_step

__all__ = ["adam_reduce", "adam_step", "available", "boundary_pass", "sgd_reduce", "sgd_step", "supports"]


def available() -> bool:
    return _ops.has_kernel("cpu")


def supports(device: torch.device) -> bool:
    return device.type == "cpu"
