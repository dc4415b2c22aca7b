"""The training examples (examples/imagenet.py, examples/cifar.py) train, log, checkpoint and resume exactly.

imagenet.py runs under ``torchrun`` (``python -m torch.distributed.run``, 2 processes, Gloo, CPU) on a tiny
ImageFolder written here; cifar.py runs in this process on synthetic data, once per method. Resumed runs
are compared with uninterrupted ones for equality, not closeness: on one machine with the same number of
processes every operation is deterministic (2-rank Gloo all-reduces add two numbers, which commutes
exactly), so any difference would be a lost piece of state.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))
import _common  # noqa: E402

try:
    _common.import_torchvision()
except Exception as error:  # whatever stops the import, the examples cannot run here
    pytest.skip(f"torchvision is not importable: {type(error).__name__}: {error}", allow_module_level=True)

# Wall-clock time differs between runs by nature; every other field must match.
UNSTABLE_FIELDS = {"epoch_seconds"}


def load_example(name: str) -> ModuleType:
    """An example script as a module (its ``main(argv)`` runs a training in this process)."""
    spec = importlib.util.spec_from_file_location(f"autolr_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_metrics(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def canonical(records: list[dict[str, Any]]) -> list[str]:
    """Records as comparable strings: NaN (AutoDrop's angle before two epochs) equals NaN here."""
    return [json.dumps(r, sort_keys=True) for r in records]


def epoch_records(records: list[dict[str, Any]], epoch: int | None = None) -> list[dict[str, Any]]:
    return [
        {k: v for k, v in r.items() if k not in UNSTABLE_FIELDS}
        for r in records
        if r["kind"] == "epoch" and (epoch is None or r["epoch"] == epoch)
    ]


def step_records(records: list[dict[str, Any]], epoch: int | None = None) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == "step" and (epoch is None or r["epoch"] == epoch)]


def assert_same_tensors(a: Any, b: Any, where: str = "") -> None:
    """``a`` and ``b`` (nested dicts/lists of tensors and numbers) are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# ------------------------------------------------------------------------------------- imagenet.py, DDP
@pytest.fixture(scope="module")
def tiny_imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes of 32x32 PNGs, 8 per class for training and 2 for validation, coloured by class."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tiny_imagenet")
    gen = torch.Generator().manual_seed(0)
    for split, per_class in (("train", 8), ("val", 2)):
        for c in range(3):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = torch.randn(32, 32, 3, generator=gen) * 40
                image[..., c] += 160
                pixels = image.clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def torchrun(script: str, args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    """Run an example under ``python -m torch.distributed.run`` on the CPU; fail with its output if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(EXAMPLES / script),
        *args,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{' '.join(command)}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def ddp_runs(tiny_imagefolder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two epochs of window-mode TLR (its lr changes at every step here) on 2 ranks; then epoch 2 again,
    resumed from the first run's epoch-1 checkpoint in fresh processes."""
    common = [
        "--data",
        str(tiny_imagefolder),
        "--arch",
        "resnet18",
        "--image-size",
        "32",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--workers",
        "1",
        "--optimizer",
        "tlr",
        "--lr",
        "0.02",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--seed",
        "3",
    ]
    full = tmp_path_factory.mktemp("imagenet_full")
    resumed = tmp_path_factory.mktemp("imagenet_resumed")
    torchrun("imagenet.py", [*common, "--out", str(full), "--keep-checkpoints"])
    torchrun("imagenet.py", [*common, "--out", str(resumed), "--resume", str(full / "checkpoint-epoch1.pt")])
    return {"full": full, "resumed": resumed}


def test_imagenet_ddp_trains_two_epochs_and_checkpoints(ddp_runs: dict[str, Path]) -> None:
    full = ddp_runs["full"]
    epochs = epoch_records(read_metrics(full))
    assert [r["epoch"] for r in epochs] == [1, 2]
    for record in epochs:
        for key in ("train_loss", "val_loss", "lr"):
            assert math.isfinite(record[key]), (key, record)
        assert 0.0 <= record["val_acc1"] <= 1.0
    checkpoint = _common.load_checkpoint(full / "checkpoint.pt", torch.device("cpu"))
    assert checkpoint["epoch"] == 2 and checkpoint["step"] == 6  # 24 images / global batch 8 = 3 steps per epoch
    assert checkpoint["method"] == "tlr" and checkpoint["world_size"] == 2 and len(checkpoint["rng"]) == 2
    assert (full / "checkpoint-epoch1.pt").is_file()


def test_imagenet_ddp_ranks_hold_the_same_lr_at_every_logged_step(ddp_runs: dict[str, Path]) -> None:
    records = read_metrics(ddp_runs["full"])
    steps = step_records(records)
    assert [r["step"] for r in steps] == list(range(1, 7))
    for record in steps + epoch_records(records):
        assert len(record["lr_per_rank"]) == 2
        assert len(set(record["lr_per_rank"])) == 1, record
        assert len(set(record["lr_min_per_rank"])) == 1, record
        assert record["lr"] == record["lr_per_rank"][0]
    # The check has teeth: TLR adapted the lr step after step, on both ranks alike.
    assert len({r["lr"] for r in steps}) >= 4


def test_imagenet_ddp_resume_continues_exactly(ddp_runs: dict[str, Path]) -> None:
    full, resumed = read_metrics(ddp_runs["full"]), read_metrics(ddp_runs["resumed"])
    assert epoch_records(resumed, 1) == [] and step_records(resumed, 1) == []  # epoch 1 was not rerun
    assert canonical(epoch_records(resumed, 2)) == canonical(epoch_records(full, 2))
    assert canonical(step_records(resumed, 2)) == canonical(step_records(full, 2))
    a = _common.load_checkpoint(ddp_runs["full"] / "checkpoint.pt", torch.device("cpu"))
    b = _common.load_checkpoint(ddp_runs["resumed"] / "checkpoint.pt", torch.device("cpu"))
    for key in ("epoch", "step", "model", "optimizer", "rng"):
        assert_same_tensors(a[key], b[key], key)


# ------------------------------------------------------------------------------- cifar.py, in process
@pytest.fixture
def restore_rng() -> Iterator[None]:
    """The examples seed the global generators: give the rest of the suite its state back.

    Also trains on one thread: tiny models gain nothing from two, and on a loaded machine spinning OpenMP
    threads make them several times slower.
    """
    state = _common.rng_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    _common.set_rng_state(state)
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", _common.METHODS)
def test_cifar_synthetic_every_method_trains_and_resumes_exactly(method: str, tmp_path: Path, restore_rng) -> None:
    """Each method through cifar.py: two epochs on random data with a tiny WRN, then epoch 2 again from the
    epoch-1 checkpoint (optimizer state, SGD's MultiStepLR, AALR's controller and checkpoints, RNG)."""
    cifar = load_example("cifar")
    argv = [
        "--synthetic",
        "48",
        "--arch",
        "wrn",
        "--depth",
        "10",
        "--width",
        "1",
        "--epochs",
        "2",
        "--batch-size",
        "16",
        "--workers",
        "0",
        "--optimizer",
        method,
        "--log-every",
        "1",
        "--device",
        "cpu",
    ]
    cifar.main([*argv, "--out", str(tmp_path / "full"), "--keep-checkpoints"])
    cifar.main([*argv, "--out", str(tmp_path / "resumed"), "--resume", str(tmp_path / "full" / "checkpoint-epoch1.pt")])
    full, resumed = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "resumed")
    assert [r["epoch"] for r in epoch_records(full)] == [1, 2]
    for record in epoch_records(full):
        assert math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"]), record
        assert record["step"] == 3 * record["epoch"]  # 48 images / batch 16
    assert canonical(epoch_records(resumed)) == canonical(epoch_records(full, 2))
    assert canonical(step_records(resumed)) == canonical(step_records(full, 2))


def test_cifar_reads_a_local_copy_without_downloading(tmp_path: Path, monkeypatch, restore_rng) -> None:
    """--data reads torchvision's CIFAR-10 layout (download=False); here a small stand-in copy whose checksums
    cannot match the real files', so the checksum test is switched off. Also runs bf16 autocast on the CPU."""
    import pickle

    torchvision = _common.import_torchvision()
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            "data": torch.randint(0, 256, (8, 3 * 32 * 32), dtype=torch.uint8, generator=gen).numpy(),
            "labels": torch.randint(0, 10, (8,), generator=gen).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"class{i}" for i in range(10)]}))

    cifar = load_example("cifar")
    argv = ["--arch", "wrn", "--depth", "10", "--width", "1", "--epochs", "1", "--batch-size", "16", "--workers", "0"]
    argv += ["--optimizer", "sgd", "--device", "cpu", "--amp", "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="never downloads"):
        cifar.main([*argv, "--data", str(tmp_path / "empty")])
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    cifar.main([*argv, "--data", str(tmp_path / "cifar")])
    (record,) = epoch_records(read_metrics(tmp_path / "out"))
    assert record["step"] == 2  # 40 training images / batch 16, the last partial batch dropped
    assert math.isfinite(record["train_loss"]) and math.isfinite(record["val_loss"])


def test_cifar_resnet_has_the_cifar_stem(restore_rng) -> None:
    cifar = load_example("cifar")
    model = cifar.cifar_resnet("resnet18", num_classes=10)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    wrn = cifar.WideResNet(depth=28, width=10, num_classes=100)
    assert sum(p.numel() for p in wrn.parameters()) == pytest.approx(36.5e6, rel=0.01)  # WRN-28-10's 36.5M


def test_every_method_has_a_setting_in_both_scripts() -> None:
    for name in ("imagenet", "cifar"):
        module = load_example(name)
        assert set(module.SETTINGS) == set(_common.METHODS), name
        for method in _common.METHODS:
            assert method in module.__doc__, (name, method)  # the docstring table documents it
