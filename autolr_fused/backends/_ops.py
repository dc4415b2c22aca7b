"""The fused ops' Python side, shared by the cpu, cuda and triton backends.

``csrc/bindings.cpp`` declares the op schemas once (``torch.ops.autolr_fused``);
``csrc/cpu`` and ``csrc/cuda`` register their implementations under the same
names, and the triton backend registers the same schemas under
``torch.ops.autolr_fused_triton``. This module loads the extension, registers
fake kernels for a namespace so that ``torch.compile`` traces its ops (their
outputs' shapes are known from the inputs), and turns the primitives' Python
arguments (``primitives.py``) into the ops' flat arguments: every wrapper takes
``ops=``, the namespace to call (the extension's by default).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from autolr_fused.backends import reference
from autolr_fused.backends.primitives import DIRECTION, REGULARIZED, Boundary
from autolr_fused.directions import AdamConfig, SGDConfig

try:
    from autolr_fused import _C  # noqa: F401  (registers torch.ops.autolr_fused)

    LOADED = True
except ImportError:  # built without the extension (AUTOLR_FUSED_NO_EXT=1, no compiler, no torch at build)
    LOADED = False

_STORE = {None: 0, REGULARIZED: 1, DIRECTION: 2}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _kernels_take(params: Sequence[Tensor]) -> bool:
    """The kernels take float32, bfloat16 and float16; a call with other dtypes (float64) runs on reference.

    So does a call without tensors: the dispatcher has no device to choose a kernel by.
    """
    return bool(params) and set(map(_DTYPE, params)) <= _KERNEL_DTYPE_SET


_DTYPE = operator.attrgetter("dtype")
_KERNEL_DTYPE_SET = frozenset(KERNEL_DTYPES)


def _momentum_vanishes(cfg: SGDConfig) -> bool:
    """A momentum that is not 0 but rounds to 0 in float32, the kernels' precision (at most 2**-150).

    The kernels would take the no-momentum branch (d = r), where torch.optim.SGD keeps a buffer and
    applies (1 - dampening); such a call runs on the reference code instead.
    """
    return 0 < cfg.momentum <= 2.0**-150


def has_kernel(device_type: str) -> bool:
    """Whether the extension has kernels for ``device_type`` ("cpu" or "cuda")."""
    if not LOADED:
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("autolr_fused::sgd_step", key)


def _stats_like(params: Sequence[Tensor], columns: int) -> Tensor:
    device = params[0].device if params else torch.device("cpu")
    return torch.empty((len(params), columns), dtype=torch.float32, device=device)


def register_fakes(namespace: str, lib: torch.library.Library | None = None) -> None:
    """Fake kernels for the five ops of ``namespace`` (their outputs' shapes follow from the inputs)."""

    @torch.library.register_fake(f"{namespace}::sgd_step", lib=lib)
    def _(params, grads, buffers, lr, lr_value, momentum, dampening, weight_decay, nesterov, maximize,
          first_step, prevs, store, regret, snapshots, prev_displacements, scale, accumulators,
          accumulate_weight, grad_scale):  # fmt: skip
        return _stats_like(params, 3) if snapshots else _stats_like([], 3)

    @torch.library.register_fake(f"{namespace}::sgd_reduce", lib=lib)
    def _(params, grads, buffers, prevs, momentum, dampening, weight_decay, nesterov, maximize, first_step,
          of_direction, grad_scale):  # fmt: skip
        return _stats_like(params, 2)

    @torch.library.register_fake(f"{namespace}::boundary_pass", lib=lib)
    def _(params, snapshots, prev_displacements, scale, accumulators, accumulate_weight):
        return _stats_like(params, 3)

    @torch.library.register_fake(f"{namespace}::adam_step", lib=lib)
    def _(params, grads, exp_avgs, exp_avg_sqs, lr, lr_value, beta1, beta2, eps, weight_decay,
          decoupled_weight_decay, maximize, bias_correction1, bias_correction2_sqrt, prevs, regret,
          grad_scale):  # fmt: skip
        return None

    @torch.library.register_fake(f"{namespace}::adam_reduce", lib=lib)
    def _(params, grads, exp_avgs, exp_avg_sqs, prevs, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
          maximize, bias_correction1, bias_correction2_sqrt, grad_scale):  # fmt: skip
        return _stats_like(params, 2)


if LOADED:
    register_fakes("autolr_fused")

# The extension's namespace, the wrappers' default ``ops=`` (looked up lazily: it may not be loaded).
EXTENSION_OPS: Any = torch.ops.autolr_fused


def _lr_args(lr: float | Tensor) -> tuple[Tensor | None, float]:
    return (lr, 0.0) if isinstance(lr, Tensor) else (None, float(lr))


def _bias_corrections(cfg: AdamConfig, step: int) -> tuple[float, float]:
    return 1 - cfg.beta1**step, (1 - cfg.beta2**step) ** 0.5


def sgd_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Sequence[Tensor],
    lr: float | Tensor,
    cfg: SGDConfig,
    *,
    first_step: bool = False,
    prevs: Sequence[Tensor] | None = None,
    store: str | None = None,
    regret: Tensor | None = None,
    boundary: Boundary | None = None,
    grad_scale: Tensor | None = None,
    ops: Any = EXTENSION_OPS,
) -> Tensor | None:
    if not _kernels_take(params) or _momentum_vanishes(cfg):
        return reference.sgd_step(
            params,
            grads,
            buffers,
            lr,
            cfg,
            first_step=first_step,
            prevs=prevs,
            store=store,
            regret=regret,
            boundary=boundary,
            grad_scale=grad_scale,
        )
    lr_tensor, lr_value = _lr_args(lr)
    b = boundary
    stats = ops.sgd_step(
        list(params),
        list(grads),
        list(buffers) if cfg.momentum != 0 else [],
        lr_tensor,
        lr_value,
        cfg.momentum,
        cfg.dampening,
        cfg.weight_decay,
        cfg.nesterov,
        cfg.maximize,
        first_step,
        list(prevs) if prevs is not None else [],
        _STORE[store],
        regret,
        list(b.snapshots) if b else [],
        list(b.prev_displacements) if b else [],
        b.scale if b else None,
        list(b.accumulators) if b and b.accumulators is not None else [],
        float(b.accumulate_weight) if b else 0.0,
        grad_scale,
    )
    return stats if b is not None else None


def sgd_reduce(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Sequence[Tensor],
    prevs: Sequence[Tensor],
    cfg: SGDConfig,
    *,
    first_step: bool = False,
    of: str = REGULARIZED,
    grad_scale: Tensor | None = None,
    ops: Any = EXTENSION_OPS,
) -> Tensor:
    if not _kernels_take(params) or _momentum_vanishes(cfg):
        return reference.sgd_reduce(
            params, grads, buffers, prevs, cfg, first_step=first_step, of=of, grad_scale=grad_scale
        )
    return ops.sgd_reduce(
        list(params),
        list(grads),
        list(buffers) if cfg.momentum != 0 and of == DIRECTION else [],
        list(prevs),
        cfg.momentum,
        cfg.dampening,
        cfg.weight_decay,
        cfg.nesterov,
        cfg.maximize,
        first_step,
        of == DIRECTION,
        grad_scale,
    )


def boundary_pass(params: Sequence[Tensor], boundary: Boundary, *, ops: Any = EXTENSION_OPS) -> Tensor:
    if not _kernels_take(params):
        return reference.boundary_pass(params, boundary)
    b = boundary
    return ops.boundary_pass(
        list(params),
        list(b.snapshots),
        list(b.prev_displacements),
        b.scale,
        list(b.accumulators) if b.accumulators is not None else [],
        float(b.accumulate_weight),
    )


def adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    lr: float | Tensor,
    cfg: AdamConfig,
    *,
    step: int,
    prevs: Sequence[Tensor] | None = None,
    regret: Tensor | None = None,
    grad_scale: Tensor | None = None,
    ops: Any = EXTENSION_OPS,
) -> None:
    if not _kernels_take(params):
        return reference.adam_step(
            params, grads, exp_avgs, exp_avg_sqs, lr, cfg, step=step, prevs=prevs, regret=regret, grad_scale=grad_scale
        )
    lr_tensor, lr_value = _lr_args(lr)
    ops.adam_step(
        list(params),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        lr_tensor,
        lr_value,
        cfg.beta1,
        cfg.beta2,
        cfg.eps,
        cfg.weight_decay,
        cfg.decoupled_weight_decay,
        cfg.maximize,
        *_bias_corrections(cfg, step),
        list(prevs) if prevs is not None else [],
        regret,
        grad_scale,
    )


def adam_reduce(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    prevs: Sequence[Tensor],
    cfg: AdamConfig,
    *,
    step: int,
    grad_scale: Tensor | None = None,
    ops: Any = EXTENSION_OPS,
) -> Tensor:
    if not _kernels_take(params):
        return reference.adam_reduce(params, grads, exp_avgs, exp_avg_sqs, prevs, cfg, step=step, grad_scale=grad_scale)
    return ops.adam_reduce(
        list(params),
        list(grads),
        list(exp_avgs),
        list(exp_avg_sqs),
        list(prevs),
        cfg.beta1,
        cfg.beta2,
        cfg.eps,
        cfg.weight_decay,
        cfg.decoupled_weight_decay,
        cfg.maximize,
        *_bias_corrections(cfg, step),
        grad_scale,
    )
