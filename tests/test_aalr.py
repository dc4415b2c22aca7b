"""AALR (shared/spec/algorithms.md, "AALR") driven by scripted loss sequences.

Two independent oracles: hand-computed tables of (loss -> lr, restored, checkpoint
action), and a naive state machine written from the spec (``SpecAALR`` below), which a
property test compares with the package on random sequences of NaN/inf/equal/better/worse
losses. Between epoch ends the model really trains (SGD with momentum, BatchNorm running
statistics), so a restore is observable: after it, the model's state_dict and the
optimizer's momentum buffers must equal the checkpoint bit for bit (torch.equal).
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from autolr_fused import AALR, AALRDecision, FusedSGD

NAN, INF = float("nan"), float("inf")


# --------------------------------------------------------------------- the oracle
class SpecAALR:
    """Algorithm 1 exactly as the spec words it, with no shared code.

    ``epoch_end`` returns (lr, event), event one of None, "save", "restore_C0", "restore_C".
    """

    def __init__(self, initial_lr: float, patience: int, initial_loss: float | None = None) -> None:
        self.lr = initial_lr
        self.patience = patience
        self.initial_loss = math.inf if initial_loss is None else initial_loss
        self.best = self.initial_loss
        self.phase = 1
        self.i = 0
        self.p = None
        self.wait = None  # "first" or "second"
        self.into_wait = 0

    def epoch_end(self, loss: float) -> tuple[float, str | None]:
        is_nan = math.isnan(loss) or math.isinf(loss)
        if self.phase == 1:
            self.i += 1
            event = None
            if is_nan or loss > self.best:
                self.lr /= 2
                event = "restore_C0"
                self.i = 0
                self.best = self.initial_loss
            else:
                self.best = loss
            if self.i == self.patience:
                event = "save"
                self.lr *= 2
                self.p = 1
                self.phase = 2
                self.wait = "first"
                self.into_wait = 0
            return self.lr, event
        self.into_wait += 1
        if self.into_wait < self.p:
            return self.lr, None  # decisions only at the end of a wait
        self.into_wait = 0
        if self.wait == "first":
            if is_nan:
                self.lr /= 2
                self.p *= 2
                return self.lr, "restore_C"
            if loss < self.best:
                return self._improve(loss)
            self.wait = "second"
            return self.lr, None
        if not is_nan and loss < self.best:
            return self._improve(loss)
        self.lr /= 2
        self.p *= 2
        self.wait = "first"
        return self.lr, "restore_C" if is_nan else None

    def _improve(self, loss: float) -> tuple[float, str]:
        self.best = loss
        self.lr *= 2
        self.p = 1
        self.wait = "first"
        return self.lr, "save"


# ------------------------------------------------------------------ test harness
def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 1))


def make_optimizer(model: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    layers = list(model.children())
    groups = [
        {"params": layers[0].parameters(), "lr": lr},
        {"params": list(layers[1].parameters()) + list(layers[2].parameters()), "lr": lr / 3},
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def train_epoch(model: nn.Module, opt: torch.optim.Optimizer, epoch: int, steps: int = 2) -> None:
    """A couple of real momentum-SGD steps: params, momentum buffers and BN statistics move."""
    g = torch.Generator().manual_seed(10_000 + epoch)
    model.train()
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        y = torch.randn(8, 1, generator=g)
        opt.zero_grad()
        # Scaled down so that the lrs AALR reaches (up to ~10) never blow the model up.
        (1e-3 * nn.functional.mse_loss(model(x), y)).backward()
        opt.step()


def capture(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """Everything a checkpoint must bring back: model state_dict and momentum buffers (None if absent)."""
    buffers = []
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state[p].get("momentum_buffer") if p in opt.state else None
            buffers.append(None if buf is None else buf.detach().clone())
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "buffers": buffers,
    }


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, except that NaN equals NaN (a diverged model is still restored bit for bit)."""
    if a.is_floating_point() and b.is_floating_point():
        as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        same_layout = a.shape == b.shape and a.dtype == b.dtype
        return same_layout and torch.equal(a.reshape(-1).view(as_int), b.reshape(-1).view(as_int))
    return torch.equal(a, b)


def assert_same_state(actual: dict, expected: dict, context: str) -> None:
    assert actual["model"].keys() == expected["model"].keys()
    for k in expected["model"]:
        assert bit_equal(actual["model"][k], expected["model"][k]), f"{context}: model {k} differs"
    assert len(actual["buffers"]) == len(expected["buffers"])
    for i, (a, e) in enumerate(zip(actual["buffers"], expected["buffers"])):
        if e is None:
            assert a is None, f"{context}: momentum buffer {i} should be absent"
        else:
            assert a is not None and bit_equal(a, e), f"{context}: momentum buffer {i} differs"


def states_differ(a: dict, b: dict) -> bool:
    try:
        assert_same_state(a, b, "")
    except AssertionError:
        return True
    return False


def assert_group_lrs(opt: torch.optim.Optimizer, lr: float, context: str) -> None:
    assert [float(g["lr"]) for g in opt.param_groups] == [lr] * len(opt.param_groups), context


def drive(aalr: AALR, model, opt, script, first_epoch: int = 1, checkpoints: dict | None = None, steps: int = 2):
    """Run ``script`` rows (loss, lr, restored, action) and check every epoch end.

    ``action``: None, "save" (C is saved now), or "restore_C0"/"restore_C".
    """
    checkpoints = checkpoints if checkpoints is not None else {}
    for epoch, (loss, lr, restored, action) in enumerate(script, start=first_epoch):
        train_epoch(model, opt, epoch, steps)
        before = capture(model, opt)
        decision = aalr.epoch_end(loss)
        context = f"epoch {epoch} (loss {loss})"
        assert isinstance(decision, AALRDecision)
        assert decision.lr == lr, context
        assert decision.restored is restored, context
        assert_group_lrs(opt, lr, context)
        after = capture(model, opt)
        if action in ("restore_C0", "restore_C"):
            target = checkpoints[action[len("restore_") :]]
            assert states_differ(before, target), f"{context}: the restore would be unobservable"
            assert_same_state(after, target, context)
        else:
            assert_same_state(after, before, f"{context}: epoch_end without restore must not touch the state")
        if action == "save":
            checkpoints["C"] = after
    return checkpoints


def new_run(initial_lr: float, patience: int, initial_loss: float | None = None, seed: int = 0):
    model = make_model(seed)
    opt = make_optimizer(model)
    aalr = AALR(model, opt, initial_lr=initial_lr, patience=patience, initial_loss=initial_loss)
    assert_group_lrs(opt, initial_lr, "construction sets the initial lr on every group")
    return model, opt, aalr, {"C0": capture(model, opt)}


# --------------------------------------------------------------- hand-computed runs
# (loss, lr after epoch_end, restored, checkpoint action), patience=3, initial_lr=0.1.
FULL_SCRIPT = [
    # Phase 1.
    (5.0, 0.1, False, None),  # i=1, L*=5
    (5.0, 0.1, False, None),  # equal loss is not worse: i=2
    (6.0, 0.05, True, "restore_C0"),  # L > L*: restart, L* back to +inf
    (NAN, 0.025, True, "restore_C0"),
    (INF, 0.0125, True, "restore_C0"),
    (-INF, 0.00625, True, "restore_C0"),  # any non-finite loss is "NaN"
    (10.0, 0.00625, False, None),  # i=1 (L* was reset to +inf, so 10 is fine)
    (9.0, 0.00625, False, None),  # i=2
    (9.0, 0.0125, False, "save"),  # i=3=patience: save C, lr*2, p=1, phase 2
    # Phase 2, p=1.
    (8.0, 0.025, False, "save"),  # first wait, improvement: L*=8
    (8.0, 0.025, False, None),  # first wait, equal: a second wait follows
    (8.5, 0.0125, False, None),  # second wait, no improvement: lr/2, p=2
    # p=2.
    (NAN, 0.0125, False, None),  # mid-wait: ignored
    (8.5, 0.0125, False, None),  # end of first wait, no improvement: second wait
    (1.0, 0.0125, False, None),  # mid-wait: ignored even though better
    (7.0, 0.025, False, "save"),  # end of second wait, improvement: L*=7, p=1
    (NAN, 0.0125, True, "restore_C"),  # first wait NaN: restore C, p=2
    (6.0, 0.0125, False, None),  # mid-wait
    (6.5, 0.025, False, "save"),  # end of first wait, improvement: L*=6.5, p=1
    (7.0, 0.025, False, None),  # first wait, worse: second wait
    (INF, 0.0125, True, "restore_C"),  # second wait NaN: lr/2, p=2, restore C
    (7.0, 0.0125, False, None),  # mid-wait
    (6.6, 0.0125, False, None),  # end of first wait, worse: second wait
    (6.6, 0.0125, False, None),  # mid-wait
    (6.5, 0.00625, False, None),  # end of second wait, equal to L*: lr/2, p=4
    (NAN, 0.00625, False, None),  # p=4: three epochs mid-wait, whatever the loss
    (6.0, 0.00625, False, None),
    (INF, 0.00625, False, None),
    (6.4, 0.0125, False, "save"),  # end of first wait: improvement, p=1
    (NAN, 0.00625, True, "restore_C"),  # restores the checkpoint saved one epoch ago
]


def test_full_scripted_run_gives_hand_computed_lrs_restores_and_checkpoints():
    model, opt, aalr, checkpoints = new_run(initial_lr=0.1, patience=3)
    drive(aalr, model, opt, FULL_SCRIPT, checkpoints=checkpoints)
    assert aalr.stats()["restores"] == sum(row[2] for row in FULL_SCRIPT)


def test_full_scripted_run_agrees_with_the_spec_state_machine():
    spec = SpecAALR(0.1, 3)
    for loss, lr, _restored, action in FULL_SCRIPT:
        assert spec.epoch_end(loss) == (lr, action)


def test_initial_loss_is_the_phase_one_bar_and_comes_back_after_a_restart():
    script = [
        (3.0, 0.5, True, "restore_C0"),  # 3 > initial_loss 2
        (2.0, 0.5, False, None),  # equal to L* = 2: fine
        (2.5, 0.25, True, "restore_C0"),  # L* back to initial_loss 2, not +inf
        (1.5, 0.25, False, None),
        (1.5, 0.5, False, "save"),  # patience 2 reached
        (1.5, 0.5, False, None),  # first wait, equal: second wait
        (NAN, 0.25, True, "restore_C"),  # second wait NaN
    ]
    model, opt, aalr, checkpoints = new_run(initial_lr=1.0, patience=2, initial_loss=2.0)
    drive(aalr, model, opt, script, checkpoints=checkpoints)


def test_patience_one_enters_phase_two_after_one_good_epoch():
    script = [
        (NAN, 0.05, True, "restore_C0"),  # a restart never reaches patience in the same epoch
        (3.0, 0.1, False, "save"),
        (4.0, 0.1, False, None),  # second wait
        (4.0, 0.05, False, None),  # lr/2, p=2
        (2.0, 0.05, False, None),  # mid-wait
        (2.0, 0.1, False, "save"),
    ]
    model, opt, aalr, checkpoints = new_run(initial_lr=0.1, patience=1)
    drive(aalr, model, opt, script, checkpoints=checkpoints)


def test_tensor_losses_decide_like_float_losses():
    losses = [5.0, 4.0, NAN, 3.0, 3.0, 3.5, INF, 2.0]
    decisions = []
    for as_tensor in (False, True):
        model = make_model()
        aalr = AALR(model, make_optimizer(model), initial_lr=0.1, patience=2)
        decisions.append([aalr.epoch_end(torch.tensor(x) if as_tensor else x) for x in losses])
    assert decisions[0] == decisions[1]
    assert any(d.restored for d in decisions[0])


def test_restore_brings_back_fused_sgd_tensor_lr_and_momentum_buffers():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    opt = FusedSGD(model.parameters(), lr=torch.tensor(0.3), momentum=0.9)
    aalr = AALR(model, opt, initial_lr=0.1, patience=1)
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1)
    train_epoch(model, opt, 1)
    assert aalr.epoch_end(1.0) == (0.2, False)
    saved = capture(model, opt)
    train_epoch(model, opt, 2)
    assert states_differ(capture(model, opt), saved)
    assert aalr.epoch_end(NAN) == (0.1, True)
    assert_same_state(capture(model, opt), saved, "after NaN restore")
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(0.1)
    train_epoch(model, opt, 3)  # and the optimizer still steps afterwards


# ------------------------------------------------------- property: package == spec
LOSS_VALUES = [NAN, INF, -INF, 1.0, 2.0, 2.0, 3.0, 4.0, 5.0]


@settings(max_examples=100, deadline=None, database=None)
@given(
    losses=st.lists(st.sampled_from(LOSS_VALUES), min_size=1, max_size=30),
    patience=st.integers(min_value=1, max_value=4),
    initial_loss=st.sampled_from([None, 2.5, 5.0, INF]),
)
def test_package_matches_spec_state_machine_on_random_loss_sequences(losses, patience, initial_loss):
    model, opt, aalr, checkpoints = new_run(initial_lr=0.1, patience=patience, initial_loss=initial_loss)
    spec = SpecAALR(0.1, patience, initial_loss)
    script = []
    for loss in losses:
        lr, event = spec.epoch_end(loss)
        script.append((loss, lr, event is not None and event.startswith("restore"), event))
    # A restore right after the checkpoint was saved, with no training since, is unobservable;
    # ``drive`` trains every epoch, so every restore here is observable.
    drive(aalr, model, opt, script, checkpoints=checkpoints, steps=1)


# ------------------------------------------------------------------- state_dict
RESUME_SCRIPT = [  # patience=2, initial_lr=0.1
    (5.0, 0.1, False, None),
    (4.0, 0.2, False, "save"),  # phase 2
    (4.5, 0.2, False, None),  # first wait, worse: second wait
    (4.5, 0.1, False, None),  # second wait, worse: p=2
    (3.0, 0.1, False, None),  # mid first wait  <- save and resume after this epoch
    (NAN, 0.05, True, "restore_C"),  # restores the C saved before the resume
    (3.0, 0.05, False, None),  # p=4
    (3.0, 0.05, False, None),
    (3.0, 0.05, False, None),
    (3.5, 0.1, False, "save"),
    (NAN, 0.05, True, "restore_C"),
]
RESUME_AFTER = 5


def _weights_only_round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_state_dict_round_trip_mid_phase_two_continues_identically():
    # Uninterrupted run, checked against the hand-computed table.
    model, opt, aalr, checkpoints = new_run(initial_lr=0.1, patience=2)
    drive(aalr, model, opt, RESUME_SCRIPT[:RESUME_AFTER], checkpoints=checkpoints)
    saved = _weights_only_round_trip(
        {"aalr": aalr.state_dict(), "model": model.state_dict(), "optimizer": opt.state_dict()}
    )
    assert aalr.stats()["phase"] == 2
    resume_checkpoints = copy.deepcopy(checkpoints)

    # Resumed run: fresh objects with different initial values, then everything loaded.
    model2 = make_model(seed=99)
    opt2 = make_optimizer(model2, lr=0.7)
    aalr2 = AALR(model2, opt2, initial_lr=0.7, patience=9)
    opt2.load_state_dict(saved["optimizer"])
    model2.load_state_dict(saved["model"])
    aalr2.load_state_dict(saved["aalr"])
    assert aalr2.stats() == aalr.stats()
    assert_same_state(capture(model2, opt2), capture(model, opt), "right after loading")

    rest = RESUME_SCRIPT[RESUME_AFTER:]
    for offset, row in enumerate(rest):
        epoch = RESUME_AFTER + 1 + offset
        drive(aalr, model, opt, [row], first_epoch=epoch, checkpoints=checkpoints)
        drive(aalr2, model2, opt2, [row], first_epoch=epoch, checkpoints=resume_checkpoints)
        assert_same_state(capture(model2, opt2), capture(model, opt), f"epoch {epoch}")
        assert aalr2.stats() == aalr.stats()


def test_state_dict_does_not_alias_the_live_checkpoints():
    model, opt, aalr, checkpoints = new_run(initial_lr=0.1, patience=1)
    drive(aalr, model, opt, [(1.0, 0.2, False, "save")], checkpoints=checkpoints)
    sd = aalr.state_dict()
    for tensor in sd["checkpoint"]["model"].values():
        tensor.add_(1)  # vandalise the exported copy
    train_epoch(model, opt, 2)
    assert aalr.epoch_end(NAN) == (0.1, True)
    assert_same_state(capture(model, opt), checkpoints["C"], "restore after editing the exported state_dict")


# ------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize(
    "kwargs, name",
    [
        pytest.param({"patience": 0}, "patience", id="patience-0"),
        pytest.param({"patience": -1}, "patience", id="patience-negative"),
        pytest.param({"patience": 2.5}, "patience", id="patience-float"),
        pytest.param({"initial_lr": 0}, "initial_lr", id="initial_lr-0"),
        pytest.param({"initial_lr": -0.1}, "initial_lr", id="initial_lr-negative"),
        pytest.param({"initial_lr": INF}, "initial_lr", id="initial_lr-inf"),
        pytest.param({"initial_lr": NAN}, "initial_lr", id="initial_lr-nan"),
        pytest.param({"initial_loss": NAN}, "initial_loss", id="initial_loss-nan"),
    ],
)
def test_bad_argument_raises_value_error_naming_it_and_leaves_the_optimizer_alone(kwargs, name):
    model = make_model()
    opt = make_optimizer(model, lr=0.05)
    with pytest.raises(ValueError, match=name):
        AALR(model, opt, **kwargs)
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.05 / 3]


def test_non_module_model_and_non_optimizer_raise_type_error():
    model = make_model()
    opt = make_optimizer(model)
    with pytest.raises(TypeError, match="model"):
        AALR(list(model.parameters()), opt)
    with pytest.raises(TypeError, match="optimizer"):
        AALR(model, object())


@pytest.mark.parametrize(
    "loss, error",
    [
        pytest.param("0.5", TypeError, id="string"),
        pytest.param(None, TypeError, id="none"),
        pytest.param(torch.tensor([1.0, 2.0]), ValueError, id="two-element-tensor"),
    ],
)
def test_bad_loss_raises_and_changes_nothing(loss, error):
    model, opt, aalr, _ = new_run(initial_lr=0.1, patience=2)
    aalr.epoch_end(1.0)
    stats_before = aalr.stats()
    with pytest.raises(error):
        aalr.epoch_end(loss)
    assert aalr.stats() == stats_before
    assert_group_lrs(opt, 0.1, "after a refused loss")


def test_load_state_dict_refuses_a_foreign_dict():
    model, opt, aalr, _ = new_run(initial_lr=0.1, patience=2)
    with pytest.raises(ValueError):
        aalr.load_state_dict(opt.state_dict())
    assert aalr.stats()["lr"] == 0.1
