"""The triton backend's five primitives against reference.py, keyword by keyword, dtype by dtype.

Without a GPU the kernels run on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, set here before the kernels are first used, for the rest
of the session too); with one, compiled, on CUDA tensors. The module is skipped when
Triton is not installed. The interpreter is slow, so tensors are small and the
kernels' tile sizes are lowered (``BLOCK=64``, ``CHUNK=128`` elements) so that small tensors
still span several blocks, full (unmasked) tiles and masked tails; one test runs
a 278011-element tensor at the default sizes.

Keyword coverage: every SGD direction (momentum 0 / 0.9, dampening, Nesterov,
weight decay, maximize, first_step) and every Adam configuration runs once,
meeting the other keywords in turn; the other keywords (store, regret,
boundary with and without scale and accumulators, grad_scale, lr as a float, a
1-element or a per-tensor tensor) are covered pairwise by 12 (SGD) and 9 (Adam)
rows. Layouts (one element, 0 elements, channels_last, a 3-D channels-last
permutation, transposed views, a non-dense view, a parameter whose state has
other strides) run once per primitive and dtype.

Tolerances:

* float32 tensors: ``rtol=2e-6`` plus 4 ulps of the tensor's largest entry (for
  near-zero results after cancellation). The kernels compute in float32 in
  reference.py's order; what differs is the rounding of multiply-adds (torch's
  vectorised CPU ops fuse them, the interpreter does not): a few ulps.
* float32 statistics: ``rtol=1e-5`` plus 1e-5 of the row's largest entry; the
  kernels add in another order than torch.sum.
* bfloat16 / float16, the style guide's rule: per tensor, the largest error
  against the same call in float64 (reference backend) is at most twice the
  reference backend's own error at that dtype, plus one ulp of the tensor's
  largest value (so that a correctly rounded result passes where the reference
  happens to be exact). Statistics: the same rule, with 1e-5 of the row's
  largest entry for the ulp. The boundary statistics of a fused ``sgd_step`` are
  those of the parameters as each backend stored them, whose roundings differ
  element by element; they are checked against a float64 computation from this
  backend's own stored parameters (float32 statistics tolerance).

Low-precision Adam with grad_scale checks that the unscaled gradient is rounded to
the moments' dtype before use, as reference.py does (SGD keeps it in float32).

End to end, a few optimizers (FusedTLR, FusedRDBD with an Adam base,
FusedAutoDropSGD with its epoch boundary) take the same steps on this backend
and on reference (the float32 tolerance of ``tests/test_backends.py``). A
subprocess compiles the kernel for sm_90 without a GPU (where Triton's NVIDIA
backend is installed): the interpreter alone would not catch what only the
compiler refuses (e.g. a non-constexpr global).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

# Without a GPU the kernels are interpreted on CPU tensors: TRITON_INTERPRET=1 must be set before Triton
# decorates them (on their first use), and stays set. With a GPU the compiled kernels
# are tested on CUDA tensors, and the variable is left alone so that the session's backend stays compiled.
if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton", reason="triton is not installed (pip install 'autolr-fused[triton]')")

from torch import nn  # noqa: E402

from autolr_fused import FusedAutoDropSGD, FusedRDBD, FusedTLR  # noqa: E402
from autolr_fused.backends import reference  # noqa: E402
from autolr_fused.backends import triton as triton_backend  # noqa: E402
from autolr_fused.backends.primitives import DIRECTION, REGULARIZED, Boundary  # noqa: E402
from autolr_fused.backends.triton import _launch  # noqa: E402
from autolr_fused.directions import AdamConfig, SGDConfig  # noqa: E402

# The kernels are decorated on first use, so importing the package before this module (as other test modules
# do) is fine; only kernels already loaded compiled without a GPU could not run here.
if not triton_backend.available():
    pytest.skip("the triton kernels were loaded compiled, and there is no GPU", allow_module_level=True)
DEVICE = torch.device("cpu" if _launch.interpreted() else "cuda")
REPO = Path(__file__).resolve().parent.parent

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LOW_PRECISION = [torch.bfloat16, torch.float16]

# (name, base shape, layout); the layout turns a contiguous base into the tensor each list holds there.
SMALL = [
    ("one_element", (1,), "contiguous"),
    ("prime_length", (37,), "contiguous"),
    ("three_blocks", (300,), "contiguous"),  # 2 blocks of 2 full tiles, one block with a tail only
    ("empty", (0,), "contiguous"),
]
LAYOUTS = SMALL + [
    ("channels_last", (2, 3, 4, 5), "channels_last"),
    ("three_d_channels_last", (2, 6, 5), "channels_last_3d"),  # (N, L, C) memory viewed as (N, C, L)
    ("transposed", (6, 5), "transposed"),  # a transposed view in every list: same strides, in place
    ("strided", (4, 10), "strided"),  # a non-dense view: processed on contiguous copies
    ("params_only_channels_last", (2, 3, 2, 3), "params_only_channels_last"),  # state strides differ: copies
]
SLOTS = (
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


def layout(base: torch.Tensor, kind: str, slot: str) -> torch.Tensor:
    if kind == "channels_last" or (kind == "params_only_channels_last" and slot == "params"):
        return base.contiguous(memory_format=torch.channels_last)
    if kind == "channels_last_3d":
        return base.permute(0, 2, 1)
    if kind == "transposed":
        return base.t()
    if kind == "strided":
        return base[:, ::2]
    return base


def make_problem(dtype: torch.dtype, tensors, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Contiguous float32 bases of every list, with values representable in ``dtype``."""
    gen = torch.Generator().manual_seed(seed)
    problem = {}
    for slot in SLOTS:
        bases = []
        for _, shape, _ in tensors:
            x = torch.randn(shape, generator=gen)
            if slot == "exp_avg_sqs":
                x = x.abs() * 0.1
            bases.append(x if slot == "accumulators" else x.to(dtype).float())
        problem[slot] = bases
    return problem


def materialise(problem, dtype: torch.dtype, tensors) -> dict[str, list[torch.Tensor]]:
    """Fresh tensors of ``dtype`` (accumulators: float32, or float64 for the float64 run) in each layout."""
    lists = {}
    for slot, bases in problem.items():
        slot_dtype = torch.float32 if slot == "accumulators" and dtype != torch.float64 else dtype
        lists[slot] = [
            layout(b.to(DEVICE, slot_dtype, copy=True), kind, slot) for b, (_, _, kind) in zip(bases, tensors)
        ]
    return lists


def run(backend, problem, dtype, call, tensors):
    lists = materialise(problem, dtype, tensors)
    with torch.no_grad():
        out = call(backend, lists)
    return lists, out


def ulp_of_largest(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).eps * t.double().abs().max().item() if t.numel() else 0.0


def assert_float32_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    if expected.numel():
        atol = 4 * torch.finfo(torch.float32).eps * expected.abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_stats_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape and actual.dtype == torch.float32, what
    slack = 1e-5 * expected.abs().amax(dim=1, keepdim=True)
    assert ((actual - expected).abs() <= 1e-5 * expected.abs() + slack).all(), f"{what}: {actual} != {expected}"


def boundary_stats_of_stored(lists_out, lists_in, scale) -> torch.Tensor:
    """The boundary rows in float64 from the parameters as stored and the pass's inputs."""
    rows = []
    triples = zip(lists_out["params"], lists_in["snapshots"], lists_in["prev_displacements"])
    for i, (p, snap, prev) in enumerate(triples):
        u = p.double() - snap.double()
        if scale is not None:
            u = u / scale[0 if scale.numel() == 1 else i].double()
        prev = prev.double()
        rows.append(torch.stack([(u * prev).sum(), (u * u).sum(), (prev * prev).sum()]))
    return torch.stack(rows).float()


def compare(call, dtype, tensors=SMALL, boundary_kind=None) -> None:
    """``call(backend, lists)`` on the triton and reference backends: every list afterwards, and the output."""
    problem = make_problem(dtype, tensors)
    got, got_out = run(triton_backend, problem, dtype, call, tensors)
    ref, ref_out = run(reference, problem, dtype, call, tensors)
    assert (got_out is None) == (ref_out is None)
    if dtype == torch.float32:
        for slot in got:
            for i, (a, b) in enumerate(zip(got[slot], ref[slot])):
                assert_float32_close(a, b, f"{slot}[{i}] ({tensors[i][0]})")
        if ref_out is not None:
            assert_stats_close(got_out, ref_out, "statistics")
        return
    truth, truth_out = run(reference, problem, torch.float64, call, tensors)
    for slot in got:
        for i, (a, b, t) in enumerate(zip(got[slot], ref[slot], truth[slot])):
            if t.numel():
                err, ref_err = (a.double() - t).abs().max().item(), (b.double() - t).abs().max().item()
                assert err <= 2 * ref_err + ulp_of_largest(a), f"{slot}[{i}] ({tensors[i][0]}): {err} > 2 * {ref_err}"
    if boundary_kind is not None:
        inputs = materialise(problem, dtype, tensors)
        scale = boundary_of(boundary_kind, inputs).scale
        assert_stats_close(got_out, boundary_stats_of_stored(got, inputs, scale), "boundary statistics")
    elif ref_out is not None:
        err = (got_out.double() - truth_out).abs()
        ref_err = (ref_out.double() - truth_out).abs()
        slack = 1e-5 * truth_out.abs().amax(dim=1, keepdim=True)
        assert (err <= 2 * ref_err + slack).all(), f"statistics: {got_out} vs {truth_out} (reference {ref_out})"


def lr_of(kind: str, n: int, value: float = 0.1):
    """The lr forms a primitive takes: a float, a shared 1-element tensor, or one element per tensor."""
    if kind == "float":
        return value
    if kind == "shared":
        return torch.tensor([value], device=DEVICE)
    return torch.linspace(0.5, 1.5, n, device=DEVICE) * value


def regret_of(n: int) -> torch.Tensor:
    return torch.linspace(-0.3, 0.2, n, device=DEVICE)


GRAD_SCALE = torch.tensor([4.0], device=DEVICE)


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(_launch, "BLOCK", 64)
    monkeypatch.setattr(_launch, "CHUNK", 128)


# --------------------------------------------------------------------------------------- sgd
# (momentum, dampening, nesterov, weight_decay, maximize, first_step): momentum 0 (dampening, Nesterov and
# first_step do not apply), or 0.9 plain, with dampening or Nesterov; each with and without weight decay,
# maximize and (with momentum) first_step.
SGD_DIRECTIONS = [(0.0, 0.0, False, wd, mx, False) for wd, mx in itertools.product((0.0, 0.01), (False, True))] + [
    (0.9, damp, nest, wd, mx, first)
    for (damp, nest), wd, mx, first in itertools.product(
        ((0.0, False), (0.1, False), (0.0, True)), (0.0, 0.01), (False, True), (False, True)
    )
]
STORES = (None, REGULARIZED, DIRECTION)
BOUNDARIES = ("none", "plain", "shared_scale", "scale_and_accumulate")
LR_KINDS = ("float", "shared", "per_tensor")
# (store, regret, boundary, grad_scale, lr): every pair of values of two keywords occurs in some row.
SGD_KEYWORDS = [
    (store, i % 2 == 1, boundary, (i // 2) % 2 == 1, LR_KINDS[(i + i // 3) % 3])
    for i, (boundary, store) in enumerate(itertools.product(BOUNDARIES, STORES))
]


def boundary_of(kind: str, lists) -> Boundary | None:
    n = len(lists["params"])
    if kind == "none":
        return None
    scale = {
        "plain": None,
        "shared_scale": torch.tensor([0.5], device=DEVICE),
        "scale_and_accumulate": torch.linspace(0.2, 2, n, device=DEVICE),
    }
    accumulate = kind == "scale_and_accumulate"
    return Boundary(
        lists["snapshots"],
        lists["prev_displacements"],
        scale[kind],
        lists["accumulators"] if accumulate else None,
        3.0 if accumulate else 0.0,
    )


def sgd_step_call(direction, store, regret, boundary, grad_scale, lr_kind):
    momentum, dampening, nesterov, weight_decay, maximize, first_step = direction
    cfg = SGDConfig(momentum, dampening, weight_decay, nesterov, maximize)

    def call(backend, lists):
        n = len(lists["params"])
        return backend.sgd_step(
            lists["params"],
            lists["grads"],
            lists["buffers"],
            lr_of(lr_kind, n),
            cfg,
            first_step=first_step,
            prevs=lists["prevs"] if store is not None or regret else None,
            store=store,
            regret=regret_of(n) if regret else None,
            boundary=boundary_of(boundary, lists),
            grad_scale=GRAD_SCALE if grad_scale else None,
        )

    return call


@pytest.mark.parametrize("direction", SGD_DIRECTIONS, ids=str)
def test_sgd_step_matches_reference_for_every_direction(direction):
    keywords = SGD_KEYWORDS[SGD_DIRECTIONS.index(direction) % len(SGD_KEYWORDS)]
    compare(sgd_step_call(direction, *keywords), torch.float32)


@pytest.mark.parametrize("keywords", SGD_KEYWORDS, ids=str)
def test_sgd_step_matches_reference_for_every_pair_of_keywords(keywords):
    compare(sgd_step_call((0.9, 0.1, False, 0.01, False, False), *keywords), torch.float32)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize(
    "direction, keywords",
    [
        ((0.0, 0.0, False, 0.01, True, False), (DIRECTION, True, "scale_and_accumulate", True, "per_tensor")),
        ((0.9, 0.1, False, 0.0, False, False), (REGULARIZED, False, "plain", False, "float")),
        ((0.9, 0.0, True, 0.01, False, True), (None, False, "shared_scale", True, "shared")),
    ],
    ids=str,
)
def test_sgd_step_low_precision_error_is_at_most_twice_the_references(dtype, direction, keywords):
    compare(sgd_step_call(direction, *keywords), dtype, boundary_kind=keywords[2])


@pytest.mark.parametrize("dtype", [torch.float32, *LOW_PRECISION], ids=str)
@pytest.mark.parametrize(
    "direction", [(0.9, 0.0, False, 0.0, False, False), (0.9, 0.1, False, 0.01, True, False)], ids=str
)
def test_sgd_step_regret_from_the_momentum_buffer_matches_reference(direction, dtype):
    """A regret without prevs reads the momentum buffer before this step's update (momentum, no nesterov)."""
    momentum, dampening, nesterov, weight_decay, maximize, first_step = direction
    cfg = SGDConfig(momentum, dampening, weight_decay, nesterov, maximize)

    def call(backend, lists):
        n = len(lists["params"])
        return backend.sgd_step(
            lists["params"], lists["grads"], lists["buffers"], lr_of("per_tensor", n), cfg,
            regret=regret_of(n), grad_scale=GRAD_SCALE,
        )  # fmt: skip

    compare(call, dtype)


def test_sgd_step_regret_without_prevs_is_refused_with_nesterov():
    problem = make_problem(torch.float32, SMALL)
    lists = materialise(problem, torch.float32, SMALL)
    n = len(lists["params"])
    with pytest.raises(ValueError, match="regret without prevs"):
        triton_backend.sgd_step(
            lists["params"], lists["grads"], lists["buffers"], 0.1, SGDConfig(0.9, 0.0, 0.0, True, False),
            regret=regret_of(n),
        )  # fmt: skip


def sgd_reduce_call(direction, of, grad_scale):
    momentum, dampening, nesterov, weight_decay, maximize, first_step = direction
    cfg = SGDConfig(momentum, dampening, weight_decay, nesterov, maximize)

    def call(backend, lists):
        return backend.sgd_reduce(
            lists["params"],
            lists["grads"],
            lists["buffers"],
            lists["prevs"],
            cfg,
            first_step=first_step,
            of=of,
            grad_scale=GRAD_SCALE if grad_scale else None,
        )

    return call


@pytest.mark.parametrize("direction", SGD_DIRECTIONS, ids=str)
def test_sgd_reduce_matches_reference_for_every_direction(direction):
    i = SGD_DIRECTIONS.index(direction)
    # of and grad_scale alternate so that each meets both values of every direction flag
    compare(sgd_reduce_call(direction, (REGULARIZED, DIRECTION)[i % 2], i % 4 < 2), torch.float32)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("of", (REGULARIZED, DIRECTION))
def test_sgd_reduce_low_precision_error_is_at_most_twice_the_references(dtype, of):
    compare(sgd_reduce_call((0.9, 0.0, True, 0.01, True, False), of, True), dtype)


# ---------------------------------------------------------------------------------- boundary
def boundary_call(kind):
    def call(backend, lists):
        if kind == "per_tensor_scale":  # without accumulators
            scale = torch.linspace(0.5, 1, len(lists["params"]), device=DEVICE)
            boundary = Boundary(lists["snapshots"], lists["prev_displacements"], scale)
            return backend.boundary_pass(lists["params"], boundary)
        return backend.boundary_pass(lists["params"], boundary_of(kind, lists))

    return call


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", BOUNDARIES[1:] + ("per_tensor_scale",))
def test_boundary_pass_matches_reference(dtype, kind):
    compare(boundary_call(kind), dtype)


# -------------------------------------------------------------------------------------- adam
# (beta1, weight_decay, decoupled, maximize). beta1 = 0.9 takes torch's lerp branch for a small weight
# (1 - beta1 < 0.5); beta1 = 0.05 (the RDBD paper's Adam runs) the other.
ADAM_CONFIGS = [
    (beta1, wd, decoupled, maximize)
    for beta1, (wd, decoupled), maximize in itertools.product(
        (0.9, 0.05), ((0.0, False), (0.1, False), (0.1, True)), (False, True)
    )
]
# (prevs: none / stored / stored and regretted, grad_scale, lr): every pair occurs.
ADAM_KEYWORDS = [
    (prevs, i % 2 == 1, lr) for i, (prevs, lr) in enumerate(itertools.product(("none", "prevs", "regret"), LR_KINDS))
]


def adam_step_call(config, prevs, grad_scale, lr_kind, step=3):
    beta1, weight_decay, decoupled, maximize = config
    cfg = AdamConfig(beta1, 0.99, 1e-8, weight_decay, decoupled, maximize)

    def call(backend, lists):
        n = len(lists["params"])
        return backend.adam_step(
            lists["params"],
            lists["grads"],
            lists["exp_avgs"],
            lists["exp_avg_sqs"],
            lr_of(lr_kind, n, 0.01),
            cfg,
            step=step,
            prevs=lists["prevs"] if prevs != "none" else None,
            regret=regret_of(n) if prevs == "regret" else None,
            grad_scale=GRAD_SCALE if grad_scale else None,
        )

    return call


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
def test_adam_step_matches_reference_for_every_config(config):
    i = ADAM_CONFIGS.index(config)
    compare(adam_step_call(config, *ADAM_KEYWORDS[i % len(ADAM_KEYWORDS)], step=1 + i % 3), torch.float32)


@pytest.mark.parametrize("keywords", ADAM_KEYWORDS, ids=str)
def test_adam_step_matches_reference_for_every_pair_of_keywords(keywords):
    compare(adam_step_call((0.9, 0.1, True, False), *keywords), torch.float32)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("config", [(0.9, 0.1, True, False), (0.05, 0.1, False, True)], ids=str)
def test_adam_step_low_precision_error_is_at_most_twice_the_references(dtype, config):
    # with grad_scale for AdamW: the unscaled float32 gradient is rounded to the moments' dtype first
    compare(adam_step_call(config, "regret", config[2], "per_tensor"), dtype)


def adam_reduce_call(config, grad_scale, step=3):
    beta1, weight_decay, decoupled, maximize = config
    cfg = AdamConfig(beta1, 0.99, 1e-8, weight_decay, decoupled, maximize)

    def call(backend, lists):
        return backend.adam_reduce(
            lists["params"],
            lists["grads"],
            lists["exp_avgs"],
            lists["exp_avg_sqs"],
            lists["prevs"],
            cfg,
            step=step,
            grad_scale=GRAD_SCALE if grad_scale else None,
        )

    return call


@pytest.mark.parametrize("config", ADAM_CONFIGS, ids=str)
def test_adam_reduce_matches_reference_for_every_config(config):
    compare(adam_reduce_call(config, ADAM_CONFIGS.index(config) % 2 == 0), torch.float32)


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("grad_scale", (False, True))
def test_adam_reduce_low_precision_error_is_at_most_twice_the_references(dtype, grad_scale):
    compare(adam_reduce_call((0.05, 0.1, False, True), grad_scale), dtype)


# ------------------------------------------------------------------- layouts and launch shapes
LAYOUT_CALLS = {
    "sgd_step": sgd_step_call(
        (0.9, 0.0, True, 0.01, True, False), DIRECTION, True, "scale_and_accumulate", True, "per_tensor"
    ),  # fmt: skip
    "sgd_reduce": sgd_reduce_call((0.9, 0.1, False, 0.01, False, False), REGULARIZED, True),
    "boundary_pass": boundary_call("scale_and_accumulate"),
    "adam_step": adam_step_call((0.9, 0.1, True, True), "regret", False, "shared"),
    "adam_reduce": adam_reduce_call((0.05, 0.1, False, False), False),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("primitive", LAYOUT_CALLS)
def test_every_layout_matches_reference(primitive, dtype):
    """One element, 0 elements, channels_last, a 3-D channels-last view, transposed and non-dense views."""
    boundary_kind = "scale_and_accumulate" if primitive == "sgd_step" else None
    compare(LAYOUT_CALLS[primitive], dtype, LAYOUTS, boundary_kind=boundary_kind)


def test_dense_layouts_run_in_place_and_the_others_on_copies():
    lists = materialise(make_problem(torch.float32, LAYOUTS), torch.float32, LAYOUTS)
    plan = _launch.plan([lists["params"], lists["grads"], lists["buffers"]], written=(0, 2))
    copied = {id(original) for original, _ in plan.copies}
    names = {name for (name, _, _), p, b in zip(LAYOUTS, lists["params"], lists["buffers"]) if {id(p), id(b)} & copied}
    assert names == {"strided", "params_only_channels_last"}
    assert len(plan.groups) == 1


MANY = [(f"t{i}", (1 + (i * 7) % 50,), "contiguous") for i in range(120)]


def test_more_than_110_tensors_run_in_one_launch():
    lists = materialise(make_problem(torch.float32, MANY), torch.float32, MANY)
    plan = _launch.plan([lists["params"], lists["grads"], lists["buffers"]], written=(0, 2))
    assert len(plan.groups) == 1 and plan.groups[0].n_tensors == len(MANY)
    compare(LAYOUT_CALLS["sgd_step"], torch.float32, MANY)


def test_a_278011_element_tensor_at_the_default_tile_sizes(monkeypatch):
    monkeypatch.undo()  # the default BLOCK and CHUNK: several blocks, full tiles and a tail
    large = [("large", (278011,), "contiguous"), ("small", (5,), "contiguous")]
    compare(LAYOUT_CALLS["sgd_step"], torch.float32, large)


def test_mixed_dtypes_run_in_one_launch_per_dtype_combination():
    """float32 and bfloat16 parameters in one call: two launches, each matching the reference."""
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.bfloat16]
    gen = torch.Generator().manual_seed(3)
    shapes = [(5,), (140,), (7,), (130,)]
    slots = ("params", "grads", "buffers", "prevs", "snapshots", "prev_displacements")
    base = {slot: [torch.randn(s, generator=gen).to(DEVICE, d) for s, d in zip(shapes, dtypes)] for slot in slots}
    results = []
    for backend in (triton_backend, reference):
        lists = {k: [t.clone() for t in v] for k, v in base.items()}
        with torch.no_grad():
            stats = backend.sgd_step(
                lists["params"], lists["grads"], lists["buffers"], torch.tensor([0.1, 0.2, 0.3, 0.4], device=DEVICE),
                SGDConfig(momentum=0.9), prevs=lists["prevs"], store=DIRECTION,
                boundary=Boundary(lists["snapshots"], lists["prev_displacements"]),
            )  # fmt: skip
        results.append((lists, stats))
    (got, got_stats), (ref, ref_stats) = results
    for slot in slots:
        for i in (0, 2):  # float32: the float32 tolerance
            assert_float32_close(got[slot][i], ref[slot][i], f"{slot}[{i}]")
        for i in (1, 3):  # bfloat16: the kernel rounds once where torch rounds per op: 2 ulps of the largest entry
            err = (got[slot][i].float() - ref[slot][i].float()).abs().max().item()
            assert err <= 2 * ulp_of_largest(ref[slot][i]), f"{slot}[{i}]: {err}"
    assert_stats_close(got_stats[[0, 2]], ref_stats[[0, 2]], "statistics")
    plan = _launch.plan([base["params"], base["grads"]], written=())
    assert [g.n_tensors for g in plan.groups] == [2, 2]


def test_a_call_with_float64_tensors_runs_on_the_reference_code():
    """As in the cpu backend, a call the kernels cannot take entirely is the reference's, bit for bit."""
    params = [torch.randn(9, dtype=torch.float64, device=DEVICE), torch.randn(4, device=DEVICE)]
    grads = [torch.randn_like(p) for p in params]
    twins = [p.clone() for p in params]
    triton_backend.sgd_step(params, grads, [], 0.1, SGDConfig(weight_decay=0.1))
    reference.sgd_step(twins, grads, [], 0.1, SGDConfig(weight_decay=0.1))
    assert all(torch.equal(a, b) for a, b in zip(params, twins))
    with pytest.raises(TypeError, match="float32, bfloat16 and float16"):  # the op itself refuses them
        torch.ops.autolr_fused_triton.boundary_pass(params, twins, grads, None, [], 0.0)


def test_results_are_bit_identical_from_run_to_run():
    problem = make_problem(torch.bfloat16, SMALL)
    outs = []
    for _ in range(2):
        lists, stats = run(triton_backend, problem, torch.bfloat16, LAYOUT_CALLS["sgd_step"], SMALL)
        _, sgd_stats = run(triton_backend, problem, torch.bfloat16, LAYOUT_CALLS["sgd_reduce"], SMALL)
        _, adam_stats = run(triton_backend, problem, torch.bfloat16, LAYOUT_CALLS["adam_reduce"], SMALL)
        outs.append(([t for slot in lists.values() for t in slot], [stats, sgd_stats, adam_stats]))
    (tensors_a, stats_a), (tensors_b, stats_b) = outs
    assert all(torch.equal(a, b) for a, b in zip(tensors_a, tensors_b))
    assert all(torch.equal(a, b) for a, b in zip(stats_a, stats_b))


# ------------------------------------------------------------------------------ the contract
def test_empty_lists_return_what_the_reference_returns():
    cfg, boundary = SGDConfig(momentum=0.9), Boundary([], [])
    assert triton_backend.sgd_step([], [], [], 0.1, cfg) is None
    assert triton_backend.sgd_step([], [], [], 0.1, cfg, boundary=boundary).shape == (0, 3)
    assert triton_backend.sgd_reduce([], [], [], [], cfg).shape == (0, 2)
    assert triton_backend.boundary_pass([], boundary).shape == (0, 3)
    assert triton_backend.adam_step([], [], [], [], 0.1, AdamConfig(), step=1) is None
    assert triton_backend.adam_reduce([], [], [], [], [], AdamConfig(), step=1).shape == (0, 2)


def test_an_lr_of_the_wrong_length_is_refused():
    params = [torch.zeros(3, device=DEVICE), torch.zeros(2, device=DEVICE)]
    grads = [torch.ones(3, device=DEVICE), torch.ones(2, device=DEVICE)]
    with pytest.raises(ValueError, match="lr must have 1 or 2 elements"):
        triton_backend.sgd_step(params, grads, [], torch.ones(3, device=DEVICE), SGDConfig())


def test_gradients_are_left_unchanged_and_written_tensors_get_a_new_version():
    p, g = torch.randn(10, device=DEVICE), torch.randn(10, device=DEVICE)
    g_before, version = g.clone(), p._version
    triton_backend.sgd_step([p], [g], [], 0.1, SGDConfig(), grad_scale=GRAD_SCALE)
    assert torch.equal(g, g_before) and p._version > version


def test_ops_are_registered_with_torch_library_with_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name in ("sgd_step", "sgd_reduce", "boundary_pass", "adam_step", "adam_reduce"):
        assert hasattr(torch.ops.autolr_fused_triton, name)
    with FakeTensorMode():
        params, snaps = [torch.empty(4), torch.empty(3)], [torch.empty(4), torch.empty(3)]
        out = torch.ops.autolr_fused_triton.boundary_pass(params, snaps, snaps, None, [], 0.0)
        assert out.shape == (2, 3)
        out = torch.ops.autolr_fused_triton.sgd_reduce(
            params, params, [], snaps, 0.0, 0.0, 0.0, False, False, False, False, None
        )
        assert out.shape == (2, 2)
        out = torch.ops.autolr_fused_triton.adam_reduce(params, params, params, params, snaps, 0.9, 0.99, 1e-8, 0.0,
                                                        False, False, 0.1, 0.1, None)  # fmt: skip
        assert out.shape == (2, 2) and out.dtype == torch.float32


def test_available_and_supports_follow_the_build():
    from autolr_fused.backends import available_backends, resolve_backend

    assert triton_backend.available() and "triton" in available_backends()
    assert resolve_backend("triton")[0] == "triton"
    assert triton_backend.supports(DEVICE)
    other = torch.device("cuda" if DEVICE.type == "cpu" else "cpu")
    assert not triton_backend.supports(other) and not triton_backend.supports(torch.device("meta"))


def test_tensors_the_kernels_cannot_address_are_refused():
    other = torch.device("cuda" if DEVICE.type == "cpu" else "cpu")
    with pytest.raises(RuntimeError, match="triton backend runs on"):
        _launch.check_device(other)


def test_an_op_refuses_a_list_of_the_wrong_length_before_writing_anything():
    params, grads = [torch.zeros(3, device=DEVICE), torch.zeros(2, device=DEVICE)], [torch.ones(3, device=DEVICE)]
    with pytest.raises(ValueError, match="one tensor per parameter"):
        triton_backend.sgd_step(params, grads, [], 0.1, SGDConfig())
    assert all(not p.any() for p in params)


# ----------------------------------------------------------------------------- end to end
# Optimizers whose steps use every primitive: TLR's window boundary (sgd_step with a scaled boundary),
# TLR per layer in step mode (sgd_reduce, then sgd_step storing r), RDBD on Adam (adam_reduce, then adam_step
# with regret) and AutoDrop's epoch ends (the boundary with snapshots and accumulated averages).
OPTIMIZERS = {
    "tlr_window": lambda p, b: FusedTLR(p, lr=0.05, momentum=0.8, steps_per_epoch=3, backend=b),
    "tlr_step_layer": lambda p, b: FusedTLR(p, lr=0.05, momentum=0.8, weight_decay=5e-4, per_layer=True, backend=b),
    "rdbd_adam": lambda p, b: FusedRDBD(p, base="adam", lr=0.01, meta_lr=1e-6, betas=(0.05, 0.99), backend=b),
    "autodrop": lambda p, b: FusedAutoDropSGD(
        p, lr=0.1, weight_decay=1e-3, steps_per_epoch=2, drop_delay=1, threshold=90.0, max_threshold=180.0, backend=b
    ),
}


def train(name: str, backend: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """6 steps of a seeded noisy quadratic; returns the parameters and every tensor of the optimizer's state."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (37,), (3, 4, 2, 2), (150,)]
    params = [nn.Parameter(torch.randn(s, generator=gen).to(DEVICE)) for s in shapes]
    params[2].data = params[2].data.to(memory_format=torch.channels_last)
    opt = OPTIMIZERS[name](params, backend)
    assert opt.backend == backend
    for _ in range(6):
        for p in params:
            p.grad = 0.5 * p.detach() + 0.3 * torch.randn(p.shape, generator=gen).to(DEVICE)
        opt.step()
    state = [v for p in params for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.is_floating_point()]
    return [p.detach() for p in params], state


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizers_take_the_reference_backends_steps(name):
    """float32, tests/test_backends.py's tolerance: a kernel rounds each stored value once where torch rounds
    per op (a few ulps per step) and the adapted lrs feed that back over the steps; 1e-5 relative is a 10x margin.
    """
    (params, state), (ref_params, ref_state) = train(name, "triton"), train(name, "reference")
    assert len(state) == len(ref_state) and state
    for what, got, ref in (("param", params, ref_params), ("state", state, ref_state)):
        for i, (a, b) in enumerate(zip(got, ref)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, i=i, w=what: f"{w} {i}: {m}")


# ------------------------------------------------------------------------ builds and modes
def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with this checkout importable, TRITON_INTERPRET unset unless given."""
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(env, PYTHONPATH=os.pathsep.join([str(REPO), environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True, text=True)


def test_without_triton_the_package_works_and_the_backend_is_unavailable():
    result = run_python(
        """
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        import torch
        import autolr_fused as alr
        assert "triton" not in alr.available_backends(), alr.available_backends()
        try:
            alr.FusedSGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, backend="triton")
        except alr.BackendUnavailableError:
            print("refused")
        """,
        TRITON_INTERPRET="1",
    )
    assert result.returncode == 0 and result.stdout.strip() == "refused", result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the compiled kernels are available")
def test_without_a_gpu_or_the_interpreter_the_backend_is_unavailable():
    result = run_python(
        """
        from autolr_fused.backends import available_backends, triton
        assert triton.sgd_step and not triton.available() and "triton" not in available_backends()
        import sys
        assert "triton" not in sys.modules  # nothing of Triton decorated: TRITON_INTERPRET=1 could still follow
        """
    )
    assert result.returncode == 0, result.stderr


def test_the_kernel_compiles_for_sm90_with_vector_loads_where_aligned():
    """The interpreter runs the kernels as Python; this compiles them (no GPU needed) for an H100, so that
    what only the compiler refuses fails here. Aligned full tiles must use 128-bit loads (ld.global.v4)."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
    result = run_python(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from autolr_fused.backends.triton import kernels as k

        def ptx(flags, dtype):
            fn, sig, constants = k.multi_tensor_kernel, {}, {}
            for name in fn.arg_names:
                if name.endswith("_DT"):
                    sig[name], constants[name] = "constexpr", dtype
                elif name.isupper():
                    sig[name] = "constexpr"
                elif name in ("table", "partials") or name.endswith("_ptr"):
                    sig[name] = "*i64" if name == "table" else "*fp32"
                else:
                    sig[name] = "i64" if name in k.COUNTS else "fp32"
            constants.update(FLAGS=flags, LR_MODE=2, REGRET_MODE=2, SCALE_MODE=1, BLOCK=1024, CHUNK=16384)
            keys = {(fn.arg_names.index(n),): v for n, v in constants.items()}
            src = ASTSource(fn=fn, signature=sig, constexprs=keys)
            return triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]

        bits = lambda *names: sum(getattr(k, n).value for n in names)
        every = {
            "sgd_step": ("SGD", "STEP", "STORE", "REGRET", "BOUNDARY", "SCALED", "ACCUMULATE", "MOMENTUM",
                         "NESTEROV", "WEIGHT_DECAY", "MAXIMIZE", "GRAD_SCALE"),
            "sgd_reduce": ("SGD", "REDUCE", "MOMENTUM", "FIRST_STEP", "OF_REGULARIZED", "GRAD_SCALE"),
            "boundary_pass": ("BOUNDARY", "SCALED", "ACCUMULATE"),
            "adam_step": ("ADAM", "STEP", "STORE", "REGRET", "DECOUPLED", "MAXIMIZE", "GRAD_SCALE"),
            "adam_reduce": ("ADAM", "REDUCE", "WEIGHT_DECAY"),
        }
        for name, flags in every.items():
            for dtype in k.KERNEL_DTYPES.values():
                assert "ld.global.v4" in ptx(bits(*flags, "ALIGNED"), dtype), (name, dtype)
        print("compiled")
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "compiled", result.stderr[-3000:]
