"""One rank of tests/test_distributed.py, and the single-process runs it is compared with.

``python tests/distributed_worker.py RANK WORLD_SIZE STORE_FILE OUT_FILE`` joins a
Gloo process group (CPU) through a file store, runs every scenario in
``SCENARIOS`` (in OUT_FILE's folder, shared by the ranks) and saves what it saw to ``OUT_FILE`` with ``torch.save``: per
scenario either the records or the error's traceback, so that one failing
scenario does not hide the others. The test compares the ranks' files with each
other and with :func:`train` run in the test's own process without sharding.
"""

from __future__ import annotations

import io
import sys
import traceback
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from autolr_fused import AALR, FusedAutoDropSGD, FusedRDBD, FusedSGD, FusedSGDHD, FusedSGDL, FusedTLR

STEPS = 6
BATCH = 8  # the global batch; each of the 2 ranks trains on half of it
BACKENDS = ("reference", "cpu")


@dataclass(frozen=True)
class Method:
    """An optimizer under test, and the steps (1-based) whose statistics span every tensor.

    With sharded parameters each of those steps makes exactly one all_reduce; the other steps none.
    """

    make: Callable[[list[Tensor], str], torch.optim.Optimizer]
    reduces_at: tuple[int, ...]


EVERY_STEP = tuple(range(1, STEPS + 1))
FROM_SECOND_STEP = EVERY_STEP[1:]

METHODS: dict[str, Method] = {
    "sgd": Method(lambda ps, b: FusedSGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-2, backend=b), ()),
    "sgdl": Method(lambda ps, b: FusedSGDL(ps, lr=0.5, total_steps=4, backend=b), ()),
    # threshold = max_threshold = 180 degrees: the trigger fires at epoch 3 whatever the angles, so the drop
    # (epoch 4, drop_delay 2) and the second one (epoch 6) happen within STEPS whatever rounding does.
    "autodrop": Method(
        lambda ps, b: FusedAutoDropSGD(
            ps, lr=0.1, steps_per_epoch=1, drop_delay=2, threshold=180.0, max_threshold=180.0, backend=b
        ),
        EVERY_STEP,
    ),
    "tlr": Method(lambda ps, b: FusedTLR(ps, lr=0.1, momentum=0.8, weight_decay=5e-4, backend=b), FROM_SECOND_STEP),
    "tlr_per_layer": Method(
        lambda ps, b: FusedTLR(ps, lr=0.1, momentum=0.8, weight_decay=5e-4, per_layer=True, backend=b),
        FROM_SECOND_STEP,
    ),
    # Windows of round(0.5 * 4) = 2 steps end at steps 2, 4, 6; factors from the second window end on.
    "tlr_window": Method(
        lambda ps, b: FusedTLR(ps, lr=0.1, momentum=0.8, steps_per_epoch=4, update_fraction=0.5, backend=b), (4, 6)
    ),
    "rdbd_sgd": Method(lambda ps, b: FusedRDBD(ps, lr=0.05, meta_lr=0.05, momentum=0.5, backend=b), EVERY_STEP),
    "rdbd_adam": Method(lambda ps, b: FusedRDBD(ps, lr=0.01, meta_lr=1e-3, base="adam", backend=b), EVERY_STEP),
    "sgdhd": Method(
        lambda ps, b: FusedSGDHD(ps, lr=0.05, momentum=0.9, hypergrad_lr=1e-2, backend=b), FROM_SECOND_STEP
    ),
}


class Net(nn.Module):
    """A small model whose tensors mostly do not split evenly over 2 ranks (7, 3 and 1 rows)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(6, 7)
        self.out = nn.Linear(7, 3)
        self.gain = nn.Parameter(torch.full((1,), 1.5))  # sharded over 2 ranks: rank 1 holds 0 elements
        self.offset = nn.Parameter(torch.full((3,), 0.1))  # FSDP2 leaves it replicated (ignored_params)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(x))) * self.gain + self.offset


def batch(step: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 6, generator=generator), torch.randn(BATCH, 3, generator=generator)


def full(t: Tensor) -> Tensor:
    """A parameter or state tensor as one plain tensor (DTensors gathered: a collective)."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rows: slice = slice(None),
    after_backward: Callable[[], None] = lambda: None,
    steps: int = STEPS,
    first_step: int = 1,
) -> dict[str, Any]:
    """``steps`` steps on the ``rows`` of each batch (mean squared error); what the optimizer did.

    Returns the ``stats()`` after each step, the number of ``torch.distributed.all_reduce``
    calls inside each ``step()`` (``ALL_REDUCES`` counts them in a worker), and by
    parameter name the final parameters and the per-tensor lrs where the optimizer keeps them.
    """
    stats, all_reduces = [], []
    for step in range(first_step, first_step + steps):
        x, y = batch(step)
        optimizer.zero_grad(set_to_none=True)
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        after_backward()
        before = ALL_REDUCES[0]
        optimizer.step()
        all_reduces.append(ALL_REDUCES[0] - before)
        stats.append(optimizer.stats())
    # By name: FSDP2 reorders the parameters, DDP prefixes their names.
    params = {name.removeprefix("module."): p for name, p in model.named_parameters()}
    return {
        "stats": stats,
        "all_reduces": all_reduces,
        "params": {name: full(p) for name, p in params.items()},
        "tensor_lrs": {
            name: full(optimizer.state[p]["lr"]) for name, p in params.items() if "lr" in optimizer.state.get(p, {})
        },
    }


# ----------------------------------------------------------------------------------- the ranks' side
ALL_REDUCES = [0]  # calls of torch.distributed.all_reduce in this process (counted once a worker starts)


def _count_all_reduces() -> None:
    original = dist.all_reduce

    def counted(*args: Any, **kwargs: Any) -> Any:
        ALL_REDUCES[0] += 1
        return original(*args, **kwargs)

    dist.all_reduce = counted


def _my_rows() -> slice:
    half = BATCH // dist.get_world_size()
    return slice(dist.get_rank() * half, (dist.get_rank() + 1) * half)


def scenario_ddp(workdir: Path) -> dict[str, Any]:
    """Every method and backend under DistributedDataParallel, each rank on its half of the batch."""
    from torch.nn.parallel import DistributedDataParallel

    out = {}
    for name, method in METHODS.items():
        for backend in BACKENDS:
            model = DistributedDataParallel(Net())
            out[name, backend] = train(model, method.make(list(model.parameters()), backend), _my_rows())
    return out


def _fully_sharded() -> nn.Module:
    """Net under FSDP2: ``hidden`` and the root sharded, ``offset`` replicated.

    ``hidden.weight`` is sharded on dim 1 (FSDP2 needs that dim to split evenly), the others on dim 0.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = Net()
    fully_shard(model.hidden, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None)
    fully_shard(
        model,
        mesh=mesh,
        ignored_params={model.offset},
    )
    return model


def _average_replicated_grads(model: nn.Module) -> Callable[[], None]:
    """What DDP would do for the parameter FSDP2 ignores: average its gradient over the ranks."""

    def average() -> None:
        dist.all_reduce(model.offset.grad)
        model.offset.grad /= dist.get_world_size()

    return average


def scenario_fsdp2(workdir: Path) -> dict[str, Any]:
    """Every method and backend under FSDP2; then, per method, a state_dict round trip continues exactly."""
    out = {}
    for name, method in METHODS.items():
        for backend in BACKENDS:
            model = _fully_sharded()
            optimizer = method.make(list(model.parameters()), backend)
            out[name, backend] = train(model, optimizer, _my_rows(), _average_replicated_grads(model))
        # The last backend's optimizer: its state_dict (DTensor state) loaded into a new optimizer on a copy
        # of the model must continue exactly as the original does.
        twin = _fully_sharded()
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters()):
                q.copy_(p)
        resumed = method.make(list(twin.parameters()), backend)
        resumed.load_state_dict(deepcopy(optimizer.state_dict()))  # as from a file: no buffer shared
        out[name, "state_types"] = {
            (param_name, key): type(value).__name__
            for param_name, p in twin.named_parameters()
            for key, value in resumed.state[p].items()
            if isinstance(value, Tensor)
        }
        kept = train(model, optimizer, _my_rows(), _average_replicated_grads(model), 2, STEPS + 1)
        again = train(twin, resumed, _my_rows(), _average_replicated_grads(twin), 2, STEPS + 1)
        out[name, "resumed"] = (kept, again)
    out["dcp"] = _checkpoint_round_trip(workdir / "checkpoint")
    return out


# The methods whose checkpoints go through torch.distributed.checkpoint: per-tensor lrs, state keys that appear
# only later (AutoDrop's displacement and average, TLR's window update), and an Adam base.
DCP_METHODS = ("tlr", "autodrop", "tlr_window", "rdbd_adam")


def _checkpoint_round_trip(directory: Path) -> dict[str, Any]:
    """FSDP2 checkpoints through torch.distributed.checkpoint continue exactly, per DCP_METHODS method and flow.

    Flows: ``dcp`` saves ``get_optimizer_state_dict`` and loads it into the same helper's output of a new
    optimizer (the usual resume: its state is only a template), then ``set_optimizer_state_dict``; ``full``
    gathers a full state_dict on rank 0 (``full_state_dict``, ``cpu_offload``) and broadcasts it back
    (``broadcast_from_rank0``); ``dcp_fresh`` is ``dcp`` saved before the first step. Each resumed
    optimizer and the original then take 3 more steps; ``untouched`` is the original's run against one
    that never met the helpers.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    def _through_file(obj: Any) -> Any:
        """As torch.save then torch.load would give it back (the offloaded state may be the live tensors)."""
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=True)

    def copy_of(model: nn.Module) -> nn.Module:
        twin = _fully_sharded()
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters()):
                q.copy_(p)
        return twin

    out: dict[str, Any] = {}
    for name in DCP_METHODS:
        make = METHODS[name].make
        for flow, steps in (("dcp", 3), ("full", 3), ("dcp_fresh", 0)):
            model = _fully_sharded()
            optimizer = make(list(model.parameters()), "cpu")
            train(model, optimizer, _my_rows(), _average_replicated_grads(model), steps)
            twin = copy_of(model)
            resumed = make(list(twin.parameters()), "cpu")
            if flow == "full":
                options = StateDictOptions(full_state_dict=True, cpu_offload=True)
                saved = _through_file(get_optimizer_state_dict(model, optimizer, options=options))
                options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
                set_optimizer_state_dict(twin, resumed, saved if dist.get_rank() == 0 else {}, options=options)
            else:
                checkpoint = str(directory / f"{name}-{flow}")
                dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=checkpoint)
                target = {"optimizer": get_optimizer_state_dict(twin, resumed)}
                dcp.load(target, checkpoint_id=checkpoint)
                set_optimizer_state_dict(twin, resumed, target["optimizer"])
            first = steps + 1
            kept = train(model, optimizer, _my_rows(), _average_replicated_grads(model), 3, first)
            again = train(twin, resumed, _my_rows(), _average_replicated_grads(twin), 3, first)
            out[name, flow] = (kept, again)
            if flow == "dcp_fresh":
                plain = _fully_sharded()
                untouched = make(list(plain.parameters()), "cpu")
                out[name, "untouched"] = (
                    kept,
                    train(plain, untouched, _my_rows(), _average_replicated_grads(plain), 3, first),
                )
    return out


# Per epoch, (rank 0's loss, rank 1's loss). Their means 2, 1, 3, nan, 0.5, 0.25, 0.2, 0.3, inf decide (patience
# 3): a rise at epoch 3 and a NaN at epoch 4 restore C0, epoch 7 enters phase 2 (checkpoint C), epoch 9 restores C.
# Either rank alone would decide otherwise (rank 0 sees a rise at epoch 2 and an improvement at epoch 9).
AALR_LOSSES = (
    (1.0, 3.0),
    (1.5, 0.5),
    (0.5, 5.5),
    (float("nan"), 1.0),
    (0.4, 0.6),
    (0.3, 0.2),
    (0.1, 0.3),
    (0.5, 0.1),
    (0.1, float("inf")),
)


def scenario_aalr(workdir: Path) -> dict[str, Any]:
    """AALR around a DDP model, fed different losses on each rank: decisions and parameters per epoch."""
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(Net())
    optimizer = FusedSGD(model.parameters(), lr=0.1)
    controller = AALR(model, optimizer, initial_lr=0.1, patience=3)
    decisions, params = [], []
    for epoch, losses in enumerate(AALR_LOSSES):
        train(model, optimizer, _my_rows(), steps=1, first_step=epoch + 1)  # move away from the checkpoints
        decisions.append(tuple(controller.epoch_end(losses[dist.get_rank()])))
        params.append([full(p) for p in model.parameters()])
    return {"decisions": decisions, "params": params, "stats": controller.stats()}


def scenario_errors(workdir: Path) -> dict[str, Any]:
    """What an optimizer says about DTensor layouts it cannot handle: (error type, message) or None per case."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    line, grid = init_device_mesh("cpu", (2,)), init_device_mesh("cpu", (1, 2))

    def attempt(action: Callable[[], Any]) -> tuple[str, str] | None:
        try:
            action()
        except Exception as error:
            return type(error).__name__, str(error)
        return None

    a = nn.Parameter(distribute_tensor(torch.ones(4, 2), line, [Shard(0)]))
    b = nn.Parameter(distribute_tensor(torch.ones(4, 2), grid, [Replicate(), Shard(0)]))
    partial = nn.Parameter(DTensor.from_local(torch.ones(2, 2), line, [Partial()]))
    out = {
        "two_meshes": attempt(lambda: FusedTLR([a, b])),
        "two_meshes_added_later": attempt(lambda: FusedTLR([a]).add_param_group({"params": [b]})),
        "partial": attempt(lambda: FusedTLR([partial])),
    }
    a.grad = distribute_tensor(torch.ones(4, 2), line, [Replicate()])
    optimizer = FusedTLR([a], momentum=0.9)
    out["gradient_layout"] = attempt(optimizer.step)
    out["state_after_refused_step"] = len(optimizer.state)
    return out


SKIPPED_STEP = 3


def scenario_skip_nonfinite(workdir: Path) -> dict[str, Any]:
    """skip_nonfinite under FSDP2 with an inf in rank 1's shard only, at step SKIPPED_STEP.

    Every rank must skip that step (rank 0's own shard is finite): otherwise the ranks' lrs and
    parameters would part.
    """
    model = _fully_sharded()
    optimizer = FusedTLR(list(model.parameters()), lr=0.1, momentum=0.8, skip_nonfinite=True)
    average, step = _average_replicated_grads(model), [0]

    def poison_one_shard() -> None:
        average()
        step[0] += 1
        if step[0] == SKIPPED_STEP and dist.get_rank() == 1:
            model.hidden.weight.grad.to_local()[0, 0] = float("inf")

    out = train(model, optimizer, _my_rows(), poison_one_shard)
    out["steps_taken"] = optimizer._controller["step"]
    return out


SCENARIOS = {
    "ddp": scenario_ddp,
    "fsdp2": scenario_fsdp2,
    "aalr": scenario_aalr,
    "errors": scenario_errors,
    "skip_nonfinite": scenario_skip_nonfinite,
}


def main(rank: int, world_size: int, store_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
    _count_all_reduces()
    results: dict[str, Any] = {}
    try:
        for name, scenario in SCENARIOS.items():
            try:
                results[name] = scenario(Path(out_file).parent)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
                break  # the ranks may now be out of step: later collectives could hang
    finally:
        torch.save(results, out_file)
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
