"""Step time of every method on every available backend, beside torch.optim.SGD and the peers (pytest-benchmark).

    python -m pytest benchmarks/test_step.py --benchmark-columns=median,ops [--param-set resnet50]

The same method table and parameter sets as ``python -m autolr_fused.bench`` (which also reports
effective bandwidth and ratios and writes JSON); compare rows of one run only. Not part of the test
suite (CI runs tests/ only).
"""

from __future__ import annotations

import pytest
import torch

from autolr_fused.backends import available_backends
from autolr_fused.bench.param_sets import PARAM_SETS
from autolr_fused.bench.run import METHODS, _peers, make_tensors

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cpu")
BACKENDS = [b for b in available_backends() if b in ("reference", "cpu")]
CASES = [(name, "torch" if name.startswith("torch") else "peer") for name in _peers()]
CASES += [(name, backend) for name in METHODS for backend in BACKENDS]


@pytest.mark.parametrize(("method", "backend"), CASES, ids=[f"{m}[{b}]" for m, b in CASES])
def test_step(benchmark, request, method, backend):
    shapes = PARAM_SETS[request.config.getoption("--param-set")]()
    params = make_tensors(shapes, torch.float32, DEVICE)
    spec = {**_peers(), **METHODS}[method]
    optimizer = spec.factory(params, backend)
    benchmark.pedantic(optimizer.step, rounds=20, iterations=1, warmup_rounds=5)
    assert all(torch.isfinite(p).all() for p in params)
