"""FusedRDBD (reference backend) against a naive float64 loop written from the spec.

The naive loop below follows ``shared/spec/algorithms.md`` ("Base update" and
"FusedRDBD") line by line, independently of the package's code:

    h_t = <d_t, d_{t-1}>                     (0 at the first step)
    if regret and h_t * h_{t-1} < 0:
        p += delta_{t-1} * d_{t-1};  lr -= delta_{t-1}
    new = clamp(lr + eta * h_t, lo, hi);  delta_t = new - lr;  lr = new
    p -= lr * d_t                            (AdamW: also p *= 1 - lr * wd)

Both sides see the same gradients: a seeded gradient of a random quadratic plus
seeded noise, computed in float64 from the naive parameters and handed, cast to
float32, to the optimizer. So the only difference between the two runs is float32
arithmetic and storage in the optimizer, and the errors do not feed back through
the gradients.

Tolerances: float32 storage rounds each parameter by <= 6e-8 relative per step;
over 40 steps that accumulates to a few 1e-6 relative, plus the effect of the
float32 per-tensor lr and float32 inner products (relative error ~1e-6 of
||d_t|| ||d_{t-1}||, times eta). Hence rtol 1e-5 / atol 1e-6 on parameters and
1e-5 relative on the lrs. Regret decisions depend on the sign of h_t; the naive
loop asserts that every h_t is away from zero (|cos| > 1e-4, far beyond float32
error) so that a mismatch can only mean a semantic difference.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from spec_problems import SHAPES, NoisyQuadratic, set_grads

from autolr_fused import FusedRDBD, available_backends

STEPS = 40
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6
LR_RTOL = 1e-5
SIGN_MARGIN = 1e-4  # |h_t| / (||d_t|| ||d_{t-1}||) below this is too close to a regret decision


# --------------------------------------------------------------------------- problem
# ------------------------------------------------------------------------ naive loop
@dataclass
class NaiveTensorState:
    lr: float
    h_prev: float = 0.0
    delta_prev: float = 0.0
    d_prev: torch.Tensor | None = None
    momentum_buffer: torch.Tensor | None = None
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    adam_step: int = 0


@dataclass
class NaiveCounters:
    regrets: int = 0
    upper_clamps: int = 0
    lower_clamps: int = 0
    hs: list[float] = field(default_factory=list)


def naive_direction(p: torch.Tensor, g: torch.Tensor, st: NaiveTensorState, cfg: dict[str, Any]) -> torch.Tensor:
    """The spec's "Base update" direction d (torch.optim.SGD / Adam / AdamW semantics)."""
    maximize = cfg.get("maximize", False)
    wd = cfg.get("weight_decay", 0.0)
    if cfg.get("base", "sgd") == "sgd":
        d = -g if maximize else g.clone()
        if wd:
            d = d + wd * p
        momentum = cfg.get("momentum", 0.0)
        if momentum:
            if st.momentum_buffer is None:
                st.momentum_buffer = d.clone()
            else:
                st.momentum_buffer = momentum * st.momentum_buffer + (1 - cfg.get("dampening", 0.0)) * d
            d = d + momentum * st.momentum_buffer if cfg.get("nesterov", False) else st.momentum_buffer.clone()
        return d
    beta1, beta2 = cfg.get("betas", (0.9, 0.999))
    eps = cfg.get("eps", 1e-8)
    g = -g if maximize else g
    if wd and not cfg.get("decoupled_weight_decay", False):
        g = g + wd * p
    if st.exp_avg is None:
        st.exp_avg = torch.zeros_like(p)
        st.exp_avg_sq = torch.zeros_like(p)
    st.adam_step += 1
    st.exp_avg = beta1 * st.exp_avg + (1 - beta1) * g
    st.exp_avg_sq = beta2 * st.exp_avg_sq + (1 - beta2) * g * g
    m_hat = st.exp_avg / (1 - beta1**st.adam_step)
    v_hat = st.exp_avg_sq / (1 - beta2**st.adam_step)
    return m_hat / (v_hat.sqrt() + eps)


def naive_rdbd_step(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[NaiveTensorState],
    cfgs: list[dict[str, Any]],
    counters: NaiveCounters,
) -> None:
    """One RDBD step per tensor, float64, in place on ``params``."""
    for p, g, st, cfg in zip(params, grads, states, cfgs):
        d = naive_direction(p, g, st, cfg)
        if st.d_prev is None:
            h = 0.0
        else:
            h = float((d * st.d_prev).sum())
            scale = float(d.norm() * st.d_prev.norm())
            assert abs(h) > SIGN_MARGIN * scale, "test case sits on a regret decision boundary; change the case"
        counters.hs.append(h)
        regret = cfg.get("regret", True)
        if regret and h * st.h_prev < 0:
            p += st.delta_prev * st.d_prev
            st.lr -= st.delta_prev
            counters.regrets += 1
        lo, hi = cfg.get("lr_bounds", (0.0, None))
        new = st.lr + cfg.get("meta_lr", 0.01) * h
        if lo is not None and new < lo:
            new = lo
            counters.lower_clamps += 1
        if hi is not None and new > hi:
            new = hi
            counters.upper_clamps += 1
        delta = new - st.lr
        st.lr = new
        if cfg.get("base", "sgd") == "adam" and cfg.get("decoupled_weight_decay", False):
            p *= 1 - st.lr * cfg.get("weight_decay", 0.0)
        p -= st.lr * d
        st.d_prev, st.h_prev, st.delta_prev = d, h, delta


# ------------------------------------------------------------------------ the cases
# Each row: optimizer keyword arguments (one group), what the naive run must show.
# "groups": optional per-group overrides: the tensors are split between two groups.
CASES = {
    "sgd_plain_regret": dict(kw=dict(base="sgd", lr=0.05, meta_lr=2e-3), expect=dict(regrets=True)),
    "sgd_plain_dbd_no_regret": dict(kw=dict(base="sgd", lr=0.05, meta_lr=2e-3, regret=False), expect=dict()),
    "sgd_momentum_dampening_regret": dict(
        kw=dict(base="sgd", lr=0.01, meta_lr=3e-4, momentum=0.7, dampening=0.3), expect=dict(regrets=True)
    ),
    "sgd_nesterov_regret": dict(
        kw=dict(base="sgd", lr=0.01, meta_lr=2e-4, momentum=0.6, nesterov=True), expect=dict(regrets=True)
    ),
    "sgd_weight_decay_momentum_regret": dict(
        kw=dict(base="sgd", lr=0.02, meta_lr=3e-4, momentum=0.5, weight_decay=0.05), expect=dict(regrets=True)
    ),
    "sgd_upper_bound_binds": dict(
        kw=dict(base="sgd", lr=0.005, meta_lr=5e-3, lr_bounds=(0.0, 0.02)), expect=dict(regrets=True, upper=True)
    ),
    "sgd_lower_bound_binds": dict(
        kw=dict(base="sgd", lr=0.3, meta_lr=2e-2, lr_bounds=(0.25, None)), expect=dict(lower=True)
    ),
    "sgd_two_groups_different_lr_and_meta_lr": dict(
        kw=dict(base="sgd", lr=0.02, meta_lr=3e-4, momentum=0.5),
        groups=dict(lr=0.05, meta_lr=1e-3, momentum=0.0, weight_decay=0.01),
        expect=dict(regrets=True),
    ),
    "adam_regret": dict(kw=dict(base="adam", lr=0.005, meta_lr=2e-4, betas=(0.05, 0.99)), expect=dict(regrets=True)),
    "adam_dbd_no_regret": dict(
        kw=dict(base="adam", lr=0.005, meta_lr=2e-4, betas=(0.05, 0.99), regret=False), expect=dict()
    ),
    "adam_coupled_weight_decay": dict(
        kw=dict(base="adam", lr=0.005, meta_lr=2e-4, betas=(0.05, 0.99), weight_decay=0.1),
        expect=dict(regrets=True),
    ),
    "adamw_decoupled_weight_decay": dict(
        kw=dict(base="adam", lr=0.01, meta_lr=2e-4, betas=(0.05, 0.99), weight_decay=0.5, decoupled_weight_decay=True),
        expect=dict(regrets=True),
    ),
    "adam_upper_and_lower_bounds_bind": dict(
        kw=dict(base="adam", lr=0.005, meta_lr=1e-2, betas=(0.05, 0.99), lr_bounds=(0.004, 0.007)),
        expect=dict(upper=True, lower=True, regrets=True),
    ),
}


def build(case: dict[str, Any], opt_params: list[torch.Tensor]) -> tuple[FusedRDBD, list[dict]]:
    """The optimizer under test and each tensor's naive configuration."""
    kw = dict(case["kw"])
    if "groups" in case:
        opt = FusedRDBD(
            [{"params": opt_params[:2]}, {"params": opt_params[2:], **case["groups"]}],
            backend="reference",
            **kw,
        )
        cfgs = [kw] * 2 + [{**kw, **case["groups"]}] * (len(opt_params) - 2)
    else:
        opt = FusedRDBD(opt_params, backend="reference", **kw)
        cfgs = [kw] * len(opt_params)
    return opt, cfgs


@pytest.mark.parametrize("name", list(CASES))
def test_rdbd_matches_naive_float64_loop_every_step(name: str) -> None:
    case = CASES[name]
    problem = NoisyQuadratic(seed=7, sigma=0.5)
    naive = [x.clone() for x in problem.initial]
    opt_params = problem.float32_params()
    opt, cfgs = build(case, opt_params)
    states = [NaiveTensorState(lr=float(cfg["lr"])) for cfg in cfgs]
    counters = NaiveCounters()

    for step in range(1, STEPS + 1):
        grads = problem.grads(naive)
        set_grads(opt_params, grads)
        opt.step()
        naive_rdbd_step(naive, grads, states, cfgs, counters)
        for i, (p, q, st) in enumerate(zip(opt_params, naive, states)):
            torch.testing.assert_close(
                p.detach().double(),
                q,
                rtol=PARAM_RTOL,
                atol=PARAM_ATOL,
                msg=lambda m, i=i, step=step: f"{name}: tensor {i} params differ at step {step}: {m}",
            )
            lr = opt.state[p]["lr"]
            assert lr.numel() == 1
            assert float(lr) == pytest.approx(st.lr, rel=LR_RTOL, abs=1e-12), (
                f"{name}: tensor {i} lr differs at step {step}: {float(lr)} vs naive {st.lr}"
            )

    start_lrs = [float(cfg["lr"]) for cfg in cfgs]
    assert any(abs(st.lr - lr0) > 0.1 * lr0 for st, lr0 in zip(states, start_lrs)), "lrs must move visibly"
    flips = sum(1 for a, b in zip(counters.hs, counters.hs[len(SHAPES) :]) if a * b < 0)
    assert flips > 0, "the inner products must change sign for the case to test regrets"
    expect = case["expect"]
    if case["kw"].get("regret", True):
        if expect.get("regrets"):
            assert counters.regrets > 0, "at least one regret must fire in this case"
    else:
        assert counters.regrets == 0
    if expect.get("upper"):
        assert counters.upper_clamps > 0, "the upper lr bound must bind in this case"
    if expect.get("lower"):
        assert counters.lower_clamps > 0, "the lower lr bound must bind in this case"


# The base changes every 8 steps, switching where d_{t-1} lives (the momentum buffer with momentum and without
# nesterov, else state["prev_direction"]); see test_spec_sgd_family.HD_SWITCHES.
RDBD_SWITCHES = {
    9: dict(nesterov=True),
    17: dict(nesterov=False),
    25: dict(momentum=0.0),
    33: dict(momentum=0.6),
}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_rdbd_follows_the_naive_loop_when_momentum_and_nesterov_change(backend: str) -> None:
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not built")
    problem = NoisyQuadratic(seed=7, sigma=0.5)
    naive = [x.clone() for x in problem.initial]
    opt_params = problem.float32_params()
    kw = dict(base="sgd", lr=0.01, meta_lr=2e-4, momentum=0.6)
    opt = FusedRDBD(opt_params, backend=backend, **kw)
    cfgs = [kw] * len(opt_params)
    states = [NaiveTensorState(lr=kw["lr"]) for _ in cfgs]
    counters = NaiveCounters()
    for step in range(1, STEPS + 1):
        if step in RDBD_SWITCHES:
            opt.param_groups[0].update(RDBD_SWITCHES[step])
            cfgs = [{**cfg, **RDBD_SWITCHES[step]} for cfg in cfgs]
        grads = problem.grads(naive)
        set_grads(opt_params, grads)
        opt.step()
        naive_rdbd_step(naive, grads, states, cfgs, counters)
        where = f"{backend}, step {step}, {cfgs[0]}"
        for i, (p, q, st) in enumerate(zip(opt_params, naive, states)):
            torch.testing.assert_close(p.detach().double(), q, rtol=PARAM_RTOL, atol=PARAM_ATOL, msg=where)
            assert float(opt.state[p]["lr"]) == pytest.approx(st.lr, rel=LR_RTOL, abs=1e-12), where
            keeps = cfgs[i]["momentum"] == 0 or cfgs[i].get("nesterov", False)
            assert ("prev_direction" in opt.state[p]) == keeps, where
    assert counters.regrets > 0, "regrets must fire for the switches to be tested with them"


def test_rdbd_regret_and_dbd_runs_differ_when_regrets_fire() -> None:
    """regret=True is not plain DBD: with sign flips of h the two runs' lrs part."""
    runs = []
    for regret in (True, False):
        problem = NoisyQuadratic(seed=7, sigma=0.5)
        params = problem.float32_params()
        opt = FusedRDBD(params, lr=0.05, meta_lr=2e-3, regret=regret, backend="reference")
        for _ in range(STEPS):
            set_grads(params, problem.grads([p.detach().double() for p in params]))
            opt.step()
        runs.append([float(opt.state[p]["lr"]) for p in params])
    assert runs[0] != runs[1]


# -------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize(
    "base_kw", [dict(base="sgd", momentum=0.9), dict(base="adam", betas=(0.05, 0.99))], ids=["sgd", "adam"]
)
@pytest.mark.parametrize("nan_everywhere", [True, False], ids=["nan_in_every_tensor", "nan_in_one_tensor"])
def test_rdbd_nan_gradient_leaves_its_tensors_lr_finite_and_unchanged(base_kw: dict, nan_everywhere: bool) -> None:
    problem = NoisyQuadratic(seed=3, sigma=0.5)
    params = problem.float32_params()
    opt = FusedRDBD(params, lr=0.01, meta_lr=1e-3, backend="reference", **base_kw)
    nan_step = 6
    for step in range(1, nan_step + 3):
        grads = [g.float() for g in problem.grads([p.detach().double() for p in params])]
        if step == nan_step:
            grads = [g.clone() for g in grads]
            for i in range(len(grads)) if nan_everywhere else [0]:
                grads[i].view(-1)[0] = float("nan")
        for p, g in zip(params, grads):
            p.grad = g
        before = [float(opt.state[p]["lr"]) if "lr" in opt.state[p] else None for p in params]
        opt.step()
        after = [float(opt.state[p]["lr"]) for p in params]
        assert all(math.isfinite(lr) for lr in after), f"lrs must stay finite (step {step}): {after}"
        if step == nan_step:
            hit = range(len(params)) if nan_everywhere else [0]
            for i in hit:
                assert after[i] == before[i], f"tensor {i}: a non-finite h must leave the lr unchanged"
            if not nan_everywhere:
                assert any(after[i] != before[i] for i in range(1, len(params))), (
                    "tensors with finite gradients keep adapting their lrs"
                )


def test_rdbd_nan_gradient_regrets_nothing_on_the_finite_entries() -> None:
    """Plain SGD: at the NaN step the finite entries move by exactly -lr * g with the old lr
    (no regret undo p += delta_{t-1} * d_{t-1}, though delta_{t-1} != 0)."""
    problem = NoisyQuadratic(seed=3, sigma=0.5)
    params = problem.float32_params()
    opt = FusedRDBD(params, lr=0.05, meta_lr=2e-3, backend="reference")
    lr_history = []
    for _ in range(5):
        set_grads(params, problem.grads([p.detach().double() for p in params]))
        opt.step()
        lr_history.append(float(opt.state[params[0]]["lr"]))
    assert lr_history[-1] != lr_history[-2], "delta_(t-1) must be nonzero for this check to mean anything"
    grad = problem.grads([p.detach().double() for p in params])[0].float()
    grad.view(-1)[0] = float("nan")
    set_grads(params, problem.grads([p.detach().double() for p in params]))
    params[0].grad = grad
    p_before = params[0].detach().clone()
    lr_before = opt.state[params[0]]["lr"].clone()
    opt.step()
    assert torch.equal(opt.state[params[0]]["lr"], lr_before)
    expected = p_before - lr_before * grad
    finite = torch.isfinite(grad)
    torch.testing.assert_close(params[0].detach()[finite], expected[finite], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------ statistics
def test_rdbd_stats_report_mean_min_max_of_per_tensor_lrs_and_inner_product() -> None:
    problem = NoisyQuadratic(seed=11, sigma=0.5)
    params = problem.float32_params()
    opt = FusedRDBD(params, lr=0.05, meta_lr=2e-3, backend="reference")
    for _ in range(10):
        set_grads(params, problem.grads([p.detach().double() for p in params]))
        opt.step()
    stats = opt.stats()
    lrs = [float(opt.state[p]["lr"]) for p in params]
    assert len(set(lrs)) > 1, "per-tensor lrs must differ for this check to mean anything"
    assert {"lr", "lr_min", "lr_max", "inner_product"} <= set(stats)
    assert stats["lr"] == pytest.approx(sum(lrs) / len(lrs), rel=1e-6)
    assert stats["lr_min"] == pytest.approx(min(lrs), rel=1e-6)
    assert stats["lr_max"] == pytest.approx(max(lrs), rel=1e-6)
    assert isinstance(stats["inner_product"], float) and math.isfinite(stats["inner_product"])


# ------------------------------------------------------------------------ state_dict
@pytest.mark.parametrize(
    "kw",
    [
        dict(base="sgd", lr=0.02, meta_lr=1e-3, momentum=0.9, dampening=0.1, weight_decay=0.01),
        dict(base="adam", lr=0.005, meta_lr=2e-4, betas=(0.05, 0.99), weight_decay=0.1, decoupled_weight_decay=True),
    ],
    ids=["sgd_momentum", "adamw"],
)
def test_rdbd_state_dict_round_trip_mid_run_continues_bit_identically(kw: dict) -> None:
    problem = NoisyQuadratic(seed=5, sigma=0.5)
    params_a = problem.float32_params()
    opt_a = FusedRDBD(params_a, backend="reference", **kw)

    def grads_now() -> list[torch.Tensor]:
        return [g.float() for g in problem.grads([p.detach().double() for p in params_a])]

    for _ in range(12):
        for p, g in zip(params_a, grads_now()):
            p.grad = g
        opt_a.step()
    saved = copy.deepcopy(opt_a.state_dict())
    params_b = [p.detach().clone().requires_grad_(True) for p in params_a]
    opt_b = FusedRDBD(params_b, backend="reference", **kw)
    opt_b.load_state_dict(saved)

    for step in range(12):
        grads = grads_now()
        for pa, pb, g in zip(params_a, params_b, grads):
            pa.grad = g.clone()
            pb.grad = g.clone()
        opt_a.step()
        opt_b.step()
        for i, (pa, pb) in enumerate(zip(params_a, params_b)):
            assert torch.equal(pa, pb), f"tensor {i} params diverge {step + 1} steps after the reload"
            assert torch.equal(opt_a.state[pa]["lr"], opt_b.state[pb]["lr"]), f"tensor {i} lr diverges"
