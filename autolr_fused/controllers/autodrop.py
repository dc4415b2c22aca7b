"""AutoDrop's epoch-level decision (paper: autodrop.txt, Algorithm 1).

At the end of epoch e, with ``s_e = x_e - x_{e-1}`` the displacement of the
whole parameter vector over the epoch:

    w_e = degrees(arccos(clamp(<s_e, s_{e-1}> / (||s_e|| ||s_{e-1}|| + 1e-12), -1, 1)))

and ``a_e`` the mean of the last W angles (W = ``angle_window``). When no drop
is pending, e >= 3 and ``|a_e - a_{e-1}| < theta``, a drop becomes pending with
k = 0, z = 0 (it latches: the trigger is not tested again while pending). While
pending, at the end of every epoch, the triggering one included:
``k += 1; z += k * x_e``; when ``k >= n_d`` the parameters become
``z / (n_d (n_d + 1) / 2)``, every lr becomes ``max(min_lr, rho * lr)`` and
``theta = min(max_threshold, theta / rho)``.

This module is pure host-side logic on three scalars per epoch; the optimizer
measures them and applies the decision to parameter memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def angle_degrees(dot: float, sq_norm: float, sq_norm_prev: float) -> float:
    """The angle between consecutive displacements, in degrees, as the spec defines it."""
    cosine = dot / (math.sqrt(max(sq_norm, 0.0)) * math.sqrt(max(sq_norm_prev, 0.0)) + 1e-12)
    if math.isnan(cosine):
        return math.nan
    return math.degrees(math.acos(min(1.0, max(-1.0, cosine))))


@dataclass
class EpochDecision:
    """What the optimizer does to parameter memory at this epoch end."""

    accumulate_weight: int  # k if the average z accumulates k * x_e this epoch, else 0
    drop: bool  # replace the parameters by the average and drop the lr


def initial_state(threshold: float) -> dict[str, Any]:
    return {
        "epoch": 0,  # completed epochs e
        "step_in_epoch": 0,
        "theta": threshold,
        "drop_pending": False,
        "k": 0,
        "drops": 0,
        "angle": math.nan,  # w_e, last measured
        "angle_mean": math.nan,  # a_e
        "recent_angles": [],  # the last W angles
    }


def end_epoch(
    state: dict[str, Any],
    dot: float,
    sq_norm: float,
    sq_norm_prev: float | None,
    *,
    angle_window: int,
    drop_delay: int,
    drop_factor: float,
    max_threshold: float,
) -> EpochDecision:
    """Advance the controller by one epoch; ``sq_norm_prev`` is None before s_{e-1} exists."""
    state["epoch"] += 1
    if sq_norm_prev is not None:
        angle = angle_degrees(dot, sq_norm, sq_norm_prev)
        recent = (state["recent_angles"] + [angle])[-angle_window:]
        mean = sum(recent) / len(recent)
        previous_mean = state["angle_mean"]
        state.update(angle=angle, recent_angles=recent, angle_mean=mean)
        saturated = abs(mean - previous_mean) < state["theta"]  # False while either is NaN
        if not state["drop_pending"] and state["epoch"] >= 3 and saturated:
            state.update(drop_pending=True, k=0)
    if not state["drop_pending"]:
        return EpochDecision(accumulate_weight=0, drop=False)
    state["k"] += 1
    weight = state["k"]
    drop = weight >= drop_delay
    if drop:
        state["theta"] = min(max_threshold, state["theta"] / drop_factor)
        state["drop_pending"] = False
        state["drops"] += 1
    return EpochDecision(accumulate_weight=weight, drop=drop)
