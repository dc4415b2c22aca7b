"""The reference backend: every primitive written with plain PyTorch ops.

This is the ground truth the fused backends are tested against. It follows
``shared/spec/algorithms.md`` literally and keeps torch.optim.SGD's and
torch.optim.Adam's order of operations, so that FusedSGD matches torch.optim.SGD.

Conventions: tensor lists are aligned (one entry per parameter); learning rates
are a Python float, a 0-dim tensor, or a list with one 0-dim float32 tensor per
parameter; every statistic is accumulated in float32 (``torch.sum`` of float32 is
deterministic on a given device), one value per tensor.
No primitive reads a device value back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Lr = float | Tensor | Sequence[Tensor]


def sgd_directions(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momentum_buffers: list[Tensor | None],
    *,
    momentum: float,
    dampening: float,
    weight_decay: float,
    nesterov: bool,
    maximize: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """torch.optim.SGD's update direction.

    Returns ``(regularized, directions)``: the regularized gradient
    ``(-g if maximize else g) + weight_decay * p`` and the direction ``d`` the
    step multiplies by the lr. ``momentum_buffers`` is updated in place (a
    ``None`` entry becomes a new buffer). The returned tensors may alias the
    gradients or the buffers: copy before storing them.
    """
    regularized, directions = [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        r = -g if maximize else g
        if weight_decay != 0:
            r = r.add(p, alpha=weight_decay)
        d = r
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = r.detach().clone()
                momentum_buffers[i] = buf
            else:
                buf.mul_(momentum).add_(r, alpha=1 - dampening)
            d = r.add(buf, alpha=momentum) if nesterov else buf
        regularized.append(r)
        directions.append(d)
    return regularized, directions


def adam_directions(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    steps: Sequence[int],
    *,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    maximize: bool,
) -> list[Tensor]:
    """torch.optim.Adam's direction ``m_hat / (sqrt(v_hat) + eps)``.

    ``steps`` are the step numbers after this step's increment (1 on the first).
    Moments are updated in place. Decoupled weight decay is not part of the
    direction: the caller applies ``p *= 1 - lr * weight_decay``.
    """
    directions = []
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        g = -g if maximize else g
        if weight_decay != 0 and not decoupled_weight_decay:
            g = g.add(p, alpha=weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        directions.append((m / bias_correction1) / denom)
    return directions


def apply_update(params: Sequence[Tensor], directions: Sequence[Tensor], lr: Lr) -> None:
    """``p -= lr * d`` for every tensor; ``lr`` as in the module docstring."""
    for i, (p, d) in enumerate(zip(params, directions)):
        lr_i = lr[i] if isinstance(lr, (list, tuple)) else lr
        if isinstance(lr_i, Tensor):
            p.addcmul_(d, lr_i.to(p.device).reshape(()), value=-1)
        else:
            p.add_(d, alpha=-lr_i)


def decay_(params: Sequence[Tensor], lr: Lr, weight_decay: float) -> None:
    """Decoupled weight decay ``p *= 1 - lr * weight_decay``."""
    for i, p in enumerate(params):
        lr_i = lr[i] if isinstance(lr, (list, tuple)) else lr
        if isinstance(lr_i, Tensor):
            p.mul_((1 - lr_i * weight_decay).to(p.device))
        else:
            p.mul_(1 - lr_i * weight_decay)


def _stack(values: list[Tensor], device: torch.device) -> Tensor:
    if not values:
        return torch.zeros(0, dtype=torch.float32, device=device)
    return torch.stack([v.to(device) for v in values])


def dots(a: Sequence[Tensor], b: Sequence[Tensor], device: torch.device) -> Tensor:
    """Per-tensor ``<a_i, b_i>`` in float32, as a 1-D tensor on ``device``."""
    return _stack([torch.sum(x.float() * y.float()) for x, y in zip(a, b)], device)


def squared_norms(a: Sequence[Tensor], device: torch.device) -> Tensor:
    """Per-tensor ``||a_i||^2`` in float32, as a 1-D tensor on ``device``."""
    return _stack([torch.sum(x.float() * x.float()) for x in a], device)


def copy_into(dst: list[Tensor | None], src: Sequence[Tensor]) -> None:
    """``dst[i] = src[i]`` as a copy in the destination's dtype; ``None`` entries get new tensors."""
    for i, s in enumerate(src):
        if dst[i] is None:
            dst[i] = s.detach().clone(memory_format=torch.preserve_format)
        else:
            dst[i].copy_(s)


def displacements(
    params: Sequence[Tensor], snapshots: Sequence[Tensor], scale: Sequence[Tensor | float] | None = None
) -> list[Tensor]:
    """``(p - snapshot) / scale`` per tensor, computed in float32."""
    out = []
    for i, (p, s) in enumerate(zip(params, snapshots)):
        disp = p.float() - s.float()
        if scale is not None:
            disp = disp / (scale[i].to(p.device) if isinstance(scale[i], Tensor) else scale[i])
        out.append(disp)
    return out


def accumulate_weighted(accumulators: Sequence[Tensor], params: Sequence[Tensor], weight: float) -> None:
    """``z += weight * p`` per tensor (float32 accumulators)."""
    for z, p in zip(accumulators, params):
        z.add_(p.float(), alpha=weight)


def replace_with_average(params: Sequence[Tensor], accumulators: Sequence[Tensor], total_weight: float) -> None:
    """``p = z / total_weight`` per tensor."""
    for p, z in zip(params, accumulators):
        p.copy_(z / total_weight)
