"""The benchmark command: its parameter sets are the ones performance.md names, and a tiny run writes
the table and a JSON a script can check (rows side by side with torch's SGD, ratios filled in)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from autolr_fused import FusedSGDHD
from autolr_fused.backends import available_backends
from autolr_fused.bench.flat_sgdhd import FlatVectorSGDHD
from autolr_fused.bench.param_sets import PARAM_SETS, numel


def test_resnet50_set_has_torchvisions_161_tensors_and_25_6m_parameters():
    shapes = PARAM_SETS["resnet50"]()
    assert len(shapes) == 161
    assert numel(shapes) == 25_557_032  # torchvision.models.resnet50().parameters()


def test_transformer350m_and_many_small_sets_match_the_spec():
    shapes = PARAM_SETS["transformer350m"]()
    assert len(shapes) == 1 + 24 * 12
    assert 340e6 < numel(shapes) < 360e6
    small = PARAM_SETS["many_small"]()
    assert len(small) == 2000
    assert all(1 <= numel([s]) <= 4096 for s in small)


def test_bench_command_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    methods = "torch-SGD-fused,FusedSGD,FusedTLR-step,FusedRDBD-adam"
    proc = subprocess.run(
        [sys.executable, "-m", "autolr_fused.bench", "--sets", "tiny", "--methods", methods, "--steps", "2",
         "--warmup", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )  # fmt: skip
    assert "FusedTLR-step" in proc.stdout and "x fused SGD" in proc.stdout
    result = json.loads(out.read_text())
    assert {"device", "torch", "commit", "rows", "yardstick"} <= set(result)
    assert result["yardstick"] == {"tiny": "torch-SGD-fused"}
    rows = result["rows"]
    backends = [b for b in available_backends() if b in ("reference", "cpu")]
    assert {(r["method"], r["backend"]) for r in rows} >= {("FusedTLR-step", b) for b in backends}
    fused = [r for r in rows if r["method"] == "torch-SGD-fused"]
    assert len(fused) == 1
    yard_bytes = fused[0]["bytes_per_step"]  # the yardstick is the same torch SGD on as many elements
    for r in rows:
        assert r["median_ms"] > 0 and r["gb_per_s"] > 0 and r["yardstick_ms"] > 0
        # Paired ratios: over the yardstick median timed beside each row, not over another row.
        expected = (r["bytes_per_step"] / r["median_ms"]) / (yard_bytes / r["yardstick_ms"])
        assert r["vs_torch_fused_sgd"] == pytest.approx(expected, rel=1e-12)
        if r["backend"] not in ("reference", "torch", "peer"):
            ref = next(x for x in rows if x["method"] == r["method"] and x["backend"] == "reference")
            expected = (ref["median_ms"] / ref["yardstick_ms"]) / (r["median_ms"] / r["yardstick_ms"])
            assert r["speedup_vs_reference"] == pytest.approx(expected, rel=1e-12)


def test_paired_timing_alternates_the_two_steps():
    """time_paired calls the method and the yardstick in turn, warm-up included, and times each call."""
    from autolr_fused.bench.run import time_paired

    calls = []
    method, yard = time_paired(
        lambda: calls.append("m"), lambda: calls.append("y"), torch.device("cpu"), warmup=2, steps=3
    )
    assert calls == ["m", "y"] * 5
    assert method >= 0 and yard >= 0


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_flat_vector_sgdhd_yardstick_follows_the_same_rule_as_fused_sgdhd(momentum):
    """The peer is a fair yardstick only if it computes what FusedSGDHD computes (spec: SGD-HD).

    float32: the one flat dot product adds in another order than the per-tensor sums, so parameters and
    lrs agree to a few ulps per step (rtol 1e-5 over 6 steps), not bitwise.
    """
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g) for s in [(5,), (3, 7), (1,)]]
    grads = [[torch.randn(t.shape, generator=g) for t in start] for _ in range(6)]
    peer_params = [torch.nn.Parameter(t.clone()) for t in start]
    ours_params = [torch.nn.Parameter(t.clone()) for t in start]
    peer = FlatVectorSGDHD(peer_params, lr=0.05, momentum=momentum, hypergrad_lr=1e-2)
    ours = FusedSGDHD(ours_params, lr=0.05, momentum=momentum, hypergrad_lr=1e-2, backend="reference")
    for step_grads in grads:
        for opt, params in ((peer, peer_params), (ours, ours_params)):
            for p, grad in zip(params, step_grads):
                p.grad = grad + 0.5 * p.detach()
            opt.step()
    assert float(peer.state["flat"]["lr"]) != 0.05  # the lr moved: the test compares the hypergradient too
    torch.testing.assert_close(peer.state["flat"]["lr"], ours.param_groups[0]["lr"], rtol=1e-5, atol=0)
    for p, q in zip(peer_params, ours_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_read_only_pass_reads_two_arrays_of_the_sets_size_and_changes_nothing():
    """The read-only yardstick counts 2 units: one dot over two arrays as large as the whole set."""
    from autolr_fused.bench.run import ReadOnlyPass, _peers

    assert _peers()["torch-dot-read-only"].units == 2
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(4, 3), (5,), (1,)]]
    before = [p.detach().clone() for p in params]
    yardstick = ReadOnlyPass(params)
    assert yardstick.a.shape == yardstick.b.shape == (18,)
    assert yardstick.step().item() == 9.0  # 18 ones times 0.5, exact in float32
    assert all(torch.equal(p, b) for p, b in zip(params, before))
