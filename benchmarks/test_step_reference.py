"""Step time of every optimizer on the reference backend, side by side with torch.optim.SGD.

    python -m pytest benchmarks/test_step_reference.py --benchmark-columns=median,ops

Not part of the test suite (CI runs tests/ only). Compare rows of one run only: this measures
the pure-PyTorch reference backend, the baseline the fused kernels are to beat.
"""

from __future__ import annotations

import pytest
import torch

import autolr_fused as alr

pytest.importorskip("pytest_benchmark")

SHAPES = [(256, 256), (256,), (512, 128), (128,), (64, 64, 3, 3), (64,)] * 4  # 24 tensors, ~1.4 M elements

OPTIMIZERS = {
    "torch-sgd-foreach": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, foreach=True),
    "torch-sgd-fused": lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9, fused=True),
    "FusedSGD": lambda ps: alr.FusedSGD(ps, lr=0.01, momentum=0.9, backend="reference"),
    "FusedSGDL": lambda ps: alr.FusedSGDL(ps, total_steps=10**9, backend="reference"),
    "FusedAutoDropSGD": lambda ps: alr.FusedAutoDropSGD(ps, lr=0.01, steps_per_epoch=100, backend="reference"),
    "FusedTLR-step": lambda ps: alr.FusedTLR(ps, lr=0.01, momentum=0.9, backend="reference"),
    "FusedTLR-window": lambda ps: alr.FusedTLR(ps, lr=0.01, momentum=0.9, steps_per_epoch=100, backend="reference"),
    "FusedRDBD-sgd": lambda ps: alr.FusedRDBD(ps, backend="reference"),
    "FusedRDBD-adam": lambda ps: alr.FusedRDBD(ps, base="adam", meta_lr=5e-7, backend="reference"),
    "FusedSGDHD": lambda ps: alr.FusedSGDHD(ps, lr=0.01, momentum=0.9, backend="reference"),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step(benchmark, name):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.1) for s in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    optimizer = OPTIMIZERS[name](params)
    for _ in range(3):
        optimizer.step()
    benchmark.pedantic(optimizer.step, rounds=20, iterations=1, warmup_rounds=2)
    assert all(torch.isfinite(p).all() for p in params)
