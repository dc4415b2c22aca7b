"""Shared machinery of the training examples (``imagenet.py``, ``cifar.py``).

What lives here, so that the two scripts only define their data, models and paper settings:

* :func:`import_torchvision`: torchvision, also beside a CPU-only torch whose PyPI torchvision cannot load
  its C++ ops (the examples use only torchvision's pure-Python models, datasets and transforms);
* :class:`Setting` and :func:`build_optimizer`: one paper setting per method and the optimizer factory
  (``sgd``, ``sgdl``, ``autodrop``, ``tlr``, ``tlr-layer``, ``rdbd``, ``rdbd-adam``, ``sgdhd``, ``aalr``);
* :func:`setup_distributed`: ``torchrun`` DDP (NCCL on CUDA, Gloo on CPU) or a single process;
* checkpoints (model, optimizer, scheduler, AALR, epoch, step and every rank's RNG state) so that a resumed
  run continues exactly as the uninterrupted one;
* :class:`MetricsLog`: rank-0 console lines and a JSON-lines metrics file;
* :func:`run_training`: the epoch loop both scripts share (bf16 autocast, channels_last, DDP, evaluation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

import autolr_fused as alr

METHODS = ("sgd", "sgdl", "autodrop", "tlr", "tlr-layer", "rdbd", "rdbd-adam", "sgdhd", "aalr")
CHECKPOINT_FORMAT = 1
# The metrics records' own fields; an optimizer statistic of the same name is logged as optimizer_NAME.
RECORD_FIELDS = ("kind", "epoch", "step", "loss", "train_loss", "train_acc1", "next_lr", "epoch_seconds")

# Keeps the stand-in op definitions of import_torchvision alive: a dropped Library object unregisters them.
_TORCHVISION_STUB_LIBRARY: list[Any] = []


def import_torchvision() -> ModuleType:
    """Import torchvision; where its C++ ops cannot load, import its pure-Python parts all the same.

    PyPI's x86-64 torchvision wheels are CUDA builds: beside a CPU-only torch their ``_C`` extension fails to
    load, and torchvision 0.28 then stops at import with ``operator torchvision::nms does not exist`` because
    it registers fake kernels for ``nms``/``qnms`` unconditionally. Declaring those two schemas (no kernels)
    lets the import finish; the examples use only models, datasets and transforms, none of which needs the
    ops, and calling ``torchvision.ops.nms`` still fails loudly. A torchvision that imports is left alone.
    """
    try:
        import torchvision
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
        library = torch.library.Library("torchvision", "DEF")
        library.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        library.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_STUB_LIBRARY.append(library)
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        import torchvision
    import torchvision.datasets  # noqa: F401
    import torchvision.models  # noqa: F401
    import torchvision.transforms  # noqa: F401

    return torchvision


# ----------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """One method's hyperparameters on one benchmark (the scripts' docstrings say where each came from).

    ``batch_size`` is the global batch, split evenly over the processes. ``milestones`` are fractions of
    the epochs at which the lr is multiplied by ``gamma``: an epoch-level MultiStepLR for ``sgd``, the
    built-in step anneal for ``sgdl``; the other methods set their lr themselves. ``extra`` holds the
    method's own constructor arguments (``AALR``'s for ``aalr``).
    """

    lr: float
    batch_size: int
    epochs: int
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class OptimizerBundle:
    """The optimizer of a run and what drives its lr from outside (an epoch scheduler, the AALR controller)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    aalr: alr.AALR | None = None


def build_optimizer(
    method: str, model: nn.Module, setting: Setting, steps_per_epoch: int, epochs: int
) -> OptimizerBundle:
    """The optimizer for ``method`` with ``setting`` over ``model``'s parameters.

    ``steps_per_epoch`` (``len(train_loader)``) is AutoDrop's measurement interval and TLR's window base
    (window mode, Section 4 of the TLR paper); with ``epochs`` it gives SGDL's ``total_steps``. For
    ``aalr`` the model must be the one whose state AALR checkpoints (the module inside DDP, built after
    DDP has broadcast rank 0's parameters, so that every rank keeps the same initial checkpoint C0).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    params = list(model.parameters())
    s, extra = setting, dict(setting.extra)
    sgd = dict(lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=s.nesterov)
    if method == "sgd":
        optimizer = alr.FusedSGD(params, **sgd)
        scheduler = None
        if s.milestones:
            # Repeats stay: a short run then takes several drops at once rather than losing some.
            epochs_at = [max(1, round(m * epochs)) for m in s.milestones]
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=epochs_at, gamma=s.gamma)
        return OptimizerBundle(optimizer, scheduler=scheduler)
    if method == "sgdl":
        optimizer = alr.FusedSGDL(
            params, **sgd, total_steps=epochs * steps_per_epoch, milestones=s.milestones, gamma=s.gamma, **extra
        )
    elif method == "autodrop":
        optimizer = alr.FusedAutoDropSGD(params, **sgd, steps_per_epoch=steps_per_epoch, **extra)
    elif method in ("tlr", "tlr-layer"):
        optimizer = alr.FusedTLR(
            params, **sgd, per_layer=method == "tlr-layer", steps_per_epoch=steps_per_epoch, **extra
        )
    elif method in ("rdbd", "rdbd-adam"):
        if method == "rdbd":
            base = dict(base="sgd", momentum=s.momentum, nesterov=s.nesterov)
        else:
            base = dict(base="adam")
        optimizer = alr.FusedRDBD(params, lr=s.lr, weight_decay=s.weight_decay, **base, **extra)
    elif method == "sgdhd":
        optimizer = alr.FusedSGDHD(params, **sgd, **extra)
    else:  # aalr: the paper's Algorithm 1 drives plain momentum SGD
        optimizer = alr.FusedSGD(params, **sgd)
        return OptimizerBundle(optimizer, aalr=alr.AALR(model, optimizer, initial_lr=s.lr, **extra))
    return OptimizerBundle(optimizer)


def resolve_setting(args: argparse.Namespace, setting: Setting) -> Setting:
    """``setting`` with the command line's explicit overrides (``--lr`` and friends) applied."""
    overrides = {
        key: getattr(args, key)
        for key in ("lr", "momentum", "weight_decay", "batch_size", "epochs")
        if getattr(args, key) is not None
    }
    return dataclasses.replace(setting, **overrides)


# ------------------------------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class DistEnv:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str | None) -> DistEnv:
    """Join the ``torchrun`` process group (NCCL on CUDA, Gloo on CPU), or run as a single process.

    ``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; a CUDA device without an index becomes
    ``cuda:LOCAL_RANK``. ``device=None`` picks CUDA when available.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("nccl", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return DistEnv(rank, world_size, local_rank, dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: Tensor, env: DistEnv) -> Tensor:
    """``values`` summed over the ranks (in place; a no-op for one process)."""
    if env.distributed:
        dist.all_reduce(values)
    return values


def gather_rows(values: Sequence[float], env: DistEnv) -> list[list[float]]:
    """Every rank's ``values`` (float64), in rank order; every rank gets them all."""
    row = torch.tensor(list(values), dtype=torch.float64, device=env.device)
    if not env.distributed:
        return [row.tolist()]
    rows = [torch.empty_like(row) for _ in range(env.world_size)]
    dist.all_gather(rows, row)
    return [r.tolist() for r in rows]


def broadcast_buffers(model: nn.Module, env: DistEnv) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics).

    DDP broadcasts them at the start of each training forward, so after an epoch each rank holds rank 0's
    statistics updated by its own last batch; evaluation and checkpoints use rank 0's on every rank.
    """
    if env.distributed:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


# ----------------------------------------------------------------------------------------- randomness
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (if installed) and torch's (CPU and CUDA) generators."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np
    except ImportError:
        return
    np.random.seed(seed % 2**32)


def rng_state() -> dict[str, Any]:
    """This process's generator states, as plain values and tensors (loadable with ``weights_only=True``)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (name, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached))
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def gather_rng_states(env: DistEnv) -> list[dict[str, Any]]:
    """Every rank's :func:`rng_state`, in rank order (a collective: every rank must call it)."""
    state = rng_state()
    if not env.distributed:
        return [state]
    states: list[Any] = [None] * env.world_size
    dist.all_gather_object(states, state)
    return states


# ---------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(state: dict[str, Any], out: Path, epoch: int, keep: bool) -> Path:
    """Write ``out/checkpoint.pt`` atomically (and ``checkpoint-epochN.pt`` beside it when ``keep``)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "checkpoint.pt"
    tmp = out / "checkpoint.pt.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash while writing leaves the previous epoch's checkpoint intact
    if keep:
        kept = out / f"checkpoint-epoch{epoch}.pt"
        kept.unlink(missing_ok=True)
        try:
            os.link(path, kept)
        except OSError:
            torch.save(state, kept)
    return path


def load_checkpoint(path: str | Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint written by :func:`save_checkpoint` (a directory means its ``checkpoint.pt``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    checkpoint = torch.load(path, map_location=device, weights_only=True)
    if checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint of these examples (format {checkpoint.get('format')!r})")
    return checkpoint


# -------------------------------------------------------------------------------------------- logging
class MetricsLog:
    """Rank 0's console lines and JSON-lines metrics file (``out/metrics.jsonl``, appended on resume)."""

    def __init__(self, out: Path, env: DistEnv) -> None:
        self.env = env
        self.path = out / "metrics.jsonl"
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)

    def print(self, message: str) -> None:
        if self.env.is_main:
            print(message, flush=True)

    def record(self, record: dict[str, Any]) -> None:
        if self.env.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(record, allow_nan=True) + "\n")


def numeric_stats(stats: Mapping[str, Any], reserved: Iterable[str] = ()) -> dict[str, float]:
    """The numbers of an optimizer's ``stats()`` (booleans as 0/1), for logging.

    A name in ``reserved`` (the record's own fields, e.g. AutoDrop's ``epoch`` counter beside the
    record's ``epoch``) is logged as ``optimizer_NAME``.
    """
    reserved = set(reserved)
    return {
        (f"optimizer_{k}" if k in reserved else k): float(v) for k, v in stats.items() if isinstance(v, (int, float))
    }


# ------------------------------------------------------------------------------------------- arguments
def add_common_arguments(parser: argparse.ArgumentParser, default_log_every: int) -> None:
    """The command-line options both scripts share."""
    parser.add_argument("--optimizer", choices=METHODS, default="autodrop", help="the lr method (default autodrop)")
    parser.add_argument("--epochs", type=int, default=None, help="total epochs (default: the method's setting)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="global batch, split over processes (default: the setting's)"
    )
    parser.add_argument("--lr", type=float, default=None, help="initial lr (default: the setting's)")
    parser.add_argument("--momentum", type=float, default=None, help="momentum (default: the setting's)")
    parser.add_argument("--weight-decay", type=float, default=None, help="weight decay (default: the setting's)")
    parser.add_argument("--workers", type=int, default=4, help="data-loading processes per training process")
    parser.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model's initialisation and the data order")
    parser.add_argument("--out", type=Path, default=Path("runs"), help="folder for checkpoints and metrics.jsonl")
    parser.add_argument("--resume", type=Path, default=None, help="a checkpoint (or its folder) to continue from")
    parser.add_argument("--keep-checkpoints", action="store_true", help="also keep checkpoint-epochN.pt of every epoch")
    parser.add_argument(
        "--log-every", type=int, default=default_log_every, help="log lr and optimizer stats every N steps"
    )
    parser.add_argument(
        "--amp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast for the forward pass (default: on for CUDA, off on CPU)",
    )
    parser.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic kernels and no cuDNN autotuning, for bit-exact resumes on a GPU",
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="channels_last memory format for the model and its inputs (default: on)",
    )


# ------------------------------------------------------------------------------------------- training
def _accuracy_counts(output: Tensor, target: Tensor, ks: Iterable[int]) -> list[Tensor]:
    """How many of the batch have the target among their top-k logits, for each k."""
    ks = list(ks)
    top = output.topk(max(ks), dim=1).indices
    hits = top.eq(target.unsqueeze(1))
    return [hits[:, :k].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, env: DistEnv, amp: bool, channels_last: bool, num_classes: int
) -> dict[str, float]:
    """Loss and top-1/top-5 accuracy over the whole evaluation set (each rank evaluates its own shard)."""
    model.eval()
    k5 = min(5, num_classes)
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, top-1, top-k5
    count = 0
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    for images, target in loader:
        images = images.to(env.device, non_blocking=True, memory_format=memory_format)
        target = target.to(env.device, non_blocking=True)
        with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=amp):
            output = model(images)
        loss = nn.functional.cross_entropy(output.float(), target, reduction="sum")
        top1, top5 = _accuracy_counts(output, target, (1, k5))
        totals += torch.stack([loss.double(), top1.double(), top5.double()])
        count += len(target)
    # The count travels with the sums: one all-reduce, and host numbers never become device copies per batch.
    counted = torch.cat([totals, torch.tensor([float(count)], dtype=torch.float64).to(env.device)])
    loss_sum, top1, top5, count = all_reduce_sum(counted, env).tolist()
    count = max(count, 1.0)
    return {"val_loss": loss_sum / count, "val_acc1": top1 / count, f"val_acc{k5}": top5 / count}


def shard(n: int, env: DistEnv) -> list[int]:
    """This rank's evaluation indices: every world_size-th item, with no padding (each item counted once)."""
    return list(range(env.rank, n, env.world_size))


def run_training(
    args: argparse.Namespace,
    *,
    script: str,
    env: DistEnv,
    model: nn.Module,
    train_set: Dataset,
    val_set: Dataset,
    num_classes: int,
    setting: Setting,
    describe: str,
    checkpoint: Mapping[str, Any] | None = None,
) -> None:
    """Train ``model`` for ``setting.epochs`` epochs with ``args.optimizer``, evaluating after every epoch.

    ``model`` is on ``env.device`` with its initial (or resumed) weights; ``checkpoint`` is what
    ``--resume`` loaded (its model weights already in ``model``). Every epoch: train (DDP when
    ``env.distributed``), evaluate, let AALR decide, step the epoch scheduler, then checkpoint and log.
    """
    log = MetricsLog(args.out, env)
    if setting.batch_size % env.world_size:
        raise SystemExit(f"--batch-size {setting.batch_size} must be divisible by the {env.world_size} processes")
    per_rank_batch = setting.batch_size // env.world_size
    cuda = env.device.type == "cuda"
    amp = cuda if args.amp is None else args.amp
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    if cuda:
        torch.backends.cudnn.benchmark = not args.deterministic
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts, at the first matmul
        torch.use_deterministic_algorithms(True, warn_only=True)

    # Every rank shuffles with the same seed (DistributedSampler); drop_last keeps the per-rank batch
    # count equal, so DDP's collectives pair up and len(train_loader) is every rank's steps per epoch.
    # Workers are not persistent: each epoch's workers are seeded from the main process's RNG, whose state
    # the checkpoint restores, so a resumed run draws the same augmentations as an uninterrupted one.
    train_sampler = DistributedSampler(
        train_set, num_replicas=env.world_size, rank=env.rank, shuffle=True, seed=args.seed, drop_last=True
    )
    loader_options = dict(num_workers=args.workers, pin_memory=cuda)
    train_loader = DataLoader(
        train_set, batch_size=per_rank_batch, sampler=train_sampler, drop_last=True, **loader_options
    )
    val_loader = DataLoader(val_set, batch_size=per_rank_batch, sampler=shard(len(val_set), env), **loader_options)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise SystemExit(f"the training set ({len(train_set)} items) is smaller than one global batch")

    train_model: nn.Module = model
    if env.distributed:
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=[env.device] if cuda else None)
    bundle = build_optimizer(args.optimizer, model, setting, steps_per_epoch, setting.epochs)
    optimizer = bundle.optimizer
    start_epoch, step = 0, 0
    if checkpoint is None:
        # The model is built alike on every rank; from here on each rank draws its own augmentations.
        seed_everything(args.seed * 1_000_003 + 1 + env.rank)
    else:
        if checkpoint["method"] != args.optimizer:
            raise SystemExit(f"the checkpoint was trained with {checkpoint['method']}, not {args.optimizer}")
        optimizer.load_state_dict(checkpoint["optimizer"])
        if bundle.scheduler is not None and checkpoint.get("scheduler") is not None:
            bundle.scheduler.load_state_dict(checkpoint["scheduler"])
        if bundle.aalr is not None and checkpoint.get("aalr") is not None:
            bundle.aalr.load_state_dict(checkpoint["aalr"])
        start_epoch, step = int(checkpoint["epoch"]), int(checkpoint["step"])
        states = checkpoint["rng"]
        if len(states) == env.world_size:
            set_rng_state(states[env.rank])
        else:  # another world size draws other shards anyway: no exact continuation to preserve
            log.print(f"resume: {len(states)} saved RNG states for {env.world_size} processes; reseeding")
            seed_everything(args.seed * 1_000_003 + 1 + start_epoch * 1009 + env.rank)
        log.print(f"resumed from epoch {start_epoch} (step {step})")

    log.print(
        f"{script}: {describe}, {args.optimizer} on {env.world_size} process(es), device {env.device}, "
        f"batch {setting.batch_size} ({per_rank_batch}/process), {steps_per_epoch} steps/epoch, "
        f"epochs {start_epoch}->{setting.epochs}, lr {setting.lr}, momentum {setting.momentum}, "
        f"weight decay {setting.weight_decay}, amp {amp}, channels_last {args.channels_last}"
    )
    criterion = nn.CrossEntropyLoss()
    for epoch in range(start_epoch, setting.epochs):
        train_sampler.set_epoch(epoch)
        train_model.train()
        started = time.perf_counter()
        totals = torch.zeros(2, dtype=torch.float64, device=env.device)  # loss sum, correct
        count = 0
        for images, target in train_loader:
            images = images.to(env.device, non_blocking=True, memory_format=memory_format)
            target = target.to(env.device, non_blocking=True)
            with torch.autocast(env.device.type, dtype=torch.bfloat16, enabled=amp):
                output = train_model(images)
            loss = criterion(output.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            # Accumulated on the device: no host synchronisation outside the logging steps.
            totals += torch.stack(
                [
                    loss.detach().double() * len(target),
                    (output.detach().argmax(1) == target).sum().double(),
                ]
            )
            count += len(target)
            if args.log_every > 0 and step % args.log_every == 0:
                stats = numeric_stats(optimizer.stats(), RECORD_FIELDS)
                rows = gather_rows([loss.item(), stats["lr"], stats.get("lr_min", stats["lr"])], env)
                step_record = {
                    "kind": "step",
                    "epoch": epoch + 1,
                    "step": step,
                    "loss": sum(r[0] for r in rows) / len(rows),
                    **stats,
                    "lr_per_rank": [r[1] for r in rows],
                    "lr_min_per_rank": [r[2] for r in rows],
                }
                log.record(step_record)
                log.print(
                    f"epoch {epoch + 1} step {step}: loss {step_record['loss']:.4f}, "
                    + ", ".join(f"{k} {v:.4g}" for k, v in stats.items())
                )

        counted = torch.cat([totals, torch.tensor([float(count)], dtype=torch.float64).to(env.device)])
        loss_sum, correct, count = all_reduce_sum(counted, env).tolist()
        train_loss, train_acc = loss_sum / count, correct / count
        broadcast_buffers(model, env)
        evaluation = evaluate(model, val_loader, env, amp, args.channels_last, num_classes)
        stats = numeric_stats(optimizer.stats(), RECORD_FIELDS)
        rows = gather_rows([stats["lr"], stats.get("lr_min", stats["lr"]), stats.get("lr_max", stats["lr"])], env)
        record: dict[str, Any] = {
            "kind": "epoch",
            "epoch": epoch + 1,
            "step": step,
            "train_loss": train_loss,
            "train_acc1": train_acc,
            **evaluation,
            **stats,
            "lr_per_rank": [r[0] for r in rows],
            "lr_min_per_rank": [r[1] for r in rows],
            "lr_max_per_rank": [r[2] for r in rows],
        }
        if bundle.aalr is not None:
            # AALR decides on this epoch's training loss; a restore resets the model for the next epoch.
            decision = bundle.aalr.epoch_end(train_loss)
            record.update({"aalr_" + k: float(v) for k, v in bundle.aalr.stats().items()})
            record["aalr_restored"] = decision.restored
        if bundle.scheduler is not None:
            bundle.scheduler.step()
        record["next_lr"] = float(optimizer.param_groups[0]["lr"])
        record["epoch_seconds"] = time.perf_counter() - started

        rng_states = gather_rng_states(env)
        if env.is_main:
            state = {
                "format": CHECKPOINT_FORMAT,
                "script": script,
                "method": args.optimizer,
                "epoch": epoch + 1,
                "step": step,
                "world_size": env.world_size,
                "setting": dataclasses.asdict(setting),
                "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": bundle.scheduler.state_dict() if bundle.scheduler is not None else None,
                "aalr": bundle.aalr.state_dict() if bundle.aalr is not None else None,
                "rng": rng_states,
            }
            save_checkpoint(state, args.out, epoch + 1, args.keep_checkpoints)
        log.record(record)
        others = [f"{k} {v:.4g}" for k, v in stats.items() if k not in ("lr", "lr_min", "lr_max")]
        if bundle.aalr is not None:
            others.append(f"AALR phase {bundle.aalr.phase}, next lr {record['next_lr']:.4g}")
        log.print(
            f"epoch {epoch + 1}/{setting.epochs}: train loss {train_loss:.4f} acc {train_acc:.3f}, "
            f"val loss {evaluation['val_loss']:.4f} acc1 {evaluation['val_acc1']:.3f}, "
            + ", ".join([f"lr {stats['lr']:.4g}", *others])
            + f" ({record['epoch_seconds']:.1f} s)"
        )
        if env.distributed:
            dist.barrier()  # the checkpoint is complete before any rank moves on (or exits)
