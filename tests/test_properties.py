"""Property tests (hypothesis): any valid configuration, on any shapes, dtypes and step sequences,
steps without crashing, never makes a learning rate inf/NaN, and the kernel backend agrees with the
reference backend within the tolerances of ``test_backends`` (its helpers, reused).

Drawn: every optimizer class and mode with hyperparameters over their valid ranges (edges included);
1-4 tensors of shapes among 0-dim, empty, odd sizes and 2-D; float32, bfloat16 or float16; 1-6 steps
in which a tensor's gradient may be zero or None (and, with ``skip_nonfinite``, hold inf/NaN).
Gradients are seeded draws (``test_backends.gradients``), so the statistics are generic values: no
inner product lands on a sign change by accident (a branch the two backends could round apart).

The ``autolr_fused-ci`` settings profile keeps the file under a minute on a 2-core CI machine: a
few examples per property, no deadline (a first call loads kernels), derandomized (the same examples
on every run, so CI cannot flake), no example database.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_backends import KERNEL_BACKENDS, assert_float32_close, assert_low_precision_close, gradients, lrs_of
from torch import nn

from autolr_fused import FusedAutoDropSGD, FusedRDBD, FusedSGD, FusedSGDHD, FusedSGDL, FusedTLR

settings.register_profile(
    "autolr_fused-ci",
    max_examples=40,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = settings.get_profile("autolr_fused-ci")
needs_kernels = pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="the cpu extension is not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# --------------------------------------------------------------------------- strategies
@st.composite
def sgd_arguments(draw) -> dict:
    """torch.optim.SGD's arguments over their valid ranges (Nesterov only where it is allowed)."""
    kw = dict(
        lr=draw(st.floats(0.0, 0.5)),
        momentum=draw(st.floats(0.0, 0.99)),
        dampening=draw(st.sampled_from([0.0, 0.3, 1.0])),
        weight_decay=draw(st.sampled_from([0.0, 1e-3, 0.1])),
        maximize=draw(st.booleans()),
    )
    kw["nesterov"] = kw["momentum"] > 0 and kw["dampening"] == 0 and draw(st.booleans())
    return kw


@st.composite
def configurations(draw) -> tuple[type, dict]:
    """(optimizer class, keyword arguments): every class and mode, hyperparameters in their valid ranges."""
    method = draw(st.sampled_from(["sgd", "sgdl", "autodrop", "tlr", "rdbd", "sgdhd"]))
    if method == "sgd":
        return FusedSGD, draw(sgd_arguments())
    if method == "sgdl":
        total = draw(st.one_of(st.none(), st.integers(1, 8)))
        return FusedSGDL, {**draw(sgd_arguments()), "total_steps": total, "gamma": draw(st.floats(0.01, 1.0))}
    if method == "autodrop":
        threshold = draw(st.floats(0.01, 90.0))
        return FusedAutoDropSGD, {
            **draw(sgd_arguments()),
            "steps_per_epoch": draw(st.integers(1, 3)),
            "drop_factor": draw(st.floats(0.05, 0.95)),
            "min_lr": draw(st.sampled_from([0.0, 1e-4])),
            "threshold": threshold,
            "max_threshold": threshold * draw(st.floats(1.0, 4.0)),
            "drop_delay": draw(st.integers(1, 3)),
            "angle_window": draw(st.integers(1, 3)),
        }
    if method == "tlr":
        return FusedTLR, {
            **draw(sgd_arguments()),
            "per_layer": draw(st.booleans()),
            "bound": draw(st.floats(0.01, 1.0)),
            "steps_per_epoch": draw(st.one_of(st.none(), st.integers(1, 6))),
            "update_fraction": draw(st.floats(0.05, 1.0)),
        }
    if method == "sgdhd":
        return FusedSGDHD, {**draw(sgd_arguments()), "hypergrad_lr": draw(st.sampled_from([0.0, 1e-4, 1e-2]))}
    base = draw(st.sampled_from(["sgd", "adam"]))
    low = draw(st.sampled_from([None, 0.0, 1e-3]))
    high = draw(st.sampled_from([None, 0.5]))
    kw = dict(
        base=base,
        lr=draw(st.floats(0.0, 0.1)),
        meta_lr=draw(st.sampled_from([0.0, 1e-4, 1e-2])),
        regret=draw(st.booleans()),
        lr_bounds=(low, high),
        weight_decay=draw(st.sampled_from([0.0, 1e-2])),
        maximize=draw(st.booleans()),
    )
    if base == "sgd":
        sgd = draw(sgd_arguments())
        kw.update(momentum=sgd["momentum"], dampening=sgd["dampening"], nesterov=sgd["nesterov"])
    else:
        kw.update(
            betas=(draw(st.sampled_from([0.05, 0.9])), draw(st.sampled_from([0.99, 0.999]))),
            eps=draw(st.sampled_from([1e-8, 1e-3])),
            decoupled_weight_decay=draw(st.booleans()),
        )
    return FusedRDBD, kw


# 0-dim, empty, odd 1-D sizes and small 2-D (a transposed view among them: a non-contiguous parameter).
shapes = st.lists(
    st.one_of(
        st.just(()),
        st.just((0,)),
        st.integers(1, 67).map(lambda n: (n,)),
        st.tuples(st.integers(1, 9), st.integers(1, 9)),
    ),
    min_size=1,
    max_size=4,
)
# Per step, per tensor: a seeded gradient, zeros, or None (the tensor sits the step out).
GRADIENT_KINDS = ["normal", "normal", "normal", "zero", "none"]


def step_plans(n_tensors: int, kinds: list[str]):
    return st.lists(st.lists(st.sampled_from(kinds), min_size=n_tensors, max_size=n_tensors), min_size=1, max_size=6)


@st.composite
def problems(draw, kinds: list[str] = GRADIENT_KINDS) -> dict:
    """A configuration, its tensors (shapes, dtype, whether 2-D ones are column-major) and a step plan."""
    cls, kw = draw(configurations())
    tensor_shapes = draw(shapes)
    return dict(
        cls=cls,
        kw=kw,
        tensor_shapes=tensor_shapes,
        dtype=draw(st.sampled_from(DTYPES)),
        transposed=draw(st.booleans()),
        plan=list(enumerate(draw(step_plans(len(tensor_shapes), kinds)))),
    )


# ---------------------------------------------------------------------------- the runs
def make_tensors(tensor_shapes: list, dtype: torch.dtype, transposed: bool) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(len(tensor_shapes))
    out = []
    for shape in tensor_shapes:
        t = torch.randn(shape, generator=g, dtype=torch.float64)
        if transposed and t.dim() == 2:
            t = t.t().contiguous().t()  # same values, column-major strides
        out.append(nn.Parameter(t.to(dtype)))
    return out


def train(problem: dict, backend: str, *, dtype: torch.dtype | None = None, plan: list | None = None, **extra):
    """Run the plan's steps ``(seed, kinds)``, asserting after each that every lr is finite.

    Returns (params, lrs, optimizer)."""
    params = make_tensors(problem["tensor_shapes"], dtype or problem["dtype"], problem["transposed"])
    opt = problem["cls"](params, backend=backend, **problem["kw"], **extra)
    for seed, kinds in problem["plan"] if plan is None else plan:
        for p, grad, kind in zip(params, gradients(params, seed), kinds):
            if kind == "none":
                p.grad = None
            elif kind == "normal":
                p.grad = grad
            else:
                p.grad = torch.full_like(p, {"zero": 0.0, "nan": math.nan, "inf": math.inf}[kind])
        opt.step()
        lrs = lrs_of(opt)
        assert torch.isfinite(lrs).all(), f"step {seed}: lrs {lrs.tolist()}"
    return [p.detach().clone() for p in params], lrs_of(opt), opt


def assert_backends_agree(problem: dict, params, lrs, ref_params, ref_lrs, **extra) -> None:
    """test_backends' tolerances: float32 directly, bf16/fp16 by their error against a float64 run."""
    if problem["dtype"] == torch.float32:
        assert_float32_close(params, lrs, ref_params, ref_lrs)
    else:
        exact, exact_lrs, _ = train(problem, "reference", dtype=torch.float64, **extra)
        assert_low_precision_close(params, lrs, ref_params, ref_lrs, exact, exact_lrs, problem["dtype"])


# ---------------------------------------------------------------------------- properties
@needs_kernels
@PROFILE
@given(problems())
def test_any_valid_configuration_keeps_lrs_finite_and_the_backends_agree(problem):
    params, lrs, opt = train(problem, "cpu")
    ref_params, ref_lrs, ref = train(problem, "reference")
    for stats in (opt.stats(), ref.stats()):
        assert all(math.isfinite(stats[k]) for k in ("lr_min", "lr_max")) or not any(p.numel() for p in params)
    assert_backends_agree(problem, params, lrs, ref_params, ref_lrs)


@needs_kernels
@PROFILE
@given(problems(kinds=GRADIENT_KINDS + ["nan", "inf"]))
def test_skip_nonfinite_equals_the_run_without_the_bad_steps(problem):
    """With skip_nonfinite, a plan with inf/NaN steps ends exactly (bit for bit) where the same plan
    without those steps ends, on each backend; the parameters stay finite and the backends agree."""

    def bad(kinds) -> bool:
        return any(k in ("nan", "inf") and math.prod(s) > 0 for k, s in zip(kinds, problem["tensor_shapes"]))

    clean = [(seed, kinds) for seed, kinds in problem["plan"] if not bad(kinds)]
    runs = {}
    for backend in ("cpu", "reference"):
        params, lrs, _ = train(problem, backend, skip_nonfinite=True)
        clean_params, clean_lrs, _ = train(problem, backend, plan=clean)
        assert all(torch.equal(a, b) for a, b in zip(params, clean_params))
        assert torch.equal(lrs, clean_lrs)
        assert all(torch.isfinite(p).all() for p in params)
        runs[backend] = params, lrs
    assert_backends_agree(problem, *runs["cpu"], *runs["reference"], plan=clean)
