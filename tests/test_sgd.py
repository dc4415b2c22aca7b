"""FusedSGD is a drop-in torch.optim.SGD (shared/spec/algorithms.md, "Base update" and "FusedSGD").

Every comparison runs torch.optim.SGD and FusedSGD side by side on identical cloned
float32 parameters and identical gradients.

Tolerance: ``rtol=1e-6, atol=0`` — the spec's "fp32: within 1e-6 relative". Both
optimizers perform the same float32 operations in the same order (torch.optim.SGD's
single-tensor path on CPU and the reference backend), so any difference is at most a
rounding of the final multiply-add (a tensor lr is applied as ``addcmul`` instead of
``add(alpha=)``), a few ulps even after 20 steps; 1e-6 relative is ~8 ulps of float32.
"""

from __future__ import annotations

import copy
import io
import itertools

import pytest
import torch
from torch import nn

from autolr_fused import FusedSGD, FusedSGDL

RTOL, ATOL = 1e-6, 0.0
STEPS = 20
# Odd sizes: prime lengths, a singleton, a 3-D tensor, a column.
SHAPES = [(7,), (3, 5), (2, 3, 5), (1,), (13, 1, 3), (11, 1)]
LATE_PARAM = len(SHAPES) - 1  # this parameter has no gradient before step LATE_START
LATE_START = 12


# --------------------------------------------------------------------------- helpers
def make_params(seed: int = 0, shapes=SHAPES) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g, dtype=torch.float32)) for s in shapes]


def clone_params(params: list[torch.Tensor]) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone()) for p in params]


def grads_for_step(step: int, shapes=SHAPES, seed: int = 1234) -> list[torch.Tensor | None]:
    """Seeded random gradients; some parameters have ``grad=None`` at some steps."""
    g = torch.Generator().manual_seed(seed * 1000 + step)
    grads: list[torch.Tensor | None] = []
    for i, s in enumerate(shapes):
        grad = torch.randn(s, generator=g, dtype=torch.float32)
        if (step + i) % 5 == 0 or (i == LATE_PARAM and step < LATE_START):
            grad = None
        grads.append(grad)
    return grads


def set_grads(params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
    for p, g in zip(params, grads):
        p.grad = None if g is None else g.clone()


def assert_params_match(fused: list[torch.Tensor], ref: list[torch.Tensor], context: str) -> None:
    for i, (a, b) in enumerate(zip(fused, ref)):
        where = f"{context}, param {i}"
        torch.testing.assert_close(a.detach(), b.detach(), rtol=RTOL, atol=ATOL, msg=lambda m, w=where: f"{w}: {m}")


def make_lr(kind: str, value: float):
    if kind == "float":
        return value
    if kind == "tensor_0d":
        return torch.tensor(value)
    if kind == "tensor_1":
        return torch.tensor([value])
    raise AssertionError(kind)


def lr_value(lr) -> float:
    return float(lr)


LR_KINDS = ["float", "tensor_0d", "tensor_1"]


def _valid_hyperparameters():
    for momentum, dampening, weight_decay, nesterov, maximize in itertools.product(
        (0.0, 0.9), (0.0, 0.1), (0.0, 1e-2), (False, True), (False, True)
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        yield pytest.param(
            dict(
                momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov, maximize=maximize
            ),
            id=f"mom{momentum}-damp{dampening}-wd{weight_decay}-nest{int(nesterov)}-max{int(maximize)}",
        )


HYPERPARAMETERS = list(_valid_hyperparameters())


# ------------------------------------------------------------------ step equivalence
@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("hp", HYPERPARAMETERS)
def test_fused_sgd_params_and_state_keys_match_torch_sgd_every_step(lr_kind, hp):
    ref_params = make_params()
    fused_params = clone_params(ref_params)
    ref = torch.optim.SGD(ref_params, lr=make_lr(lr_kind, 0.05), **hp)
    fused = FusedSGD(fused_params, lr=make_lr(lr_kind, 0.05), **hp)
    for step in range(STEPS):
        grads = grads_for_step(step)
        set_grads(ref_params, grads)
        set_grads(fused_params, grads)
        ref.step()
        fused.step()
        assert_params_match(fused_params, ref_params, f"step {step}")
        for i, (p, q) in enumerate(zip(fused_params, ref_params)):
            assert set(fused.state[p]) == set(ref.state[q]), f"step {step}, param {i}: state keys differ"
    # The late parameter really went through both regimes (no grad, then grads).
    assert not torch.equal(fused_params[LATE_PARAM], make_params()[LATE_PARAM])


@pytest.mark.parametrize("lr_kind", LR_KINDS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_zero_dim_parameter_with_tensor_lr_matches_torch_sgd(lr_kind, momentum):
    """A 0-dim parameter (e.g. a learned scalar temperature) with every accepted lr form."""
    shapes = [(), (4,)]
    ref_params = make_params(shapes=shapes)
    fused_params = clone_params(ref_params)
    ref = torch.optim.SGD(ref_params, lr=make_lr(lr_kind, 0.05), momentum=momentum)
    fused = FusedSGD(fused_params, lr=make_lr(lr_kind, 0.05), momentum=momentum)
    for step in range(5):
        g = torch.Generator().manual_seed(step)
        grads = [torch.randn(s, generator=g) for s in shapes]
        set_grads(ref_params, grads)
        set_grads(fused_params, grads)
        ref.step()
        fused.step()
        assert_params_match(fused_params, ref_params, f"step {step}")
        assert fused_params[0].shape == torch.Size([])


# ------------------------------------------------------------------------ state_dict
def _run_steps(opt, params, steps):
    for step in steps:
        set_grads(params, grads_for_step(step))
        opt.step()


@pytest.mark.parametrize("lr_kind", ["float", "tensor_0d"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("direction", ["torch_to_fused", "fused_to_torch"])
def test_state_dict_loaded_across_torch_sgd_and_fused_sgd_continues_like_uninterrupted_run(
    direction, momentum, lr_kind
):
    hp = dict(momentum=momentum, dampening=0.0, weight_decay=1e-2, nesterov=momentum > 0)
    switch = 10

    # Uninterrupted torch.optim.SGD run.
    ref_params = make_params()
    ref = torch.optim.SGD(ref_params, lr=make_lr(lr_kind, 0.05), **hp)
    trajectory = []
    for step in range(STEPS):
        _run_steps(ref, ref_params, [step])
        trajectory.append([p.detach().clone() for p in ref_params])

    first_cls, second_cls = (
        (torch.optim.SGD, FusedSGD) if direction == "torch_to_fused" else (FusedSGD, torch.optim.SGD)
    )
    first_params = make_params()
    first = first_cls(first_params, lr=make_lr(lr_kind, 0.05), **hp)
    _run_steps(first, first_params, range(switch))
    saved = copy.deepcopy(first.state_dict())

    # The second optimizer starts with a different lr and no momentum: everything comes from the state_dict.
    second_params = clone_params(first_params)
    second = second_cls(second_params, lr=make_lr(lr_kind, 0.5))
    second.load_state_dict(saved)
    assert lr_value(second.param_groups[0]["lr"]) == pytest.approx(0.05)
    assert second.param_groups[0]["momentum"] == momentum
    for step in range(switch, STEPS):
        _run_steps(second, second_params, [step])
        assert_params_match(second_params, trajectory[step], f"{direction}, step {step}")


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_state_dict_layout_has_the_same_keys_as_torch_sgd(momentum):
    ref_params = make_params()
    fused_params = clone_params(ref_params)
    hp = dict(lr=0.05, momentum=momentum, dampening=0.1 if momentum else 0.0, weight_decay=1e-2)
    ref = torch.optim.SGD(ref_params, **hp)
    fused = FusedSGD(fused_params, **hp)
    _run_steps(ref, ref_params, range(6))
    _run_steps(fused, fused_params, range(6))
    ref_sd, fused_sd = ref.state_dict(), fused.state_dict()

    assert set(fused_sd) == set(ref_sd) == {"state", "param_groups"}
    assert set(fused_sd["state"]) == set(ref_sd["state"])  # LATE_PARAM has no state yet in either
    assert LATE_PARAM not in fused_sd["state"]
    for pid, ref_state in ref_sd["state"].items():
        assert set(fused_sd["state"][pid]) == set(ref_state)
        assert set(fused_sd["state"][pid]) == ({"momentum_buffer"} if momentum else set())
    assert len(fused_sd["param_groups"]) == len(ref_sd["param_groups"]) == 1
    ref_group, fused_group = ref_sd["param_groups"][0], fused_sd["param_groups"][0]
    assert set(fused_group) == set(ref_group)
    assert fused_group == ref_group  # same values too: lr, momentum, ..., params ids


def test_named_parameters_give_torch_sgds_param_groups_steps_and_cross_loading_state_dicts():
    """torch.optim.SGD(model.named_parameters()) keeps ``param_names`` in its groups; FusedSGD the same."""
    ref_params, fused_params = make_params(), make_params()
    hp = dict(lr=0.05, momentum=0.9, weight_decay=1e-2)
    ref = torch.optim.SGD([(f"p{i}", p) for i, p in enumerate(ref_params)], **hp)
    fused = FusedSGD([(f"p{i}", p) for i, p in enumerate(fused_params)], **hp)
    _run_steps(ref, ref_params, range(6))
    _run_steps(fused, fused_params, range(6))
    assert all(torch.equal(a, b) for a, b in zip(ref_params, fused_params))
    assert fused.state_dict()["param_groups"] == ref.state_dict()["param_groups"]
    ref_saved, fused_saved = copy.deepcopy(ref.state_dict()), copy.deepcopy(fused.state_dict())
    ref.load_state_dict(fused_saved)  # torch keeps the loaded tensors themselves: copies, not shared buffers
    fused.load_state_dict(ref_saved)
    _run_steps(ref, ref_params, range(6, 9))
    _run_steps(fused, fused_params, range(6, 9))
    assert all(torch.equal(a, b) for a, b in zip(ref_params, fused_params))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hp", [dict(momentum=0.0), dict(momentum=0.9, weight_decay=1e-2, nesterov=True)])
def test_sixteen_bit_reference_backend_is_torch_sgds_for_loop_bit_for_bit(dtype, hp):
    """In 16 bits torch's own SGDs differ from each other (foreach rounds the momentum update twice, the
    for-loop once per op); the reference backend runs the for-loop's ops (docs/sgd.md, 16-bit parameters)."""
    ref_params = [nn.Parameter(p.detach().to(dtype)) for p in make_params()]
    fused_params = clone_params(ref_params)
    ref = torch.optim.SGD(ref_params, lr=0.05, foreach=False, **hp)
    fused = FusedSGD(fused_params, lr=0.05, backend="reference", **hp)
    for step in range(8):
        for params in (ref_params, fused_params):
            set_grads(params, [None if g is None else g.to(dtype) for g in grads_for_step(step)])
        ref.step()
        fused.step()
        assert all(torch.equal(a, b) for a, b in zip(ref_params, fused_params)), f"step {step}"


# ------------------------------------------------------------- optimizer contract
def test_param_groups_with_different_hyperparameters_match_torch_sgd():
    ref_params = make_params()
    fused_params = clone_params(ref_params)

    def groups(ps):
        return [
            {"params": ps[:2], "lr": 0.1, "momentum": 0.9, "nesterov": True},
            {"params": ps[2:4], "lr": 0.01, "weight_decay": 1e-2, "momentum": 0.5, "dampening": 0.1},
            {"params": ps[4:], "lr": 0.003, "maximize": True},
        ]

    ref = torch.optim.SGD(groups(ref_params), lr=0.05)
    fused = FusedSGD(groups(fused_params), lr=0.05)
    assert [g["lr"] for g in fused.param_groups] == [0.1, 0.01, 0.003]
    for step in range(STEPS):
        _run_steps(ref, ref_params, [step])
        _run_steps(fused, fused_params, [step])
        assert_params_match(fused_params, ref_params, f"step {step}")


def test_add_param_group_mid_run_matches_torch_sgd():
    ref_params = make_params()
    fused_params = clone_params(ref_params)
    ref = torch.optim.SGD(ref_params[:3], lr=0.05, momentum=0.9)
    fused = FusedSGD(fused_params[:3], lr=0.05, momentum=0.9)
    for step in range(STEPS):
        if step == 7:
            ref.add_param_group({"params": ref_params[3:], "lr": 0.2, "weight_decay": 1e-2})
            fused.add_param_group({"params": fused_params[3:], "lr": 0.2, "weight_decay": 1e-2})
            assert len(fused.param_groups) == 2
            assert fused.param_groups[1]["momentum"] == 0.9  # defaults fill the new group
        _run_steps(ref, ref_params, [step])
        _run_steps(fused, fused_params, [step])
        assert_params_match(fused_params, ref_params, f"step {step}")


def test_zero_grad_sets_grads_to_none_by_default_and_to_zero_when_asked():
    params = make_params()
    opt = FusedSGD(params, lr=0.1)
    set_grads(params, [torch.ones(s) for s in SHAPES])
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    set_grads(params, [torch.ones(s) for s in SHAPES])
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in params)


def test_step_with_closure_returns_its_loss_and_runs_it_with_grad_enabled():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 5, generator=g), torch.randn(16, 1, generator=g)
    ref_model = nn.Linear(5, 1)
    fused_model = copy.deepcopy(ref_model)
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    fused = FusedSGD(fused_model.parameters(), lr=0.1, momentum=0.9)
    grad_enabled_inside = []

    def closure_for(model, opt, record):
        def closure():
            record.append(torch.is_grad_enabled())
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        return closure

    for step in range(5):
        ref_loss = ref.step(closure_for(ref_model, ref, []))
        closure = closure_for(fused_model, fused, grad_enabled_inside)
        fused_loss = fused.step(closure)
        assert isinstance(fused_loss, torch.Tensor)
        assert torch.equal(fused_loss, ref_loss)
        assert_params_match(list(fused_model.parameters()), list(ref_model.parameters()), f"step {step}")
    assert grad_enabled_inside == [True] * 5
    assert fused.step() is None  # no closure: returns None (grads from the last closure remain)


def test_step_pre_and_post_hooks_fire_around_each_step_and_can_be_removed():
    params = make_params()
    opt = FusedSGD(params, lr=0.1)
    events = []
    before = {}

    def pre_hook(optimizer, args, kwargs):
        assert optimizer is opt
        before["p0"] = params[0].detach().clone()
        events.append("pre")

    def post_hook(optimizer, args, kwargs):
        assert optimizer is opt
        assert not torch.equal(params[0], before["p0"])  # the update has happened
        events.append("post")

    pre_handle = opt.register_step_pre_hook(pre_hook)
    post_handle = opt.register_step_post_hook(post_hook)
    for _ in range(3):
        set_grads(params, [torch.ones(s) for s in SHAPES])
        opt.step()
    assert events == ["pre", "post"] * 3
    pre_handle.remove()
    post_handle.remove()
    set_grads(params, [torch.ones(s) for s in SHAPES])
    opt.step()
    assert events == ["pre", "post"] * 3


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5),
    "MultiStepLR": lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[4, 9, 15], gamma=0.3),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=STEPS),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8, eta_min=1e-3),
}


@pytest.mark.parametrize("lr_kind", ["float", "tensor_0d"])
@pytest.mark.parametrize("scheduler", list(SCHEDULERS))
def test_lr_scheduler_gives_same_lrs_and_params_as_with_torch_sgd(scheduler, lr_kind):
    ref_params = make_params()
    fused_params = clone_params(ref_params)
    hp = dict(momentum=0.9, weight_decay=1e-2)  # OneCycleLR cycles the momentum too
    ref = torch.optim.SGD(ref_params, lr=make_lr(lr_kind, 0.05), **hp)
    fused = FusedSGD(fused_params, lr=make_lr(lr_kind, 0.05), **hp)
    ref_sched, fused_sched = SCHEDULERS[scheduler](ref), SCHEDULERS[scheduler](fused)
    seen_lrs = set()
    for step in range(STEPS):
        _run_steps(ref, ref_params, [step])
        _run_steps(fused, fused_params, [step])
        ref_sched.step()
        fused_sched.step()
        fused_last = [lr_value(v) for v in fused_sched.get_last_lr()]
        assert fused_last == pytest.approx([lr_value(v) for v in ref_sched.get_last_lr()], rel=1e-12)
        assert lr_value(fused.param_groups[0]["lr"]) == pytest.approx(lr_value(ref.param_groups[0]["lr"]), rel=1e-12)
        assert fused.param_groups[0]["momentum"] == pytest.approx(ref.param_groups[0]["momentum"], rel=1e-12)
        seen_lrs.add(round(lr_value(fused.param_groups[0]["lr"]), 12))
        assert_params_match(fused_params, ref_params, f"{scheduler} step {step}")
    assert len(seen_lrs) > 2  # the schedule really changed the lr


def test_fused_sgdl_without_anneal_under_step_lr_matches_torch_sgd():
    ref_params = make_params()
    fused_params = clone_params(ref_params)
    ref = torch.optim.SGD(ref_params, lr=0.05, weight_decay=5e-3)  # FusedSGDL's default weight decay
    fused = FusedSGDL(fused_params, lr=0.05, total_steps=None)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=4, gamma=0.5)
    fused_sched = torch.optim.lr_scheduler.StepLR(fused, step_size=4, gamma=0.5)
    for step in range(STEPS):
        _run_steps(ref, ref_params, [step])
        _run_steps(fused, fused_params, [step])
        ref_sched.step()
        fused_sched.step()
        assert fused_sched.get_last_lr() == pytest.approx(ref_sched.get_last_lr(), rel=1e-12)
        assert_params_match(fused_params, ref_params, f"step {step}")


def test_fused_sgdl_anneal_composes_with_step_lr():
    """The built-in anneal multiplies whatever lr StepLR set, at ceil(m * total_steps) completed steps."""
    total_steps, gamma = 12, 0.1
    milestones = {4, 8}  # 1/3 and 2/3 of 12
    ref_params = make_params()
    fused_params = clone_params(ref_params)
    ref = torch.optim.SGD(ref_params, lr=0.05, weight_decay=5e-3)
    fused = FusedSGDL(fused_params, lr=0.05, total_steps=total_steps, gamma=gamma)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref, step_size=5, gamma=0.5)
    fused_sched = torch.optim.lr_scheduler.StepLR(fused, step_size=5, gamma=0.5)
    for step in range(total_steps + 3):
        _run_steps(ref, ref_params, [step])
        _run_steps(fused, fused_params, [step])
        if step + 1 in milestones:
            ref.param_groups[0]["lr"] *= gamma
        ref_sched.step()
        fused_sched.step()
        assert lr_value(fused.param_groups[0]["lr"]) == pytest.approx(ref.param_groups[0]["lr"], rel=1e-12)
        assert_params_match(fused_params, ref_params, f"step {step}")


# ------------------------------------------------------------------------ validation
BAD_ARGUMENTS = [
    pytest.param(dict(lr=-0.1), "lr", id="negative-lr"),
    pytest.param(dict(lr=torch.tensor(-0.1)), "lr", id="negative-tensor-lr"),
    pytest.param(dict(lr=0.1, momentum=-0.1), "momentum", id="negative-momentum"),
    pytest.param(dict(lr=0.1, momentum=1.0), "momentum", id="momentum-one"),
    pytest.param(dict(lr=0.1, weight_decay=-1e-2), "weight_decay", id="negative-weight-decay"),
    pytest.param(dict(lr=0.1, nesterov=True), "nesterov", id="nesterov-without-momentum"),
    pytest.param(dict(lr=0.1, momentum=0.9, dampening=0.1, nesterov=True), "nesterov", id="nesterov-with-dampening"),
    pytest.param(dict(lr=0.1, differentiable=True), "differentiable", id="differentiable"),
]


@pytest.mark.parametrize("kwargs, name", BAD_ARGUMENTS)
def test_bad_constructor_argument_raises_value_error_naming_it_and_leaves_params_unchanged(kwargs, name):
    params = make_params()
    before = [p.detach().clone() for p in params]
    set_grads(params, grads_for_step(1))
    with pytest.raises(ValueError, match=name):
        FusedSGD(params, **kwargs)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("kwargs, name", BAD_ARGUMENTS)
def test_bad_add_param_group_argument_raises_and_leaves_optimizer_unchanged(kwargs, name):
    if kwargs.get("nesterov") and "momentum" not in kwargs:
        kwargs = {**kwargs, "momentum": 0.0}  # the optimizer's default momentum (0.9) would fill it in
    ref_params = make_params()
    fused_params = clone_params(ref_params)
    ref = torch.optim.SGD(ref_params[:3], lr=0.05, momentum=0.9)
    fused = FusedSGD(fused_params[:3], lr=0.05, momentum=0.9)
    _run_steps(ref, ref_params, range(3))
    _run_steps(fused, fused_params, range(3))
    state_before = copy.deepcopy(fused.state_dict())
    group = {"params": fused_params[3:], **kwargs}
    with pytest.raises(ValueError, match=name):
        fused.add_param_group(group)
    assert len(fused.param_groups) == 1
    after = fused.state_dict()
    assert after["param_groups"] == state_before["param_groups"]
    assert set(after["state"]) == set(state_before["state"])
    for pid, st in state_before["state"].items():
        assert torch.equal(after["state"][pid]["momentum_buffer"], st["momentum_buffer"])
    # ... and it keeps matching torch.optim.SGD afterwards.
    _run_steps(ref, ref_params, range(3, 6))
    _run_steps(fused, fused_params, range(3, 6))
    assert_params_match(fused_params[:3], ref_params[:3], "after the refused group")


def test_sparse_gradient_raises_at_step_and_changes_no_parameter_or_state():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True)
    dense = nn.Linear(3, 2)
    params = list(emb.parameters()) + list(dense.parameters())
    opt = FusedSGD(params, lr=0.1, momentum=0.9)
    # A first step on the dense part only creates momentum state.
    dense(torch.randn(4, 3)).sum().backward()
    opt.step()
    opt.zero_grad()
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state_dict())
    dense(emb(torch.tensor([1, 4, 4]))).sum().backward()
    assert emb.weight.grad.is_sparse
    with pytest.raises((RuntimeError, ValueError), match="sparse"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    state_after = opt.state_dict()
    assert set(state_after["state"]) == set(state_before["state"])
    for pid, st in state_before["state"].items():
        assert torch.equal(state_after["state"][pid]["momentum_buffer"], st["momentum_buffer"])


def test_duplicate_params_in_a_group_raise_value_error():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError):
        FusedSGD([p, p], lr=0.1)


def test_param_in_two_groups_raises_value_error():
    p, q = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2))
    with pytest.raises(ValueError):
        FusedSGD([{"params": [p, q]}, {"params": [p]}], lr=0.1)


def test_empty_param_list_raises_value_error():
    with pytest.raises(ValueError, match="empty"):
        FusedSGD([], lr=0.1)


def test_state_dict_survives_torch_save_and_weights_only_load():
    params = make_params()
    opt = FusedSGD(params, lr=torch.tensor(0.05), momentum=0.9)
    _run_steps(opt, params, range(4))
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    other_params = clone_params(params)
    other = FusedSGD(other_params, lr=torch.tensor(1.0), momentum=0.9)
    other.load_state_dict(loaded)
    _run_steps(opt, params, range(4, 8))
    _run_steps(other, other_params, range(4, 8))
    assert all(torch.equal(a, b) for a, b in zip(params, other_params))
