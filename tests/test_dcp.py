"""Checkpoints through torch.distributed.checkpoint's state_dict helpers, in one process.

``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` keep only ``state`` and
``param_groups``, so the controller state travels in ``param_groups[0]["autolr_fused"]``;
on an optimizer whose state is empty they take a zero-lr step to create it, which must
change nothing; and ``dcp.load`` loads only the keys its template (a fresh optimizer's
``get_optimizer_state_dict``) has. Every case of ``tests/test_resume.py``, saved before
the first step and at each of its save points, must continue bit for bit like the
uninterrupted run, through each route. The sharded (FSDP2) versions run in
``tests/test_distributed.py``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

if not torch.distributed.is_available():
    pytest.skip("this torch build has no torch.distributed", allow_module_level=True)

import torch.distributed.checkpoint as dcp  # noqa: E402
from test_resume import BACKENDS, CASES, DEVICE, assert_same_run, make_model, through_bytes, train_step
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from autolr_fused import FusedAutoDropSGD, FusedTLR

CPU_BACKENDS = [b for b in BACKENDS if DEVICE[b] == "cpu"]
POINTS = [(name, k) for name, (_, _, points) in CASES.items() for k in (0, *points)]


def trained(factory, backend: str, k: int, seed: int = 0):
    model = make_model(DEVICE[backend], seed)
    opt = factory(model, backend)
    for step in range(k):
        train_step(model, opt, step)
    return model, opt


def fresh_copy(factory, backend: str, model):
    """Another model (other initial weights, then the same values) and a new optimizer on it."""
    twin_model = make_model(DEVICE[backend], seed=1)
    twin_model.load_state_dict(model.state_dict())
    return twin_model, factory(twin_model, backend)


def quiet_dcp(call, *args, **kwargs):
    with warnings.catch_warnings():  # "no process group: saving/loading as a single process"
        warnings.simplefilter("ignore", UserWarning)
        return call(*args, **kwargs)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case, k", POINTS, ids=[f"{n}-at{k}" for n, k in POINTS])
def test_state_dict_helpers_and_dcp_resume_bit_identically(case, k, backend, tmp_path: Path):
    factory, total, _ = CASES[case]
    reference_model, reference = trained(factory, backend, k)  # never meets the helpers
    model, opt = trained(factory, backend, k)
    before = [p.detach().clone() for p in model.parameters()]
    saved = through_bytes(get_optimizer_state_dict(model, opt))
    # Taking a state_dict changes nothing: the helpers' state-creating step (k = 0) leaves parameters alone.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

    helper_model, helper = fresh_copy(factory, backend, model)
    set_optimizer_state_dict(helper_model, helper, saved)

    # The usual resume with dcp: the template is a fresh optimizer's get_optimizer_state_dict.
    quiet_dcp(dcp.save, {"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=tmp_path)
    dcp_model, from_dcp = fresh_copy(factory, backend, model)
    target = {"optimizer": get_optimizer_state_dict(dcp_model, from_dcp)}
    quiet_dcp(dcp.load, target, checkpoint_id=tmp_path)
    set_optimizer_state_dict(dcp_model, from_dcp, target["optimizer"])

    runs = {"original": (model, opt), "set_optimizer_state_dict": (helper_model, helper), "dcp": (dcp_model, from_dcp)}
    for step in range(k, total):
        train_step(reference_model, reference, step)
        for route, (m, o) in runs.items():
            train_step(m, o, step)
            assert_same_run(reference_model, reference, m, o, f"{route}, step {step + 1} (saved at {k})")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_full_state_dict_on_cpu_round_trips(backend):
    """full_state_dict=True and cpu_offload=True (what rank 0 saves with torch.save) load back exactly."""
    factory, total, (k, *_) = CASES["autodrop"]
    reference_model, reference = trained(factory, backend, k)
    model, opt = trained(factory, backend, k)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    saved = through_bytes(get_optimizer_state_dict(model, opt, options=options))
    twin_model, twin = fresh_copy(factory, backend, model)
    set_optimizer_state_dict(twin_model, twin, saved, options=StateDictOptions(full_state_dict=True))
    for step in range(k, total):
        train_step(reference_model, reference, step)
        train_step(twin_model, twin, step)
        assert_same_run(reference_model, reference, twin_model, twin, f"step {step + 1}")


def test_the_helpers_state_dict_has_every_key_the_optimizer_can_grow():
    """AutoDrop's displacement and drop average exist only later; the template holds them already (as zeros)."""
    factory = CASES["autodrop"][0]
    model, opt = trained(factory, "reference", 0)
    template = get_optimizer_state_dict(model, opt)
    assert opt._template_state and not opt.stats()["epoch"]
    for state in template["state"].values():
        assert {"snapshot", "prev_displacement", "average"} <= set(state)
        assert not state["prev_displacement"].any() and state["average"].dtype == torch.float32
    # optimizer.state_dict() itself lists only what exists
    assert all("average" not in state for state in opt.state_dict()["state"].values())


def test_a_template_that_lacks_saved_state_is_refused(tmp_path: Path):
    """dcp.load into a state_dict without a key the checkpoint has leaves it out: load_state_dict says so."""
    factory = CASES["autodrop"][0]
    model, opt = trained(factory, "reference", 6)  # the drop is pending: every tensor has an average
    quiet_dcp(dcp.save, {"optimizer": opt.state_dict()}, checkpoint_id=tmp_path)
    other_model, other = trained(factory, "reference", 1)  # no displacement, no average yet
    target = {"optimizer": other.state_dict()}
    quiet_dcp(dcp.load, target, checkpoint_id=tmp_path)
    before = other.state_dict()
    with pytest.raises(ValueError, match="lacks the state"):
        other.load_state_dict(target["optimizer"])
    assert repr(other.state_dict()) == repr(before)


def test_a_flattened_state_dict_is_refused_with_the_reason():
    """flatten_optimizer_state_dict keeps only the keys of the live param groups: the entry is lost."""
    model, opt = trained(CASES["tlr_step"][0], "reference", 2)
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    saved = get_optimizer_state_dict(model, opt, options=options)
    twin_model, twin = fresh_copy(CASES["tlr_step"][0], "reference", model)
    with pytest.raises(ValueError, match="flatten_optimizer_state_dict"):
        set_optimizer_state_dict(twin_model, twin, saved, options=options)


def test_the_entry_is_plain_json_and_loads_with_weights_only():
    model = make_model("cpu")
    opt = FusedTLR(model.parameters(), lr=0.05, steps_per_epoch=4)
    for step in range(5):
        train_step(model, opt, step)
    entry = opt.state_dict()["param_groups"][0]["autolr_fused"]
    assert isinstance(entry, str)
    assert json.loads(entry)["controller"] == {"step": 5, "step_in_window": 0, "windows": 5}  # windows of 1 step
    twin = FusedTLR(make_model("cpu", 1).parameters(), lr=0.05, steps_per_epoch=4)
    twin.load_state_dict(through_bytes(opt.state_dict()))
    assert twin.stats() == opt.stats()


def test_a_corrupt_entry_is_refused_before_anything_changes():
    model, opt = trained(CASES["autodrop"][0], "reference", 3)
    for bad in ("not json", "{}", 3):
        sd = opt.state_dict()
        sd["param_groups"][0]["autolr_fused"] = bad
        twin = FusedAutoDropSGD(make_model("cpu", 1).parameters(), lr=0.1, steps_per_epoch=2)
        with pytest.raises(ValueError, match="autolr_fused"):
            twin.load_state_dict(sd)
        assert not twin.state and twin.stats()["epoch"] == 0
