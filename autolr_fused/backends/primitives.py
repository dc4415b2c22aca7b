"""What a backend provides: five fused primitives over many tensors at once.

Every backend module (``reference``, ``cpu``, ``triton``, ``cuda``) defines these
functions with exactly the semantics written in ``reference.py``; they know
nothing about papers, only about tensor lists:

``sgd_step(params, grads, buffers, lr, cfg, *, first_step, prevs, store, regret, boundary, grad_scale)``
    One torch.optim.SGD update of every tensor, optionally (a) first undoing a
    regretted lr change ``p += regret[i] * prevs[i]`` (without ``prevs``, the
    momentum buffer before this step's update takes the place of ``prevs[i]``:
    it is the previous direction with momentum and without nesterov, and is
    only allowed then, not on the first step, and without a store), (b) storing this step's
    regularized gradient or direction into ``prevs``, and (c) the boundary
    pass after the update (see :class:`Boundary`). Returns the boundary
    statistics, or None.
``sgd_reduce(params, grads, buffers, prevs, cfg, *, first_step, of, grad_scale)``
    Per tensor ``(<a_i, prevs_i>, ||a_i||^2)`` as a float32 ``(n, 2)`` tensor,
    where ``a`` is this step's regularized gradient (``of="regularized"``) or
    direction (``of="direction"``); reads the momentum buffers without changing them.
``boundary_pass(params, boundary)``
    The boundary pass alone (for a step where not every tensor was updated).
``adam_step`` / ``adam_reduce``
    The same two for torch.optim.Adam's direction (no boundary).

Conventions shared by all of them:

* lists are aligned, one entry per parameter, all on one device;
  ``buffers`` (momentum), ``prevs``, snapshots and displacements have the
  parameter's dtype; accumulators are float32;
* ``lr`` is a Python float, or a float32 tensor with 1 element (shared) or one
  element per tensor; ``regret`` a float32 tensor with one element per tensor;
* ``first_step`` means the momentum buffers are uninitialised and become ``r``;
* ``grad_scale`` (GradScaler's scale, a 1-element float32 tensor) divides every
  gradient before use; the gradients themselves are not modified;
* statistics are float32, one row per tensor, accumulated in float32 or wider
  in a fixed order (bit-identical from run to run);
* nothing reads a device value back to the host.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

PRIMITIVES = ("sgd_step", "sgd_reduce", "boundary_pass", "adam_step", "adam_reduce")
REGULARIZED = "regularized"
DIRECTION = "direction"


@dataclass
class Boundary:
    """The snapshot pass fused into the last update of an epoch (AutoDrop) or window (TLR).

    After the update, per tensor: ``u = (p - snapshots[i]) / scale[i]`` (no
    division when ``scale`` is None), the statistics row
    ``(<u, prev_displacements[i]>, ||u||^2, ||prev_displacements[i]||^2)``, then
    ``prev_displacements[i] = u``, ``snapshots[i] = p`` and, when
    ``accumulators`` is given, ``accumulators[i] += accumulate_weight * p``.
    """

    snapshots: Sequence[Tensor]
    prev_displacements: Sequence[Tensor]
    scale: Tensor | None = None
    accumulators: Sequence[Tensor] | None = None
    accumulate_weight: float = 0.0


def check_regret_from_buffer(momentum: float, nesterov: bool, first_step: bool, store: object) -> None:
    """``sgd_step``'s regret without ``prevs`` reads the momentum buffer: only where it is the previous direction."""
    if momentum == 0 or nesterov or first_step or store:
        raise ValueError(
            "sgd_step: a regret without prevs reads the momentum buffers, which needs momentum without "
            "nesterov, not the first step, and no store"
        )


def lr_vector(lr: float | Tensor | Sequence[Tensor], device: torch.device) -> float | Tensor:
    """``lr`` in the primitives' form: a float, or a 1-D float32 tensor on ``device``."""
    if isinstance(lr, (list, tuple)):
        return torch.stack([x.reshape(()).to(device=device, dtype=torch.float32) for x in lr])
    if isinstance(lr, Tensor):
        return lr.reshape(-1).to(device=device, dtype=torch.float32)
    return float(lr)
