"""Every kernel backend x every optimizer x every dtype against the reference backend.

One table of optimizer cases (``CASES``) runs across the available kernel
backends (``cpu``; ``triton`` under ``TRITON_INTERPRET=1``, marked slow, or on a
GPU; ``cuda`` on a GPU) and the parameter dtypes. Each case trains the same parameters with
the same gradient sequence on the reference backend and on the kernel backend.

Tolerances:

* float32: ``rtol=1e-5, atol=1e-6`` on parameters and learning rates after
  ``STEPS`` steps. Both backends compute in float32; a kernel rounds each
  stored value once where torch's ops round after every op (a few ulps per
  step, ~6e-8 each), and the adaptive lrs feed such differences back over 8
  steps: 1e-5 relative leaves a 10x margin over the ~1e-6 seen.
* bfloat16 / float16: the style guide's rule. The error of the kernel backend
  against the same run in float64 (reference backend) is at most twice the
  reference backend's own error at that dtype, plus one ulp of the parameter's
  magnitude (for tensors where the reference happens to be exact).
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch import nn

from autolr_fused import (
    FusedAutoDropSGD,
    FusedRDBD,
    FusedSGD,
    FusedSGDHD,
    FusedSGDL,
    FusedTLR,
    available_backends,
)
from autolr_fused.backends import resolve_backend

STEPS = 8
KERNEL_BACKENDS = [b for b in available_backends() if b != "reference"]
DEVICE = {"reference": "cpu", "cpu": "cpu", "cuda": "cuda", "triton": "cuda" if torch.cuda.is_available() else "cpu"}
# Interpreted Triton (CPU tensors) runs every kernel as Python, minutes for this file's sizes: its rows are slow
# here, and tests/test_backend_triton.py covers the backend at small sizes in CI.
KERNEL_BACKEND_PARAMS = [
    pytest.param(b, marks=pytest.mark.slow) if b == "triton" and DEVICE[b] == "cpu" else b for b in KERNEL_BACKENDS
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# name -> constructor(params, backend, **extra keywords such as skip_nonfinite); every method and mode, with options
# that exercise the kernels' branches.
CASES = {
    "sgd": lambda p, b, **kw: FusedSGD(p, lr=0.1, backend=b, **kw),
    "sgd_nesterov_wd": lambda p, b, **kw: FusedSGD(
        p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2, backend=b, **kw
    ),
    "sgd_dampening_maximize": lambda p, b, **kw: FusedSGD(
        p, lr=0.05, momentum=0.8, dampening=0.3, maximize=True, backend=b, **kw
    ),
    "sgd_tensor_lr": lambda p, b, **kw: FusedSGD(p, lr=torch.tensor(0.05), momentum=0.5, backend=b, **kw),
    "sgdl": lambda p, b, **kw: FusedSGDL(p, lr=0.3, total_steps=6, backend=b, **kw),
    "autodrop": lambda p, b, **kw: FusedAutoDropSGD(
        p, lr=0.1, steps_per_epoch=1, drop_delay=2, threshold=90.0, max_threshold=180.0, backend=b, **kw
    ),
    "autodrop_epochs": lambda p, b, **kw: FusedAutoDropSGD(
        p,
        lr=0.1,
        weight_decay=1e-3,
        steps_per_epoch=2,
        drop_delay=1,
        threshold=90.0,
        max_threshold=180.0,
        backend=b,
        **kw,
    ),
    "tlr_step": lambda p, b, **kw: FusedTLR(p, lr=0.05, momentum=0.8, weight_decay=5e-4, backend=b, **kw),
    "tlr_step_layer": lambda p, b, **kw: FusedTLR(p, lr=0.05, momentum=0.8, per_layer=True, backend=b, **kw),
    "tlr_window": lambda p, b, **kw: FusedTLR(p, lr=0.05, momentum=0.8, steps_per_epoch=6, backend=b, **kw),
    "tlr_window_layer": lambda p, b, **kw: FusedTLR(p, lr=0.05, per_layer=True, steps_per_epoch=3, backend=b, **kw),
    "rdbd_sgd": lambda p, b, **kw: FusedRDBD(p, lr=0.02, meta_lr=1e-4, momentum=0.9, backend=b, **kw),
    "rdbd_sgd_dbd_bounds": lambda p, b, **kw: FusedRDBD(
        p, lr=0.02, meta_lr=0.05, regret=False, lr_bounds=(0.0, 0.03), backend=b, **kw
    ),
    "rdbd_adam": lambda p, b, **kw: FusedRDBD(
        p, base="adam", lr=0.01, meta_lr=1e-6, betas=(0.05, 0.99), backend=b, **kw
    ),
    "rdbd_adamw": lambda p, b, **kw: FusedRDBD(
        p, base="adam", lr=0.01, meta_lr=1e-6, weight_decay=0.1, decoupled_weight_decay=True, backend=b, **kw
    ),
    "sgdhd": lambda p, b, **kw: FusedSGDHD(p, lr=0.05, momentum=0.9, hypergrad_lr=1e-3, backend=b, **kw),
}


def make_params(dtype: torch.dtype, device: str, seed: int = 0) -> list[nn.Parameter]:
    """Odd shapes: one element, a prime length, a 0-element tensor, channels_last, a transposed view."""
    g = torch.Generator().manual_seed(seed)
    plain = [torch.randn(s, generator=g) for s in [(1,), (7,), (0,), (33, 17), (1031,)]]
    channels_last = torch.randn(4, 3, 5, 5, generator=g).to(memory_format=torch.channels_last)
    transposed = torch.randn(9, 17, generator=g).t()
    tensors = plain + [channels_last, transposed]
    return [nn.Parameter(t.to(device=device, dtype=dtype)) for t in tensors]


def gradients(params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
    """A pull towards 0 plus seeded noise: h and the lr rules see realistic, sign-changing statistics."""
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for p in params:
        noise = torch.randn(p.shape, generator=g).to(device=p.device)
        out.append((0.5 * p.detach().double() + 0.3 * noise).to(p.dtype))
    return out


def run(case: str, backend: str, dtype: torch.dtype, device: str, *, grad_dtype: torch.dtype | None = None):
    """Train with the case's optimizer; returns (params, per-tensor and group lrs, optimizer)."""
    params = make_params(dtype, device)
    opt = CASES[case](params, backend)
    for step in range(STEPS):
        # The gradients are computed from the float64 view of the parameters for every dtype.
        for p, grad in zip(params, gradients(params, step)):
            p.grad = grad.to(grad_dtype or p.dtype)
        opt.step()
    return [p.detach().clone() for p in params], lrs_of(opt), opt


def lrs_of(opt: torch.optim.Optimizer) -> torch.Tensor:
    values = [float(group["lr"]) for group in opt.param_groups]
    for group in opt.param_groups:
        for p in group["params"]:
            if "lr" in opt.state.get(p, {}):
                values.append(float(opt.state[p]["lr"]))
    return torch.tensor(values, dtype=torch.float64)


def assert_float32_close(params, lrs, ref_params, ref_lrs) -> None:
    """A float32 kernel run against the reference backend's: the tolerances of the module docstring."""
    for i, (a, b) in enumerate(zip(params, ref_params)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"param {i}: {m}")
    torch.testing.assert_close(lrs, ref_lrs, rtol=1e-5, atol=0.0)


def assert_low_precision_close(params, lrs, ref_params, ref_lrs, exact, exact_lrs, dtype: torch.dtype) -> None:
    """A bf16/fp16 kernel run's error against the float64 run ``exact`` is at most twice the reference
    backend's own error at ``dtype`` (plus one ulp): the module docstring's rule."""
    ulp = torch.finfo(dtype).eps
    for i, (x, r, e) in enumerate(zip(params, ref_params, exact)):
        if e.numel() == 0:
            continue
        err = (x.double() - e).abs().max().item()
        ref_err = (r.double() - e).abs().max().item()
        slack = ulp * e.abs().max().item()
        if math.isnan(ref_err):  # torch's own ops break down at this precision (fp16 Adam: eps underflows)
            assert math.isfinite(err), f"param {i}: not finite"
            continue
        assert err <= 2 * ref_err + slack, f"param {i}: error {err:.3g} vs reference's {ref_err:.3g}"
    lr_err = (lrs - exact_lrs).abs().max().item()
    ref_lr_err = (ref_lrs - exact_lrs).abs().max().item()
    assert math.isfinite(lr_err)
    if not math.isnan(ref_lr_err):
        assert lr_err <= 2 * ref_lr_err + 1e-6 * exact_lrs.abs().max().item()


@pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend is available in this build")
@pytest.mark.parametrize("backend", KERNEL_BACKEND_PARAMS)
@pytest.mark.parametrize("case", list(CASES))
def test_float32_kernel_backend_matches_reference(case, backend):
    device = DEVICE[backend]
    ref_params, ref_lrs, _ = run(case, "reference", torch.float32, device)
    params, lrs, opt = run(case, backend, torch.float32, device)
    assert opt.backend == backend
    assert_float32_close(params, lrs, ref_params, ref_lrs)


@pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend is available in this build")
@pytest.mark.parametrize("backend", KERNEL_BACKEND_PARAMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_low_precision_error_is_at_most_twice_the_references(case, backend, dtype):
    device = DEVICE[backend]
    exact, exact_lrs, _ = run(case, "reference", torch.float64, device)
    ref_params, ref_lrs, _ = run(case, "reference", dtype, device)
    params, lrs, _ = run(case, backend, dtype, device)
    assert_low_precision_close(params, lrs, ref_params, ref_lrs, exact, exact_lrs, dtype)


@pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend is available in this build")
@pytest.mark.parametrize("backend", KERNEL_BACKEND_PARAMS)
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_backend_is_bit_identical_from_run_to_run(case, backend):
    device = DEVICE[backend]
    first, first_lrs, opt1 = run(case, backend, torch.bfloat16, device)
    second, second_lrs, opt2 = run(case, backend, torch.bfloat16, device)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert torch.equal(first_lrs, second_lrs)
    for s1, s2 in zip(opt1.state.values(), opt2.state.values()):
        for key, value in s1.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, s2[key]), key


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="the cpu extension is not built")
def test_cpu_results_do_not_depend_on_the_thread_count():
    """Chunk partial sums are added in chunk order, so 1 and 2 threads give the same bits."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_lrs, _ = run("tlr_step_layer", "cpu", torch.float32, "cpu")
        torch.set_num_threads(max(2, threads))
        two, two_lrs, _ = run("tlr_step_layer", "cpu", torch.float32, "cpu")
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))
    assert torch.equal(one_lrs, two_lrs)


# csrc/cpu/multi_tensor_cpu.h's kStreamBytes: a cpu call whose parameter-sized tensors take more bytes writes the
# arrays it does not read (stored gradients or directions) with streaming stores, a smaller one with plain stores.
STREAM_BYTES = 16 * 2**20
# Lengths that leave heads and tails around the 16-byte streaming stores, one past a chunk (32768 elements), and a
# filler that lifts the call past STREAM_BYTES at every dtype.
STREAM_LENGTHS = [1, 7, 33, 517, 1031, 32773, 2**22 + 3]


def _offset_tensors(dtype: torch.dtype, seed: int, positive: bool = False) -> list[torch.Tensor]:
    """One tensor per length of STREAM_LENGTHS, each a view at storage offset 0 to 3 (unaligned from 1 on)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(STREAM_LENGTHS):
        offset = (seed + i) % 4
        base = torch.randn(n + offset, generator=g)
        out.append((base.abs() if positive else base).to(dtype)[offset:])
    return out


def _pieces(lists: list[list[torch.Tensor]], size: int = 2**18) -> list[list[list[torch.Tensor]]]:
    """The same tensors as calls of at most ``size`` elements each (views, so the calls write into them)."""
    calls = []
    for i, n in enumerate(STREAM_LENGTHS):
        for begin in range(0, n, size):
            calls.append([[t[i][begin : begin + size]] for t in lists])
    return calls


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="the cpu extension is not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("op", ["sgd_regularized_momentum", "sgd_direction", "adam"])
def test_cpu_streaming_stores_write_what_plain_stores_write(op, dtype):
    """A call past STREAM_BYTES (streaming stores) stores the same bits as the same tensors in small calls.

    The stored gradient or direction is written without being read, with streaming stores from the first 16-byte
    aligned element on; unaligned views and odd lengths check the heads and tails around them.
    """
    from autolr_fused.backends import cpu
    from autolr_fused.directions import AdamConfig, SGDConfig

    adam = op == "adam"
    lists = [_offset_tensors(dtype, seed, positive=(adam and seed == 3)) for seed in range(5 if adam else 4)]
    twins = [[t.clone() for t in list_] for list_ in lists]
    assert sum(t.numel() * t.element_size() for list_ in lists for t in list_) > STREAM_BYTES

    def call(tensors: list[list[torch.Tensor]]) -> None:
        if adam:
            p, g, m, v, prev = tensors
            cpu.adam_step(p, g, m, v, 1e-3, AdamConfig(weight_decay=1e-2), step=3, prevs=prev)
        elif op == "sgd_direction":
            p, g, _, prev = tensors
            cpu.sgd_step(p, g, [], 0.05, SGDConfig(weight_decay=1e-2), prevs=prev, store="direction")
        else:
            p, g, buf, prev = tensors
            cfg = SGDConfig(momentum=0.9, nesterov=True, weight_decay=1e-2)
            cpu.sgd_step(p, g, buf, 0.05, cfg, prevs=prev, store="regularized", grad_scale=torch.tensor([4.0]))

    call(lists)
    for piece in _pieces(twins):
        assert sum(t.numel() * t.element_size() for list_ in piece for t in list_) <= STREAM_BYTES
        call(piece)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for k, (list_, twin) in enumerate(zip(lists, twins)):
        for i, (a, b) in enumerate(zip(list_, twin)):
            assert torch.equal(a.view(bits), b.view(bits)), f"list {k}, length {STREAM_LENGTHS[i]}"


# Backends whose sgd_step runs here on CPU tensors at this file's sizes (interpreted Triton is covered by
# tests/test_backend_triton.py, a GPU's backends by the rows below on a GPU).
HOST_BACKENDS = ["reference", *(b for b in KERNEL_BACKENDS if DEVICE[b] == "cpu" and b != "triton")]


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("wd_damp_scale", [(0.0, 0.0, False), (1e-2, 0.3, True)], ids=["plain", "wd_damp_scaled"])
def test_sgd_step_regret_without_prevs_reads_the_buffer_before_the_update(backend, dtype, wd_damp_scale):
    """With momentum and without nesterov a regret may read the previous direction from the momentum buffer.

    The call without ``prevs`` must write exactly the bits of the same call given a copy of the buffers as
    ``prevs``: the regret reads the buffer as it was before this step's update, whatever the backend.
    """
    from autolr_fused.directions import SGDConfig

    ops = resolve_backend(backend)[1]
    weight_decay, dampening, scaled = wd_damp_scale
    cfg = SGDConfig(momentum=0.9, dampening=dampening, weight_decay=weight_decay)
    grad_scale = torch.tensor([4.0]) if scaled else None
    params = [p.detach() for p in make_params(dtype, "cpu", seed=1)]
    grads = [g * 4 if scaled else g for g in gradients(params, 0)]
    buffers = [b.to(dtype) for b in gradients(params, 1)]
    regret = torch.linspace(-0.3, 0.2, len(params))
    lr = torch.linspace(0.05, 0.1, len(params))
    runs = []
    for from_buffer in (True, False):
        p, buf = [t.clone() for t in params], [t.clone() for t in buffers]
        prevs = None if from_buffer else [t.clone() for t in buffers]
        ops.sgd_step(p, grads, buf, lr, cfg, prevs=prevs, regret=regret, grad_scale=grad_scale)
        runs.append((p, buf))
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for (p, buf), (p_ref, buf_ref) in zip(*[list(zip(*r)) for r in runs]):
        assert torch.equal(p.view(bits), p_ref.view(bits)) and torch.equal(buf.view(bits), buf_ref.view(bits))
    # The regret did something: the same step without it moves the parameters elsewhere.
    p = [t.clone() for t in params]
    ops.sgd_step(p, grads, [t.clone() for t in buffers], lr, cfg, grad_scale=grad_scale)
    assert any(not torch.equal(a, b) for a, b in zip(p, runs[0][0]) if a.numel())


@pytest.mark.parametrize("backend", HOST_BACKENDS)
@pytest.mark.parametrize(
    "cfg_kw, first_step",
    [(dict(), False), (dict(momentum=0.9, nesterov=True), False), (dict(momentum=0.9), True)],
    ids=["no_momentum", "nesterov", "first_step"],
)
def test_sgd_step_regret_without_prevs_is_refused_where_the_buffer_is_not_the_direction(backend, cfg_kw, first_step):
    from autolr_fused.directions import SGDConfig

    ops = resolve_backend(backend)[1]
    params = [torch.ones(5), torch.ones(3)]
    before = [p.clone() for p in params]
    buffers = [torch.ones(5), torch.ones(3)] if cfg_kw.get("momentum") else []
    with pytest.raises((ValueError, RuntimeError), match="regret without prevs"):
        ops.sgd_step(
            params,
            [torch.ones(5), torch.ones(3)],
            buffers,
            0.1,
            SGDConfig(**cfg_kw),
            first_step=first_step,
            regret=torch.tensor([0.1, 0.2]),
        )
    assert all(torch.equal(a, b) for a, b in zip(params, before))


@pytest.mark.skipif("cpu" not in KERNEL_BACKENDS, reason="the cpu extension is not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cpu_16_bit_conversions_equal_torchs_for_every_value(dtype):
    """The cpu kernels convert bfloat16/float16 on their bits (csrc/cpu/multi_tensor_cpu.h, so that the loops
    vectorise). Widening is exact for all 65536 values; narrowing rounds as torch does (to nearest, ties to
    even, float16 subnormals, overflow to infinity), bit for bit, for every value times factors that make
    ties (3), subnormals (1e-3, 2^-20), overflow (1e4, 3e30) and arbitrary mantissas (0.7). NaN only has to
    stay NaN (torch keeps a payload, the kernels write a canonical NaN)."""
    from autolr_fused.backends import cpu
    from autolr_fused.directions import SGDConfig

    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    finite = ~every.float().isnan()
    # An sgd_step at lr 0 with a zero gradient widens each parameter and narrows it back.
    p = every.clone()
    cpu.sgd_step([p], [torch.zeros_like(p)], [], 0.0, SGDConfig())
    assert torch.equal(p[finite].view(torch.int16), every[finite].view(torch.int16))
    assert p[~finite].float().isnan().all()

    g = every[finite].clone()
    for factor in (3.0, 0.7, 1e-3, 2.0**-20, 1e4, 3e30):
        scale = torch.tensor([1.0 / factor], dtype=torch.float32)
        prev = torch.empty_like(g)
        # store="regularized" writes r = g * (1 / scale) (float32, as the kernel divides), rounded to the dtype.
        cpu.sgd_step([g.clone()], [g], [], 0.0, SGDConfig(), prevs=[prev], store="regularized", grad_scale=scale)
        expected = (g.float() * (1.0 / scale)).to(dtype)
        assert torch.equal(prev.view(torch.int16), expected.view(torch.int16)), factor


@pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend is available in this build")
@pytest.mark.parametrize("backend", KERNEL_BACKEND_PARAMS)
@pytest.mark.parametrize("case", ["sgd_nesterov_wd", "tlr_step_layer", "rdbd_adam", "autodrop"])
def test_hundreds_of_tensors_and_a_large_one(case, backend):
    """150 tensors (past a launch's metadata capacity) and one of 278011 elements (tail paths)."""
    device = DEVICE[backend]
    g = torch.Generator().manual_seed(3)
    shapes = [(int(n),) for n in torch.randint(1, 300, (150,), generator=g)] + [(278011,)]
    results = []
    for b in ("reference", backend):
        params = [
            nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)
        ]
        params = [nn.Parameter(p.detach().to(device)) for p in params]
        opt = CASES[case](params, b)
        for step in range(3):
            for p, grad in zip(params, gradients(params, step)):
                p.grad = grad
            opt.step()
        results.append(([p.detach() for p in params], lrs_of(opt)))
    (ref, ref_lrs), (out, lrs) = results
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * max(1.0, b.abs().max().item()))
    torch.testing.assert_close(lrs, ref_lrs, rtol=1e-5, atol=0.0)


@pytest.mark.skipif(not KERNEL_BACKENDS, reason="no kernel backend is available in this build")
@pytest.mark.parametrize("backend", KERNEL_BACKEND_PARAMS)
def test_gradients_with_other_strides_than_their_parameters(backend):
    """A contiguous gradient of a channels_last parameter is read in the parameter's order."""
    device = DEVICE[backend]
    results = []
    for b in ("reference", backend):
        p = nn.Parameter(torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0)).to(device))
        p.data = p.data.to(memory_format=torch.channels_last)
        opt = FusedTLR([p], lr=0.1, momentum=0.9, backend=b)
        for step in range(3):
            p.grad = (p.detach() * 0.5 + step).contiguous()
            opt.step()
        results.append(p.detach().clone())
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKEND_PARAMS])
@pytest.mark.parametrize("case", ["sgd_nesterov_wd", "tlr_step", "rdbd_adam", "autodrop", "sgdhd"])
def test_grad_scaler_step_with_inf_changes_nothing_and_finite_steps_unscale(case, backend):
    device = DEVICE[backend]
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    params = make_params(torch.float32, device)
    opt = CASES[case](params, backend)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=1)
    plain_params = [nn.Parameter(p.detach().clone()) for p in params]
    plain = CASES[case](plain_params, backend)
    for step in range(4):
        scaler.scale(torch.ones((), device=device))  # GradScaler creates its scale lazily here
        grads = gradients(params, step)
        for p, q, grad in zip(params, plain_params, grads):
            p.grad = grad * scaler.get_scale()
            q.grad = grad.clone()
        if step == 2:
            params[3].grad[0, 0] = float("inf")
            before = copy.deepcopy(opt.state_dict())
            before_params = [p.detach().clone() for p in params]
            scaler.step(opt)
            scaler.update()
            assert all(torch.equal(a, b) for a, b in zip(params, before_params))
            after = opt.state_dict()
            assert repr(after["param_groups"]) == repr(before["param_groups"])  # lrs, controller, statistics
            for key, state in before["state"].items():
                for name, value in state.items():
                    if isinstance(value, torch.Tensor):
                        assert torch.equal(value, after["state"][key][name]), name
            continue
        scaler.step(opt)
        scaler.update()
        plain.step()
    for a, b in zip(params, plain_params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_auto_picks_the_cpu_kernels_for_cpu_parameters(monkeypatch):
    monkeypatch.delenv("AUTOLR_FUSED_BACKEND", raising=False)
    opt = FusedSGD([nn.Parameter(torch.zeros(3))], lr=0.1)
    expected = "cpu" if "cpu" in available_backends() else "reference"
    assert opt.backend == expected


@pytest.mark.skipif(os.environ.get("AUTOLR_FUSED_REQUIRE_CPU_EXT") != "1", reason="only where the build is required")
def test_the_cpu_extension_was_built():
    """CI sets AUTOLR_FUSED_REQUIRE_CPU_EXT=1: a silent fallback to reference must fail there."""
    assert "cpu" in available_backends()


@pytest.mark.parametrize("backend", KERNEL_BACKEND_PARAMS)
@pytest.mark.parametrize("case", ["sgd_nesterov_wd", "tlr_step_layer", "rdbd_adam", "autodrop_epochs"])
def test_float64_parameters_run_on_the_reference_code_under_a_kernel_backend(case, backend):
    """The kernels take float32/bf16/fp16; float64 steps equal the reference backend's exactly."""
    device = DEVICE[backend]
    ref, ref_lrs, _ = run(case, "reference", torch.float64, device)
    out, lrs, _ = run(case, backend, torch.float64, device)
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert torch.equal(lrs, ref_lrs)


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKEND_PARAMS])
def test_per_layer_tlr_takes_a_tensor_whose_first_gradient_comes_late(backend):
    device = DEVICE[backend]
    params = [nn.Parameter(torch.randn(5, device=device)) for _ in range(3)]
    opt = FusedTLR(params, lr=0.1, per_layer=True, backend=backend)
    for step in range(6):
        for i, p in enumerate(params):
            p.grad = None if (i == 2 and step < 3) else torch.full_like(p, 1.0 + step % 2)
        opt.step()
    lrs = [float(opt.state[p]["lr"]) for p in params]
    assert lrs[2] > 0.1  # it adapted once its gradients came (consecutive positive inner products)
    assert all(math.isfinite(x) for x in lrs)
