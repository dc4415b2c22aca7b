"""Exact resume: a run saved at any step and continued from the saved state equals the uninterrupted run.

One table of cases (``CASES``: optimizer factory, run length, save points) runs on every
available backend. Each case trains a small two-layer model (two param groups) on seeded
data; the interrupted run stops after ``k`` steps, saves the model's and the optimizer's
state through ``torch.save`` into memory, loads it back with ``weights_only=True`` into a
fresh model and a fresh optimizer, and continues. Same backend: the parameters, every lr,
the whole optimizer state and ``stats(per_tensor=True)`` must be bit-identical (``torch.equal``) to the
uninterrupted run's after every continued step: the state dict is the whole state, so
there is nothing to be approximately equal about. Across backends (save on one, continue
on another) the tolerance is ``tests/test_backends.py``'s float32 one.

The save points cover: before the first step's successors exist (after step 1), mid-epoch
and mid-window, epoch and window boundaries, AutoDrop while a drop is pending (its
average accumulating) and right after the drop, SGDL around a milestone, AALR in phase 2
(in a second wait, and mid-wait after a restore), and GradScaler runs with skipped steps.
"""

from __future__ import annotations

import copy
import io
import math
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from autolr_fused import (
    AALR,
    FusedAutoDropSGD,
    FusedRDBD,
    FusedSGD,
    FusedSGDHD,
    FusedSGDL,
    FusedTLR,
    available_backends,
)

BACKENDS = [b for b in available_backends() if b in ("reference", "cpu", "cuda")]
DEVICE = {"reference": "cpu", "cpu": "cpu", "cuda": "cuda"}
Factory = Callable[[list[dict[str, Any]], str], torch.optim.Optimizer]


def groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """Two param groups (the second at half the lr), so per-group lrs and tensors must both come back."""
    return [
        {"params": list(model[0].parameters())},
        {"params": list(model[2].parameters()), "lr": lr / 2},
    ]


# name -> (factory(model, backend), total steps, save points). The comments say what each save point hits.
CASES: dict[str, tuple[Callable[[nn.Module, str], torch.optim.Optimizer], int, tuple[int, ...]]] = {
    "sgd": (lambda m, b: FusedSGD(groups(m, 0.1), lr=0.1, momentum=0.9, nesterov=True, backend=b), 8, (1, 5)),
    # a tensor lr stays a tensor through the state dict; SGDL multiplies it in place at the milestone (step 4)
    "sgd_tensor_lr": (lambda m, b: FusedSGD(groups(m, torch.tensor(0.1)), lr=torch.tensor(0.1), backend=b), 6, (3,)),
    "sgdl_tensor_lr": (
        lambda m, b: FusedSGDL(groups(m, torch.tensor(0.3)), lr=torch.tensor(0.3), total_steps=12, backend=b),
        12,
        (3, 5),
    ),
    # milestones at steps 4 and 8 of 12: just before, at and after the first anneal
    "sgdl": (lambda m, b: FusedSGDL(groups(m, 0.3), lr=0.3, total_steps=12, backend=b), 12, (3, 4, 5)),
    # epochs of 2 steps; a large threshold triggers at epoch 3 (step 6); drop_delay=3 drops at epoch 5 (step 10).
    "autodrop": (
        lambda m, b: FusedAutoDropSGD(
            groups(m, 0.1), lr=0.1, steps_per_epoch=2, threshold=90.0, max_threshold=180.0, drop_delay=3, backend=b
        ),
        14,
        (3, 6, 7, 8, 10, 11),  # mid-epoch; trigger (k=1); pending mid-epoch; pending at k=2; just dropped; after
    ),
    "autodrop_window": (
        lambda m, b: FusedAutoDropSGD(
            groups(m, 0.1),
            lr=0.1,
            momentum=0.5,
            weight_decay=1e-3,
            steps_per_epoch=3,
            threshold=60.0,
            max_threshold=120.0,
            drop_delay=2,
            angle_window=3,
            backend=b,
        ),
        24,
        (4, 9, 13),  # the mean of the last angles (a list in the controller state) must come back
    ),
    "tlr_step": (
        lambda m, b: FusedTLR(groups(m, 0.05), lr=0.05, momentum=0.8, weight_decay=5e-4, backend=b),
        8,
        (1, 4),
    ),
    "tlr_step_layer": (lambda m, b: FusedTLR(groups(m, 0.05), lr=0.05, per_layer=True, backend=b), 8, (1, 4)),
    # K = round(0.5 * 6) = 3 steps per window: mid-window 2 (before the first factor), a window end, mid-window 3
    "tlr_window": (
        lambda m, b: FusedTLR(
            groups(m, 0.05), lr=0.05, momentum=0.8, steps_per_epoch=6, update_fraction=0.5, backend=b
        ),
        12,
        (4, 6, 7),
    ),
    "tlr_window_layer": (
        lambda m, b: FusedTLR(
            groups(m, 0.05), lr=0.05, per_layer=True, steps_per_epoch=6, update_fraction=0.5, backend=b
        ),
        12,
        (4, 6, 7),
    ),
    "rdbd_sgd": (lambda m, b: FusedRDBD(groups(m, 0.02), lr=0.02, meta_lr=1e-2, momentum=0.9, backend=b), 8, (1, 4)),
    "rdbd_adam": (
        lambda m, b: FusedRDBD(groups(m, 0.01), base="adam", lr=0.01, meta_lr=1e-4, betas=(0.05, 0.99), backend=b),
        8,
        (1, 4),
    ),
    "rdbd_adamw": (
        lambda m, b: FusedRDBD(
            groups(m, 0.01),
            base="adam",
            lr=0.01,
            meta_lr=1e-4,
            weight_decay=0.1,
            decoupled_weight_decay=True,
            backend=b,
        ),
        8,
        (4,),
    ),
    "sgdhd": (lambda m, b: FusedSGDHD(groups(m, 0.05), lr=0.05, momentum=0.9, hypergrad_lr=1e-2, backend=b), 8, (1, 4)),
}
RESUME_CASES = [(name, k) for name, (_, _, points) in CASES.items() for k in points]


# ------------------------------------------------------------------------ harness
def make_model(device: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(device)


def batch(step: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The data of step ``step``: seeded by the step, so a resumed run sees what the uninterrupted one saw."""
    g = torch.Generator().manual_seed(500 + step)
    return torch.randn(8, 5, generator=g).to(device), torch.randn(8, 3, generator=g).to(device)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int, scaler=None, inf_steps=()) -> float:
    x, y = batch(step, next(model.parameters()).device.type)
    opt.zero_grad(set_to_none=True)
    loss = nn.functional.mse_loss(model(x), y)
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        if step in inf_steps:  # an overflow: GradScaler skips this step
            model[0].weight.grad[0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
    return loss.item()


def through_bytes(obj: Any) -> Any:
    """``obj`` after ``torch.save`` and ``torch.load(weights_only=True)``: only plain tensors and numbers survive."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def lrs_of(opt: torch.optim.Optimizer) -> list[float]:
    """Every group lr, then every per-tensor lr, as Python floats (exact: float32 values fit in a float)."""
    values = [float(group["lr"]) for group in opt.param_groups]
    values += [float(opt.state[p]["lr"]) for g in opt.param_groups for p in g["params"] if "lr" in opt.state[p]]
    return values


def same_number(a: Any, b: Any) -> bool:
    """Equality of stats values, NaN equal to NaN (an angle is NaN before it is measured)."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def assert_same_values(actual: Any, expected: Any, where: str) -> None:
    """Bitwise equality of nested state: tensors by torch.equal (same dtype and device), numbers exactly."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), where
        assert actual.dtype == expected.dtype and actual.shape == expected.shape, where
        assert torch.equal(actual.cpu(), expected.cpu()), where
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), f"{where}: {actual.keys()}"
        for key in expected:
            assert_same_values(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert isinstance(actual, (list, tuple)) and len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_values(a, e, f"{where}[{i}]")
    else:
        assert same_number(actual, expected), f"{where}: {actual!r} != {expected!r}"


def assert_same_run(model, opt, twin_model, twin, where: str) -> None:
    for (name, a), b in zip(twin_model.named_parameters(), model.parameters()):
        assert torch.equal(a, b), f"{where}: parameter {name} differs"
    assert lrs_of(twin) == lrs_of(opt), where
    assert_same_values(twin.stats(per_tensor=True), opt.stats(per_tensor=True), f"{where}: stats(per_tensor=True)")
    assert_same_values(twin.state_dict(), opt.state_dict(), f"{where}: state_dict()")


def saved_run(factory, backend: str, k: int, scaler_args=None, inf_steps=(), device: str | None = None):
    """k steps (on ``device``, by default the backend's), then everything needed to continue, through bytes."""
    model = make_model(device or DEVICE[backend])
    opt = factory(model, backend)
    scaler = None if scaler_args is None else torch.amp.GradScaler(DEVICE[backend], **scaler_args)
    for step in range(k):
        train_step(model, opt, step, scaler, inf_steps)
    saved = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    if scaler is not None:
        saved["scaler"] = scaler.state_dict()
    return through_bytes(saved)


def resumed(factory, backend: str, saved, scaler_args=None):
    """A fresh model (other initial weights, overwritten by the saved ones) and optimizer, loaded."""
    model = make_model(DEVICE[backend], seed=1)
    model.load_state_dict(saved["model"])
    opt = factory(model, backend)
    opt.load_state_dict(saved["optimizer"])
    scaler = None
    if scaler_args is not None:
        scaler = torch.amp.GradScaler(DEVICE[backend], **scaler_args)
        scaler.load_state_dict(saved["scaler"])
    return model, opt, scaler


# -------------------------------------------------------------------------- tests
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case, k", RESUME_CASES, ids=[f"{n}-at{k}" for n, k in RESUME_CASES])
def test_resume_from_a_saved_state_dict_is_bit_identical_to_the_uninterrupted_run(case, k, backend):
    if DEVICE[backend] == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    factory, total, _ = CASES[case]
    model = make_model(DEVICE[backend])
    opt = factory(model, backend)
    for step in range(k):
        train_step(model, opt, step)
    twin_model, twin, _ = resumed(factory, backend, saved_run(factory, backend, k))
    assert_same_run(model, opt, twin_model, twin, f"right after loading at step {k}")
    for step in range(k, total):
        train_step(model, opt, step)
        train_step(twin_model, twin, step)
        assert_same_run(model, opt, twin_model, twin, f"step {step + 1} (resumed at {k})")


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if DEVICE[b] == "cpu"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_deep_copied_or_pickled_optimizer_continues_like_the_original(case, backend, copier):
    """copy.deepcopy / pickle of (model, optimizer) mid-run keeps the controller state and the backend.

    torch.optim.Optimizer pickles only defaults, state and param_groups; a copy without the controller
    would restart its counters (or fail on its first step).
    """
    factory, total, save_points = CASES[case]
    k = save_points[0]
    model = make_model("cpu")
    opt = factory(model, backend)
    for step in range(k):
        train_step(model, opt, step)
    if copier == "deepcopy":
        twin_model, twin = copy.deepcopy((model, opt))
    else:
        twin_model, twin = pickle.loads(pickle.dumps((model, opt)))
    assert twin.backend == opt.backend
    for step in range(k, total):
        train_step(model, opt, step)
        train_step(twin_model, twin, step)
        assert_same_run(model, opt, twin_model, twin, f"step {step + 1} ({copier} at {k})")


def test_the_autodrop_save_points_hit_a_pending_drop_and_the_drop():
    """The table's AutoDrop case really is mid-drop at its save points (else it would prove less)."""
    factory, _, _ = CASES["autodrop"]
    model = make_model("cpu")
    opt = factory(model, "reference")
    seen = {}
    for step in range(11):
        train_step(model, opt, step)
        seen[step + 1] = (opt.stats()["drop_pending"], opt.stats()["k"], opt.stats()["drops"])
    assert seen[3] == (False, 0, 0)
    assert seen[6] == (True, 1, 0)  # the trigger epoch: the average holds 1 * x_3
    assert seen[7] == (True, 1, 0) and seen[8] == (True, 2, 0)
    assert seen[10][0] is False and seen[10][2] == 1  # dropped at the end of epoch 5
    assert any("average" in opt.state[p] for p in model.parameters()) is False


@pytest.mark.parametrize(
    "save_backend, load_backend",
    [pytest.param(a, b, id=f"{a}-to-{b}") for a in BACKENDS for b in BACKENDS if a != b and "cuda" not in (a, b)],
)
@pytest.mark.parametrize("case, k", [("autodrop", 7), ("tlr_window_layer", 4), ("rdbd_adam", 4), ("sgdhd", 4)])
def test_a_state_dict_saved_on_one_backend_continues_on_another(case, k, save_backend, load_backend):
    """Continue within test_backends.py's float32 tolerance (rtol 1e-5, atol 1e-6): the backends round differently."""
    factory, total, _ = CASES[case]
    model = make_model("cpu")
    opt = factory(model, save_backend)
    for step in range(total):
        train_step(model, opt, step)
    twin_model, twin, _ = resumed(factory, load_backend, saved_run(factory, save_backend, k))
    assert twin.backend == load_backend
    for step in range(k, total):
        train_step(twin_model, twin, step)
    for a, b in zip(twin_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(lrs_of(twin)), torch.tensor(lrs_of(opt)), rtol=1e-5, atol=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
@pytest.mark.parametrize("direction", ["cpu-to-cuda", "cuda-to-cpu"])
@pytest.mark.parametrize("case, k", [("autodrop", 7), ("tlr_window_layer", 4), ("rdbd_adam", 4), ("sgdhd", 4)])
def test_a_state_dict_moves_between_cpu_and_cuda(case, k, direction):
    """Saved on one device, loaded onto the other: every state tensor lands on the new device; the run
    continues within the float32 backend tolerance of the uninterrupted run on the saving device."""
    save_device, load_device = direction.split("-to-")
    backend_of = {"cpu": "cpu" if "cpu" in BACKENDS else "reference", "cuda": "cuda" if "cuda" in BACKENDS else "auto"}
    factory, total, _ = CASES[case]
    model = make_model(save_device)
    opt = factory(model, backend_of[save_device])
    for step in range(total):
        train_step(model, opt, step)
    saved = saved_run(factory, backend_of[save_device], k, device=save_device)
    twin_model = make_model(load_device, seed=1)
    twin_model.load_state_dict(saved["model"])
    twin = factory(twin_model, backend_of[load_device])
    twin.load_state_dict(saved["optimizer"])
    for state in twin.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                assert value.device.type == load_device
    for step in range(k, total):
        train_step(twin_model, twin, step)
    for a, b in zip(twin_model.parameters(), model.parameters()):
        torch.testing.assert_close(a.cpu(), b.cpu(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(lrs_of(twin)), torch.tensor(lrs_of(opt)), rtol=1e-5, atol=0.0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "cuda"])
@pytest.mark.parametrize(
    "case, k", [("autodrop", 7), ("tlr_window", 4), ("tlr_step_layer", 4), ("rdbd_sgd", 4), ("sgdhd", 3)]
)
def test_resume_under_a_grad_scaler_with_skipped_steps_is_bit_identical(case, k, backend):
    """Steps 2 and 5 overflow (skipped before and after the save); the scaler's state is saved alongside."""
    factory, total, _ = CASES[case]
    scaler_args = {"init_scale": 2.0**12, "growth_interval": 2}
    inf_steps = (2, 5)
    model = make_model("cpu")
    opt = factory(model, backend)
    scaler = torch.amp.GradScaler("cpu", **scaler_args)
    for step in range(k):
        train_step(model, opt, step, scaler, inf_steps)
    twin_model, twin, twin_scaler = resumed(
        factory, backend, saved_run(factory, backend, k, scaler_args, inf_steps), scaler_args
    )
    for step in range(k, total):
        train_step(model, opt, step, scaler, inf_steps)
        train_step(twin_model, twin, step, twin_scaler, inf_steps)
        assert_same_run(model, opt, twin_model, twin, f"step {step + 1}")
    assert twin_scaler.get_scale() == scaler.get_scale()


# ------------------------------------------------------------------------- AALR
AALR_LOSSES = [1.0, 0.9, 0.95, float("nan"), 0.85, 0.8, 0.7, 0.75, 0.72]
# Epochs after which the run is saved (patience 2): 2 = phase 2 just entered (C saved); 3 = in a second wait;
# 4 = the NaN epoch just restored C (p = 2); 5 = mid-wait (one epoch into a wait of 2).
AALR_SAVE_POINTS = (2, 3, 4, 5)


def aalr_optimizers() -> dict[str, Factory]:
    return {
        "FusedSGD": lambda m, b: FusedSGD(groups(m, 0.1), lr=0.1, momentum=0.9, backend=b),
        "FusedTLR": lambda m, b: FusedTLR(groups(m, 0.1), lr=0.1, momentum=0.9, backend=b),
    }


def aalr_epoch(model, opt, aalr, epoch: int) -> None:
    for step in range(2):
        train_step(model, opt, 2 * epoch + step)
    aalr.epoch_end(AALR_LOSSES[epoch])


@pytest.mark.parametrize("inner", list(aalr_optimizers()))
@pytest.mark.parametrize("epochs", AALR_SAVE_POINTS)
def test_aalr_resume_in_phase_two_is_bit_identical(epochs, inner):
    factory = aalr_optimizers()[inner]
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    model = make_model("cpu")
    opt = factory(model, backend)
    aalr = AALR(model, opt, initial_lr=0.1, patience=2)
    for epoch in range(epochs):
        aalr_epoch(model, opt, aalr, epoch)
    assert aalr.phase == 2
    saved = through_bytes({"model": model.state_dict(), "optimizer": opt.state_dict(), "aalr": aalr.state_dict()})
    twin_model = make_model("cpu", seed=1)
    twin = factory(twin_model, backend)
    twin_aalr = AALR(twin_model, twin, initial_lr=0.1, patience=2)
    twin_model.load_state_dict(saved["model"])
    twin.load_state_dict(saved["optimizer"])
    twin_aalr.load_state_dict(saved["aalr"])
    assert twin_aalr.stats() == aalr.stats()
    for epoch in range(epochs, len(AALR_LOSSES)):
        aalr_epoch(model, opt, aalr, epoch)
        aalr_epoch(twin_model, twin, twin_aalr, epoch)
        assert_same_run(model, opt, twin_model, twin, f"epoch {epoch + 1}")
        assert_same_values(twin_aalr.state_dict(), aalr.state_dict(), f"epoch {epoch + 1}: AALR")
    assert aalr.restores >= 1  # the NaN epoch restored C, before or after the save
