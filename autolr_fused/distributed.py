"""All-reducing statistics for sharded parameters (FSDP2's ``fully_shard``, DTensor).

The backends' primitives take plain tensors. When parameters are DTensors, an
optimizer hands the primitives the local shards (:class:`LocalShardOps`): those
are views of the DTensors' storage, so the in-place updates land in the
DTensors. Optimizer state of a parameter's shape (momentum buffers, snapshots,
previous gradients) stays a DTensor with the parameter's placements, as
torch.optim keeps it, so that ``state_dict()`` and ``torch.distributed.checkpoint``
see sharded state; per-tensor scalars (learning rates) are plain tensors, equal
on every rank.

Every statistic row a primitive returns (an inner product or a squared norm of
one tensor) is then a partial sum over this rank's shard. :meth:`Sharding.sum_rows`
makes them global: one ``torch.distributed.all_reduce`` (a sum) of the step's
concatenated rows, over the parameters' mesh. A tensor replicated over a mesh
dimension (a ``Replicate`` placement, or a plain tensor in a sharded model)
contributes from coordinate 0 of that dimension only, so it is counted once.

Parameters that are not DTensors (a single process, DDP) take none of this: the
optimizers keep their plain path, with no all_reduce and no per-step cost.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable, Sequence
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from autolr_fused.backends.primitives import PRIMITIVES, Boundary


def _dtensor_class() -> type | None:
    """torch's DTensor class, or None while ``torch.distributed.tensor`` is not imported.

    No tensor can be a DTensor before that module is imported, so a single-process
    run never imports it (nor pays for its import).
    """
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``."""
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(tensor, dtensor)


def local(value: Any) -> Any:
    """``value`` with every DTensor in it replaced by its local shard (lists, tuples and Boundary looked into)."""
    if is_dtensor(value):
        return value.to_local()
    if isinstance(value, (list, tuple)):
        return [local(v) for v in value]
    if isinstance(value, Boundary):
        return dataclasses.replace(
            value,
            snapshots=local(value.snapshots),
            prev_displacements=local(value.prev_displacements),
            accumulators=local(value.accumulators),
        )
    return value


def _on_local_shards(primitive: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return primitive(*local(args), **{k: local(v) for k, v in kwargs.items()})

    call.__name__ = call.__qualname__ = primitive.__name__
    call.__doc__ = primitive.__doc__
    return call


def _layout(tensor: Tensor) -> str:
    return f"a DTensor with placements {tensor.placements}" if is_dtensor(tensor) else "a plain tensor"


class LocalShardOps:
    """A backend whose primitives accept DTensors: each call passes their local shards to ``ops``."""

    def __init__(self, ops: ModuleType) -> None:
        for name in PRIMITIVES:
            setattr(self, name, _on_local_shards(getattr(ops, name)))


class Sharding:
    """How an optimizer's parameters are laid out over ranks, and how to sum their statistics.

    Built by :meth:`of` from every parameter of the optimizer; None there when no
    parameter is a DTensor. All DTensor parameters must live on one DeviceMesh:
    rows are summed over that mesh's ranks (its process group for a 1-D mesh,
    the default group for a mesh of every rank).
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        dtensors = [p for p in params if is_dtensor(p)]
        mesh = dtensors[0].device_mesh
        for p in dtensors:
            if p.device_mesh != mesh:
                raise ValueError(
                    "params: every DTensor parameter of one optimizer must be on the same DeviceMesh "
                    f"(got {mesh} and {p.device_mesh}); use one optimizer per mesh"
                )
            if any(placement.is_partial() for placement in p.placements):
                raise ValueError(
                    f"params: a DTensor parameter has a Partial placement {p.placements}; "
                    "parameters must be sharded or replicated"
                )
        coordinate = mesh.get_coordinate()
        if coordinate is None:
            raise ValueError(f"params: this rank is not in the parameters' DeviceMesh {mesh}")
        # Statistics need summing only when some tensor is split over ranks.
        self.reduces = any(not pl.is_replicate() for p in dtensors for pl in p.placements)
        self.device_type = mesh.device_type
        self.group = None
        if self.reduces:
            if mesh.ndim == 1:
                self.group = mesh.get_group()
            elif mesh.size() != torch.distributed.get_world_size():
                raise ValueError(
                    f"params: sharded parameters on a {mesh.ndim}-D DeviceMesh that does not span every rank "
                    "are not supported; use a 1-D mesh or a mesh of all ranks"
                )
        # A rank counts a tensor's statistics unless the tensor is replicated over a mesh
        # dimension in which the rank is not the first: then another rank counts them.
        self._counted = {
            id(p): all(
                c == 0
                for c, placement in zip(coordinate, p.placements if is_dtensor(p) else [None] * mesh.ndim)
                if placement is None or placement.is_replicate()
            )
            for p in params
        }
        self._masks: dict[tuple[int, ...], Tensor | None] = {}

    @classmethod
    def of(cls, params: Iterable[Tensor]) -> Sharding | None:
        """The sharding of ``params``, or None when none is a DTensor (nothing to localise or sum)."""
        params = list(params)
        if not any(is_dtensor(p) for p in params):
            return None
        return cls(params)

    def check_gradients(self, param_groups: list[dict[str, Any]]) -> None:
        """Refuse a gradient laid out differently from its parameter (its local shard would not match)."""
        for group in param_groups:
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if is_dtensor(p) != is_dtensor(g) or (
                    is_dtensor(p) and (g.placements != p.placements or g.device_mesh != p.device_mesh)
                ):
                    raise ValueError(
                        f"a parameter of shape {tuple(p.shape)} is {_layout(p)} but its gradient is {_layout(g)}; "
                        "the gradient must have the parameter's placements (redistribute it first)"
                    )

    def all_ranks_finite(self, finite: Tensor) -> bool:
        """``skip_nonfinite``'s answer over every rank, from this rank's 0-dim bool ``finite`` over its shards.

        One all_reduce (MIN) of one number, so that all ranks skip a step together or
        none does; without sharded tensors the local answer is everyone's.
        """
        if not self.reduces:
            return bool(finite)
        flag = finite.to(device=self.device_type, dtype=torch.int32).reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=self.group)
        return bool(flag)

    def sum_rows(self, rows: Tensor, params: Sequence[Tensor]) -> Tensor:
        """Per-shard statistic rows, an ``(n, k)`` tensor (row i: ``params[i]``), summed over the ranks.

        Every rank must call this at the same point with the same ``params`` (as
        every collective): one all_reduce of the rows as one small vector, in
        place when no row is dropped (the primitives' rows are fresh tensors).
        """
        if not self.reduces:
            return rows
        key = tuple(map(id, params))
        if key not in self._masks:
            if len(self._masks) >= 8:  # subsets of parameters with gradients come and go; keep a few
                self._masks.clear()
            dropped = [not self._counted[i] for i in key]
            self._masks[key] = torch.tensor(dropped, device=rows.device) if any(dropped) else None
        dropped = self._masks[key]
        # masked_fill, not a multiplication: a rank that does not count a tensor must add an exact 0, even
        # when the tensor's own statistics are not finite.
        rows = rows.contiguous() if dropped is None else rows.masked_fill(dropped[:, None], 0)
        torch.distributed.all_reduce(rows, group=self.group)
        return rows
