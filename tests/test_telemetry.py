"""Telemetry: ``stats(per_tensor=True)`` and the ``StatsLogger`` helper (autolr_fused/telemetry.py).

Per-tensor lrs are checked exactly against where each optimizer keeps them (its group's
lr, or ``state[p]["lr"]``). AutoDrop's per-tensor angles are checked against the spec's
angle formula evaluated in float64 on the epoch-end parameters this test records itself.
The logger is checked end to end: a real ``SummaryWriter`` read back from disk, a
``logging`` capture, and the host-read guard of tests/test_api.py on the steps it must
not log.
"""

from __future__ import annotations

import logging
import math
from unittest import mock

import pytest
import torch
from test_api import _forbid_host_reads
from torch import nn

from autolr_fused import (
    AALR,
    FusedAutoDropSGD,
    FusedRDBD,
    FusedSGD,
    FusedSGDHD,
    FusedSGDL,
    FusedTLR,
    StatsLogger,
)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def two_groups(model: nn.Module, lr: float) -> list[dict]:
    return [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": lr / 4}]


OPTIMIZERS = {
    "FusedSGD": lambda m: FusedSGD(two_groups(m, 0.1), lr=0.1, momentum=0.9),
    "FusedSGDL": lambda m: FusedSGDL(two_groups(m, 0.1), lr=0.1, total_steps=4),
    "FusedAutoDropSGD": lambda m: FusedAutoDropSGD(two_groups(m, 0.1), lr=0.1, steps_per_epoch=2),
    "FusedTLR": lambda m: FusedTLR(two_groups(m, 0.1), lr=0.1, momentum=0.9),
    "FusedTLR-per_layer": lambda m: FusedTLR(two_groups(m, 0.1), lr=0.1, per_layer=True),
    "FusedRDBD-sgd": lambda m: FusedRDBD(two_groups(m, 0.05), lr=0.05, meta_lr=0.1),
    "FusedRDBD-adam": lambda m: FusedRDBD(two_groups(m, 0.05), base="adam", lr=0.05, meta_lr=1e-3),
    "FusedSGDHD": lambda m: FusedSGDHD(two_groups(m, 0.1), lr=0.1, hypergrad_lr=1e-2),
}


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


# ------------------------------------------------------------- stats(per_tensor=True)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_per_tensor_lrs_are_the_lrs_each_tensor_is_updated_with(name):
    model = make_model()
    opt = OPTIMIZERS[name](model)
    train(model, opt, range(5))
    stats = opt.stats(per_tensor=True)
    expected = {}
    for group in opt.param_groups:
        for p in group["params"]:
            own = opt.state[p].get("lr")
            expected[f"lr/{len(expected)}"] = float(own if own is not None else group["lr"])
    assert {k: v for k, v in stats.items() if k.startswith("lr/")} == expected
    assert all(type(v) is float for v in expected.values())
    # The summary entries are those of stats() and the per-tensor ones only come on request.
    summary = opt.stats()
    assert {k: stats[k] for k in summary} == summary
    assert not any("/" in k for k in summary)
    if name in ("FusedTLR-per_layer", "FusedRDBD-sgd"):  # a per-tensor method really gives different lrs
        assert len(set(expected.values())) > 2


def epoch_end_parameters(model, opt, steps: int) -> list[list[torch.Tensor]]:
    """x_e per tensor (float64) at every epoch end of a 1-step-epoch AutoDrop run, x_0 first."""
    xs = [[p.detach().double().clone() for p in model.parameters()]]
    for step in range(steps):
        train(model, opt, range(step, step + 1))
        xs.append([p.detach().double().clone() for p in model.parameters()])
    return xs


def spec_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    cosine = (a * b).sum() / (a.norm() * b.norm() + 1e-12)
    return math.degrees(math.acos(max(-1.0, min(1.0, cosine.item()))))


def test_autodrop_per_tensor_angles_follow_the_spec_formula_per_tensor():
    """Tolerance 1e-3 degrees: the optimizer's sums are float32 (relative error ~1e-6 in the cosine), and
    d(angle)/d(cos) = 1/sin(angle) turns that into ~1e-4 degrees for the angles of a few degrees seen here."""
    model = make_model()
    opt = FusedAutoDropSGD(model.parameters(), lr=0.1, momentum=0.5, steps_per_epoch=1, drop_delay=50)
    xs = epoch_end_parameters(model, opt, 4)
    stats = opt.stats(per_tensor=True)
    n = len(xs[0])
    for i in range(n):
        s_e, s_prev = xs[4][i] - xs[3][i], xs[3][i] - xs[2][i]
        assert stats[f"angle/{i}"] == pytest.approx(spec_angle(s_e, s_prev), abs=1e-3), i
    angles = [stats[f"angle/{i}"] for i in range(n)]
    assert max(angles) - min(angles) > 1.0  # the tensors really move differently: not one number repeated


def test_with_one_tensor_the_per_tensor_angle_is_the_global_angle_exactly():
    p = nn.Parameter(torch.randn(7, generator=torch.Generator().manual_seed(1)))
    opt = FusedAutoDropSGD([p], lr=0.1, steps_per_epoch=2)
    for step in range(6):
        p.grad = p.detach() + torch.randn(7, generator=torch.Generator().manual_seed(step))
        opt.step()
        stats = opt.stats(per_tensor=True)
        if math.isnan(stats["angle"]):
            assert math.isnan(stats["angle/0"])  # no angle before the second epoch end
        else:
            assert stats["angle/0"] == stats["angle"]
    assert stats["epoch"] == 3 and not math.isnan(stats["angle"])


def test_autodrop_per_tensor_angles_keep_parameter_order_when_a_tensor_starts_late():
    """At step 2 the first tensor gets its first gradient: its new momentum buffer puts it second in the
    step's rows, which must be put back in parameter order (same float32 tolerance as above)."""
    late, early = (nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(s))) for s in (5, 9))
    opt = FusedAutoDropSGD([late, early], lr=0.1, momentum=0.9, steps_per_epoch=1)
    xs = [[late.detach().double().clone(), early.detach().double().clone()]]
    for step in range(2):
        g = torch.Generator().manual_seed(10 + step)
        late.grad = None if step == 0 else torch.randn(5, generator=g)
        early.grad = torch.randn(9, generator=g)
        opt.step()
        xs.append([late.detach().double().clone(), early.detach().double().clone()])
    stats = opt.stats(per_tensor=True)
    assert stats["epoch"] == 2
    expected_early = spec_angle(xs[2][1] - xs[1][1], xs[1][1] - xs[0][1])
    assert stats["angle/1"] == pytest.approx(expected_early, abs=1e-3)
    # The late tensor did not move in epoch 1 (s_1 = 0): the formula's 1e-12 makes its cosine 0, i.e. 90 degrees.
    assert stats["angle/0"] == pytest.approx(90.0, abs=1e-9)


# ------------------------------------------------------------------------ StatsLogger
class FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag: str, scalar_value: float, global_step: int | None = None) -> None:
        self.scalars.append((tag, scalar_value, global_step))


def test_stats_logger_writes_every_nth_step_to_a_summary_writer(tmp_path):
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    model = make_model()
    opt = OPTIMIZERS["FusedTLR-per_layer"](model)
    writer = tensorboard.SummaryWriter(log_dir=str(tmp_path))
    stats_logger = StatsLogger(opt, every=3, writer=writer, names=model, per_tensor=True)
    stats_logger.attach()
    written = {}
    for step in range(1, 8):
        train(model, opt, range(step, step + 1))
        if step % 3 == 0:
            written[step] = opt.stats(per_tensor=True)
    writer.close()
    events = event_accumulator.EventAccumulator(str(tmp_path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"optimizer/lr", "optimizer/factor", "optimizer/lr/0.weight", "optimizer/lr/2.bias"} <= tags
    for tag in ("optimizer/lr", "optimizer/lr/0.weight", "optimizer/lr/2.bias"):
        key = tag.removeprefix("optimizer/")
        index = {"lr/0.weight": "lr/0", "lr/2.bias": "lr/3"}.get(key, key)
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        # TensorBoard stores float32: the written values are the stats rounded to float32.
        assert got == [(s, float(torch.tensor(written[s][index], dtype=torch.float32))) for s in (3, 6)], tag


def test_stats_logger_logs_one_line_every_nth_step(caplog):
    model = make_model()
    opt = OPTIMIZERS["FusedAutoDropSGD"](model)
    stats_logger = StatsLogger(opt, every=2, logger=logging.getLogger("train"), per_tensor=True, prefix="sgd")
    with caplog.at_level(logging.INFO, logger="train"):
        for step in range(5):
            train(model, opt, range(step, step + 1))
            stats_logger.step()
    lines = [r.getMessage() for r in caplog.records if r.name == "train"]
    assert len(lines) == 2
    assert lines[0].startswith("sgd step 2: lr=0.1 lr_min=0.025 lr_max=0.1 angle=nan")
    assert lines[1].startswith("sgd step 4: ") and " epoch=2 " in lines[1] and " angle/3=" in lines[1]


def test_stats_logger_reads_nothing_from_the_device_between_logged_steps():
    """The host-read guard of tests/test_api.py on steps 1-3 and 5-7; steps 4 and 8 log."""
    model = make_model()
    opt = OPTIMIZERS["FusedTLR"](model)
    writer = FakeWriter()
    handle = StatsLogger(opt, every=4, writer=writer, per_tensor=True).attach()
    train(model, opt, range(0, 1))  # state exists; this step is the logger's first
    patches = _forbid_host_reads()
    for step in range(1, 8):
        if step in (3, 7):  # the logger's 4th and 8th calls may read
            train(model, opt, range(step, step + 1))
            continue
        for p in patches:
            p.start()
        try:
            train(model, opt, range(step, step + 1))
        finally:
            for p in patches:
                p.stop()
    assert sorted({s for _, _, s in writer.scalars}) == [4, 8]
    handle.remove()
    train(model, opt, range(8, 12))
    assert max(s for _, _, s in writer.scalars) == 8  # detached: no more writes


def test_stats_logger_without_writer_or_logger_logs_to_the_package_logger(caplog):
    model = make_model()
    opt = OPTIMIZERS["FusedSGD"](model)
    stats_logger = StatsLogger(opt, every=1)
    with caplog.at_level(logging.INFO, logger="autolr_fused"):
        train(model, opt, range(1))
        assert stats_logger.step() == opt.stats()
    assert [r.name for r in caplog.records] == ["autolr_fused"]


def test_stats_logger_drives_an_aalr_controller_per_epoch():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    aalr = AALR(model, opt, patience=2)
    writer = FakeWriter()
    stats_logger = StatsLogger(aalr, every=1, writer=writer, prefix="aalr")
    for loss in (1.0, 0.5, 0.4):
        aalr.epoch_end(loss)
        stats_logger.step()
    assert [(v, s) for tag, v, s in writer.scalars if tag == "aalr/phase"] == [(1.0, 1), (2.0, 2), (2.0, 3)]


def test_stats_logger_step_count_can_continue_after_a_resume():
    model = make_model()
    opt = OPTIMIZERS["FusedSGD"](model)
    writer = FakeWriter()
    stats_logger = StatsLogger(opt, every=5, writer=writer)
    stats_logger.steps = 8  # resumed after step 8
    for _ in range(3):
        stats_logger.step()
    assert {s for _, _, s in writer.scalars} == {10}


BAD_LOGGER_ARGUMENTS = [
    pytest.param(lambda opt: StatsLogger(object()), TypeError, "optimizer", id="no-stats"),
    pytest.param(lambda opt: StatsLogger(opt, every=0), ValueError, "every", id="every-0"),
    pytest.param(lambda opt: StatsLogger(opt, every=2.5), TypeError, "every", id="every-float"),
    pytest.param(lambda opt: StatsLogger(opt, writer="runs/x"), TypeError, "writer", id="writer-path"),
    pytest.param(lambda opt: StatsLogger(opt, logger="train"), TypeError, "logger", id="logger-name"),
    pytest.param(lambda opt: StatsLogger(opt, names=3), TypeError, "names", id="names-int"),
    pytest.param(lambda opt: StatsLogger(opt, names=[torch.zeros(1)]), TypeError, "names", id="names-no-pairs"),
    pytest.param(
        lambda opt: StatsLogger(AALR(make_model(), opt), per_tensor=True),
        TypeError,
        "per_tensor",
        id="per_tensor-aalr",
    ),
]


@pytest.mark.parametrize("make, error, name", BAD_LOGGER_ARGUMENTS)
def test_stats_logger_bad_argument_raises_naming_it(make, error, name):
    opt = OPTIMIZERS["FusedSGD"](make_model())
    with pytest.raises(error, match=name):
        make(opt)


def test_stats_logger_attach_needs_a_torch_optimizer():
    model = make_model()
    aalr = AALR(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="attach"):
        StatsLogger(aalr).attach()


def test_stats_logger_skips_formatting_when_the_logger_is_disabled():
    """A logger above the level gets no line, so no string is built for it."""
    model = make_model()
    opt = OPTIMIZERS["FusedSGD"](model)
    quiet = logging.getLogger("quiet")
    quiet.setLevel(logging.WARNING)
    with mock.patch.object(quiet, "log") as log:
        StatsLogger(opt, every=1, logger=quiet).step()
    log.assert_not_called()
