"""Robustness: inf/NaN gradients, skip_nonfinite, bad input and mismatched state_dicts, for every
optimizer and mode (``test_backends.CASES``) on the reference and the kernel backends.

The contract under test:

* a statistic that is not finite never reaches a learning rate (the lr stays, the parameters follow
  torch.optim.SGD), the step reads nothing back from the device, and the first call that synchronises
  anyway (``stats()``, ``state_dict()``, AutoDrop's epoch end) emits exactly one RuntimeWarning;
* ``skip_nonfinite=True``: a step whose gradients hold inf/NaN changes nothing at all;
* bad input raises a TypeError/ValueError naming the problem before anything changes.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from unittest import mock

import pytest
import torch
from test_api import OPTIMIZERS, SHAPES, SYNC_METHODS, _forbid_host_reads
from test_api import make_params as small_params
from test_api import run_steps as run_small_steps
from test_backends import CASES, DEVICE, KERNEL_BACKEND_PARAMS, gradients, lrs_of, make_params
from torch import nn

from autolr_fused import AALR, FusedRDBD, FusedSGD, FusedSGDHD, FusedTLR

BACKENDS = ["reference", *KERNEL_BACKEND_PARAMS]  # interpreted Triton rows are slow (see test_backends)
STEPS = 7
BAD_STEP = 2  # before AutoDrop can trigger (epoch >= 3) and after the step-level lrs have adapted once
# The methods without statistics: their lrs follow the constructor or their schedule whatever the gradients.
NO_STATISTICS = {"sgd", "sgd_nesterov_wd", "sgd_dampening_maximize", "sgd_tensor_lr", "sgdl"}
PER_STEP_CASES = ["tlr_step", "tlr_step_layer", "tlr_window", "rdbd_sgd", "rdbd_adam", "sgdhd"]


def run_case_steps(opt: torch.optim.Optimizer, params: list[torch.Tensor], steps) -> None:
    """Steps with ``test_backends.gradients`` (finite, seeded by the step number)."""
    for step in steps:
        for p, g in zip(params, gradients(params, step)):
            p.grad = g
        opt.step()


def bad_gradients(params: list[torch.Tensor], step: int, value: float) -> list[torch.Tensor]:
    """This step's gradients with ``value`` in the first entry of every non-empty tensor."""
    grads = gradients(params, step)
    for g in grads:
        if g.numel():
            g[(0,) * g.dim()] = value
    return grads


def assert_same_state(after: dict, before: dict) -> None:
    """Two state_dicts hold the same groups, controller, statistics and (bit for bit) state tensors."""
    # The groups hold the lrs and, in param_groups[0]["autolr_fused"], the controller and statistics (exact JSON).
    assert repr(after["param_groups"]) == repr(before["param_groups"])
    assert set(after["state"]) == set(before["state"])
    for pid, state in before["state"].items():
        assert set(after["state"][pid]) == set(state)
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, after["state"][pid][name]), name  # NaN state never occurs here
            else:
                assert after["state"][pid][name] == value, name


def snapshot(opt: torch.optim.Optimizer, params: list[torch.Tensor]) -> tuple[dict, list[torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the warning itself is tested on its own
        return copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]


def assert_unchanged(opt: torch.optim.Optimizer, params: list[torch.Tensor], saved: tuple) -> None:
    state, values = saved
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    assert_same_state(snapshot(opt, params)[0], state)


# ------------------------------------------------------------------ non-finite statistics
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_nonfinite_gradients_never_reach_an_lr_and_warn_once(case, backend):
    """inf/NaN in every tensor's gradient at one step: the parameters then stay non-finite, so every later
    statistic is too. The adaptive lrs stay exactly where they were before that step; the lrs of the
    methods without statistics equal a finite run's (SGDL's anneal goes on); one RuntimeWarning. NaN on
    the reference backend, inf on the kernels (an inf gradient gives inf/NaN statistics alike)."""
    device, value = DEVICE[backend], math.nan if backend == "reference" else math.inf
    finite_params, params = make_params(torch.float32, device), make_params(torch.float32, device)
    finite, opt = CASES[case](finite_params, backend), CASES[case](params, backend)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(STEPS):
            for q, g in zip(finite_params, gradients(finite_params, step)):
                q.grad = g
            finite.step()
            grads = bad_gradients(params, step, value) if step == BAD_STEP else gradients(params, step)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
            lrs = lrs_of(opt)
            assert torch.isfinite(lrs).all(), f"step {step}: {lrs}"
            if case in NO_STATISTICS:
                assert torch.equal(lrs, lrs_of(finite))
            elif step == BAD_STEP - 1:
                frozen = lrs
            elif step >= BAD_STEP:
                assert torch.equal(lrs, frozen), f"step {step}: {lrs} != {frozen}"
        assert not any(torch.isfinite(p).all() for p in params if p.numel()), "the bad step must reach the params"
        for _ in range(2):
            opt.stats()
            opt.state_dict()
        finite.stats()
        finite.state_dict()
    runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    expected = 0 if case in NO_STATISTICS else 1
    assert len(runtime) == expected, [str(w.message) for w in runtime]
    if expected:
        assert type(opt).__name__ in str(runtime[0].message) and "skip_nonfinite" in str(runtime[0].message)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", PER_STEP_CASES)
def test_nonfinite_steps_read_nothing_back_and_stats_warns(case, backend):
    """The non-finite flag lives on the device: steps that meet inf/NaN make no host read; stats() warns."""
    device = DEVICE[backend]
    params = make_params(torch.float32, device)
    opt = CASES[case](params, backend)
    run_case_steps(opt, params, range(2))
    patches = _forbid_host_reads()
    for patch in patches:
        patch.start()
    try:
        for step in range(2, 6):
            for p, g in zip(params, bad_gradients(params, step, math.nan)):
                p.grad = g
            opt.step()
    finally:
        for patch in patches:
            patch.stop()
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.stats()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once means once
        opt.stats()
        opt.state_dict()


@pytest.mark.parametrize("backend", BACKENDS)
def test_autodrop_warns_at_the_epoch_end_that_meets_a_nonfinite_angle(backend):
    device = DEVICE[backend]
    params = make_params(torch.float32, device)
    opt = CASES["autodrop_epochs"](params, backend)  # two steps per epoch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_case_steps(opt, params, range(2))
        for p, g in zip(params, bad_gradients(params, 2, math.inf)):
            p.grad = g
        opt.step()  # mid-epoch: no read, no warning
    for p, g in zip(params, gradients(params, 3)):
        p.grad = g
    with pytest.warns(RuntimeWarning, match="FusedAutoDropSGD"):
        opt.step()  # the epoch end reads the statistics anyway
    assert math.isnan(opt.stats()["angle"]) and not opt.stats()["drop_pending"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda ps, b: FusedSGDHD(ps, lr=0.1, hypergrad_lr=1e30, backend=b), id="sgdhd"),
        pytest.param(lambda ps, b: FusedRDBD(ps, lr=0.1, meta_lr=1e30, lr_bounds=(None, None), backend=b), id="rdbd"),
    ],
)
def test_finite_statistics_that_would_overflow_the_lr_leave_it_unchanged(make, backend):
    """h = <g_t, g_{t-1}> = 4e30 is finite, but lr + 1e30 * h is beyond float32's range (3.4e38): the lr
    keeps its value, exactly, instead of becoming inf (which would make every parameter inf/NaN)."""
    device = DEVICE[backend]
    params = [nn.Parameter(torch.zeros(4, device=device))]
    opt = make(params, backend)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finite statistic is not reported as a non-finite one
        for _ in range(3):
            params[0].grad = torch.full((4,), 1e15, device=device)
            opt.step()
        lrs = lrs_of(opt).float()  # the group lr (a float for RDBD) and the float32 lrs, all 0.1 exactly
        assert torch.equal(lrs, torch.full_like(lrs, 0.1)), lrs
        assert torch.isfinite(params[0]).all()


# ------------------------------------------------------------------------- skip_nonfinite
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_skip_nonfinite_step_changes_nothing_and_the_run_goes_on_as_without_it(case, backend):
    """One bad entry (-inf, NaN on the kernels) in one tensor: the step changes no parameter, buffer,
    statistic, lr or counter, and the run then matches, bit for bit, a twin that never saw that step."""
    device, value = DEVICE[backend], -math.inf if backend == "reference" else math.nan
    params, twin_params = make_params(torch.float32, device), make_params(torch.float32, device)
    opt = CASES[case](params, backend, skip_nonfinite=True)
    twin = CASES[case](twin_params, backend)
    assert opt.skip_nonfinite and not twin.skip_nonfinite
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing non-finite ever reaches a statistic: no warning
        for step in range(STEPS):
            grads = gradients(params, step)
            for p, q, g in zip(params, twin_params, grads):
                p.grad, q.grad = g, g.clone()
            if step == BAD_STEP:
                params[3].grad[1, 2] = value
                saved = snapshot(opt, params)
                opt.step()
                assert_unchanged(opt, params, saved)
                continue
            opt.step()
            twin.step()
        assert all(torch.equal(p, q) for p, q in zip(params, twin_params))
        assert torch.equal(lrs_of(opt), lrs_of(twin))
        assert opt.stats() == pytest.approx(twin.stats(), nan_ok=True)


@pytest.mark.parametrize("name", ["FusedSGD", "FusedTLR", "FusedRDBD-adam", "FusedSGDHD"])
def test_skip_nonfinite_reads_one_value_back_per_step(name):
    """The documented cost: one fused finiteness check, one device-to-host read per step, whatever the
    number of tensors (the per-step methods make no read of their own)."""
    factory, _ = OPTIMIZERS[name]
    params = small_params()
    opt = factory(params, skip_nonfinite=True)
    run_small_steps(opt, params, range(2))
    reads = []
    originals = {m: getattr(torch.Tensor, m) for m in SYNC_METHODS}

    def counting(method):
        def read(self, *args, **kwargs):
            reads.append(method)
            return originals[method](self, *args, **kwargs)

        return read

    with mock.patch.multiple(torch.Tensor, **{m: counting(m) for m in SYNC_METHODS}):
        run_small_steps(opt, params, range(2, 6))
    assert len(reads) == 4, reads


def test_skip_nonfinite_does_not_skip_large_finite_gradients():
    """The check is a max-abs norm: 1e30 squared overflows float32, but the step is finite and runs."""
    p = nn.Parameter(torch.zeros(3))
    opt = FusedSGD([p], lr=1e-30, skip_nonfinite=True)
    p.grad = torch.full((3,), 1e30)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), -1.0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad_dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_skip_nonfinite_checks_every_dtype_of_a_mixed_precision_model(bad_dtype):
    """Gradients of several dtypes are checked in one pass (compared in float64); the bad one is found."""
    params = [nn.Parameter(torch.ones(2, dtype=d)) for d in (torch.float32, torch.float64, torch.bfloat16)]
    params.append(nn.Parameter(torch.ones(2, dtype=torch.float16)))
    opt = FusedTLR(params, lr=0.1, skip_nonfinite=True)
    for p in params:
        p.grad = torch.ones_like(p)
    next(p for p in params if p.dtype == bad_dtype).grad[1] = math.inf
    opt.step()
    assert all(torch.equal(p, torch.ones_like(p)) for p in params)
    assert opt._controller["step"] == 0
    for p in params:
        p.grad = torch.ones_like(p)
    opt.step()
    assert opt._controller["step"] == 1
    expected = 1 - torch.tensor(0.1).double()  # the first real step, with the float32 lr 0.1 of global TLR
    for p in params:  # ... rounded to the parameter's dtype: within one rounding of it
        torch.testing.assert_close(p.double(), expected.expand(2), rtol=torch.finfo(p.dtype).eps, atol=0)


def test_skip_nonfinite_is_a_setting_of_the_object_not_of_its_state_dict():
    """FusedSGD's state_dict stays torch.optim.SGD's; loading keeps the constructed setting, both ways."""
    params = small_params()
    on, off = FusedSGD(params, lr=0.1, momentum=0.9, skip_nonfinite=True), FusedSGD(params, lr=0.1, momentum=0.9)
    run_small_steps(on, params, range(2))
    reference = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    assert on.state_dict()["param_groups"] == reference.state_dict()["param_groups"]
    off.load_state_dict(on.state_dict())
    on.load_state_dict(reference.state_dict())  # saved by torch, without any such setting
    assert on.skip_nonfinite and not off.skip_nonfinite


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_skip_nonfinite_must_be_a_bool(name):
    factory, _ = OPTIMIZERS[name]
    with pytest.raises(TypeError, match="skip_nonfinite"):
        factory(small_params(), skip_nonfinite="yes")


# ------------------------------------------------------------------------------ bad input
def _meta_and_cpu():
    return [nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2, device="meta"))]


BAD_PARAMS = [
    pytest.param(lambda: [1.0], TypeError, "Tensors", id="not-a-tensor"),
    pytest.param(lambda: 5, TypeError, "iterable", id="not-iterable"),
    pytest.param(lambda: nn.Parameter(torch.zeros(2)), TypeError, "iterable", id="a-bare-tensor"),
    pytest.param(lambda: {nn.Parameter(torch.zeros(2))}, TypeError, "set", id="a-set"),
    pytest.param(lambda: [nn.Parameter(torch.zeros(2, dtype=torch.complex64))], TypeError, "complex", id="complex"),
    pytest.param(lambda: [torch.zeros(3).to_sparse()], TypeError, "dense", id="sparse-parameter"),
    pytest.param(_meta_and_cpu, ValueError, "one device", id="cpu-and-meta"),
    pytest.param(lambda: [], ValueError, "empty", id="empty"),
    pytest.param(lambda: [{"lr": 0.1}], ValueError, "params", id="group-without-params"),
]


@pytest.mark.parametrize("make_bad, error, match", BAD_PARAMS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bad_params_at_construction_raise_a_clear_error(name, make_bad, error, match):
    factory, _ = OPTIMIZERS[name]
    with pytest.raises(error, match=match):
        factory(make_bad())


def test_a_parameter_listed_twice_is_refused_in_a_group_and_across_groups():
    p, q = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(3))
    for factory, _ in OPTIMIZERS.values():
        with pytest.raises(ValueError, match="more than once"):
            factory([p, q, p])
        with pytest.raises(ValueError, match="more than one parameter group"):
            factory([{"params": [p]}, {"params": [q, p]}])


BAD_GROUPS = [
    pytest.param(lambda old: [old[0]], ValueError, "more than one parameter group", id="already-optimized"),
    pytest.param(lambda old: [nn.Parameter(torch.zeros(2, dtype=torch.complex64))], TypeError, "complex", id="complex"),
    pytest.param(lambda old: [nn.Parameter(torch.zeros(2, device="meta"))], ValueError, "one device", id="meta"),
    pytest.param(lambda old: ["weight"], TypeError, "Tensors", id="a-string"),
]


@pytest.mark.parametrize("make_bad, error, match", BAD_GROUPS)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_bad_param_group_is_refused_and_the_optimizer_is_unchanged(name, make_bad, error, match):
    factory, _ = OPTIMIZERS[name]
    params = small_params()
    opt = factory(params)
    run_small_steps(opt, params, range(3))
    saved = snapshot(opt, params)
    with pytest.raises(error, match=match):
        opt.add_param_group({"params": make_bad(params)})
    assert len(opt.param_groups) == 1
    assert_unchanged(opt, params, saved)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_sparse_gradient_is_refused_before_the_step_changes_anything(case, backend):
    """The sparse gradient is the last tensor's: a check made tensor by tensor during the update would
    already have changed the others."""
    device = DEVICE[backend]
    params = make_params(torch.float32, device)
    opt = CASES[case](params, backend)
    run_case_steps(opt, params, range(3))
    saved = snapshot(opt, params)
    params[-1].grad = params[-1].grad.contiguous().to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()
    assert_unchanged(opt, params, saved)


def _bad_gradient(kind: str, p: torch.Tensor) -> None:
    """Give ``p`` a gradient a step refuses: torch's ``.grad`` setter refuses the last two, ``.data`` does not."""
    p.grad = torch.ones_like(p)
    if kind == "sparse":
        p.grad = p.grad.to_sparse()
    elif kind == "complex":
        p.grad.data = torch.ones(p.shape, dtype=torch.complex64)
    elif kind == "shape":
        p.grad.data = torch.ones(p.numel() + 1)


GRADIENT_CHECKS = {"sparse": (ValueError, "sparse"), "complex": (TypeError, "complex"), "shape": (ValueError, "shape")}


@pytest.mark.parametrize("path", ["extension", "python"])
@pytest.mark.parametrize("kind", list(GRADIENT_CHECKS))
def test_the_gradient_check_refuses_alike_in_cpp_and_python_before_any_change(kind, path, monkeypatch):
    """check_gradients runs in C++ where the extension is built and in Python otherwise: same refusals,
    same errors, whichever tensor holds the bad gradient, and nothing changes."""
    from autolr_fused import _validation

    if path == "python":
        monkeypatch.setattr(_validation, "_first_bad_gradient", None)
    elif _validation._first_bad_gradient is None:
        pytest.skip("the extension is not built")
    error, match = GRADIENT_CHECKS[kind]
    for bad in (0, len(SHAPES) - 1):
        params = small_params()
        opt = FusedSGD(params, lr=0.1, momentum=0.9, backend="reference")
        run_small_steps(opt, params, range(2))
        saved = snapshot(opt, params)
        for p in params:
            p.grad = torch.ones_like(p)
        _bad_gradient(kind, params[bad])
        with pytest.raises(error, match=match):
            opt.step()
        assert_unchanged(opt, params, saved)


def test_first_bad_gradient_reports_the_first_refused_tensor_and_skips_missing_gradients():
    from autolr_fused import _validation

    if _validation._first_bad_gradient is None:
        pytest.skip("the extension is not built")
    check = _validation._first_bad_gradient
    params = [nn.Parameter(torch.zeros(s)) for s in [(2, 3), (4,), (1,), (5, 1)]]
    assert check(params) == -1  # no gradients yet
    for p in params:
        p.grad = torch.zeros_like(p)
    params[1].grad = None
    params[2].grad = params[2].grad.t()  # a view: strided, same shape
    assert check(params) == -1
    assert check([]) == -1
    _bad_gradient("shape", params[3])
    _bad_gradient("sparse", params[2])
    assert check(params) == 2
    assert check(tuple(params[3:])) == 0
    assert check([params[0], "not a tensor"]) == 1
    with pytest.raises(TypeError):
        check(None)


# ----------------------------------------------------------------- mismatched state_dicts
def _trained(name: str, seed: int = 0):
    factory, _ = OPTIMIZERS[name]
    params = small_params(seed)
    opt = factory(params)
    run_small_steps(opt, params, range(4))
    return opt, params


@functools.cache
def _saved_state_dict(name: str, seed: int) -> dict:
    return _trained(name, seed)[0].state_dict()


def saved_state_dict(name: str, seed: int = 0) -> dict:
    """A fresh copy of the state_dict of ``name`` trained for 4 steps (trained once per session)."""
    return copy.deepcopy(_saved_state_dict(name, seed))


def _a_state_tensor(sd: dict) -> tuple:
    """(param id, key) of a parameter-shaped state tensor, made (a momentum buffer) where the method has none."""
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return pid, key
    pid = sd["param_groups"][0]["params"][0]
    sd["state"][pid] = {"momentum_buffer": torch.zeros(SHAPES[0])}
    return pid, "momentum_buffer"


def _wrong_shape(sd):
    pid, key = _a_state_tensor(sd)
    sd["state"][pid][key] = torch.zeros(7, 7)


def _missing_group_key(sd):
    del sd["param_groups"][0]["momentum"]


def _extra_group(sd):
    sd["param_groups"].append(copy.deepcopy(sd["param_groups"][0]))


def _fewer_params(sd):
    sd["param_groups"][0]["params"] = sd["param_groups"][0]["params"][:-1]


def _unknown_param_id(sd):
    sd["state"][12345] = {}


def _nan_lr(sd):
    sd["param_groups"][0]["lr"] = math.nan


def _integer_state(sd):
    pid, key = _a_state_tensor(sd)
    sd["state"][pid][key] = sd["state"][pid][key].to(torch.int64)


MISMATCHES = [
    pytest.param(lambda sd: sd.pop("state"), "'state'", id="no-state"),
    pytest.param(_extra_group, "parameter group", id="one-group-too-many"),
    pytest.param(_fewer_params, "parameter", id="one-parameter-too-few"),
    pytest.param(_missing_group_key, "momentum", id="group-without-momentum"),
    pytest.param(_wrong_shape, "shape", id="state-tensor-of-wrong-shape"),
    pytest.param(_integer_state, "floating", id="integer-state-tensor"),
    pytest.param(_unknown_param_id, "12345", id="state-of-an-unknown-parameter"),
    pytest.param(_nan_lr, "lr", id="nan-lr"),
]


# One configuration per class (the checks live in the shared base); the cross-class test covers every mode.
ONE_PER_CLASS = ["FusedSGD", "FusedSGDL", "FusedAutoDropSGD", "FusedTLR-per_layer", "FusedRDBD-adam", "FusedSGDHD"]


@pytest.mark.parametrize("corrupt, match", MISMATCHES)
@pytest.mark.parametrize("name", ONE_PER_CLASS)
def test_mismatched_state_dict_raises_value_error_and_changes_nothing(name, corrupt, match):
    """The donor is the same optimizer trained on other values, so only the corruption is wrong."""
    opt, params = _trained(name)
    sd = saved_state_dict(name, seed=1)
    corrupt(sd)
    saved = snapshot(opt, params)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    assert_unchanged(opt, params, saved)


@pytest.mark.parametrize("target", list(OPTIMIZERS))
def test_state_dict_of_another_optimizer_or_mode_is_refused(target):
    opt, params = _trained(target)
    saved = snapshot(opt, params)
    for source in OPTIMIZERS:
        if source != target:
            with pytest.raises(ValueError):
                opt.load_state_dict(saved_state_dict(source))
    assert_unchanged(opt, params, saved)


@pytest.mark.parametrize("source", [name for name in OPTIMIZERS if name != "FusedSGD"])
def test_a_state_dict_taken_before_the_first_step_fits_only_its_own_class(source):
    """Before any step an autolr optimizer's state_dict has no state, but its entry still tells it apart."""
    fresh = OPTIMIZERS[source][0](small_params(1)).state_dict()
    opt, params = _trained("FusedSGD")
    saved = snapshot(opt, params)
    with pytest.raises(ValueError, match="another autolr_fused optimizer"):
        opt.load_state_dict(fresh)
    assert_unchanged(opt, params, saved)


def test_rdbd_state_that_lacks_part_of_a_bundle_is_refused():
    opt, params = _trained("FusedRDBD-sgd")
    sd = copy.deepcopy(opt.state_dict())
    del sd["state"][0]["prev_h"]
    with pytest.raises(ValueError, match="prev_h"):
        opt.load_state_dict(sd)


def test_torch_sgd_state_dict_from_an_older_torch_without_the_newer_flags_still_loads():
    """torch.optim.SGD fills nesterov/maximize/foreach/differentiable/fused when an old group lacks them."""
    params = small_params()
    ref = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    run_small_steps(ref, params, range(2))
    sd = ref.state_dict()
    for key in ("nesterov", "maximize", "foreach", "differentiable", "fused"):
        del sd["param_groups"][0][key]
    opt = FusedSGD(small_params(), lr=0.5, momentum=0.9)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["maximize"] is False


def test_aalr_load_state_dict_refuses_a_bad_state_and_changes_nothing():
    model = nn.Linear(3, 1)
    aalr = AALR(model, torch.optim.SGD(model.parameters(), lr=0.1), patience=2)
    aalr.epoch_end(1.0)
    before = aalr.stats()
    bad = aalr.state_dict()
    bad["lr"] = math.nan
    with pytest.raises(ValueError, match="lr"):
        aalr.load_state_dict(bad)
    bad = {**aalr.state_dict(), "phase": 3}
    with pytest.raises(ValueError, match="phase"):
        aalr.load_state_dict(bad)
    with pytest.raises(TypeError):
        aalr.load_state_dict([("lr", 0.1)])
    assert aalr.stats() == before
