"""FusedAutoDropSGD (reference backend) against a naive float64 loop written from the spec.

The naive loop follows ``shared/spec/algorithms.md`` ("Base update" and
"FusedAutoDropSGD") line by line, independently of the package's code: epochs of
``steps_per_epoch`` torch.optim.SGD steps; at each epoch end (after that step's
update) ``s_e = x_e - x_{e-1}`` over the whole parameter vector, the angle
``w_e`` for e >= 2, its mean ``a_e`` over the last W angles, the latching trigger
``|a_e - a_{e-1}| < theta`` for e >= 3, the linearly weighted average over n_d
epochs, the lr drop ``max(min_lr, rho * lr)`` of every group, and
``theta = min(max_threshold, theta / rho)``.

Both runs see the same gradients: a seeded gradient of a random quadratic plus
seeded noise, computed in float64 from the naive parameters and handed, cast to
float32, to the optimizer; float32 errors therefore do not feed back through the
gradients.

Tolerances: float32 storage rounds each parameter by <= 6e-8 relative per step,
so after ~40 steps the optimizer's parameters sit within a few 1e-6 relative of
the float64 loop: rtol 1e-5 / atol 1e-6. Group lrs are Python floats computed by
the same double-precision formula on both sides: rel 1e-12. The displacements
are O(0.1) against parameter errors O(1e-6), so the float32 angle is within
~1e-4 degrees of the float64 one; we allow 1e-3 degrees. The trigger decisions
must match exactly, so the naive loop asserts that every tested
``|a_e - a_{e-1}|`` is at least 0.05 degrees away from theta (otherwise the case,
not the tolerance, must change).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from spec_problems import SHAPES, NoisyQuadratic, set_grads

from autolr_fused import FusedAutoDropSGD, available_backends

GROUP_OF_TENSOR = [0, 0, 1, 1]  # two param groups: the first two tensors, the last two
PARAM_RTOL, PARAM_ATOL = 1e-5, 1e-6
GROUP_LR_REL = 1e-12
ANGLE_ATOL_DEG = 1e-3
TRIGGER_MARGIN_DEG = 0.05


# --------------------------------------------------------------------------- problem
# ------------------------------------------------------------------------ naive loop
class NaiveAutoDrop:
    """The spec's FusedAutoDropSGD in float64, on a list of tensors in two groups."""

    def __init__(self, params: list[torch.Tensor], groups: list[dict[str, Any]], cfg: dict[str, Any]) -> None:
        self.params = params
        self.groups = [dict(g) for g in groups]  # per group: lr, momentum, dampening, weight_decay, nesterov
        self.cfg = cfg
        self.buffers: list[torch.Tensor | None] = [None] * len(params)
        self.steps_in_epoch = 0
        self.epoch = 0
        self.x_prev = self.flat()  # x_0
        self.s_prev: torch.Tensor | None = None
        self.angles: list[float] = []
        self.a_prev: float | None = None
        self.theta = float(cfg["threshold"])
        self.pending = False
        self.k = 0
        self.z: torch.Tensor | None = None
        self.drops = 0
        self.tests_failed = 0  # trigger tested (e >= 3, not pending) and not fired
        self.min_lr_bound = 0  # times max(min_lr, .) picked min_lr
        self.last_angle: float | None = None
        self.dropped_this_epoch = False

    def flat(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.params])

    def unflatten_into_params(self, x: torch.Tensor) -> None:
        offset = 0
        for p in self.params:
            p.copy_(x[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    def sgd_step(self, grads: list[torch.Tensor]) -> None:
        for i, (p, g) in enumerate(zip(self.params, grads)):
            grp = self.groups[GROUP_OF_TENSOR[i]]
            d = g.clone()
            if grp.get("weight_decay", 0.0):
                d = d + grp["weight_decay"] * p
            momentum = grp.get("momentum", 0.0)
            if momentum:
                if self.buffers[i] is None:
                    self.buffers[i] = d.clone()
                else:
                    self.buffers[i] = momentum * self.buffers[i] + (1 - grp.get("dampening", 0.0)) * d
                d = d + momentum * self.buffers[i] if grp.get("nesterov", False) else self.buffers[i]
            p -= grp["lr"] * d

    def step(self, grads: list[torch.Tensor]) -> bool:
        """One optimizer step; returns whether it ended an epoch."""
        self.sgd_step(grads)
        self.steps_in_epoch += 1
        if self.steps_in_epoch < self.cfg["steps_per_epoch"]:
            return False
        self.steps_in_epoch = 0
        self.end_epoch()
        return True

    def end_epoch(self) -> None:
        cfg = self.cfg
        self.epoch += 1
        self.dropped_this_epoch = False
        x = self.flat()
        s = x - self.x_prev
        if self.s_prev is not None:  # e >= 2
            cosine = float(s @ self.s_prev) / (float(s.norm()) * float(self.s_prev.norm()) + 1e-12)
            w = math.degrees(math.acos(min(1.0, max(-1.0, cosine))))
            assert 1.0 < w < 179.0, "angle too close to 0/180 degrees for float32 accuracy; change the case"
            self.last_angle = w
            self.angles.append(w)
            window = self.angles[-cfg["angle_window"] :]
            a = sum(window) / len(window)
            if not self.pending and self.epoch >= 3:
                change = abs(a - self.a_prev)
                assert abs(change - self.theta) > TRIGGER_MARGIN_DEG, (
                    f"epoch {self.epoch}: |a_e - a_(e-1)| = {change} is within {TRIGGER_MARGIN_DEG} degrees of "
                    f"theta = {self.theta}; change the case"
                )
                if change < self.theta:
                    self.pending, self.k, self.z = True, 0, torch.zeros_like(x)
                else:
                    self.tests_failed += 1
            self.a_prev = a
        if self.pending:
            self.k += 1
            self.z = self.z + self.k * x
            n_d = cfg["drop_delay"]
            if self.k >= n_d:
                x = self.z / (n_d * (n_d + 1) / 2)
                self.unflatten_into_params(x)
                for grp in self.groups:
                    dropped = cfg["drop_factor"] * grp["lr"]
                    if cfg["min_lr"] > dropped:
                        self.min_lr_bound += 1
                    grp["lr"] = max(cfg["min_lr"], dropped)
                self.theta = min(cfg["max_threshold"], self.theta / cfg["drop_factor"])
                self.pending = False
                self.drops += 1
                self.dropped_this_epoch = True
        self.x_prev = x  # the replaced parameters after a drop
        self.s_prev = s  # the displacement measured before any replacement


# ------------------------------------------------------------------------ the cases
# cfg: optimizer-wide arguments; groups: per-group arguments (lr, momentum, ...);
# expect: what the naive run must show for the case to test what it claims.
BIG = dict(threshold=1e6, max_threshold=1e6)  # the trigger always fires once e >= 3
CASES = {
    "delay1_momentum09_window1_min_lr_binds": dict(
        cfg=dict(steps_per_epoch=3, drop_factor=0.5, min_lr=0.03, drop_delay=1, angle_window=1, **BIG),
        groups=[dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.9)],
        epochs=8,
        expect=dict(drops=4, min_lr=True),
    ),
    "delay2_momentum0_window3_theta_capped": dict(
        cfg=dict(
            steps_per_epoch=2,
            drop_factor=0.2,
            min_lr=5e-3,
            threshold=90.0,
            max_threshold=360.0,
            drop_delay=2,
            angle_window=3,
        ),
        groups=[dict(lr=0.2), dict(lr=0.1, weight_decay=0.01)],
        epochs=12,
        expect=dict(drops=2),
    ),
    "delay3_momentum09_nesterov_window1": dict(
        cfg=dict(steps_per_epoch=3, drop_factor=0.5, min_lr=0.02, drop_delay=3, angle_window=1, **BIG),
        groups=[dict(lr=0.08, momentum=0.9, nesterov=True), dict(lr=0.04, momentum=0.9, nesterov=True)],
        epochs=12,
        expect=dict(drops=3, min_lr=True),
    ),
    "delay3_momentum0_one_step_epochs_window3": dict(
        cfg=dict(
            steps_per_epoch=1,
            drop_factor=0.5,
            min_lr=0.01,
            threshold=90.0,
            max_threshold=360.0,
            drop_delay=3,
            angle_window=3,
        ),
        groups=[dict(lr=0.1), dict(lr=0.03)],
        epochs=30,
        expect=dict(drops=3, min_lr=True),
    ),
    "delay2_momentum05_dampening_moderate_theta": dict(
        cfg=dict(
            steps_per_epoch=2,
            drop_factor=0.5,
            min_lr=0.01,
            threshold=5.0,
            max_threshold=20.0,
            drop_delay=2,
            angle_window=1,
        ),
        groups=[dict(lr=0.1, momentum=0.5, dampening=0.2), dict(lr=0.05, momentum=0.5, dampening=0.2)],
        epochs=16,
        expect=dict(drops=1, failed_tests=True),
    ),
    "delay1_momentum0_window3_moderate_theta": dict(
        cfg=dict(
            steps_per_epoch=2,
            drop_factor=0.5,
            min_lr=0.01,
            threshold=3.0,
            max_threshold=6.0,
            drop_delay=1,
            angle_window=3,
        ),
        groups=[dict(lr=0.1), dict(lr=0.05)],
        epochs=16,
        expect=dict(drops=1, failed_tests=True),
    ),
}


def build(case: dict[str, Any], params: list[torch.Tensor]) -> FusedAutoDropSGD:
    groups = [
        {"params": [p for p, g in zip(params, GROUP_OF_TENSOR) if g == gi], "momentum": 0.0, **grp}
        for gi, grp in enumerate(case["groups"])
    ]
    return FusedAutoDropSGD(groups, backend="reference", **case["cfg"])


@pytest.mark.parametrize("name", list(CASES))
def test_autodrop_matches_naive_float64_loop_every_step_and_epoch(name: str) -> None:
    case = CASES[name]
    problem = NoisyQuadratic(seed=13, sigma=1.0)
    opt_params = problem.float32_params()
    opt = build(case, opt_params)
    naive = NaiveAutoDrop([x.clone() for x in problem.initial], case["groups"], case["cfg"])
    n_d = case["cfg"]["drop_delay"]

    for step in range(1, case["epochs"] * case["cfg"]["steps_per_epoch"] + 1):
        grads = problem.grads(naive.params)
        set_grads(opt_params, grads)
        opt.step()
        epoch_ended = naive.step(grads)
        where = f"{name}, step {step} (epoch {naive.epoch})"
        for i, (p, q) in enumerate(zip(opt_params, naive.params)):
            torch.testing.assert_close(
                p.detach().double(),
                q,
                rtol=PARAM_RTOL,
                atol=PARAM_ATOL,
                msg=lambda m, i=i, where=where: f"{where}: tensor {i} params differ: {m}",
            )
        for gi, (group, ngroup) in enumerate(zip(opt.param_groups, naive.groups)):
            assert float(group["lr"]) == pytest.approx(ngroup["lr"], rel=GROUP_LR_REL), f"{where}: group {gi} lr"
        if not epoch_ended:
            continue
        stats = opt.stats()
        assert stats["drop_pending"] == naive.pending, f"{where}: drop_pending"
        assert stats["theta"] == pytest.approx(naive.theta, rel=1e-12), f"{where}: theta"
        if naive.epoch >= 2:
            assert stats["angle"] == pytest.approx(naive.last_angle, abs=ANGLE_ATOL_DEG), f"{where}: angle"
        # k is defined by the spec while a drop is pending, and equals n_d at the drop
        if naive.pending:
            assert stats["k"] == naive.k, f"{where}: k"
        if naive.dropped_this_epoch:
            assert stats["k"] == n_d, f"{where}: k at the drop"

    expect = case["expect"]
    assert naive.drops >= expect["drops"], f"the case must drop at least {expect['drops']} times, got {naive.drops}"
    if expect.get("min_lr"):
        assert naive.min_lr_bound > 0, "min_lr must bind in this case"
    if expect.get("failed_tests"):
        assert naive.tests_failed > 0, "the trigger must also be tested and not fire in this case"


# ------------------------------------------------------------------ argument checks
def _fresh_params() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_(True) for s in SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    return params, [p.detach().clone() for p in params]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        (dict(), TypeError),
        (dict(steps_per_epoch=0), ValueError),
        (dict(steps_per_epoch=3, drop_factor=0.0), ValueError),
        (dict(steps_per_epoch=3, drop_factor=1.0), ValueError),
    ],
    ids=["steps_per_epoch_missing", "steps_per_epoch_zero", "drop_factor_zero", "drop_factor_one"],
)
def test_autodrop_invalid_arguments_raise_before_touching_params(kwargs: dict, error: type) -> None:
    params, before = _fresh_params()
    grads_before = [p.grad.clone() for p in params]
    with pytest.raises(error):
        FusedAutoDropSGD(params, lr=0.1, backend="reference", **kwargs)
    for p, b, g in zip(params, before, grads_before):
        assert torch.equal(p.detach(), b)
        assert torch.equal(p.grad, g)


# ------------------------------------------------------------------------ state_dict
@pytest.mark.parametrize("extra_steps", [0, 1], ids=["saved_at_epoch_end", "saved_mid_epoch"])
def test_autodrop_state_dict_round_trip_during_pending_drop_continues_bit_identically(extra_steps: int) -> None:
    spe, n_d = 3, 3
    problem = NoisyQuadratic(seed=17, sigma=1.0)
    params_a = problem.float32_params()
    groups = [dict(lr=0.1, momentum=0.9), dict(lr=0.05, momentum=0.9)]
    case = dict(cfg=dict(steps_per_epoch=spe, drop_factor=0.5, min_lr=0.03, drop_delay=n_d, **BIG), groups=groups)
    opt_a = build(case, params_a)

    def grads_now() -> list[torch.Tensor]:
        return [g.float() for g in problem.grads([p.detach().double() for p in params_a])]

    # the trigger fires at the end of epoch 3 (k = 1); after epoch 4, k = 2 < n_d
    for _ in range(4 * spe + extra_steps):
        for p, g in zip(params_a, grads_now()):
            p.grad = g
        opt_a.step()
    stats = opt_a.stats()
    assert stats["drop_pending"] and 1 <= stats["k"] < n_d, f"must be saved in the middle of a pending drop: {stats}"
    lrs_at_save = [float(g["lr"]) for g in opt_a.param_groups]

    saved = copy.deepcopy(opt_a.state_dict())
    params_b = [p.detach().clone().requires_grad_(True) for p in params_a]
    opt_b = build(case, params_b)
    opt_b.load_state_dict(saved)

    for step in range(4 * spe):
        grads = grads_now()
        for pa, pb, g in zip(params_a, params_b, grads):
            pa.grad = g.clone()
            pb.grad = g.clone()
        opt_a.step()
        opt_b.step()
        for i, (pa, pb) in enumerate(zip(params_a, params_b)):
            assert torch.equal(pa, pb), f"tensor {i} params diverge {step + 1} steps after the reload"
        for ga, gb in zip(opt_a.param_groups, opt_b.param_groups):
            assert float(ga["lr"]) == float(gb["lr"])
        sa, sb = opt_a.stats(), opt_b.stats()
        for key in ("drop_pending", "k", "theta"):
            assert sa[key] == sb[key], f"{key} diverges after the reload"
    assert [float(g["lr"]) for g in opt_b.param_groups] != lrs_at_save, "the pending drop must complete after reload"


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_group_added_while_a_drop_is_pending_joins_the_drops_average(backend):
    """Not in the spec (it has one fixed parameter set); the rule FusedAutoDropSGD.add_param_group states.

    A tensor that joins after k epoch ends of a pending drop counts as if it had held its joining value
    at those k ends: at the drop it becomes (sum_{j<=k} j * x_join + sum_{j>k} j * x_j) / (n_d(n_d+1)/2).
    float32 accumulation of 4 terms: rtol 1e-6.
    """
    if backend == "cpu" and "cpu" not in available_backends():
        pytest.skip("the C++ extension is not built")
    g = torch.Generator().manual_seed(0)
    first = torch.nn.Parameter(torch.randn(5, generator=g))
    late = torch.nn.Parameter(torch.randn(3, generator=g))
    n_d = 4
    # One step per epoch; threshold = max_threshold = 180 degrees: the trigger fires at epoch 3 (k = 1 there).
    opt = FusedAutoDropSGD(
        [first], lr=0.1, momentum=0.0, steps_per_epoch=1, threshold=180.0, max_threshold=180.0, drop_delay=n_d,
        backend=backend,
    )  # fmt: skip
    for _ in range(4):  # epochs 1..4: the trigger at 3 (k = 1), k = 2 after epoch 4
        first.grad = torch.randn(5, generator=g)
        opt.step()
    assert opt.stats()["drop_pending"] and opt.stats()["k"] == 2
    opt.add_param_group({"params": [late]})
    x_join = late.detach().double().clone()
    weighted = (1 + 2) * x_join
    for k in (3, 4):  # epochs 5 and 6: k = 3, then the drop at k = n_d = 4
        first.grad, late.grad = torch.randn(5, generator=g), torch.randn(3, generator=g)
        before = late.detach().double().clone()
        opt.step()
        if k < n_d:
            weighted += k * late.detach().double()
        else:  # the drop replaced the parameters: x_e of this epoch end is the stepped value
            stepped = before - 0.1 * late.grad.double()
            weighted += k * stepped
    assert opt.stats()["drops"] == 1
    torch.testing.assert_close(late.detach().double(), weighted / (n_d * (n_d + 1) / 2), rtol=1e-6, atol=1e-7)
