"""The reference backend: every primitive written with plain PyTorch ops, one tensor at a time.

This is the ground truth the fused backends are tested against. It follows
``shared/spec/algorithms.md`` literally and keeps torch.optim.SGD's and
torch.optim.Adam's order of operations, so that FusedSGD matches torch.optim.SGD.
The primitives and their conventions are listed in ``primitives.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from autolr_fused.backends.primitives import DIRECTION, REGULARIZED, Boundary, check_regret_from_buffer
from autolr_fused.directions import AdamConfig, SGDConfig

Lr = float | Tensor


def _lr_at(lr: Lr, i: int) -> Lr:
    if isinstance(lr, Tensor):
        return lr[0] if lr.numel() == 1 else lr[i]
    return lr


def _unscaled(g: Tensor, grad_scale: Tensor | None) -> Tensor:
    """GradScaler's unscale, kept in float32 (as torch's fused optimizers do) rather than rounded to g's dtype."""
    if grad_scale is None:
        return g
    return g.to(torch.promote_types(g.dtype, torch.float32)) / grad_scale.reshape(())


def _stats(rows: list[list[Tensor]], n_columns: int, device: torch.device) -> Tensor:
    if not rows:
        return torch.zeros((0, n_columns), dtype=torch.float32, device=device)
    return torch.stack([torch.stack(row) for row in rows]).to(torch.float32)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.sum(a.float() * b.float())


def _sgd_terms(
    p: Tensor, g: Tensor, buf: Tensor | None, cfg: SGDConfig, first_step: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(regularized gradient r, direction d, new momentum buffer), without writing anything."""
    r = -g if cfg.maximize else g
    if cfg.weight_decay != 0:
        r = r.add(p, alpha=cfg.weight_decay)
    if cfg.momentum == 0:
        return r, r, None
    new_buf = r.clone() if first_step else buf.mul(cfg.momentum).add_(r, alpha=1 - cfg.dampening)
    d = r.add(new_buf, alpha=cfg.momentum) if cfg.nesterov else new_buf
    return r, d, new_buf


def _adam_terms(
    p: Tensor, g: Tensor, m: Tensor, v: Tensor, cfg: AdamConfig, step: int
) -> tuple[Tensor, Tensor, Tensor]:
    """(direction d, new first moment, new second moment), without writing anything."""
    g = (-g if cfg.maximize else g).to(m.dtype)  # torch.lerp needs one dtype: an unscaled g is float32
    if cfg.weight_decay != 0 and not cfg.decoupled_weight_decay:
        g = g.add(p, alpha=cfg.weight_decay)
    new_m = m.lerp(g, 1 - cfg.beta1)
    new_v = v.mul(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
    bias_correction1 = 1 - cfg.beta1**step
    bias_correction2_sqrt = (1 - cfg.beta2**step) ** 0.5
    denom = (new_v.sqrt() / bias_correction2_sqrt).add_(cfg.eps)
    return (new_m / bias_correction1) / denom, new_m, new_v


def _update(p: Tensor, d: Tensor, lr: Lr) -> None:
    if isinstance(lr, Tensor):
        p.addcmul_(d, lr, value=-1)
    else:
        p.add_(d, alpha=-lr)


def _finish(
    i: int,
    p: Tensor,
    d: Tensor,
    lr: Lr,
    prevs: Sequence[Tensor] | None,
    stored: Tensor | None,
    regret: Tensor | None,
    decay: float,
) -> None:
    """The writes every update shares: regret, decoupled decay, ``p -= lr * d``, the stored vector."""
    lr_i = _lr_at(lr, i)
    if regret is not None:
        p.addcmul_(prevs[i], regret[i])
    if decay != 0:
        p.mul_(1 - lr_i * decay)
    _update(p, d, lr_i)
    if stored is not None:
        prevs[i].copy_(stored)


def boundary_pass(params: Sequence[Tensor], boundary: Boundary) -> Tensor:
    """The snapshot pass of :class:`Boundary` alone, for tensors that were not all updated this step."""
    rows = []
    for i, p in enumerate(params):
        snap, prev = boundary.snapshots[i], boundary.prev_displacements[i]
        u = p.float() - snap.float()
        if boundary.scale is not None:
            u = u / _lr_at(boundary.scale, i)
        rows.append([_dot(u, prev), _dot(u, u), _dot(prev, prev)])
        prev.copy_(u)
        snap.copy_(p)
        if boundary.accumulators is not None:
            boundary.accumulators[i].add_(p.float(), alpha=boundary.accumulate_weight)
    return _stats(rows, 3, params[0].device if params else torch.device("cpu"))


def sgd_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    buffers: Sequence[Tensor],
    lr: Lr,
    cfg: SGDConfig,
    *,
    first_step: bool = False,
    prevs: Sequence[Tensor] | None = None,
    store: str | None = None,
    regret: Tensor | None = None,
    boundary: Boundary | None = None,
    grad_scale: Tensor | None = None,
) -> Tensor | None:
    """One torch.optim.SGD step of every tensor (see ``primitives.py``)."""
    if regret is not None and prevs is None:  # the previous direction is the momentum buffer before the update
        check_regret_from_buffer(cfg.momentum, cfg.nesterov, first_step, store)
        prevs = buffers
    for i, (p, g) in enumerate(zip(params, grads)):
        buf = buffers[i] if cfg.momentum != 0 else None
        r, d, new_buf = _sgd_terms(p, _unscaled(g, grad_scale), buf, cfg, first_step)
        stored = None if store is None else r if store == REGULARIZED else d
        _finish(i, p, d, lr, prevs, stored, regret, 0.0)
        if new_buf is not None:
            buf.copy_(new_buf)
    return None if boundary is None else boundary_pass(params, boundary)


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
) -> Tensor:
    """Per tensor ``(<a, prev>, ||a||^2)`` with ``a`` this step's regularized gradient or direction."""
    rows = []
    for i, (p, g) in enumerate(zip(params, grads)):
        buf = buffers[i] if cfg.momentum != 0 else None
        r, d, _ = _sgd_terms(p, _unscaled(g, grad_scale), buf, cfg, first_step)
        a = d if of == DIRECTION else r
        rows.append([_dot(a, prevs[i]), _dot(a, a)])
    return _stats(rows, 2, params[0].device if params else torch.device("cpu"))


def adam_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    lr: Lr,
    cfg: AdamConfig,
    *,
    step: int,
    prevs: Sequence[Tensor] | None = None,
    regret: Tensor | None = None,
    grad_scale: Tensor | None = None,
) -> None:
    """One torch.optim.Adam/AdamW step (``step`` counts this one: 1 first); stores ``d`` into ``prevs``."""
    decay = cfg.weight_decay if cfg.decoupled_weight_decay else 0.0
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        d, new_m, new_v = _adam_terms(p, _unscaled(g, grad_scale), m, v, cfg, step)
        _finish(i, p, d, lr, prevs, d if prevs is not None else None, regret, decay)
        m.copy_(new_m)
        v.copy_(new_v)


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
) -> Tensor:
    """Per tensor ``(<d, prev>, ||d||^2)`` with ``d`` this step's Adam direction."""
    rows = []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        d, _, _ = _adam_terms(p, _unscaled(g, grad_scale), m, v, cfg, step)
        rows.append([_dot(d, prevs[i]), _dot(d, d)])
    return _stats(rows, 2, params[0].device if params else torch.device("cpu"))
