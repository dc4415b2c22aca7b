"""The cuda backend's five primitives (csrc/cuda) against reference.py, on CUDA tensors.

Skipped without a CUDA device or without the extension's CUDA kernels.

Coverage: every combination of the primitives' keywords (SGD: first_step, store,
regret, boundary with and without scale and accumulators, grad_scale; Adam:
prevs, regret, grad_scale, step) for five SGD directions and five Adam
configurations, in float32, bfloat16 and float16, the lr cycling through its
three forms (float, 1-element tensor, one element per tensor); odd sizes and
layouts (1 and 0 elements, 278011 elements, 130 and 700 tensors, which cross
the metadata capacity of one launch, channels_last, a transposed view, a
non-dense view, state tensors whose strides differ from the parameter's, a
misaligned data pointer, mixed dtypes in one call); bit-identical reruns; the
number of kernel launches per call; a CUDA-graph capture and replay of each
primitive and of a FusedSGD and a FusedTLR step; no host synchronisation.

Tolerances (shared/style.md):

* float32 tensors: 8 ulps of the result plus 8 ulps of the problem's magnitude
  (for results that cancel); the kernels follow the CPU kernels' order of
  operations and fuse multiply-adds where torch's CUDA kernels do, so what
  differs is a rounding here and there.
* bfloat16 / float16 tensors, the style guide's rule: against the same call in
  float64 (reference backend), the error is at most twice the reference
  backend's own error at that dtype, element by element plus one ulp of the
  element (a correctly rounded result may lose to a reference that happens to
  be exact), and over the tensor (2-norm) plus a sixteenth of an ulp.
* statistics (float32): against the float64 call, at most twice the reference
  backend's error plus 1e-5 of the row's scale (sqrt(||a||^2 ||b||^2) for an
  inner product). The boundary pass fused into sgd_step works on the parameters
  as this backend stored them, which may differ by a rounding from the
  reference's: its outputs are checked against reference.boundary_pass applied
  to this backend's own updated parameters.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable

import pytest
import torch

from autolr_fused.backends import available_backends

if not torch.cuda.is_available() or "cuda" not in available_backends():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from autolr_fused import FusedSGD, FusedTLR  # noqa: E402
from autolr_fused.backends import cuda as cuda_backend  # noqa: E402
from autolr_fused.backends import reference  # noqa: E402
from autolr_fused.backends.primitives import DIRECTION, REGULARIZED, Boundary  # noqa: E402
from autolr_fused.directions import AdamConfig, SGDConfig  # noqa: E402

pytestmark = pytest.mark.gpu

DEVICE = torch.device("cuda")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS32 = torch.finfo(torch.float32).eps
LISTS = (
    "params",
    "grads",
    "buffers",
    "prevs",
    "snapshots",
    "prev_displacements",
    "accumulators",
    "exp_avgs",
    "exp_avg_sqs",
)
STATE = LISTS[1:]  # the lists that follow their parameter's layout unless a layout says otherwise


# ------------------------------------------------------------------------------------- problems
@dataclasses.dataclass(frozen=True)
class Problem:
    """Shapes, per-tensor dtypes and a layout for the tensors of one call."""

    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    layout: str = "contiguous"
    seed: int = 0

    @property
    def n(self) -> int:
        return len(self.shapes)


def problem(shapes, dtype: torch.dtype | tuple[torch.dtype, ...], layout: str = "contiguous", seed: int = 0) -> Problem:
    """A Problem; a tuple of dtypes is cycled through, tensor by tensor."""
    shapes = tuple(tuple(s) for s in shapes)
    dtypes = dtype if isinstance(dtype, tuple) else (dtype,)
    return Problem(shapes, tuple(dtypes[i % len(dtypes)] for i in range(len(shapes))), layout, seed)


SMALL_SHAPES = ((3, 5), (7,), (2, 3, 4), (1,), (0,), (33, 17))


def _arrange(x: torch.Tensor, layout: str, slot: str) -> torch.Tensor:
    """``x`` (contiguous, on the device) in the memory layout ``layout`` gives list ``slot``."""
    if layout == "channels_last" or (layout == "params_channels_last" and slot == "params"):
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
    if layout == "transposed" and x.dim() == 2:
        return x.t().contiguous().t()  # dense, column-major: walked in place
    if layout == "strided":
        wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype, device=x.device)
        wide[..., ::2] = x
        return wide[..., ::2]  # not dense: walked on a copy
    if layout == "misaligned":
        flat = torch.zeros(x.numel() + 1, dtype=x.dtype, device=x.device)
        flat[1:] = x.reshape(-1)
        return flat[1:].view(x.shape)  # data pointer one element past 16-byte alignment
    return x


@dataclasses.dataclass
class Inputs:
    """Every list of one call, plus the per-tensor vectors; ``lists[name][i]``."""

    lists: dict[str, list[torch.Tensor]]
    lr_per_tensor: torch.Tensor
    lr_shared: torch.Tensor
    regret: torch.Tensor
    scale: torch.Tensor
    scale_shared: torch.Tensor
    grad_scale: torch.Tensor

    def __getattr__(self, name: str):
        lists = self.__dict__.get("lists", {})
        if name in lists:
            return lists[name]
        raise AttributeError(name)


def make_inputs(p: Problem, kind: str) -> Inputs:
    """Fresh inputs of ``p``: ``kind`` "test" (the problem's dtypes and layout) or "float64" (contiguous)."""
    gen = torch.Generator().manual_seed(p.seed)
    lists: dict[str, list[torch.Tensor]] = {name: [] for name in LISTS}
    for shape, dtype in zip(p.shapes, p.dtypes):
        param = torch.zeros(shape, dtype=torch.float64)
        for name in LISTS:
            x = torch.randn(shape, generator=gen, dtype=torch.float64)
            if name == "exp_avg_sqs":
                x = x.abs() * 0.1
            if name == "snapshots":
                x = x * 0.05 + param  # near the parameters, as in training
            storage = torch.float32 if name == "accumulators" else dtype
            x = x.to(storage).to(torch.float64)  # representable in the tested dtype
            if name == "params":
                param = x
            if kind == "float64":
                lists[name].append(x.to(DEVICE))
            else:
                lists[name].append(_arrange(x.to(device=DEVICE, dtype=storage), p.layout, name))
    n = p.n
    vector = lambda lo, hi: torch.linspace(lo, hi, max(n, 1), device=DEVICE)[:n].contiguous()  # noqa: E731
    return Inputs(
        lists,
        lr_per_tensor=vector(0.05, 0.2),
        lr_shared=torch.tensor([0.1], device=DEVICE),
        regret=vector(-0.3, 0.25),
        scale=vector(0.5, 2.0),
        scale_shared=torch.tensor([0.75], device=DEVICE),
        grad_scale=torch.tensor([3.0], device=DEVICE),  # not a power of two: the division rounds
    )


def magnitude(x: Inputs) -> float:
    """The problem's largest input value over the smallest boundary scale: the size of its intermediates."""
    largest = max((t.abs().max().item() for ts in x.lists.values() for t in ts if t.numel()), default=1.0)
    return largest / 0.5


# ------------------------------------------------------------------------------------- calls
@dataclasses.dataclass(frozen=True)
class Call:
    """One primitive with its keywords; ``run(backend, inputs)`` calls it and returns its output."""

    op: str
    cfg: SGDConfig | AdamConfig | None = None
    lr: str = "float"
    first_step: bool = False
    store: str | None = None
    regret: bool = False
    boundary: str | None = None  # None, "plain", "shared_scale", "scale_and_accumulate"
    grad_scale: bool = False
    of: str = REGULARIZED
    prevs: bool = False  # adam_step: store d into prevs
    step: int = 1
    regret_from_buffer: bool = False  # sgd_step: a regret without prevs reads the old momentum buffers

    def __str__(self) -> str:
        fields = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)]
        return ",".join(f for f in fields if not f.endswith(("=None", "=False")))

    def lr_of(self, x: Inputs):
        return {"float": 0.1, "shared": x.lr_shared, "per_tensor": x.lr_per_tensor}[self.lr]

    def boundary_of(self, x: Inputs) -> Boundary | None:
        if self.boundary is None:
            return None
        scale = {"plain": None, "shared_scale": x.scale_shared, "scale_and_accumulate": x.scale}[self.boundary]
        accumulate = self.boundary == "scale_and_accumulate"
        return Boundary(
            x.snapshots,
            x.prev_displacements,
            scale,
            x.accumulators if accumulate else None,
            0.25 if accumulate else 0.0,
        )

    def run(self, backend, x: Inputs) -> torch.Tensor | None:
        gs = x.grad_scale if self.grad_scale else None
        with torch.no_grad():
            if self.op == "sgd_step":
                return backend.sgd_step(
                    x.params,
                    x.grads,
                    x.buffers,
                    self.lr_of(x),
                    self.cfg,
                    first_step=self.first_step,
                    prevs=x.prevs if (self.store is not None or self.regret) and not self.regret_from_buffer else None,
                    store=self.store,
                    regret=x.regret if self.regret else None,
                    boundary=self.boundary_of(x),
                    grad_scale=gs,
                )
            if self.op == "sgd_reduce":
                return backend.sgd_reduce(
                    x.params,
                    x.grads,
                    x.buffers,
                    x.prevs,
                    self.cfg,
                    first_step=self.first_step,
                    of=self.of,
                    grad_scale=gs,
                )
            if self.op == "boundary_pass":
                return backend.boundary_pass(x.params, self.boundary_of(x))
            if self.op == "adam_step":
                return backend.adam_step(
                    x.params,
                    x.grads,
                    x.exp_avgs,
                    x.exp_avg_sqs,
                    self.lr_of(x),
                    self.cfg,
                    step=self.step,
                    prevs=x.prevs if self.prevs or self.regret else None,
                    regret=x.regret if self.regret else None,
                    grad_scale=gs,
                )
            assert self.op == "adam_reduce"
            return backend.adam_reduce(
                x.params, x.grads, x.exp_avgs, x.exp_avg_sqs, x.prevs, self.cfg, step=self.step, grad_scale=gs
            )


SGD_CONFIGS = (
    SGDConfig(),
    SGDConfig(weight_decay=0.01, maximize=True),
    SGDConfig(momentum=0.9),
    SGDConfig(momentum=0.9, dampening=0.1, weight_decay=0.01),
    SGDConfig(momentum=0.9, nesterov=True, weight_decay=0.01, maximize=True),
)
ADAM_CONFIGS = (
    AdamConfig(),
    AdamConfig(weight_decay=0.01),
    AdamConfig(weight_decay=0.01, decoupled_weight_decay=True, maximize=True),
    AdamConfig(beta1=0.3, beta2=0.99, eps=1e-6),  # 1 - beta1 >= 0.5: lerp's other branch
    AdamConfig(beta1=0.0, weight_decay=0.1, decoupled_weight_decay=True),
)
LR_KINDS = ("float", "shared", "per_tensor")
BOUNDARIES = (None, "plain", "shared_scale", "scale_and_accumulate")


def _sgd_step_calls() -> list[Call]:
    keywords = itertools.product(SGD_CONFIGS, (False, True), (None, REGULARIZED, DIRECTION), (False, True), BOUNDARIES,
                                 (False, True))  # fmt: skip
    return [
        Call("sgd_step", cfg, LR_KINDS[i % 3], first, store, regret, boundary, gs)
        for i, (cfg, first, store, regret, boundary, gs) in enumerate(keywords)
        if cfg.momentum != 0 or not first
    ]


def _adam_step_calls() -> list[Call]:
    keywords = itertools.product(ADAM_CONFIGS, ((False, False), (True, False), (True, True)), (False, True), (1, 7))
    return [
        Call("adam_step", cfg, LR_KINDS[i % 3], regret=regret, grad_scale=gs, prevs=prevs, step=step)
        for i, (cfg, (prevs, regret), gs, step) in enumerate(keywords)
    ]


# The table: every keyword combination of every primitive.
CALLS = (
    _sgd_step_calls()
    + [
        Call("sgd_step", cfg, "per_tensor", regret=True, boundary=boundary, grad_scale=gs, regret_from_buffer=True)
        for cfg, boundary, gs in itertools.product(SGD_CONFIGS[2:4], (None, "plain"), (False, True))
    ]
    + [
        Call("sgd_reduce", cfg, first_step=first, of=of, grad_scale=gs)
        for cfg, first, of, gs in itertools.product(SGD_CONFIGS, (False, True), (REGULARIZED, DIRECTION), (False, True))
        if cfg.momentum != 0 or not first
    ]
    + [Call("boundary_pass", boundary=b) for b in BOUNDARIES[1:]]
    + _adam_step_calls()
    + [
        Call("adam_reduce", cfg, grad_scale=gs, step=step)
        for cfg, gs, step in itertools.product(ADAM_CONFIGS, (False, True), (1, 7))
    ]
)

# One full-featured call per primitive, for the size, layout, rerun, graph and sync tests.
FULL_CALLS = {
    "sgd_step": Call("sgd_step", SGD_CONFIGS[4], "per_tensor", store=DIRECTION, regret=True, grad_scale=True),
    "sgd_step_boundary": Call(
        "sgd_step",
        SGD_CONFIGS[3],
        "shared",
        store=REGULARIZED,
        regret=True,
        boundary="scale_and_accumulate",
        grad_scale=True,
    ),  # fmt: skip
    "sgd_reduce": Call("sgd_reduce", SGD_CONFIGS[4], of=DIRECTION, grad_scale=True),
    "boundary_pass": Call("boundary_pass", boundary="scale_and_accumulate"),
    "adam_step": Call("adam_step", ADAM_CONFIGS[2], "per_tensor", regret=True, grad_scale=True, prevs=True, step=3),
    "adam_reduce": Call("adam_reduce", ADAM_CONFIGS[1], grad_scale=True, step=3),
}


# ------------------------------------------------------------------------------------- checks
def _check_float32(name: str, got: torch.Tensor, ref: torch.Tensor, scale: float) -> None:
    tol = 8 * EPS32 * (ref.double().abs() + scale)
    err = (got.double() - ref.double()).abs()
    assert (err <= tol).all(), f"{name}: max error {err.max().item():.3g} over {tol.max().item():.3g}"


def _check_low_precision(name: str, got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, scale: float) -> None:
    finfo = torch.finfo(got.dtype)
    t = truth.double()
    err, ref_err = (got.double() - t).abs(), (ref.double() - t).abs()
    ulp = finfo.eps * t.abs() + finfo.tiny * finfo.eps + 8 * EPS32 * scale
    assert (err <= 2 * ref_err + ulp).all(), f"{name}: error {(err - 2 * ref_err).max().item():.3g} over 2x reference"
    norm, ref_norm = err.norm().item(), ref_err.norm().item()
    assert norm <= 2 * ref_norm + finfo.eps / 16 * t.norm().item(), f"{name}: ||error|| {norm:.3g} > 2 * {ref_norm:.3g}"


def _check_tensor(name: str, got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor | None, scale: float) -> None:
    assert got.dtype == ref.dtype and got.shape == ref.shape, name
    assert torch.isfinite(got).all(), f"{name}: not finite"
    if got.dtype == torch.float32 or truth is None:
        if got.dtype == torch.float32:
            _check_float32(name, got, ref, scale)
        else:  # the same arithmetic on both sides: one rounding apart at most
            finfo = torch.finfo(got.dtype)
            err = (got.double() - ref.double()).abs()
            assert (err <= finfo.eps * ref.double().abs() + finfo.tiny * finfo.eps).all(), f"{name}: over 1 ulp"
    else:
        _check_low_precision(name, got, ref, truth, scale)


def _stats_scale(rows: torch.Tensor, prev_sq: torch.Tensor) -> torch.Tensor:
    """Per entry, the size its error is measured against: sqrt(||a||^2 ||b||^2) for an inner product."""
    rows = rows.double().abs()
    if rows.shape[1] == 3:  # <u, prev>, ||u||^2, ||prev||^2
        return torch.stack([(rows[:, 1] * rows[:, 2]).sqrt(), rows[:, 1], rows[:, 2]], dim=1)
    return torch.stack([(rows[:, 1] * prev_sq).sqrt(), rows[:, 1]], dim=1)


def _check_stats(name: str, got: torch.Tensor, ref: torch.Tensor, truth: torch.Tensor, prev_sq: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and got.device == ref.device and got.shape == ref.shape, name
    assert torch.isfinite(got).all(), f"{name}: not finite"
    t = truth.double()
    err, ref_err = (got.double() - t).abs(), (ref.double() - t).abs()
    slack = 1e-5 * _stats_scale(t, prev_sq) + 1e-30
    assert (err <= 2 * ref_err + slack).all(), f"{name}: {got.tolist()} vs {t.tolist()} (reference {ref.tolist()})"


def _clone_inputs(x: Inputs) -> Inputs:
    lists = {name: [t.clone(memory_format=torch.preserve_format) for t in ts] for name, ts in x.lists.items()}
    return dataclasses.replace(x, lists=lists)


def compare(call: Call, p: Problem) -> None:
    """``call`` on the cuda and reference backends (and reference in float64): every list afterwards, the output."""
    got_x, ref_x, truth_x = make_inputs(p, "test"), make_inputs(p, "test"), make_inputs(p, "float64")
    before = _clone_inputs(got_x)
    scale = magnitude(got_x)
    prev_sq = torch.stack([t.double().square().sum() for t in truth_x.prevs]) if p.n else torch.zeros(0)
    got = call.run(cuda_backend, got_x)
    ref = call.run(reference, ref_x)
    grads = truth_x.grads
    if call.grad_scale:  # unscaled in float64, not in reference.py's float32
        truth_x.lists["grads"] = [g / truth_x.grad_scale.double() for g in grads]
    truth = dataclasses.replace(call, grad_scale=False).run(reference, truth_x)
    truth_x.lists["grads"] = grads
    assert (got is None) == (ref is None), "output"
    fused_boundary = call.op == "sgd_step" and call.boundary is not None
    boundary_lists = ("snapshots", "prev_displacements", "accumulators")
    for name in LISTS:
        if fused_boundary and name in boundary_lists:
            continue
        for i, (g, r, t) in enumerate(zip(got_x.lists[name], ref_x.lists[name], truth_x.lists[name])):
            _check_tensor(f"{name}[{i}] {tuple(g.shape)} {g.dtype}", g, r, t, scale)
    if fused_boundary:
        # The pass after the update, from the parameters as this backend stored them.
        expect = dataclasses.replace(before, lists={**before.lists, "params": got_x.params})
        expect_stats = reference.boundary_pass(expect.params, call.boundary_of(expect))
        for name in boundary_lists:
            for i, (g, e) in enumerate(zip(got_x.lists[name], expect.lists[name])):
                _check_tensor(f"{name}[{i}] {tuple(g.shape)} {g.dtype}", g, e, None, scale)
        _check_stats("boundary statistics", got, expect_stats, expect_stats.double(), prev_sq)
    elif got is not None:
        _check_stats("statistics", got, ref, truth, prev_sq)


# ------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("call", CALLS, ids=str)
def test_every_keyword_combination_matches_reference(call, dtype):
    compare(call, problem(SMALL_SHAPES, dtype))


ODD_PROBLEMS = {
    "278011_elements": lambda d: problem([(278011,), (1,), (0,), (65536,), (65537,)], d),
    "130_tensors": lambda d: problem([(1 + (37 * i) % 2000,) for i in range(130)], d),
    "700_tensors": lambda d: problem([(1 + (53 * i) % 300,) for i in range(700)], d),
    "channels_last": lambda d: problem([(2, 3, 5, 7), (4, 8, 3, 3), (1, 16, 1, 1)], d, "channels_last"),
    "params_channels_last_state_contiguous": lambda d: problem([(2, 3, 5, 7), (3, 4, 2, 2)], d, "params_channels_last"),
    "transposed_views": lambda d: problem([(5, 7), (64, 33), (1, 9)], d, "transposed"),
    "non_dense_views": lambda d: problem([(4, 10), (3, 1)], d, "strided"),
    "misaligned_pointers": lambda d: problem([(1001,), (4097,), (8,)], d, "misaligned"),
}
ODD_CASES = [(shapes, dtype) for shapes in ODD_PROBLEMS for dtype in DTYPES] + [("mixed_dtypes", DTYPES)]


@pytest.mark.parametrize("shapes,dtype", ODD_CASES, ids=str)
@pytest.mark.parametrize("name", FULL_CALLS)
def test_odd_sizes_and_layouts_match_reference(name, shapes, dtype):
    make = ODD_PROBLEMS.get(shapes, lambda d: problem([(300,), (301,), (302,), (70000,), (5, 5), (9,)], d))
    compare(FULL_CALLS[name], make(dtype))


def _outputs(call: Call, p: Problem) -> list[torch.Tensor]:
    x = make_inputs(p, "test")
    out = call.run(cuda_backend, x)
    return [t for ts in x.lists.values() for t in ts] + ([] if out is None else [out])


@pytest.mark.parametrize("name", FULL_CALLS)
def test_reruns_are_bit_identical(name):
    p = problem([(278011,), (1,), (3, 5)] + [(1 + i,) for i in range(400)], (torch.float32, torch.bfloat16))
    first, second = _outputs(FULL_CALLS[name], p), _outputs(FULL_CALLS[name], p)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("name", FULL_CALLS)
def test_at_most_two_kernel_launches_per_call(name):
    call = FULL_CALLS[name]
    x = make_inputs(problem([(278011,)] + [(1 + i,) for i in range(100)], torch.float32), "test")
    call.run(cuda_backend, x)  # warm up (module load)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        call.run(cuda_backend, x)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ours = [k for k in kernels if "autolr_fused" in k]
    has_stats = call.op != "adam_step" and not (call.op == "sgd_step" and call.boundary is None)
    assert len(ours) == (2 if has_stats else 1) and len(ours) == len(kernels), kernels


def test_no_host_synchronisation_in_a_primitive():
    x = make_inputs(problem(SMALL_SHAPES + ((278011,),), torch.bfloat16), "test")
    for call in FULL_CALLS.values():
        call.run(cuda_backend, x)  # warm up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in FULL_CALLS.values():
            call.run(cuda_backend, x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("name", FULL_CALLS)
def test_a_captured_primitive_replays_like_the_eager_call(name):
    call = FULL_CALLS[name]
    p = problem([(278011,), (7,), (0,), (3, 5)], (torch.float32, torch.float16))
    eager, graphed = make_inputs(p, "test"), make_inputs(p, "test")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call.run(cuda_backend, _clone_inputs(graphed))  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured_out = call.run(cuda_backend, graphed)
    expected_out = None
    for _ in range(2):
        graph.replay()
        expected_out = call.run(cuda_backend, eager)
    torch.cuda.synchronize()
    for name_, (a, b) in ((n, ab) for n in LISTS for ab in zip(graphed.lists[n], eager.lists[n])):
        assert torch.equal(a, b), name_
    assert (captured_out is None) == (expected_out is None)
    if captured_out is not None:
        assert torch.equal(captured_out, expected_out)


def _model_params(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(64, 3, 3, 3), (64,), (1000, 256), (256,), (10, 278011 // 10)]
    params = [torch.randn(s, generator=gen).to(DEVICE).requires_grad_(True) for s in shapes]
    params[0].data = params[0].data.contiguous(memory_format=torch.channels_last)
    return params


def _set_grads(params: list[torch.Tensor], step: int) -> None:
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        g = torch.randn(p.shape, generator=gen).to(DEVICE)
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.copy_(g)  # in place: a captured step reads the same gradient memory


OPTIMIZERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "FusedSGD": lambda ps: FusedSGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-4, backend="cuda"),
    "FusedTLR": lambda ps: FusedTLR(ps, lr=0.05, momentum=0.8, weight_decay=5e-4, backend="cuda"),
}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_captured_optimizer_step_replays_like_eager_steps(name):
    eager_params, graphed_params = _model_params(0), _model_params(0)
    eager, graphed = OPTIMIZERS[name](eager_params), OPTIMIZERS[name](graphed_params)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for step in range(3):  # warm up: state, momentum buffers and previous gradients exist before the capture
            _set_grads(graphed_params, step)
            graphed.step()
    torch.cuda.current_stream().wait_stream(side)
    for step in range(3):
        _set_grads(eager_params, step)
        eager.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed.step()
    for step in range(3, 8):
        _set_grads(graphed_params, step)
        graph.replay()
        _set_grads(eager_params, step)
        eager.step()
    torch.cuda.synchronize()
    for a, b in zip(graphed_params, eager_params):
        assert torch.equal(a, b)
    lr = [g["lr"] for g in graphed.param_groups], [g["lr"] for g in eager.param_groups]
    assert all(float(a) == float(b) for a, b in zip(*lr))


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_an_optimizer_step_does_not_synchronise(name):
    params = _model_params(1)
    opt = OPTIMIZERS[name](params)
    for step in range(3):
        _set_grads(params, step)
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.slow
def test_a_tensor_of_more_than_2_31_elements_is_indexed_in_64_bits():
    n = 2**31 + 70000
    if torch.cuda.get_device_properties(DEVICE).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GB of GPU memory")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    p, g, prev = (torch.randn(n, generator=gen, device=DEVICE, dtype=torch.bfloat16) for _ in range(3))
    cfg = SGDConfig(weight_decay=0.01)
    piece = 2**27
    a_dot_prev = a_sq = prev_sq = 0.0
    for i in range(0, n, piece):
        a = g[i : i + piece].double() + 0.01 * p[i : i + piece].double()
        b = prev[i : i + piece].double()
        a_dot_prev += (a * b).sum().item()
        a_sq += (a * a).sum().item()
        prev_sq += (b * b).sum().item()
    stats = cuda_backend.sgd_reduce([p], [g], [], [prev], cfg)
    # A wrong offset past 2^31 would move the inner product by about sqrt(n), 200 times the tolerance.
    assert math.isclose(stats[0, 0].item(), a_dot_prev, rel_tol=1e-6, abs_tol=1e-7 * math.sqrt(a_sq * prev_sq))
    assert math.isclose(stats[0, 1].item(), a_sq, rel_tol=1e-6)
    # Elementwise, the update of a slice as a tensor of its own is the update of the slice in place.
    pieces = (slice(0, 1000), slice(2**31 - 35000, 2**31 + 35000), slice(n - 70001, n))
    expected = [p[s].clone() for s in pieces]
    cuda_backend.sgd_step(expected, [g[s].clone() for s in pieces], [], 0.1, cfg)
    cuda_backend.sgd_step([p], [g], [], 0.1, cfg)
    for s, e in zip(pieces, expected):
        assert torch.equal(p[s], e), s
