"""Evidence that each method behaves as its paper says (issue #6), through the public API.

The experiments live in ``autolr_fused.validation``; their criteria were fixed from the papers' wording
before measuring (see each module's docstring). Fast tests run reduced sizes in CI; ``-m slow`` runs the
full protocols, the same ones ``python -m autolr_fused.validation --out docs`` reports.

A claim that did not reproduce at full size is kept as a strict xfail that asserts the claim: it
documents the measured numbers, and it fails loudly (XPASS) the day the claim starts to hold.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("sklearn")

from autolr_fused.validation import aalr, autodrop, rdbd, sgdl, tlr  # noqa: E402
from autolr_fused.validation.common import single_thread  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # One thread: faster for these small models on a shared CPU, and the chaotic CNN runs stay
    # bit-for-bit the runs the report shows (the thread count changes float reductions).
    with single_thread():
        yield


# ------------------------------------------------------------------------------ AutoDrop, NQM (fast)
@pytest.mark.parametrize("lr", autodrop.NQM_LRS)
def test_nqm_angle_matches_theorem1(lr):
    """autodrop.txt Theorem 1: the steady-state angle between consecutive GD steps, via stats()['angle']."""
    (check,) = autodrop.nqm_angle_check(lrs=[lr], steps=3000, burn_in=1000)
    # The tolerance is 1 degree. Measured offsets are -0.04..-0.11 deg (the theorem's two
    # approximations) and the standard error of a 2000-step mean is ~0.1 deg, so 1 degree leaves ~8 SE.
    assert abs(check.error) <= autodrop.ANGLE_TOLERANCE_DEG, check
    assert check.sem < 0.3, check  # the comparison is only meaningful if the mean is this well determined


def test_nqm_angle_drop_ends_at_small_lr_floor():
    """autodrop.txt Figure 3: halving on 20-step-mean saturation takes 0.06 to 0.001 and its loss floor."""
    check, run = autodrop.nqm_drop_check(steps=5000, tail=2000, seed=0)
    # 0.06 / 2^6 < 0.001: six lr changes, the last clamped at min_lr (later triggers leave the lr there).
    assert check.final_lr == 0.001 and len(check.drop_steps) == 6, check
    # Within 10% of the Theorem-1 floor at lr 0.001 (101.8): five seeds measured 1.01..1.04 x the floor; a
    # 2000-step mean of a loss whose per-step sd is ~13% and correlation time ~50 steps has ~2% noise.
    # The floor at the starting lr is 118x higher, so the test separates the two clearly.
    assert abs(check.final_loss / check.floor_min_lr - 1) <= autodrop.FLOOR_TOLERANCE, check


# ------------------------------------------------------------------------------ AutoDrop, NQM (slow)
@pytest.mark.slow
def test_nqm_full_protocol():
    """The report's sizes: 20000 steps per lr, three seeds for the drop run."""
    for check in autodrop.nqm_angle_check():
        assert abs(check.error) <= autodrop.ANGLE_TOLERANCE_DEG, check  # measured: |error| <= 0.11 deg
        assert abs(check.measured_loss / check.loss_floor - 1) <= 0.05, check  # stationary floor, measured < 2%
    for seed in (0, 1, 2):
        check, _ = autodrop.nqm_drop_check(seed=seed)
        assert check.reproduced, check  # measured: within 2.5% of the floor


# ----------------------------------------------------------------------------- AutoDrop, CNN (slow)
@pytest.fixture(scope="module")
def figure2():
    return autodrop.figure2_check()


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="not reproduced on the digits CNN: the angle climbs for 5-10 epochs, then falls back at lrs >= 0.03 "
    "(training loss ~0) and still drifts up at 0.01 and 0.003 after 60 epochs (docs/validation.md)",
)
def test_cnn_angle_rises_and_saturates(figure2):
    """autodrop.txt Figure 2 (P1): at a constant lr the epoch angle rises, then saturates."""
    assert all(c.rises and c.saturates for c in figure2), [(c.lr, c.rise, c.q3, c.q4) for c in figure2]


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="not reproduced: by epoch 30 the angle at lr 0.1 has already fallen to ~18 deg, the x0.2 drop "
    "shows no dip beyond the noise (docs/validation.md)",
)
def test_cnn_angle_resets_after_a_drop():
    """autodrop.txt abstract: after a drop the angle 'resets' and increases again."""
    check = autodrop.reset_check()
    assert check.reproduced, (check.before, check.dip, check.after, check.margin)


# -------------------------------------------------------------------------------------------- TLR
def test_tlr_window_factor_follows_spec_in_the_validation_run():
    """The TLR protocol's optimizer does what algorithms.md says, recomputed from the parameters.

    This pins the package side of the TLR finding (docs/validation.md): the lr climb in the MLP runs is
    the specified rule at work, not a slip in FusedTLR.
    """
    trace = tlr.factor_trace(epochs=10)
    assert trace.window == 4 and len(trace.factors) > 20
    # float32 parameters: the recomputation in float64 from rounded parameters agrees to ~1e-7;
    # 1e-5 would still catch any factor computed from the wrong windows (those differ by > 1e-2).
    assert trace.max_deviation < 1e-5, trace.max_deviation
    assert np.nanmax(trace.factors) <= 1 + 0.25 + 1e-6  # the bound c holds


@pytest.fixture(scope="module")
def tlr_grid():
    return tlr.robustness_check()


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="not reproduced: with momentum 0.8 and 4-step windows TLR's lr climbs to 60-1400 and every run "
    "diverges (NaN) (docs/validation.md)",
)
def test_tlr_spread_over_initial_lr_much_smaller_than_sgd(tlr_grid):
    """trainable_learning_rate.txt Section 5: robustness to the initial lr, for every batch size."""
    assert all(c.reproduced for c in tlr_grid), [(c.batch_size, c.tlr_spread, c.sgd_spread) for c in tlr_grid]


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="not reproduced: the lr rises but does not decay (docs/validation.md)"
)
def test_tlr_lr_rises_then_decays(tlr_grid):
    """trainable_learning_rate.txt Section 5: the lr first increases, then decreases."""
    runs = [r for c in tlr_grid for r in c.tlr]
    assert all(r.lr_rises and r.lr_decays for r in runs), [(r.batch_size, r.lr0, r.lr_peak, r.lrs[-1]) for r in runs]


# ------------------------------------------------------------------------------------------- RDBD
def test_rdbd_early_loss_below_sgd():
    """rdbd.txt Section 5.1: RDBD's early training loss is below SGD's (paired over seeds)."""
    runs = rdbd.early_loss_check(methods=("sgd", "rdbd"), steps=250, seeds=(0, 1, 2))
    comparison = rdbd.compare(runs, "rdbd", "sgd")
    # Pre-registered: positive mean paired difference at >= 2 standard errors. Measured at this size
    # and at 3750 steps: differences 0.4-1.4 nats with t > 50, so the 2-SE bar is far from binding.
    assert comparison.reproduced, comparison


@pytest.fixture(scope="module")
def rdbd_runs():
    return rdbd.early_loss_check()


@pytest.mark.slow
def test_rdbd_early_loss_below_sgd_full(rdbd_runs):
    assert rdbd.compare(rdbd_runs, "rdbd", "sgd").reproduced  # measured: +0.40, t = 57


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="not reproduced: RDBD and plain DBD train alike, DBD marginally lower (-0.004, t = -2.1)",
)
def test_rdbd_early_loss_below_dbd(rdbd_runs):
    """rdbd.txt Section 5.2: the regret step lowers the early loss below plain delta-bar-delta's."""
    assert rdbd.compare(rdbd_runs, "rdbd", "dbd").reproduced, rdbd.compare(rdbd_runs, "rdbd", "dbd")


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="not reproduced: with eta = 5e-7 Adam+RDBD's lrs jump by ~1e-2 per step; its mean loss is ~0.4 "
    "against Adam's ~0.04, bounded or not",
)
def test_rdbd_adam_early_loss_below_adam(rdbd_runs):
    """rdbd.txt Section 5.1: Adam+RDBD's early training loss is below Adam's."""
    for variant in ("rdbd_adam", "rdbd_adam_bounded"):
        comparison = rdbd.compare(rdbd_runs, variant, "adam")
        assert comparison.reproduced, comparison


# ------------------------------------------------------------------------------------------- AALR
@pytest.fixture(scope="module")
def aalr_seed0():
    # Seed 0 of the report's three; seed 2 fails "then trains" at full size (see test_aalr_trains_full):
    # this fast test pins the recovery mechanics, the slow ones carry the verdict over all seeds.
    return aalr.divergence_recovery(epochs=60, seed=0, baseline=False)


def test_aalr_recovers_from_a_diverging_lr(aalr_seed0):
    """aalr.txt Section 4: from an lr whose first epoch is NaN, AALR restores, halves and trains."""
    run = aalr_seed0
    assert run.diverged_first  # the premise: lr 1e4 is NaN after one epoch
    assert run.nan_restores >= 1 and run.recovers, run.lrs_used
    # lr 1e4 halves to ~1 in ~13 NaN/explosion epochs; 60 epochs leave phase 2 > 20 epochs to settle.
    # Pre-registered bars: final J <= 10% of J(theta_0) (measured ~0.7%) and >= 90% test accuracy
    # (measured ~96%; the same net reaches ~98% at lr 0.1).
    assert run.trains, (run.final_loss, run.initial_loss, run.test_accuracy)


def test_aalr_phase2_doubles_only_on_improvement(aalr_seed0):
    """aalr.txt Algorithm 1, lines 24-26: in phase 2 the lr doubles when the loss beats L*."""
    run = aalr_seed0
    doublings = run.phase2_doublings()
    assert doublings and all(improved for _, improved in doublings), doublings
    assert run.doubles_on_improvement  # and the lr climbs above the one phase 1 settled on


@pytest.fixture(scope="module")
def aalr_runs():
    return aalr.recovery_check()


@pytest.mark.slow
def test_aalr_recovers_full(aalr_runs):
    """Every seed from lr 1e4 goes NaN, restores and reaches phase 2 with a finite loss (measured: 3 of 3)."""
    for run in aalr_runs[aalr.DIVERGING_LR]:
        assert run.diverged_first and run.recovers, (run.seed, run.lrs_used)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="partly reproduced: seed 2 trains, then a phase-2 doubling explodes the loss without NaN, which "
    "Algorithm 1 never restores; it ends at ~40% test accuracy",
)
def test_aalr_trains_full(aalr_runs):
    for run in aalr_runs[aalr.DIVERGING_LR]:
        assert run.trains, (run.seed, run.final_loss, run.test_accuracy)


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="partly reproduced: from lr 10, seed 0's loss never beats L* in phase 2, so it never doubles",
)
def test_aalr_phase2_doubles_full(aalr_runs):
    for runs in aalr_runs.values():
        for run in runs:
            assert run.doubles_on_improvement, (run.initial_lr, run.seed, run.phase2_doublings())


# ------------------------------------------------------------------------------------------- SGDL
def test_sgdl_is_the_papers_recipe():
    """FusedSGDL's defaults are the paper's recipe: it trains exactly as torch.optim.SGD(lr=1.0,
    weight_decay=5e-3) with MultiStepLR x0.1 at 1/3 and 2/3 of the steps (so the SGDL outcome below is
    the recipe's, not the package's)."""
    # 3 epochs = 18 steps cross both milestones (steps 6 and 12). Same float32 operations in the same
    # order: any difference beyond rounding would mean a different update.
    assert sgdl.torch_equivalence(epochs=3, seed=0) <= 1e-5


@pytest.fixture(scope="module")
def sgdl_result():
    return sgdl.sgdl_check()


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="not reproduced: at lr 1.0 the digits CNN trains erratically; one seed of five collapses to chance",
)
def test_sgdl_trains_stably(sgdl_result):
    """sgdl_vanilla_sgd_large_lr.txt Section 7: SGDL converges smoothly."""
    assert sgdl_result.stable, [(r.seed, r.epoch_losses[0], r.epoch_losses[-1]) for r in sgdl_result.runs["sgdl"]]


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True,
    raises=AssertionError,
    reason="not reproduced: SGDL's mean test accuracy is ~73% against SGDM's ~98.5%",
)
def test_sgdl_accuracy_comparable_to_sgdm(sgdl_result):
    """sgdl_vanilla_sgd_large_lr.txt Figure 4: the same or better accuracy than momentum SGD at lr 0.1."""
    assert sgdl_result.comparable, (sgdl_result.mean_accuracy("sgdl"), sgdl_result.mean_accuracy("sgdm"))


# ----------------------------------------------------------------------------------------- report
def test_report_renders_rows_and_sections():
    from autolr_fused.validation.report import Row, Section, render

    section = Section("nqm", "A title", [Row("claim a | b", "1 deg", "1.1 deg", "yes", "`cmd`")], ["body line"])
    text = render([section], "quick", 61.0)
    assert "| claim | paper | measured | reproduced | command |" in text
    assert "## A title" in text and "body line" in text and "1.0 min" in text


def test_cli_rejects_unknown_sections(capsys):
    from autolr_fused.validation.__main__ import main

    with pytest.raises(SystemExit):
        main(["--only", "nonsense"])
    assert "unknown sections" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_quick_run_writes_report_and_figures(tmp_path):
    pytest.importorskip("matplotlib")
    from autolr_fused.validation.__main__ import main
    from autolr_fused.validation.report import SECTIONS

    assert main(["--out", str(tmp_path), "--size", "quick"]) == 0
    text = (tmp_path / "validation.md").read_text()
    for key in SECTIONS:
        assert f"--only {key}`" in text
    pngs = sorted(p.name for p in (tmp_path / "validation").glob("*.png"))
    assert len(pngs) == 7, pngs
    for png in pngs:
        assert (tmp_path / "validation" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_theorem1_formula_limits():
    """Theorem 1's formula: 90 deg as lr -> 0 and the paper's 120-deg bound (C* >= -lr max a / 2) for lr a <= 1."""
    a, sigma2 = autodrop.nqm_problem()
    assert autodrop.theorem1_angle(1e-9, a, sigma2) == pytest.approx(90.0, abs=1e-6)
    for lr in (0.001, 0.01, 0.03, 0.05):  # lr * max a <= 1: the proof's condition
        cosine = math.cos(math.radians(autodrop.theorem1_angle(lr, a, sigma2)))
        assert -lr * a.max() / 2 - 1e-12 <= cosine < 0
