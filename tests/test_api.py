"""The public API of autolr_fused: one table of the public classes, and the contract
every optimizer shares (backends, the environment override, stats(), argument checks,
state_dict serialisation, no host synchronisation inside per-step methods)."""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable
from unittest import mock

import pytest
import torch
from torch import nn

import autolr_fused
from autolr_fused import (
    AALR,
    BACKEND_ENV_VAR,
    BackendUnavailableError,
    FusedAutoDropSGD,
    FusedRDBD,
    FusedSGD,
    FusedSGDHD,
    FusedSGDL,
    FusedTLR,
    available_backends,
)

PUBLIC_CLASSES = [
    "AALR",
    "FusedAutoDropSGD",
    "FusedRDBD",
    "FusedSGD",
    "FusedSGDHD",
    "FusedSGDL",
    "FusedTLR",
    "StatsLogger",
]
SHAPES = [(4, 3), (5,), (2, 1, 3)]

# One row per optimizer configuration: (factory taking params and extra kwargs, extra stats keys).
OPTIMIZERS: dict[str, tuple[Callable[..., torch.optim.Optimizer], set[str]]] = {
    "FusedSGD": (lambda ps, **kw: FusedSGD(ps, lr=0.1, momentum=0.9, **kw), set()),
    "FusedSGDL": (lambda ps, **kw: FusedSGDL(ps, lr=0.1, total_steps=6, **kw), set()),
    "FusedAutoDropSGD": (
        lambda ps, **kw: FusedAutoDropSGD(ps, lr=0.1, steps_per_epoch=2, drop_delay=2, **kw),
        {"angle", "theta", "drop_pending", "k"},
    ),
    "FusedTLR": (lambda ps, **kw: FusedTLR(ps, lr=0.1, momentum=0.9, **kw), {"factor"}),
    "FusedTLR-per_layer": (lambda ps, **kw: FusedTLR(ps, lr=0.1, per_layer=True, **kw), {"factor"}),
    "FusedTLR-window": (lambda ps, **kw: FusedTLR(ps, lr=0.1, steps_per_epoch=3, **kw), {"factor"}),
    "FusedRDBD-sgd": (lambda ps, **kw: FusedRDBD(ps, lr=0.05, momentum=0.5, **kw), {"inner_product"}),
    "FusedRDBD-adam": (lambda ps, **kw: FusedRDBD(ps, base="adam", meta_lr=1e-3, **kw), {"inner_product"}),
    "FusedSGDHD": (lambda ps, **kw: FusedSGDHD(ps, lr=0.1, hypergrad_lr=1e-3, **kw), {"inner_product"}),
}
BASE_OPTIMIZERS = ["FusedSGD", "FusedSGDL", "FusedAutoDropSGD", "FusedTLR", "FusedRDBD-sgd", "FusedSGDHD"]
# The methods whose lr rule runs inside every step: no device-to-host read is allowed there.
PER_STEP = ["FusedSGD", "FusedTLR", "FusedTLR-per_layer", "FusedRDBD-sgd", "FusedRDBD-adam", "FusedSGDHD"]


def make_params(seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]


def clone_params(params) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone()) for p in params]


def run_steps(opt, params, steps, seed: int = 7) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(seed * 1000 + step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


def is_plain_number(value) -> bool:
    return type(value) in (int, float, bool)


# ------------------------------------------------------------------------ imports
@pytest.mark.parametrize("name", PUBLIC_CLASSES)
def test_public_class_is_importable_from_package_root_and_listed_in_all(name):
    assert isinstance(getattr(autolr_fused, name), type)
    assert name in autolr_fused.__all__


@pytest.mark.parametrize("name", BASE_OPTIMIZERS)
def test_each_optimizer_is_a_torch_optimizer(name):
    factory, _ = OPTIMIZERS[name]
    assert isinstance(factory(make_params()), torch.optim.Optimizer)


def test_aalr_is_a_controller_not_an_optimizer():
    model = nn.Linear(2, 1)
    aalr = AALR(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not isinstance(aalr, torch.optim.Optimizer)


# ----------------------------------------------------------------------- backends
def test_available_backends_always_include_reference():
    backends = available_backends()
    assert isinstance(backends, tuple)
    assert "reference" in backends
    assert set(backends) <= {"reference", "cpu", "triton", "cuda"}


@pytest.mark.parametrize("name", BASE_OPTIMIZERS)
def test_reference_backend_constructs_and_steps(name):
    factory, _ = OPTIMIZERS[name]
    params = make_params()
    before = [p.detach().clone() for p in params]
    opt = factory(params, backend="reference")
    run_steps(opt, params, range(3))
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("name", BASE_OPTIMIZERS)
def test_unknown_backend_raises_value_error(name):
    factory, _ = OPTIMIZERS[name]
    with pytest.raises(ValueError, match="backend"):
        factory(make_params(), backend="nonsense")


@pytest.mark.parametrize("backend", ["cuda", "cpu", "triton"])
@pytest.mark.parametrize("name", BASE_OPTIMIZERS)
def test_explicit_backend_raises_backend_unavailable_error_only_when_unavailable(name, backend):
    factory, _ = OPTIMIZERS[name]
    if backend in available_backends():
        assert isinstance(factory(make_params(), backend=backend), torch.optim.Optimizer)
    else:
        with pytest.raises(BackendUnavailableError, match=backend):
            factory(make_params(), backend=backend)


def test_backend_env_var_name_is_public():
    assert BACKEND_ENV_VAR == "AUTOLR_FUSED_BACKEND"


@pytest.mark.parametrize("name", BASE_OPTIMIZERS)
def test_env_var_reference_overrides_auto(name, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "reference")
    factory, _ = OPTIMIZERS[name]
    params = make_params()
    opt = factory(params)  # backend="auto"
    run_steps(opt, params, range(2))
    assert opt.backend == "reference"


@pytest.mark.parametrize("name", BASE_OPTIMIZERS)
def test_env_var_naming_no_backend_raises_value_error_under_auto(name, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "bogus")
    factory, _ = OPTIMIZERS[name]
    with pytest.raises(ValueError, match=BACKEND_ENV_VAR):
        factory(make_params())


def test_env_var_does_not_override_an_explicit_backend(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "bogus")
    opt = FusedSGD(make_params(), lr=0.1, backend="reference")
    assert opt.backend == "reference"


# -------------------------------------------------------------------------- stats
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_stats_are_plain_python_numbers_with_the_documented_keys(name):
    factory, extra_keys = OPTIMIZERS[name]
    params = make_params()
    opt = factory(params)
    for n_steps in (0, 7):
        run_steps(opt, params, range(n_steps))
        stats = opt.stats()
        assert isinstance(stats, dict)
        assert {"lr", "lr_min", "lr_max"} | extra_keys <= set(stats)
        bad = {k: type(v).__name__ for k, v in stats.items() if not is_plain_number(v)}
        assert not bad, f"non-plain stats values: {bad}"
        assert stats["lr_min"] <= stats["lr"] <= stats["lr_max"] or math.isnan(stats["lr"])


def test_autodrop_stats_report_k_and_pending_as_int_and_bool():
    params = make_params()
    opt = FusedAutoDropSGD(params, lr=0.1, steps_per_epoch=1, drop_delay=3)
    run_steps(opt, params, range(4))
    stats = opt.stats()
    assert type(stats["k"]) is int
    assert type(stats["drop_pending"]) is bool


def test_aalr_stats_are_plain_python_numbers():
    model = nn.Linear(3, 1)
    aalr = AALR(model, torch.optim.SGD(model.parameters(), lr=0.1), patience=2)
    for loss in (1.0, 0.5, 0.4, torch.tensor(0.3)):
        aalr.epoch_end(loss)
        stats = aalr.stats()
        assert {"lr", "lr_min", "lr_max"} <= set(stats)
        assert all(is_plain_number(v) for v in stats.values()), stats


# -------------------------------------------------------------- host synchronisation
SYNC_METHODS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


class HostRead(AssertionError):
    pass


def _forbid_host_reads():
    """Patch every Python-level way of reading a tensor's value back to the host.

    On a GPU these are the calls that synchronise; CPU-only CI has no
    torch.cuda.set_sync_debug_mode, so each of them raises instead.
    """

    def boom(self, *args, **kwargs):
        raise HostRead("a tensor value was read back to the host during step()")

    patches = [mock.patch.object(torch.Tensor, m, boom) for m in SYNC_METHODS]
    return patches


def test_host_read_guard_catches_each_kind_of_read():
    t = torch.tensor(1.0)
    patches = _forbid_host_reads()
    for p in patches:
        p.start()
    try:
        for read in (
            t.item,
            t.tolist,
            lambda: bool(t),
            lambda: float(t),
            lambda: int(t),
            lambda: [0, 1][torch.tensor(1)],
        ):
            with pytest.raises(HostRead):
                read()
    finally:
        for p in patches:
            p.stop()
    assert float(t) == 1.0


@pytest.mark.parametrize("name", PER_STEP)
def test_per_step_methods_do_not_read_device_values_during_step(name):
    factory, _ = OPTIMIZERS[name]
    params, twin_params = make_params(), make_params()
    opt, twin = factory(params), factory(twin_params)
    run_steps(opt, params, range(2))  # warm-up: state (previous gradient/direction, lr tensors) exists
    run_steps(twin, twin_params, range(2))
    patches = _forbid_host_reads()
    for p in patches:
        p.start()
    try:
        run_steps(opt, params, range(2, 6))
    finally:
        for p in patches:
            p.stop()
    # The guarded steps did the real work: identical to unguarded steps.
    run_steps(twin, twin_params, range(2, 6))
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))
    assert opt.stats() == twin.stats()


def test_autodrop_reads_device_values_only_at_epoch_ends():
    params = make_params()
    opt = FusedAutoDropSGD(params, lr=0.1, steps_per_epoch=4, drop_delay=2)
    run_steps(opt, params, range(4))  # one full epoch
    patches = _forbid_host_reads()
    for p in patches:
        p.start()
    try:
        run_steps(opt, params, range(4, 7))  # three steps inside the second epoch
    finally:
        for p in patches:
            p.stop()
    assert opt.stats()["epoch"] == 1
    run_steps(opt, params, [7])  # the epoch end itself may synchronise once
    assert opt.stats()["epoch"] == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for torch.cuda.set_sync_debug_mode")
@pytest.mark.gpu
@pytest.mark.parametrize("name", PER_STEP)
def test_per_step_methods_do_not_synchronise_on_cuda(name):
    factory, _ = OPTIMIZERS[name]
    params = [nn.Parameter(p.detach().cuda()) for p in make_params()]
    opt = factory(params)
    run_steps(opt, params, range(2))
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------- argument checks
BAD_HYPERPARAMETERS = [
    pytest.param(lambda ps: FusedTLR(ps, bound=0), "bound", id="FusedTLR-bound-0"),
    pytest.param(lambda ps: FusedTLR(ps, update_fraction=0), "update_fraction", id="FusedTLR-update_fraction-0"),
    pytest.param(lambda ps: FusedTLR(ps, steps_per_epoch=0), "steps_per_epoch", id="FusedTLR-steps_per_epoch-0"),
    pytest.param(lambda ps: FusedTLR(ps, lr=-1), "lr", id="FusedTLR-negative-lr"),
    pytest.param(lambda ps: FusedRDBD(ps, base="sgdx"), "base", id="FusedRDBD-base-sgdx"),
    pytest.param(lambda ps: FusedRDBD(ps, meta_lr=-1), "meta_lr", id="FusedRDBD-meta_lr-negative"),
    pytest.param(lambda ps: FusedRDBD(ps, lr_bounds=(1, 0)), "lr_bounds", id="FusedRDBD-lr_bounds-reversed"),
    pytest.param(lambda ps: FusedRDBD(ps, base="adam", betas=(1.0, 0.999)), "betas", id="FusedRDBD-beta1-1"),
    # Arguments of the other base would be ignored, so they are refused.
    pytest.param(lambda ps: FusedRDBD(ps, base="adam", dampening=0.5), "dampening", id="FusedRDBD-adam-dampening"),
    pytest.param(lambda ps: FusedRDBD(ps, betas=(0.5, 0.9)), "betas", id="FusedRDBD-sgd-betas"),
    pytest.param(lambda ps: FusedRDBD(ps, eps=1e-6), "eps", id="FusedRDBD-sgd-eps"),
    pytest.param(
        lambda ps: FusedRDBD(ps, weight_decay=0.1, decoupled_weight_decay=True),
        "decoupled_weight_decay",
        id="FusedRDBD-sgd-decoupled",
    ),
    pytest.param(lambda ps: FusedSGDHD(ps, hypergrad_lr=-1), "hypergrad_lr", id="FusedSGDHD-hypergrad_lr-negative"),
    pytest.param(lambda ps: FusedSGDL(ps, gamma=0), "gamma", id="FusedSGDL-gamma-0"),
    pytest.param(lambda ps: FusedSGDL(ps, total_steps=0), "total_steps", id="FusedSGDL-total_steps-0"),
    pytest.param(
        lambda ps: FusedAutoDropSGD(ps, steps_per_epoch=5, drop_factor=1.0), "drop_factor", id="AutoDrop-drop_factor-1"
    ),
    pytest.param(
        lambda ps: FusedAutoDropSGD(ps, steps_per_epoch=0), "steps_per_epoch", id="AutoDrop-steps_per_epoch-0"
    ),
    pytest.param(
        lambda ps: FusedAutoDropSGD(ps, steps_per_epoch=5, drop_delay=0), "drop_delay", id="AutoDrop-drop_delay-0"
    ),
    pytest.param(lambda ps: FusedSGD(ps, lr=-1), "lr", id="FusedSGD-negative-lr"),
]


@pytest.mark.parametrize("factory, name", BAD_HYPERPARAMETERS)
def test_bad_hyperparameter_raises_value_error_naming_it_and_leaves_params_unchanged(factory, name):
    params = make_params()
    for p in params:
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in params]
    with pytest.raises(ValueError, match=name):
        factory(params)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in params)


# add_param_group with a bad value on a working optimizer: the error names it, nothing changes.
BAD_GROUPS = [
    pytest.param("FusedTLR", {"bound": 0}, "bound", id="FusedTLR-bound"),
    pytest.param("FusedTLR-window", {"update_fraction": 0}, "update_fraction", id="FusedTLR-update_fraction"),
    pytest.param("FusedRDBD-sgd", {"meta_lr": -1}, "meta_lr", id="FusedRDBD-meta_lr"),
    pytest.param("FusedRDBD-sgd", {"lr_bounds": (1, 0)}, "lr_bounds", id="FusedRDBD-lr_bounds"),
    pytest.param("FusedSGDHD", {"hypergrad_lr": -1}, "hypergrad_lr", id="FusedSGDHD-hypergrad_lr"),
    pytest.param("FusedAutoDropSGD", {"drop_factor": 1.0}, "drop_factor", id="AutoDrop-drop_factor"),
    pytest.param("FusedSGD", {"momentum": 1.0}, "momentum", id="FusedSGD-momentum"),
]


@pytest.mark.parametrize("name, group_kwargs, arg", BAD_GROUPS)
def test_bad_param_group_raises_value_error_naming_it_before_any_state_change(name, group_kwargs, arg):
    factory, _ = OPTIMIZERS[name]
    params = make_params()
    opt = factory(params[:2])
    run_steps(opt, params[:2], range(3))
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=arg):
        opt.add_param_group({"params": [params[2]], **group_kwargs})
    assert len(opt.param_groups) == 1
    after = opt.state_dict()
    assert _groups_equal(after["param_groups"], before["param_groups"])
    assert set(after["state"]) == set(before["state"])


def _groups_equal(a, b) -> bool:
    if len(a) != len(b):
        return False
    for ga, gb in zip(a, b):
        if set(ga) != set(gb):
            return False
        for k in ga:
            va, vb = ga[k], gb[k]
            if isinstance(va, torch.Tensor) or isinstance(vb, torch.Tensor):
                if not torch.equal(torch.as_tensor(va), torch.as_tensor(vb)):
                    return False
            elif va != vb:
                return False
    return True


AALR_BAD = [
    pytest.param({"patience": 0}, "patience", id="patience-0"),
    pytest.param({"patience": -3}, "patience", id="patience-negative"),
    pytest.param({"initial_lr": 0}, "initial_lr", id="initial_lr-0"),
    pytest.param({"initial_lr": -0.1}, "initial_lr", id="initial_lr-negative"),
    pytest.param({"initial_lr": float("nan")}, "initial_lr", id="initial_lr-nan"),
    pytest.param({"initial_loss": float("nan")}, "initial_loss", id="initial_loss-nan"),
]


@pytest.mark.parametrize("kwargs, name", AALR_BAD)
def test_aalr_bad_argument_raises_value_error_naming_it_before_touching_the_optimizer(kwargs, name):
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.123)
    with pytest.raises(ValueError, match=name):
        AALR(model, opt, **kwargs)
    assert opt.param_groups[0]["lr"] == 0.123


# ------------------------------------------------------------------ serialisation
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_round_trips_through_torch_save_weights_only_and_continues_identically(name):
    factory, _ = OPTIMIZERS[name]
    params = make_params()
    opt = factory(params)
    run_steps(opt, params, range(5))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)

    twin_params = clone_params(params)
    twin = factory(twin_params)
    twin.load_state_dict(loaded)
    # The lrs come back at once; last-step diagnostics (factor, inner_product) may wait for the next step.
    lr_keys = ("lr", "lr_min", "lr_max")
    assert {k: twin.stats()[k] for k in lr_keys} == {k: opt.stats()[k] for k in lr_keys}
    run_steps(opt, params, range(5, 11))
    run_steps(twin, twin_params, range(5, 11))
    assert all(torch.equal(a, b) for a, b in zip(params, twin_params))
    assert twin.stats() == pytest.approx(opt.stats(), nan_ok=True)


def test_aalr_state_dict_round_trips_through_torch_save_weights_only():
    model = nn.Linear(3, 1)
    aalr = AALR(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), patience=2)
    for loss in (1.0, 0.9, 0.8):  # into phase 2: both checkpoints C0 and C exist
        aalr.epoch_end(loss)
    buf = io.BytesIO()
    torch.save(aalr.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    other_model = nn.Linear(3, 1)
    other = AALR(other_model, torch.optim.SGD(other_model.parameters(), lr=0.1, momentum=0.9))
    other.load_state_dict(loaded)
    assert other.stats() == aalr.stats()


@pytest.mark.parametrize(
    "make, key",
    [
        (lambda ps: autolr_fused.FusedTLR(ps, lr=0.1), "factor"),
        (lambda ps: autolr_fused.FusedTLR(ps, lr=0.1, per_layer=True), "factor"),
        (lambda ps: autolr_fused.FusedSGDHD(ps, lr=0.1, hypergrad_lr=1e-2), "inner_product"),
        (lambda ps: autolr_fused.FusedRDBD(ps, meta_lr=0.1), "inner_product"),
    ],
)
def test_stats_survive_a_state_dict_round_trip(make, key):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    optimizer = make(params)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    before = optimizer.stats()
    assert before[key] not in (0.0, 1.0)  # a real statistic was measured
    fresh = make([torch.nn.Parameter(p.detach().clone()) for p in params])
    fresh.load_state_dict(optimizer.state_dict())
    assert fresh.stats() == before


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_named_parameters_step_like_plain_parameters_and_keep_their_names_in_state_dict(name):
    """``model.named_parameters()`` as torch.optim takes them: the same steps, plus ``param_names``."""
    factory, _ = OPTIMIZERS[name]
    plain, named = make_params(), make_params()
    opt_plain = factory(plain)
    opt_named = factory([(f"layer{i}.weight", p) for i, p in enumerate(named)])
    assert opt_named.param_groups[0]["params"] == named
    assert opt_named.param_groups[0]["param_names"] == ["layer0.weight", "layer1.weight", "layer2.weight"]
    run_steps(opt_plain, plain, range(4))
    run_steps(opt_named, named, range(4))
    assert all(torch.equal(a, b) for a, b in zip(plain, named))
    saved = opt_named.state_dict()
    assert saved["param_groups"][0]["param_names"] == ["layer0.weight", "layer1.weight", "layer2.weight"]
    twin_params = clone_params(named)
    twin = factory([(f"layer{i}.weight", p) for i, p in enumerate(twin_params)])
    twin.load_state_dict(copy.deepcopy(saved))  # FusedSGD, as torch, keeps the loaded tensors themselves
    run_steps(opt_named, named, range(4, 7))
    run_steps(twin, twin_params, range(4, 7))
    assert all(torch.equal(a, b) for a, b in zip(named, twin_params))


def test_named_and_unnamed_parameters_do_not_mix():
    a, b, c = make_params()
    with pytest.raises(ValueError, match="names"):
        FusedSGD([("a", a), b], lr=0.1)
    opt = FusedSGD([("a", a)], lr=0.1)
    with pytest.raises(ValueError, match="names"):  # torch's rule across groups, before the group is added
        opt.add_param_group({"params": [b]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": [("c", c)], "lr": 0.01})
    assert opt.param_groups[1]["param_names"] == ["c"]
    with pytest.raises(TypeError, match="name, tensor"):
        FusedSGD([(a, "a")], lr=0.1)
