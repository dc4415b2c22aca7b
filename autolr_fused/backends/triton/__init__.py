"""The ``triton`` backend: the five primitives of ``primitives.py`` as multi-tensor Triton kernels.

One launch of one kernel (``kernels.py``) per call and dtype combination covers
every tensor, with deterministic two-pass statistics (per-block partials, then
a per-tensor sum in block order). The ops are registered with ``torch.library``
as ``autolr_fused_triton::<primitive>`` with the extension's schemas
(``_launch.py``), and the primitives are ``_ops.py``'s wrappers calling them:
calls with other dtypes than float32, bfloat16 and float16 (float64), and calls
without tensors, run on the reference code, as in the cpu backend.

The kernels run on CUDA tensors, or on CPU tensors when Triton interprets them
(``TRITON_INTERPRET=1`` set before the kernels are first used; slow, for
tests; ``_launch.py`` says why nothing of Triton is imported before). Under the
interpreter CUDA tensors are refused: the kernels read tensor addresses from a
table, which the interpreter would dereference as host memory. Without Triton
the package imports as usual and this backend is unavailable.
"""

from __future__ import annotations

import functools

import torch

from autolr_fused.backends import _ops
from autolr_fused.backends.triton import _launch  # registers torch.ops.autolr_fused_triton.*; imports no Triton

__all__ = ["adam_reduce", "adam_step", "available", "boundary_pass", "sgd_reduce", "sgd_step", "supports"]

_OPS = torch.ops.autolr_fused_triton
sgd_step = functools.partial(_ops.sgd_step, ops=_OPS)
sgd_reduce = functools.partial(_ops.sgd_reduce, ops=_OPS)
boundary_pass = functools.partial(_ops.boundary_pass, ops=_OPS)
adam_step = functools.partial(_ops.adam_step, ops=_OPS)
adam_reduce = functools.partial(_ops.adam_reduce, ops=_OPS)


def available() -> bool:
    """Triton is installed, and the kernels are interpreted or there is a GPU to compile them for."""
    if not _launch.installed():
        return False
    return _launch.loadable() if _launch.interpreted() else torch.cuda.is_available()


def supports(device: torch.device | str) -> bool:
    """CUDA devices for compiled kernels; CPU tensors under the interpreter."""
    return available() and torch.device(device).type == ("cpu" if _launch.interpreted() else "cuda")
