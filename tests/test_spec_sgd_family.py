"""FusedTLR, FusedSGDHD and FusedSGDL (reference backend) against naive float64 loops.

The loops below (``SpecTLR``, ``SpecSGDHD``, ``spec_sgd_step``) are written from
shared/spec/algorithms.md, sections "Base update", "FusedSGDL", "FusedTLR" and
"FusedSGDHD", independently of the package's code: plain Python over float64
tensors, one equation per line.

Set-up shared by every comparison: four parameter tensors of odd shapes, float32
for the optimizer and float64 copies for the loop; the gradient of a random
quadratic ``0.5 * ||A x - b||^2`` plus seeded noise, a deterministic function of
the step and of the (loop's) parameters.

Gradient feeding and tolerances. The gradient is computed once per step in
float64 from the loop's parameters, cast to float32, and the *same* float32
values are given to the optimizer and (upcast, exactly) to the loop. Both sides
therefore see bit-identical gradients, and the optimizer's parameters never feed
back into them; the only difference left is the optimizer's float32 arithmetic
(parameters, buffers, learning rates and float32-accumulated statistics), each
operation rounding at 2**-24 ~ 6e-8 relative. Over 40 steps that accumulates to
~1e-6 relative at worst, so:

* learning rates: 1e-5 relative (observed: at most ~1e-6);
* parameters: 1e-5 relative to the element's path length |p_0| + sum_t |lr_t d_t|,
  plus 1e-6 absolute (see ``assert_params_close``; observed: below 5% of that).
  The path, not the final value, is the scale of the rounding: TLR drives the lr
  to the edge of stability, where elements swing far and may end near zero.

Any semantic slip (a missing term, an lr applied one step late, a wrong window
length, u_j not divided by lr_j) moves results by percents of a step, orders of
magnitude above these tolerances.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction

import pytest
import torch

from autolr_fused import FusedSGDHD, FusedSGDL, FusedTLR, available_backends

SHAPES = [(3, 5), (7,), (2, 3, 4), (1,)]
STEPS = 40
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6
LR_RTOL = 1e-5


# --------------------------------------------------------------------- problem
class Quadratic:
    """0.5 * ||A x - b||^2 over the concatenated parameters, plus seeded per-step noise."""

    def __init__(self, seed: int, scale: float = 1.0, noise: float = 0.1, steps: int = 400) -> None:
        gen = torch.Generator().manual_seed(seed)
        n = sum(math.prod(s) for s in SHAPES)
        rows = 64
        self.A = torch.randn(rows, n, generator=gen, dtype=torch.float64) * (scale / math.sqrt(rows))
        self.b = torch.randn(rows, generator=gen, dtype=torch.float64)
        self.noise = torch.randn(steps + 1, n, generator=gen, dtype=torch.float64) * noise
        self.x0 = torch.randn(n, generator=gen, dtype=torch.float64)

    @staticmethod
    def split(flat: torch.Tensor) -> list[torch.Tensor]:
        out, i = [], 0
        for s in SHAPES:
            k = math.prod(s)
            out.append(flat[i : i + k].reshape(s).clone())
            i += k
        return out

    def initial(self) -> list[torch.Tensor]:
        return self.split(self.x0)

    def grads(self, step: int, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """float32 gradients at ``params`` (any dtype), computed in float64."""
        x = torch.cat([p.detach().double().reshape(-1) for p in params])
        g = self.A.T @ (self.A @ x - self.b) + self.noise[step]
        return [t.float() for t in self.split(g)]


def make_params(problem: Quadratic) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(float32 parameters for the optimizer, float64 copies for the loop)."""
    p64 = problem.initial()
    p32 = [p.float().clone().requires_grad_(True) for p in p64]
    return p32, [p.clone() for p in p64]


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor], sign: float = 1.0) -> None:
    for p, g in zip(params, grads):
        p.grad = (g * sign).clone()


def assert_params_close(opt_params, spec_params, paths, where: str) -> None:
    """|p - p_spec| <= PARAM_RTOL * path + PARAM_ATOL, elementwise.

    ``path`` is |p_0| + sum_t |lr_t d_t| per element (the spec loop tracks it): the
    float32 rounding of every update p -= lr d, and of the lr itself, is relative to
    the size of that update, not to where the element ends up. An element that
    travels far and ends near 0 carries error from the whole trip, so a plain rtol
    on the final value would be wrong, while a semantic slip (one step at a wrong
    lr) moves an element by percents of one step, far above 1e-5 of the whole path.
    """
    for i, (p, q, m) in enumerate(zip(opt_params, spec_params, paths)):
        err = (p.detach().double() - q).abs()
        allowed = PARAM_RTOL * m + PARAM_ATOL
        bad = err > allowed
        assert not bad.any(), (
            f"{where}, tensor {i}: {int(bad.sum())} elements off; worst |err| {float(err.max()):.3g}, "
            f"worst err/allowed {float((err / allowed).max()):.3g}"
        )


def assert_lr_close(actual: float, expected: float, where: str) -> None:
    assert math.isclose(actual, expected, rel_tol=LR_RTOL), f"{where}: lr {actual!r} != spec {expected!r}"


# ------------------------------------------------------- spec: the base update
def spec_sgd_direction(p, g, buf, *, momentum, dampening, weight_decay, nesterov, maximize):
    """'Base update': returns (regularized gradient r, update direction d, new momentum buffer)."""
    r = -g if maximize else g
    if weight_decay:
        r = r + weight_decay * p
    d = r
    if momentum:
        if buf is None:
            buf = r.clone()
        else:
            buf = momentum * buf + (1 - dampening) * r
        d = r + momentum * buf if nesterov else buf
    return r, d, buf


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a * b).sum())


def spec_apply(p: torch.Tensor, step: torch.Tensor, path: torch.Tensor) -> None:
    """p = p - lr * d (``step`` is lr * d), and the path length |p_0| + sum |lr d| grows by |step|."""
    p.sub_(step)
    path.add_(step.abs())


# ------------------------------------------------------------------ spec: TLR
def spec_change_factor(h: float, q: float, c: float) -> float:
    """den = max(4 (q - h), h / c); factor = 1 + h / den if den > 0 and all finite, else 1."""
    if not (math.isfinite(h) and math.isfinite(q)):
        return 1.0
    den = max(4 * (q - h), h / c)
    if not (math.isfinite(den) and den > 0):
        return 1.0
    return 1 + h / den


class SpecTLR:
    """FusedTLR from the spec, over groups of float64 tensors."""

    def __init__(
        self,
        groups,
        lrs,
        *,
        momentum=0.0,
        dampening=0.0,
        weight_decay=0.0,
        nesterov=False,
        maximize=False,
        per_layer=False,
        bound=0.25,
        steps_per_epoch=None,
        update_fraction=0.33,
    ):
        self.groups = groups
        self.sgd = dict(
            momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize
        )
        self.per_layer, self.c = per_layer, bound
        self.keys = [(gi, ti) for gi, g in enumerate(groups) for ti in range(len(g))]
        # Per layer: every tensor's own lr, starting at its group's lr; global: one lr per group.
        self.lr = {k: lrs[k[0]] for k in self.keys} if per_layer else list(lrs)
        self.buf = {k: None for k in self.keys}
        self.t = 0
        self.prev_r = None
        self.window = None if steps_per_epoch is None else max(1, round(update_fraction * steps_per_epoch))
        self.snap = {k: self.p(k).clone() for k in self.keys}  # x_snap of window 1: params before step 1
        self.path = {k: self.p(k).abs() for k in self.keys}
        self.prev_u = None
        self.in_window = 0
        self.factors = []  # every factor applied: a float (global) or a {key: float} (per layer)

    def p(self, k):
        return self.groups[k[0]][k[1]]

    def lr_of(self, k) -> float:
        return self.lr[k] if self.per_layer else self.lr[k[0]]

    def scale(self, newer, older) -> None:
        if self.per_layer:
            f = {k: spec_change_factor(dot(newer[k], older[k]), dot(newer[k], newer[k]), self.c) for k in self.keys}
            for k in self.keys:
                self.lr[k] *= f[k]
        else:
            h = sum(dot(newer[k], older[k]) for k in self.keys)
            q = sum(dot(newer[k], newer[k]) for k in self.keys)
            f = spec_change_factor(h, q, self.c)
            self.lr = [lr * f for lr in self.lr]
        self.factors.append(f)

    def step(self, grads) -> None:
        """grads: {key: float64 gradient}."""
        self.t += 1
        r, d = {}, {}
        for k in self.keys:
            r[k], d[k], self.buf[k] = spec_sgd_direction(self.p(k), grads[k], self.buf[k], **self.sgd)
        if self.window is None:
            # Algorithm 2: at t >= 2 the factor of (r_t, r_{t-1}) scales the lr before this update.
            if self.t >= 2:
                self.scale(r, self.prev_r)
            for k in self.keys:
                spec_apply(self.p(k), self.lr_of(k) * d[k], self.path[k])
            self.prev_r = {k: v.clone() for k, v in r.items()}
            return
        for k in self.keys:
            spec_apply(self.p(k), self.lr_of(k) * d[k], self.path[k])
        self.in_window += 1
        if self.in_window == self.window:
            self.in_window = 0
            u = {k: (self.p(k) - self.snap[k]) / self.lr_of(k) for k in self.keys}  # lr_of: lr used in this window
            if self.prev_u is not None:
                self.scale(u, self.prev_u)
            self.snap = {k: self.p(k).clone() for k in self.keys}
            self.prev_u = u


@dataclass(frozen=True)
class TLRCase:
    name: str
    per_layer: bool = False
    steps_per_epoch: int | None = None
    update_fraction: float = 0.33
    bound: float = 0.25
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    maximize: bool = False
    lr: float = 0.1
    groups: tuple = ((0, 1, 2, 3),)
    group_lr_scale: tuple = (1.0,)
    seed: int = 0

    def kwargs(self) -> dict:
        return dict(
            momentum=self.momentum,
            dampening=self.dampening,
            weight_decay=self.weight_decay,
            nesterov=self.nesterov,
            maximize=self.maximize,
            per_layer=self.per_layer,
            bound=self.bound,
            steps_per_epoch=self.steps_per_epoch,
            update_fraction=self.update_fraction,
        )

    def window(self) -> int | None:
        if self.steps_per_epoch is None:
            return None
        return max(1, round(self.update_fraction * self.steps_per_epoch))


PAPER = dict(momentum=0.8, weight_decay=5e-4)  # the TLR paper's runs
TWO_GROUPS = dict(groups=((0, 2), (1, 3)), group_lr_scale=(1.0, 0.3))

TLR_CASES = [
    # step mode (steps_per_epoch=None)
    TLRCase("step_global_plain"),
    TLRCase("step_global_momentum_wd", **PAPER, seed=1),
    TLRCase("step_global_dampened_momentum_bound_0.1", momentum=0.5, dampening=0.3, bound=0.1, seed=2),
    TLRCase("step_global_nesterov_wd_bound_1", momentum=0.9, nesterov=True, weight_decay=1e-3, bound=1.0, seed=3),
    TLRCase("step_global_maximize_wd", maximize=True, weight_decay=1e-3, seed=4),
    TLRCase("step_global_two_groups", **PAPER, **TWO_GROUPS, seed=5),
    TLRCase("step_per_layer_plain", per_layer=True, seed=6),
    TLRCase("step_per_layer_momentum_wd", per_layer=True, **PAPER, seed=7),
    TLRCase(
        "step_per_layer_nesterov_maximize_bound_0.5",
        per_layer=True,
        momentum=0.5,
        nesterov=True,
        maximize=True,
        weight_decay=1e-3,
        bound=0.5,
        seed=8,
    ),
    TLRCase("step_per_layer_two_groups", per_layer=True, **TWO_GROUPS, seed=9),
    # window mode: K = max(1, round(update_fraction * steps_per_epoch))
    TLRCase("window_K3_global_momentum_wd", steps_per_epoch=10, **PAPER, seed=10),
    TLRCase("window_K3_per_layer_momentum_wd", steps_per_epoch=10, per_layer=True, **PAPER, seed=11),
    TLRCase("window_K2_round_half_even_global_momentum_wd", steps_per_epoch=5, update_fraction=0.5, **PAPER, seed=12),
    TLRCase(
        "window_K2_round_half_even_per_layer_momentum_wd",
        steps_per_epoch=5,
        update_fraction=0.5,
        per_layer=True,
        **PAPER,
        seed=13,
    ),
    TLRCase(
        "window_K3_global_nesterov_maximize_bound_1",
        steps_per_epoch=10,
        momentum=0.9,
        nesterov=True,
        maximize=True,
        weight_decay=1e-3,
        bound=1.0,
        seed=14,
    ),
    TLRCase("window_K3_global_two_groups", steps_per_epoch=10, **PAPER, **TWO_GROUPS, seed=15),
    TLRCase("window_K1_floor_of_one_global", steps_per_epoch=1, update_fraction=0.33, seed=16),
    TLRCase("window_K1_floor_of_one_per_layer", steps_per_epoch=1, update_fraction=0.33, per_layer=True, seed=17),
]


def build_tlr(case: TLRCase, problem: Quadratic):
    """(optimizer, its flat param list, spec loop, the loop's flat param list, key of each flat index)."""
    p32, p64 = make_params(problem)
    lrs = [case.lr * s for s in case.group_lr_scale]
    opt = FusedTLR(
        [{"params": [p32[i] for i in g], "lr": lr} for g, lr in zip(case.groups, lrs)],
        lr=case.lr,
        backend="reference",
        **case.kwargs(),
    )
    spec = SpecTLR([[p64[i] for i in g] for g in case.groups], lrs, **case.kwargs())
    keys = {i: (gi, ti) for gi, g in enumerate(case.groups) for ti, i in enumerate(g)}
    return opt, p32, spec, p64, keys


def opt_lrs(opt, params, keys, per_layer: bool) -> dict:
    """The lr each flat tensor is updated with next, as the optimizer exposes it."""
    if per_layer:
        return {i: float(opt.state[params[i]]["lr"]) for i in keys}
    return {i: float(opt.param_groups[keys[i][0]]["lr"]) for i in keys}


def run_tlr(case: TLRCase, steps: int = STEPS):
    """Runs optimizer and spec loop side by side, checking params and lrs after every step.

    Returns the optimizer's lr trace (one {flat index: lr} per step, index 0 = before step 1).
    """
    problem = Quadratic(case.seed)
    opt, p32, spec, p64, keys = build_tlr(case, problem)
    sign = -1.0 if case.maximize else 1.0  # maximize descends the quadratic when fed its negated gradient
    # Before step 1 every lr is its group's lr, held as float32.
    trace = [{i: float(torch.tensor(case.lr * case.group_lr_scale[keys[i][0]])) for i in keys}]
    for t in range(1, steps + 1):
        g = problem.grads(t, p64)
        set_grads(p32, g, sign)
        opt.step()
        spec.step({keys[i]: (g[i] * sign).double() for i in keys})
        where = f"{case.name}, step {t}"
        assert_params_close(p32, p64, [spec.path[keys[i]] for i in range(len(p32))], where)
        lrs = opt_lrs(opt, p32, keys, case.per_layer)
        for i, k in keys.items():
            assert_lr_close(lrs[i], spec.lr_of(k), f"{where}, tensor {i}")
        if not case.per_layer:
            for gi, group in enumerate(opt.param_groups):
                assert_lr_close(float(group["lr"]), spec.lr[gi], f"{where}, param_groups[{gi}]['lr']")
            if spec.factors:
                assert math.isclose(opt.stats()["factor"], spec.factors[-1], rel_tol=LR_RTOL), where
        trace.append(lrs)
    return trace, spec


@pytest.mark.parametrize("case", TLR_CASES, ids=lambda c: c.name)
def test_tlr_params_and_lrs_match_spec_loop_every_step(case: TLRCase) -> None:
    trace, spec = run_tlr(case)
    window = case.window()
    expected_updates = STEPS - 1 if window is None else STEPS // window - 1
    assert len(spec.factors) == expected_updates
    # The run is only a real check if the lr actually moved, both up and down.
    flat = [f for fs in spec.factors for f in (fs.values() if isinstance(fs, dict) else [fs])]
    assert max(flat) > 1.0 + 1e-3, f"{case.name}: the lr never grew; the case exercises nothing"
    assert min(flat) < 1.0 - 1e-3, f"{case.name}: the lr never shrank; the case exercises nothing"


@pytest.mark.parametrize("case", TLR_CASES, ids=lambda c: c.name)
def test_tlr_every_lr_change_factor_lies_in_0_75_to_1_plus_bound(case: TLRCase) -> None:
    trace, _ = run_tlr(case)
    slack = 1e-6  # the lr is a float32 product: one rounding per factor
    for t in range(1, len(trace)):
        for i, lr in trace[t].items():
            ratio = lr / trace[t - 1][i]
            assert 0.75 - slack <= ratio <= 1 + case.bound + slack, f"{case.name}, step {t}, tensor {i}: {ratio}"
    grown = [trace[t][i] / trace[t - 1][i] for t in range(1, len(trace)) for i in trace[t]]
    # The cap is reached: consecutive gradients that agree grow the lr by exactly 1 + c.
    assert max(grown) == pytest.approx(1 + case.bound, rel=1e-6)


@pytest.mark.parametrize("case", [c for c in TLR_CASES if len(c.groups) == 2 and not c.per_layer], ids=lambda c: c.name)
def test_tlr_global_factor_multiplies_every_group_lr_alike(case: TLRCase) -> None:
    trace, spec = run_tlr(case)
    ratio = case.group_lr_scale[1] / case.group_lr_scale[0]
    first, second = case.groups[0][0], case.groups[1][0]
    for t, lrs in enumerate(trace):
        # float32 lrs: one rounding per multiplication, ~40 of them; a per-group factor would be off by percents.
        assert lrs[second] / lrs[first] == pytest.approx(ratio, rel=1e-5), f"step {t}"
    assert trace[-1][first] != pytest.approx(case.lr, rel=1e-3), "the lr never moved"


@pytest.mark.parametrize("case", [c for c in TLR_CASES if c.steps_per_epoch is not None], ids=lambda c: c.name)
def test_tlr_window_lr_changes_only_at_window_ends_from_the_second_window(case: TLRCase) -> None:
    trace, _ = run_tlr(case)
    window = case.window()
    changed_at = {t for t in range(1, len(trace)) if trace[t] != trace[t - 1]}
    allowed = {t for t in range(2 * window, STEPS + 1, window)}
    assert changed_at <= allowed, f"K={window}: lr changed at steps {sorted(changed_at - allowed)}"
    assert len(changed_at) >= len(allowed) - 2, f"K={window}: lr changed only at {sorted(changed_at)}"


# ----------------------------------------------- TLR factor edge cases, direct
def two_step_tlr(older, newer, *, per_layer: bool, bound: float):
    """Step mode with no weight decay or momentum: two steps with the given gradients."""
    params = [torch.zeros(s, requires_grad=True) for s in SHAPES]
    opt = FusedTLR(params, lr=0.1, per_layer=per_layer, bound=bound, backend="reference")
    for grads in (older, newer):
        set_grads(params, grads)
        opt.step()
    return opt, params


def tlr_lrs(opt, params, per_layer):
    if per_layer:
        return [float(opt.state[p]["lr"]) for p in params]
    return [float(opt.param_groups[0]["lr"])]


@pytest.mark.parametrize("bound", [0.25, 0.1, 1.0])
@pytest.mark.parametrize("k", [1.0, -1.0, 4.0, 0.5, -3.0, 0.0])
def test_tlr_global_factor_of_scaled_gradient_follows_formula(k: float, bound: float) -> None:
    gen = torch.Generator().manual_seed(42)
    older = [torch.randn(s, generator=gen) for s in SHAPES]
    newer = [k * g for g in older]
    opt, params = two_step_tlr(older, newer, per_layer=False, bound=bound)
    # h = k B, q = k^2 B with B = ||older||^2 > 0, so the factor does not depend on B.
    expected = spec_change_factor(k, k * k, bound)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1 * expected, rel=1e-6)
    assert opt.stats()["factor"] == pytest.approx(expected, rel=1e-6)
    if k == 1.0:
        assert expected == 1 + bound  # identical gradients: the cap
    if k == -1.0:
        assert expected == 0.875  # opposite gradients: 1 - q / (8 q)


@pytest.mark.parametrize("bound", [0.25, 0.5])
def test_tlr_per_layer_factors_use_each_tensors_own_h_and_q(bound: float) -> None:
    gen = torch.Generator().manual_seed(7)
    older = [torch.randn(s, generator=gen) for s in SHAPES]
    a = older[2].reshape(-1)
    orthogonal = torch.randn(a.shape, generator=gen)
    orthogonal = (orthogonal - (orthogonal @ a) / (a @ a) * a).reshape(SHAPES[2])
    newer = [older[0].clone(), -older[1], orthogonal, 4.0 * older[3]]
    opt, params = two_step_tlr(older, newer, per_layer=True, bound=bound)
    expected = [1 + bound, 0.875, 1.0, spec_change_factor(4.0, 16.0, bound)]
    got = [lr / 0.1 for lr in tlr_lrs(opt, params, per_layer=True)]
    assert got == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
@pytest.mark.parametrize("steps_per_epoch", [None, 4], ids=["step_mode", "window_mode"])
def test_tlr_zero_gradients_give_factor_one(per_layer: bool, steps_per_epoch) -> None:
    params = [torch.ones(s, requires_grad=True) for s in SHAPES]
    opt = FusedTLR(
        params, lr=0.1, momentum=0.8, per_layer=per_layer, steps_per_epoch=steps_per_epoch, backend="reference"
    )
    for _ in range(12):  # window mode: K = round(0.33 * 4) = 1, so 11 factors
        set_grads(params, [torch.zeros(s) for s in SHAPES])
        opt.step()
        assert tlr_lrs(opt, params, per_layer) == [float(torch.tensor(0.1))] * (len(SHAPES) if per_layer else 1)
        assert all(torch.equal(p, torch.ones_like(p)) for p in params)
    assert opt.stats()["factor"] == 1.0


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per_layer"])
@pytest.mark.parametrize("steps_per_epoch", [None, 3], ids=["step_mode", "window_mode_K1"])
def test_tlr_nan_gradient_never_puts_nan_into_the_lr(per_layer: bool, steps_per_epoch) -> None:
    case = TLRCase("nan", per_layer=per_layer, steps_per_epoch=steps_per_epoch)
    problem = Quadratic(21)
    opt, p32, spec, p64, keys = build_tlr(case, problem)
    nan_step, nan_tensor = 4, 1
    history = []
    for t in range(1, 13):
        g = problem.grads(t, p64)
        if t == nan_step:
            g[nan_tensor] = g[nan_tensor].clone()
            g[nan_tensor].view(-1)[0] = float("nan")
        set_grads(p32, g)
        opt.step()
        spec.step({keys[i]: g[i].double() for i in keys})
        lrs = opt_lrs(opt, p32, keys, per_layer)
        assert all(math.isfinite(v) for v in lrs.values()), f"step {t}: {lrs}"
        # The spec loop treats non-finite h, q or den as factor 1: the lrs agree, NaN params or not.
        for i, k in keys.items():
            assert_lr_close(lrs[i], spec.lr_of(k), f"step {t}, tensor {i}")
        history.append(lrs)
    before = history[nan_step - 2]
    # The step with the NaN gradient does not change the lr of the tensors its statistics touch.
    touched = list(keys) if not per_layer else [nan_tensor]
    for i in touched:
        assert history[nan_step - 1][i] == before[i]
    if per_layer:
        assert any(history[-1][i] != history[0][i] for i in keys if i != nan_tensor), "finite tensors stay adaptive"
    if not per_layer:
        with pytest.warns(RuntimeWarning, match="not finite"):  # the one warning, at this first stats()
            assert math.isfinite(opt.stats()["factor"])


# ----------------------------------------------------------------- spec: HD
class SpecSGDHD:
    """FusedSGDHD from the spec: one lr; lr += beta <r_t, d_{t-1}> at t >= 2, before the update."""

    def __init__(self, params, lr, hypergrad_lr, **sgd):
        self.params, self.lr, self.beta, self.sgd = params, lr, hypergrad_lr, sgd
        self.buf = [None] * len(params)
        self.path = [p.abs() for p in params]
        self.prev_d = None
        self.h = None
        self.h_magnitude = None  # sum |r_t| |d_{t-1}|: the scale of float32 rounding in h

    def step(self, grads) -> None:
        r, d = [], []
        for i, (p, g) in enumerate(zip(self.params, grads)):
            ri, di, self.buf[i] = spec_sgd_direction(p, g, self.buf[i], **self.sgd)
            r.append(ri)
            d.append(di)
        if self.prev_d is not None:
            self.h = sum(dot(ri, di) for ri, di in zip(r, self.prev_d))
            self.h_magnitude = sum(dot(ri.abs(), di.abs()) for ri, di in zip(r, self.prev_d))
            self.lr = self.lr + self.beta * self.h
        for p, di, m in zip(self.params, d, self.path):
            spec_apply(p, self.lr * di, m)
        self.prev_d = [di.clone() for di in d]


HD_CASES = {
    "plain": dict(),
    "weight_decay": dict(weight_decay=1e-2),
    "momentum": dict(momentum=0.5),
    "dampened_momentum_wd": dict(momentum=0.7, dampening=0.2, weight_decay=1e-2),
    "nesterov_wd": dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
    "maximize_momentum_wd": dict(momentum=0.5, weight_decay=1e-2, maximize=True),
}
HD_SGD_DEFAULTS = dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False)


@pytest.mark.parametrize("name", list(HD_CASES))
def test_sgdhd_params_lr_and_inner_product_match_spec_loop_every_step(name: str) -> None:
    sgd = {**HD_SGD_DEFAULTS, **HD_CASES[name]}
    problem = Quadratic(100 + len(name))
    p32, p64 = make_params(problem)
    lr0, beta = 0.05, 1e-3  # |<r, d>| ~ 1e2 here: the lr moves several-fold within 40 steps and stays stable
    opt = FusedSGDHD(p32, lr=lr0, hypergrad_lr=beta, backend="reference", **sgd)
    spec = SpecSGDHD(p64, lr0, beta, **sgd)
    sign = -1.0 if sgd["maximize"] else 1.0
    for t in range(1, STEPS + 1):
        g = problem.grads(t, p64)
        set_grads(p32, g, sign)
        opt.step()
        spec.step([(gi * sign).double() for gi in g])
        where = f"{name}, step {t}"
        assert_params_close(p32, p64, spec.path, where)
        # lr += beta h: the rounding of h enters additively, so the tolerance is on lr0's scale as well.
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(spec.lr, rel=LR_RTOL, abs=LR_RTOL * lr0), where
        assert opt.stats()["lr"] == pytest.approx(spec.lr, rel=LR_RTOL, abs=LR_RTOL * lr0), where
        if t >= 2:
            # h is a float32 sum of products: its rounding scales with sum |r| |d|, not with h (which may cancel).
            assert abs(opt.stats()["inner_product"] - spec.h) <= 1e-5 * spec.h_magnitude, where
    assert abs(spec.lr - lr0) > 0.1 * lr0, f"{name}: the lr barely moved ({lr0} -> {spec.lr}); test too weak"


# The group's base changes every 8 steps, switching where d_{t-1} lives (the momentum buffer with momentum and
# without nesterov, else state["prev_direction"]): buffer -> nesterov -> buffer -> no momentum -> buffer again
# (the old buffer, kept in state while momentum was 0, resumes as torch.optim.SGD's does).
HD_SWITCHES = {
    1: dict(momentum=0.5),
    9: dict(momentum=0.5, nesterov=True),
    17: dict(momentum=0.5, nesterov=False),
    25: dict(momentum=0.0, nesterov=False),
    33: dict(momentum=0.5, nesterov=False),
}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_sgdhd_follows_the_spec_loop_when_momentum_and_nesterov_change(backend: str) -> None:
    if backend not in available_backends():
        pytest.skip(f"{backend} backend not built")
    problem = Quadratic(77)
    p32, p64 = make_params(problem)
    lr0, beta = 0.05, 1e-3
    opt = FusedSGDHD(p32, lr=lr0, hypergrad_lr=beta, weight_decay=1e-2, backend=backend)
    spec = SpecSGDHD(p64, lr0, beta, **{**HD_SGD_DEFAULTS, "weight_decay": 1e-2})
    for t in range(1, STEPS + 1):
        if t in HD_SWITCHES:
            opt.param_groups[0].update(HD_SWITCHES[t])
            spec.sgd = {**spec.sgd, **HD_SWITCHES[t]}
        g = problem.grads(t, p64)
        set_grads(p32, g)
        opt.step()
        spec.step([gi.double() for gi in g])
        where = f"{backend}, step {t}, {spec.sgd}"
        assert_params_close(p32, p64, spec.path, where)
        assert float(opt.param_groups[0]["lr"]) == pytest.approx(spec.lr, rel=LR_RTOL, abs=LR_RTOL * lr0), where
        if t >= 2:
            assert abs(opt.stats()["inner_product"] - spec.h) <= 1e-5 * spec.h_magnitude, where
        # d_t is kept apart from the momentum buffer only where the buffer is not the direction.
        keeps = spec.sgd["momentum"] == 0 or spec.sgd["nesterov"]
        assert all(("prev_direction" in opt.state[p]) == keeps for p in p32), where
    assert abs(spec.lr - lr0) > 0.1 * lr0, f"the lr barely moved ({lr0} -> {spec.lr}); test too weak"


def test_sgdhd_first_step_is_plain_sgd_at_the_initial_lr() -> None:
    problem = Quadratic(5)
    p32, p64 = make_params(problem)
    opt = FusedSGDHD(p32, lr=0.05, hypergrad_lr=1.0, momentum=0.9, weight_decay=1e-2, backend="reference")
    g = problem.grads(1, p64)
    set_grads(p32, g)
    opt.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.05, rel=1e-7)
    paths = [q.abs() for q in p64]
    for q, gi, m in zip(p64, g, paths):
        spec_apply(q, 0.05 * (gi.double() + 1e-2 * q), m)
    assert_params_close(p32, p64, paths, "step 1")


# ---------------------------------------------------------------- spec: SGDL
def spec_sgd_step(params, grads, bufs, paths, lr, **sgd) -> None:
    for i, (p, g) in enumerate(zip(params, grads)):
        _, d, bufs[i] = spec_sgd_direction(p, g, bufs[i], **sgd)
        spec_apply(p, lr * d, paths[i])


def spec_sgdl_lr(step: int, lr0: float, total_steps: int | None, gamma: float = 0.1) -> float:
    """lr used at ``step`` (1-based): annealed at the end of the step whose count reaches m * total_steps."""
    if total_steps is None:
        return lr0
    milestones = [math.ceil(Fraction(1, 3) * total_steps), math.ceil(Fraction(2, 3) * total_steps)]
    passed = sum(1 for m in milestones if step - 1 >= m)
    return lr0 * gamma**passed


SGDL_DEFAULTS = dict(momentum=0.0, dampening=0.0, weight_decay=5e-3, nesterov=False, maximize=False)


@pytest.mark.parametrize("total_steps", [30, 10, 7, 3, 2, 1, 300])
def test_sgdl_defaults_anneal_at_thirds_and_params_match_vanilla_sgd(total_steps: int) -> None:
    problem = Quadratic(200, scale=0.6)  # largest curvature ~1.3: lr 1.0 is stable
    p32, p64 = make_params(problem)
    opt = FusedSGDL(p32, total_steps=total_steps, backend="reference")
    bufs = [None] * len(p64)
    paths = [p.abs() for p in p64]
    for t in range(1, total_steps + 6):
        expected_lr = spec_sgdl_lr(t, 1.0, total_steps)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_lr, rel=1e-12), f"lr used at step {t}"
        g = problem.grads(t, p64)
        set_grads(p32, g)
        opt.step()
        spec_sgd_step(p64, [gi.double() for gi in g], bufs, paths, expected_lr, **SGDL_DEFAULTS)
        assert_params_close(p32, p64, paths, f"step {t}")
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01, rel=1e-12)


def test_sgdl_thirty_steps_use_lr0_then_tenth_then_hundredth() -> None:
    params = [torch.zeros(3, requires_grad=True)]
    opt = FusedSGDL(params, lr=0.5, total_steps=30, backend="reference")
    used = []
    for _ in range(30):
        used.append(opt.param_groups[0]["lr"])
        params[0].grad = torch.ones(3)
        opt.step()
    assert used[:10] == pytest.approx([0.5] * 10, rel=1e-12)
    assert used[10:20] == pytest.approx([0.05] * 10, rel=1e-12)
    assert used[20:] == pytest.approx([0.005] * 10, rel=1e-12)


def test_sgdl_defaults_are_the_papers_recipe() -> None:
    opt = FusedSGDL([torch.zeros(2, requires_grad=True)], backend="reference")
    group = opt.param_groups[0]
    assert group["lr"] == 1.0
    assert group["weight_decay"] == 5e-3
    assert group["momentum"] == 0
    assert group["dampening"] == 0
    assert group["nesterov"] is False
    assert group["maximize"] is False


def test_sgdl_without_total_steps_never_anneals() -> None:
    problem = Quadratic(201, scale=0.6)
    p32, p64 = make_params(problem)
    opt = FusedSGDL(p32, backend="reference")
    bufs = [None] * len(p64)
    paths = [p.abs() for p in p64]
    for t in range(1, 61):
        g = problem.grads(t, p64)
        set_grads(p32, g)
        opt.step()
        spec_sgd_step(p64, [gi.double() for gi in g], bufs, paths, 1.0, **SGDL_DEFAULTS)
        assert opt.param_groups[0]["lr"] == 1.0
    assert_params_close(p32, p64, paths, "after 60 steps")


def test_sgdl_with_momentum_is_torch_sgd_semantics_plus_anneal() -> None:
    problem = Quadratic(202)
    p32, p64 = make_params(problem)
    sgd = dict(momentum=0.9, dampening=0.0, weight_decay=1e-3, nesterov=True, maximize=False)
    opt = FusedSGDL(p32, lr=0.05, total_steps=24, backend="reference", **sgd)
    bufs = [None] * len(p64)
    paths = [p.abs() for p in p64]
    for t in range(1, 31):
        g = problem.grads(t, p64)
        set_grads(p32, g)
        opt.step()
        spec_sgd_step(p64, [gi.double() for gi in g], bufs, paths, spec_sgdl_lr(t, 0.05, 24), **sgd)
        assert_params_close(p32, p64, paths, f"step {t}")


def test_sgdl_anneal_composes_with_steplr_factors_multiply() -> None:
    problem = Quadratic(203, scale=0.6)
    p32, p64 = make_params(problem)
    opt = FusedSGDL(p32, lr=0.8, total_steps=30, backend="reference")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    bufs = [None] * len(p64)
    paths = [p.abs() for p in p64]
    for t in range(1, 36):
        expected_lr = spec_sgdl_lr(t, 0.8, 30) * 0.5 ** ((t - 1) // 4)
        assert opt.param_groups[0]["lr"] == pytest.approx(expected_lr, rel=1e-12), f"lr used at step {t}"
        g = problem.grads(t, p64)
        set_grads(p32, g)
        opt.step()
        sched.step()
        spec_sgd_step(p64, [gi.double() for gi in g], bufs, paths, expected_lr, **SGDL_DEFAULTS)
        assert_params_close(p32, p64, paths, f"step {t}")


# ------------------------------------------------------ state_dict round trip
ROUND_TRIP = {
    "tlr_step_global": lambda ps: FusedTLR(ps, lr=0.1, momentum=0.8, weight_decay=5e-4, backend="reference"),
    "tlr_step_per_layer": lambda ps: FusedTLR(
        ps, lr=0.1, momentum=0.8, weight_decay=5e-4, per_layer=True, backend="reference"
    ),
    "tlr_window_K3_global": lambda ps: FusedTLR(
        ps, lr=0.1, momentum=0.8, weight_decay=5e-4, steps_per_epoch=10, backend="reference"
    ),
    "tlr_window_K3_per_layer": lambda ps: FusedTLR(
        ps, lr=0.1, momentum=0.8, weight_decay=5e-4, steps_per_epoch=10, per_layer=True, backend="reference"
    ),
    "tlr_window_K2_per_layer": lambda ps: FusedTLR(
        ps, lr=0.1, momentum=0.8, steps_per_epoch=5, update_fraction=0.5, per_layer=True, backend="reference"
    ),
    "sgdhd_momentum_wd": lambda ps: FusedSGDHD(
        ps, lr=0.05, momentum=0.5, weight_decay=1e-2, hypergrad_lr=1e-3, backend="reference"
    ),
    "sgdl_total_30": lambda ps: FusedSGDL(ps, total_steps=30, backend="reference"),
}


def snapshot_lrs(opt) -> list[torch.Tensor]:
    """Every lr the optimizer holds: each group's, then every per-tensor state lr."""
    out = [torch.as_tensor(g["lr"]).detach().clone() for g in opt.param_groups]
    for g in opt.param_groups:
        for p in g["params"]:
            if "lr" in opt.state[p]:
                out.append(opt.state[p]["lr"].detach().clone())
    return out


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_state_dict_round_trip_mid_run_continues_bit_identically(name: str) -> None:
    make = ROUND_TRIP[name]
    problem = Quadratic(300, scale=0.6)
    params, _ = make_params(problem)
    opt = make(params)
    split, total = 7, 30  # step 7: mid-window for K = 3 and K = 2, before SGDL's milestones at 10 and 20
    for t in range(1, split + 1):
        set_grads(params, problem.grads(t, params))
        opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    resumed_params = [p.detach().clone().requires_grad_(True) for p in params]
    buffer.seek(0)
    resumed = make(resumed_params)
    resumed.load_state_dict(torch.load(buffer))
    lrs_before = snapshot_lrs(opt)
    assert all(torch.equal(a, b) for a, b in zip(lrs_before, snapshot_lrs(resumed)))
    changed = False
    for t in range(split + 1, total + 1):
        g = problem.grads(t, params)
        set_grads(params, g)
        set_grads(resumed_params, g)
        opt.step()
        resumed.step()
        for i, (a, b) in enumerate(zip(params, resumed_params)):
            assert torch.equal(a, b), f"step {t}, tensor {i}"
        lrs, resumed_lrs = snapshot_lrs(opt), snapshot_lrs(resumed)
        assert len(lrs) == len(resumed_lrs)
        assert all(torch.equal(a, b) for a, b in zip(lrs, resumed_lrs)), f"step {t}: {lrs} vs {resumed_lrs}"
        changed |= any(not torch.equal(a, b) for a, b in zip(lrs, lrs_before))
    assert changed, "the lr never changed after the split: the round trip was not exercised"
