"""Distributed training: DDP and FSDP2 on 2 processes (Gloo, CPU) against one process.

One pair of processes (``tests/distributed_worker.py``, spawned once for the
module: ~30 s of the budget, mostly importing torch twice) runs every scenario
with every method on the ``reference`` and ``cpu`` backends; the tests below
read what each rank recorded.

* DDP replicates the gradients, so every rank must compute bit for bit the same
  learning rates, statistics and parameters (nothing to tolerate: same inputs,
  same operations).
* FSDP2 shards the parameters (7, 3 and 1 rows over 2 ranks, one tensor on
  dim 1, one tensor left replicated): the learning rates, statistics and
  parameters must equal a single-process run on the whole batch. Summation
  order differs (gradients are averaged by a reduce-scatter, statistics are
  sums of two partial sums), so float32 rounding differs by an ulp or two per
  step, which the adaptive lrs feed back over 6 steps. Seen: lrs, angles and
  inner products within 4e-7 relative, parameters (of size 0.1 to 1) within
  1.2e-7 absolute. Allowed: ``rtol=1e-5`` (25x margin) and, for tensors,
  ``atol=1e-6`` (8x), far below what a missing or doubly counted shard does
  (2% on the lr after one step here). DDP runs are held to the same
  tolerance against one process. The two ranks must agree bit for bit, and
  each step makes exactly one ``all_reduce`` when its controller reads
  statistics, else none.
* AALR averages the loss over ranks, so ranks fed different losses decide alike.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import autolr_fused
from autolr_fused import AALR, FusedSGD, FusedTLR
from autolr_fused.distributed import Sharding

if not torch.distributed.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

import distributed_worker as worker  # noqa: E402  (tests/ is on sys.path, as for spec_problems)

WORLD_SIZE = 2
RTOL, TENSOR_ATOL = 1e-5, 1e-6  # see the module docstring
CASES = [(name, backend) for name in worker.METHODS for backend in worker.BACKENDS]
IDS = [f"{name}-{backend}" for name, backend in CASES]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every scenario's records of rank 0 and rank 1, from one run of 2 worker processes."""
    if "cpu" not in autolr_fused.available_backends():
        pytest.skip("the cpu backend (the compiled extension) is not built")
    tmp = tmp_path_factory.mktemp("distributed")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    env.pop("AUTOLR_FUSED_BACKEND", None)
    outs = [tmp / f"rank{rank}.pt" for rank in range(WORLD_SIZE)]
    script = str(Path(__file__).with_name("distributed_worker.py"))
    procs = [
        subprocess.Popen(
            [sys.executable, script, str(rank), str(WORLD_SIZE), str(tmp / "store"), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank, out in enumerate(outs)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, log, out in zip(procs, logs, outs):
        assert proc.returncode == 0 and out.exists(), f"a worker failed (exit {proc.returncode}):\n{log}"
    return [torch.load(out, weights_only=False) for out in outs]


def scenario(ranks: list[dict[str, Any]], name: str) -> list[Any]:
    """Both ranks' records of one scenario; its traceback as the failure if it raised."""
    for rank, records in enumerate(ranks):
        if name not in records:
            pytest.fail(f"scenario {name!r} did not run on rank {rank} (an earlier scenario failed)")
        if "error" in records[name]:
            pytest.fail(f"scenario {name!r} raised on rank {rank}:\n{records[name]['error']}")
    return [records[name] for records in ranks]


def compare(got: Any, expected: Any, what: str, leaf: Callable[[Any, Any, str], None]) -> None:
    """``leaf`` on every pair of leaves of two equally nested dicts, lists and tuples."""
    if isinstance(got, dict):
        assert got.keys() == expected.keys(), what
        for key in got:
            compare(got[key], expected[key], f"{what}[{key!r}]", leaf)
    elif isinstance(got, (list, tuple)):
        assert len(got) == len(expected), what
        for i, (x, y) in enumerate(zip(got, expected)):
            compare(x, y, f"{what}[{i}]", leaf)
    else:
        leaf(got, expected, what)


def _identical(a: Any, b: Any, what: str) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{what}: {a} != {b}"
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), f"{what}: nan != {b}"
    else:
        assert a == b, f"{what}: {a!r} != {b!r}"


def _close(got: Any, expected: Any, what: str) -> None:
    if isinstance(got, torch.Tensor):
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=TENSOR_ATOL, msg=lambda m: f"{what}: {m}")
    elif isinstance(got, float):
        nan = math.isnan(got) and math.isnan(expected)
        assert nan or math.isclose(got, expected, rel_tol=RTOL), f"{what}: {got} != {expected}"
    else:
        assert got == expected, f"{what}: {got!r} != {expected!r}"


def assert_identical(a: Any, b: Any, what: str) -> None:
    """Bit for bit (NaN equals NaN: AutoDrop's angle before two epochs)."""
    compare(a, b, what, _identical)


def assert_close(got: Any, expected: Any, what: str) -> None:
    """Within the module's tolerances (its docstring says why); NaN only where NaN is expected."""
    compare(got, expected, what, _close)


def one_process(name: str, backend: str) -> dict[str, Any]:
    """The method trained in this process, unsharded, on the whole batch of every step."""
    model = worker.Net()
    return worker.train(model, worker.METHODS[name].make(list(model.parameters()), backend))


def learning_rates(records: dict[str, Any]) -> list[float]:
    return [step["lr"] for step in records["stats"]]


# ------------------------------------------------------------------------------------------------- DDP
@pytest.mark.parametrize("name, backend", CASES, ids=IDS)
def test_ddp_ranks_compute_identical_learning_rates_and_parameters(ranks, name, backend):
    rank0, rank1 = (records[name, backend] for records in scenario(ranks, "ddp"))
    assert_identical(rank0["stats"], rank1["stats"], "stats() after each step")
    assert_identical(rank0["params"], rank1["params"], "parameters")
    assert_identical(rank0["tensor_lrs"], rank1["tensor_lrs"], "per-tensor lrs")
    assert rank0["all_reduces"] == [0] * worker.STEPS, "DDP needs no all_reduce in step()"
    # DDP averages the halves' gradients: the run is the one-process run on the whole batch.
    assert_close(rank0["stats"], one_process(name, backend)["stats"], "stats() against one process")


def test_ddp_learning_rates_really_adapt():
    """The comparisons above are not of constant lrs: every adaptive method moved its lr within STEPS."""
    for name in worker.METHODS:
        lrs = learning_rates(one_process(name, "reference"))
        assert name == "sgd" or lrs[-1] != pytest.approx(lrs[0], rel=1e-3), (name, lrs)


# ----------------------------------------------------------------------------------------------- FSDP2
@pytest.mark.parametrize("name, backend", CASES, ids=IDS)
def test_fsdp2_matches_one_unsharded_process(ranks, name, backend):
    rank0, rank1 = (records[name, backend] for records in scenario(ranks, "fsdp2"))
    assert_identical(rank0, rank1, "rank 0 against rank 1")
    expected = one_process(name, backend)
    assert_close(rank0["stats"], expected["stats"], "stats() after each step")
    assert_close(rank0["params"], expected["params"], "parameters")
    assert_close(rank0["tensor_lrs"], expected["tensor_lrs"], "per-tensor lrs")


@pytest.mark.parametrize("name", list(worker.METHODS))
def test_fsdp2_makes_one_all_reduce_per_step_that_reads_statistics(ranks, name):
    expected = [int(step in worker.METHODS[name].reduces_at) for step in range(1, worker.STEPS + 1)]
    for records in scenario(ranks, "fsdp2"):
        for backend in worker.BACKENDS:
            assert records[name, backend]["all_reduces"] == expected, backend


@pytest.mark.parametrize("name", list(worker.METHODS))
def test_fsdp2_state_dict_keeps_dtensor_state_and_resumes_exactly(ranks, name):
    scalar_keys = {"lr", "prev_h", "prev_delta"}  # per-tensor scalars: plain, equal on every rank
    for records in scenario(ranks, "fsdp2"):
        kept, resumed = records[name, "resumed"]
        assert_identical(resumed, kept, "2 steps after load_state_dict against 2 more steps of the original")
        for (param, key), kind in records[name, "state_types"].items():
            sharded = param != "offset" and key not in scalar_keys
            assert kind == ("DTensor" if sharded else "Tensor"), (param, key, kind)


@pytest.mark.parametrize("flow", ["dcp", "full", "dcp_fresh", "untouched"])
@pytest.mark.parametrize("name", worker.DCP_METHODS)
def test_fsdp2_checkpoints_through_the_dcp_state_dict_helpers_resume_exactly(ranks, name, flow):
    """get/set_optimizer_state_dict (with dcp.save/dcp.load, or full on rank 0) resume bit for bit.

    The helpers carry the controller state in ``param_groups[0]["autolr_fused"]``, their state-creating
    step on a fresh optimizer changes nothing, and a fresh optimizer's state_dict is a complete template
    for ``dcp.load`` (see ``tests/distributed_worker.py``'s ``_checkpoint_round_trip``).
    """
    for records in scenario(ranks, "fsdp2"):
        kept, resumed = records["dcp"][name, flow]
        assert_identical(resumed, kept, f"{flow}: 3 steps after loading against 3 more steps of the original")


# ------------------------------------------------------------------------------------------------ AALR
def test_aalr_ranks_with_different_losses_decide_alike_on_the_mean(ranks):
    rank0, rank1 = scenario(ranks, "aalr")
    assert_identical(rank0, rank1, "rank 0 against rank 1")

    def decisions(losses: list[float]) -> list[tuple[float, bool]]:
        model = worker.Net()
        controller = AALR(model, FusedSGD(model.parameters(), lr=0.1), initial_lr=0.1, patience=3)
        return [tuple(controller.epoch_end(loss)) for loss in losses]

    means = [(a + b) / 2 for a, b in worker.AALR_LOSSES]
    assert rank0["decisions"] == decisions(means)
    assert [epoch for epoch, (_, restored) in enumerate(rank0["decisions"], 1) if restored] == [3, 4, 9]
    assert rank0["decisions"] != decisions([a for a, _ in worker.AALR_LOSSES]), "rank 0 alone would differ"


def test_fsdp2_skip_nonfinite_skips_on_every_rank_when_one_shard_has_an_inf(ranks):
    rank0, rank1 = scenario(ranks, "skip_nonfinite")
    assert rank0["steps_taken"] == rank1["steps_taken"] == worker.STEPS - 1, "one step, and only one, skipped"
    assert_identical(rank0, rank1, "rank 0 against rank 1")
    assert all(torch.isfinite(p).all() for p in rank0["params"].values())


# -------------------------------------------------------------------------------------- layouts refused
def test_unsupported_dtensor_layouts_raise_value_errors_naming_the_problem(ranks):
    for records in scenario(ranks, "errors"):
        assert records["two_meshes"][0] == "ValueError" and "same DeviceMesh" in records["two_meshes"][1]
        assert records["two_meshes_added_later"] == records["two_meshes"]
        assert records["partial"][0] == "ValueError" and "Partial" in records["partial"][1]
        assert records["gradient_layout"][0] == "ValueError" and "gradient" in records["gradient_layout"][1]
        assert records["state_after_refused_step"] == 0, "the refused step changed the optimizer's state"


# -------------------------------------------------------------------------------- the plain fast path
def test_plain_parameters_take_the_plain_path_with_no_collective(monkeypatch):
    """Without DTensor parameters: the backend module itself steps, and nothing calls all_reduce."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("all_reduce called for plain parameters")

    monkeypatch.setattr(torch.distributed, "all_reduce", refuse)
    for name, method in worker.METHODS.items():
        model = worker.Net()
        optimizer = method.make(list(model.parameters()), "reference")
        assert optimizer._sharding is None and optimizer._ops is autolr_fused.backends.reference, name
        worker.train(model, optimizer, steps=3)
    assert Sharding.of(FusedTLR(worker.Net().parameters()).param_groups[0]["params"]) is None
