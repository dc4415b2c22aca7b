"""Memory: the extra bytes each optimizer keeps per parameter, and no growth over many steps.

The extra memory is measured, not estimated: the bytes of every distinct storage behind
the tensors in ``optimizer.state`` (shared storages counted once: per-tensor scalars are
views of one vector), compared exactly with what the class docstrings, README.md and
docs/README.md state. The leak tests run thousands of steps of a few tiny tensors and
check that what the optimizer holds (state, last statistics, caches, lr tensors) and the
number of live tensor objects (``gc``) are the same after warm-up as at the end.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch
from test_backends import make_params
from torch import Tensor, nn

from autolr_fused import (
    AALR,
    FusedAutoDropSGD,
    FusedRDBD,
    FusedSGD,
    FusedSGDHD,
    FusedSGDL,
    FusedTLR,
)

# name -> (factory, extra memory as documented): (copies of the parameters in their dtype, float32 copies of the
# parameters, float32 scalars per tensor).
MEMORY = {
    "sgd": (lambda p: FusedSGD(p, lr=0.01), (0, 0, 0)),
    "sgd_momentum": (lambda p: FusedSGD(p, lr=0.01, momentum=0.9), (1, 0, 0)),  # momentum buffer
    "sgdl": (lambda p: FusedSGDL(p, lr=0.01, total_steps=100), (0, 0, 0)),
    # snapshot x_{e-1}, previous displacement s_{e-1}, momentum buffer (a float32 average only while pending)
    "autodrop": (lambda p: FusedAutoDropSGD(p, lr=0.01, steps_per_epoch=2), (3, 0, 0)),
    "tlr_step": (lambda p: FusedTLR(p, lr=0.01, momentum=0.9), (2, 0, 0)),  # previous gradient, momentum buffer
    "tlr_step_layer": (lambda p: FusedTLR(p, lr=0.01, per_layer=True), (1, 0, 1)),  # + its lr
    "tlr_window": (lambda p: FusedTLR(p, lr=0.01, momentum=0.9, steps_per_epoch=4), (3, 0, 0)),  # snapshot, u_{j-1}
    "tlr_window_layer": (lambda p: FusedTLR(p, lr=0.01, per_layer=True, steps_per_epoch=4), (2, 0, 1)),
    # With momentum and without nesterov the momentum buffer is the previous direction: only it is kept.
    # lr, previous h and previous delta per tensor
    "rdbd_sgd": (lambda p: FusedRDBD(p, lr=0.01, momentum=0.9), (1, 0, 3)),
    "rdbd_sgd_plain": (lambda p: FusedRDBD(p, lr=0.01), (1, 0, 3)),  # previous direction
    "rdbd_sgd_nesterov": (lambda p: FusedRDBD(p, lr=0.01, momentum=0.9, nesterov=True), (2, 0, 3)),  # + buffer
    "rdbd_adam": (lambda p: FusedRDBD(p, base="adam", lr=0.01, meta_lr=1e-6), (3, 0, 3)),  # + exp_avg, exp_avg_sq
    "sgdhd": (lambda p: FusedSGDHD(p, lr=0.01, momentum=0.9), (1, 0, 0)),  # the buffer is the previous direction
    "sgdhd_plain": (lambda p: FusedSGDHD(p, lr=0.01), (1, 0, 0)),  # previous direction
    "sgdhd_nesterov": (lambda p: FusedSGDHD(p, lr=0.01, momentum=0.9, nesterov=True), (2, 0, 0)),  # + buffer
}


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the distinct storages behind the tensors in ``opt.state``."""
    storages = {}
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, Tensor) and value.numel():
                storage = value.untyped_storage()
                storages[(storage.device, storage.data_ptr())] = storage.nbytes()
    return sum(storages.values())


def expected_bytes(params: list[Tensor], copies: int, float32_copies: int, scalars: int) -> int:
    elements = sum(p.numel() for p in params)
    return elements * (copies * params[0].element_size() + float32_copies * 4) + 4 * scalars * len(params)


def step_with_seeded_grads(opt: torch.optim.Optimizer, params: list[Tensor], steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(MEMORY))
def test_extra_memory_per_parameter_is_as_documented(name, dtype):
    """Odd shapes (a 0-element tensor, channels_last, a transposed view): state tensors keep the layout, not more."""
    factory, documented = MEMORY[name]
    params = make_params(dtype, "cpu")
    opt = factory(params)
    step_with_seeded_grads(opt, params, range(5))
    assert state_bytes(opt) == expected_bytes(params, *documented)


def test_autodrop_holds_a_float32_average_only_while_a_drop_is_pending():
    params = make_params(torch.bfloat16, "cpu")
    opt = FusedAutoDropSGD(params, lr=0.01, steps_per_epoch=1, threshold=90.0, max_threshold=180.0, drop_delay=2)
    seen = set()
    for step in range(8):
        step_with_seeded_grads(opt, params, range(step, step + 1))
        pending = opt.stats()["drop_pending"]
        seen.add(pending)
        assert state_bytes(opt) == expected_bytes(params, 3, 1 if pending else 0, 0), f"step {step + 1}"
    assert seen == {True, False} and opt.stats()["drops"] >= 2


# ------------------------------------------------------------------------------ leaks
# Configurations that cycle through every kind of step within a few steps (epoch and window ends, AutoDrop drops
# that keep coming, RDBD regrets), so that a short warm-up has seen every state the long run can be in.
LEAK_CASES = {
    "sgd_momentum": MEMORY["sgd_momentum"][0],
    "sgdl": lambda p: FusedSGDL(p, lr=0.01, total_steps=200),  # both milestones within the warm-up
    "autodrop": lambda p: FusedAutoDropSGD(
        p, lr=0.01, steps_per_epoch=2, threshold=90.0, max_threshold=180.0, drop_delay=2, angle_window=3
    ),
    "tlr_step": MEMORY["tlr_step"][0],
    "tlr_step_layer": MEMORY["tlr_step_layer"][0],
    "tlr_window": lambda p: FusedTLR(p, lr=0.01, momentum=0.9, steps_per_epoch=6, update_fraction=0.5),
    "tlr_window_layer": lambda p: FusedTLR(p, lr=0.01, per_layer=True, steps_per_epoch=6, update_fraction=0.5),
    # momentum makes consecutive directions agree, so the lr climbs: the bound keeps the run finite
    "rdbd_sgd": lambda p: FusedRDBD(p, lr=0.01, meta_lr=1e-2, momentum=0.9, lr_bounds=(0.0, 0.05)),
    "rdbd_adam": MEMORY["rdbd_adam"][0],
    "sgdhd": lambda p: FusedSGDHD(p, lr=0.01, momentum=0.9, hypergrad_lr=1e-3),
}
WARM_UP = 120  # a multiple of every cycle above (epochs of 2, windows of 3, AutoDrop's drop cycle of 2 epochs)


def held(opt: torch.optim.Optimizer) -> tuple[int, int, int]:
    """(tensors, bytes of their distinct storages, Python entries) the optimizer keeps between steps."""
    tensors = [v for state in opt.state.values() for v in state.values() if isinstance(v, Tensor)]
    tensors += list(opt._statistics.values())
    tensors += [] if opt._flat_cache is None else list(opt._flat_cache[1].values())
    tensors += [group["lr"] for group in opt.param_groups if isinstance(group["lr"], Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    entries = len(opt.state) + sum(len(v) if isinstance(v, list) else 1 for v in opt._controller.values())
    return len(tensors), sum(storages.values()), entries


def live_tensors() -> int:
    gc.collect()
    # type(), not isinstance(): isinstance reads __class__, which warns on some of torch's deprecated module objects
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), Tensor))


@pytest.fixture
def one_thread():
    """One intra-op thread: thousands of tiny steps are dominated by thread wake-ups on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class LeakRun:
    """One optimizer of ``LEAK_CASES`` on three tiny tensors, fed a fixed cycle of gradient tensors."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.params = [
            nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
            for i, s in enumerate([(3, 4), (5,), (2, 1, 3)])
        ]
        # A pull towards 0 plus a fixed cycle of noise, written into one gradient tensor per parameter: the
        # lrs meet a real problem (they neither run off nor collapse), and the test allocates nothing per step.
        self.noise = [
            [
                torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * k + i))
                for i, p in enumerate(self.params)
            ]
            for k in range(WARM_UP)
        ]
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.opt = LEAK_CASES[name](self.params)
        self.steps = 0

    def run(self, steps: int) -> set[tuple[int, int, int]]:
        """``steps`` steps; the set of what the optimizer held after each."""
        seen = set()
        for _ in range(steps):
            for p, g, noise in zip(self.params, self.grads, self.noise[self.steps % WARM_UP]):
                torch.add(noise, p.detach(), alpha=0.5, out=g)
                p.grad = g
            self.opt.step()
            self.steps += 1
            seen.add(held(self.opt))
        return seen


def run_without_growth(steps: int) -> None:
    """Every case: a warm-up of 2 cycles, then ``steps`` more (a whole number of cycles, so every run ends in the
    phase it started in). One count of live tensors before and after for all cases together: a full gc pass
    costs more than the steps."""
    runs = [LeakRun(name) for name in LEAK_CASES]
    warm = [run.run(2 * WARM_UP) for run in runs]
    before = live_tensors()
    later = [run.run(steps) for run in runs]
    after = live_tensors()
    for run, w, s in zip(runs, warm, later):
        assert s <= w, f"{run.name}: the optimizer holds more after warm-up: {sorted(s - w)} vs {sorted(w)}"
        assert all(math.isfinite(float(group["lr"])) for group in run.opt.param_groups), run.name
    assert after == before, f"{after - before} more live tensors after {steps} steps of every optimizer"


def test_hundreds_of_steps_hold_no_more_than_the_warm_up(one_thread):
    """600 steps of each optimizer after a warm-up of 240 (the 10,000-step run is the slow variant below)."""
    run_without_growth(5 * WARM_UP)


@pytest.mark.slow
def test_ten_thousand_steps_hold_no_more_than_the_warm_up(one_thread):
    run_without_growth(84 * WARM_UP)  # 10,080 steps of each optimizer


def test_aalr_checkpoints_are_replaced_not_accumulated(one_thread):
    """300 epochs with a save (improvement) or a restore (NaN) at almost every decision: same live tensors."""
    model = nn.Linear(4, 2)
    opt = FusedSGD(model.parameters(), lr=0.01, momentum=0.9)
    aalr = AALR(model, opt, initial_lr=0.01, patience=1)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))

    def epochs(start: int, stop: int) -> None:
        for epoch in range(start, stop):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
            aalr.epoch_end(float("nan") if epoch % 5 == 4 else 1.0 / (epoch + 1))

    epochs(0, 100)
    before, restores = live_tensors(), aalr.restores
    epochs(100, 400)
    assert live_tensors() == before
    assert aalr.restores - restores == 60  # every NaN epoch ended a wait of 1 and restored C
