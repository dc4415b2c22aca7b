"""``python -m autolr_fused.bench``: optimizer step times side by side, as shared/spec/performance.md asks.

For every parameter set, one run times torch.optim.SGD (for-loop, foreach,
fused; momentum 0.9), every method on the reference backend and on each kernel
backend available for the device, and the peers users would pick instead
(dadaptation.DAdaptSGD, prodigyopt.Prodigy, schedulefree.SGDScheduleFree when
installed, and hypergradient SGD as its authors publish it: ``flat_sgdhd.py``),
and a pass that only reads (``torch.dot`` over as many elements, ``ReadOnlyPass``).
It reports the median step time over ``--steps`` timed steps after
``--warmup``, the effective bandwidth (the method's minimal bytes per step /
time), its ratio to torch's fused SGD (and, on a GPU, to a large copy), and
each kernel backend's speed-up over the reference backend. It prints a table
and writes JSON (device, torch version, commit, rows) for scripts.

The ratios are paired: every timed step of a method alternates with a step of
torch's fused SGD (momentum 0.9) on a tensor set of its own, and a row's
ratios divide by the yardstick medians timed beside it, so that a machine
that slows down or speeds up during the run (a shared one does) moves both
sides of each ratio alike. Where torch has no fused SGD for the device and
dtype, its foreach SGD is the yardstick instead (the JSON says which).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

import autolr_fused as alr
from autolr_fused.backends import available_backends
from autolr_fused.bench.flat_sgdhd import FlatVectorSGDHD
from autolr_fused.bench.param_sets import PARAM_SETS, numel

MOMENTUM = 0.9
Factory = Callable[[list[torch.Tensor], str], Any]  # an optimizer, or anything else with a step()


@dataclass
class Method:
    factory: Factory
    units: int  # minimal bytes per element of an ordinary step, in element sizes (performance.md)
    ours: bool = True  # runs on the package's backends


# The steps timed for AutoDrop and TLR window mode are between boundaries (as performance.md's table).
NEVER = 10**9
METHODS: dict[str, Method] = {
    "FusedSGD": Method(lambda p, b: alr.FusedSGD(p, lr=0.01, momentum=MOMENTUM, backend=b), 5),
    "FusedSGDL": Method(lambda p, b: alr.FusedSGDL(p, total_steps=NEVER, backend=b), 3),
    "FusedAutoDropSGD": Method(
        lambda p, b: alr.FusedAutoDropSGD(p, lr=0.01, momentum=MOMENTUM, steps_per_epoch=NEVER, backend=b), 5
    ),
    "FusedTLR-window": Method(
        lambda p, b: alr.FusedTLR(p, lr=0.01, momentum=MOMENTUM, steps_per_epoch=NEVER, backend=b), 5
    ),
    "FusedTLR-step": Method(lambda p, b: alr.FusedTLR(p, lr=0.01, momentum=MOMENTUM, backend=b), 7),
    "FusedTLR-step-layer": Method(
        lambda p, b: alr.FusedTLR(p, lr=0.01, momentum=MOMENTUM, per_layer=True, backend=b), 7
    ),
    "FusedSGDHD": Method(lambda p, b: alr.FusedSGDHD(p, lr=0.01, momentum=MOMENTUM, backend=b), 7),
    "FusedRDBD-sgd": Method(lambda p, b: alr.FusedRDBD(p, backend=b), 5),
    "FusedRDBD-sgd-momentum": Method(lambda p, b: alr.FusedRDBD(p, momentum=MOMENTUM, backend=b), 7),
    "FusedRDBD-adam": Method(lambda p, b: alr.FusedRDBD(p, base="adam", meta_lr=5e-7, backend=b), 9),
}


class ReadOnlyPass:
    """Not an optimizer: ``torch.dot`` of two flat tensors as large as the parameter set, a pass that only
    reads (2 units). It shows what a reduce pass, which only reads, can reach on the device beside the
    read-write passes of an SGD step (README, Benchmarks)."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        n = sum(p.numel() for p in params)
        self.a = torch.ones(n, dtype=params[0].dtype, device=params[0].device)
        self.b = torch.full_like(self.a, 0.5)

    def step(self) -> torch.Tensor:
        return torch.dot(self.a, self.b)


def _peers() -> dict[str, Method]:
    peers = {
        "torch-SGD-forloop": Method(
            lambda p, _: torch.optim.SGD(p, lr=0.01, momentum=MOMENTUM, foreach=False), 5, ours=False
        ),
        "torch-SGD-foreach": Method(
            lambda p, _: torch.optim.SGD(p, lr=0.01, momentum=MOMENTUM, foreach=True), 5, ours=False
        ),
        "torch-SGD-fused": Method(
            lambda p, _: torch.optim.SGD(p, lr=0.01, momentum=MOMENTUM, fused=True), 5, ours=False
        ),
        "torch-dot-read-only": Method(lambda p, _: ReadOnlyPass(p), 2, ours=False),
        "SGDN-HD-flat-vector": Method(
            lambda p, _: FlatVectorSGDHD(p, lr=0.01, momentum=MOMENTUM, hypergrad_lr=1e-6), 7, ours=False
        ),
    }
    try:
        import dadaptation

        peers["dadaptation.DAdaptSGD"] = Method(
            lambda p, _: dadaptation.DAdaptSGD(p, lr=1.0, momentum=MOMENTUM), 5, ours=False
        )
    except ImportError:
        pass
    try:
        import prodigyopt

        peers["prodigyopt.Prodigy"] = Method(lambda p, _: prodigyopt.Prodigy(p, lr=1.0), 9, ours=False)
    except ImportError:
        pass
    try:
        import schedulefree

        def schedule_free(p: list[torch.Tensor], _: str) -> torch.optim.Optimizer:
            opt = schedulefree.SGDScheduleFree(p, lr=0.01, momentum=MOMENTUM)
            opt.train()
            return opt

        peers["schedulefree.SGDScheduleFree"] = Method(schedule_free, 5, ours=False)
    except ImportError:
        pass
    return peers


@dataclass
class Row:
    method: str
    backend: str
    param_set: str
    dtype: str
    device: str
    tensors: int
    elements: int
    median_ms: float
    bytes_per_step: int
    gb_per_s: float
    vs_torch_fused_sgd: float = float("nan")  # effective bandwidth / torch fused SGD's
    vs_copy: float = float("nan")  # effective bandwidth / copy bandwidth (GPU)
    speedup_vs_reference: float = float("nan")  # reference step time / this step time (both over their yardstick)
    yardstick_ms: float = float("nan")  # the median yardstick step timed alternately with this method's


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(step: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``step`` (on a GPU, of the work it queued, by events)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> float:
    """Median seconds of one call of ``step`` over ``steps`` timed calls after ``warmup`` calls."""
    return time_paired(step, None, device, warmup, steps)[0]


def time_paired(
    step: Callable[[], Any], yardstick: Callable[[], Any] | None, device: torch.device, warmup: int, steps: int
) -> tuple[float, float]:
    """Median seconds of ``step`` and of ``yardstick``, their timed calls alternating (see the module docstring)."""
    for _ in range(warmup):
        step()
        if yardstick is not None:
            yardstick()
    _sync(device)
    times: list[float] = []
    yard_times: list[float] = []
    for _ in range(steps):
        times.append(_seconds(step, device))
        if yardstick is not None:
            yard_times.append(_seconds(yardstick, device))
    return statistics.median(times), statistics.median(yard_times) if yard_times else float("nan")


def make_yardstick(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> tuple[str, Any]:
    """torch.optim.SGD(momentum=0.9) on its own tensors, fused where torch has it for ``device`` and ``dtype``."""
    params = make_tensors(shapes, dtype, device)
    for name in ("torch-SGD-fused", "torch-SGD-foreach"):
        try:
            opt = _peers()[name].factory(params, "torch")
            opt.step()  # torch refuses a fused SGD on a device it lacks only at the first step
            return name, opt
        except (RuntimeError, ValueError, TypeError):
            continue
    raise RuntimeError(f"no torch SGD yardstick runs on {device} with {dtype}")


def make_tensors(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device) -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=g) * 0.1).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=g) * 1e-3).to(device=device, dtype=dtype)
        params.append(p)
    return params


def copy_bandwidth(device: torch.device, dtype: torch.dtype) -> float:
    """Bytes per second of a large dst.copy_(src) (bytes read plus written)."""
    n = 256 * 2**20
    src, dst = torch.empty(n, dtype=dtype, device=device), torch.empty(n, dtype=dtype, device=device)
    seconds = time_steps(lambda: dst.copy_(src), device, 3, 20)
    return 2 * n * src.element_size() / seconds


def bench_set(
    name: str,
    device: torch.device,
    dtype: torch.dtype,
    methods: list[str],
    backends: list[str],
    warmup: int,
    steps: int,
) -> tuple[list[Row], str]:
    shapes = PARAM_SETS[name]()
    elements = numel(shapes)
    element_size = torch.empty((), dtype=dtype).element_size()
    table = {**_peers(), **METHODS}
    yardstick_name, yardstick = make_yardstick(shapes, dtype, device)
    yardstick_bytes = table[yardstick_name].units * element_size * elements
    rows = []
    for method in methods:
        spec = table[method]
        for backend in backends if spec.ours else ["torch" if method.startswith("torch") else "peer"]:
            params = make_tensors(shapes, dtype, device)
            try:
                opt = spec.factory(params, backend)
            except (RuntimeError, ValueError, TypeError) as err:  # e.g. torch's fused SGD on a dtype/device it lacks
                print(f"  skipped {method} [{backend}]: {err}", file=sys.stderr)
                continue
            seconds, yard_seconds = time_paired(opt.step, yardstick.step, device, warmup, steps)
            total_bytes = spec.units * element_size * elements
            rows.append(
                Row(
                    method,
                    backend,
                    name,
                    str(dtype).removeprefix("torch."),
                    str(device),
                    len(shapes),
                    elements,
                    seconds * 1e3,
                    total_bytes,
                    total_bytes / seconds / 1e9,
                    vs_torch_fused_sgd=(total_bytes / seconds) / (yardstick_bytes / yard_seconds),
                    yardstick_ms=yard_seconds * 1e3,
                )
            )
            del opt, params
    del yardstick
    for r in rows:
        reference = [x for x in rows if x.method == r.method and x.backend == "reference"]
        if reference and r.backend not in ("reference", "torch", "peer"):
            ref = reference[0]
            r.speedup_vs_reference = (ref.median_ms / ref.yardstick_ms) / (r.median_ms / r.yardstick_ms)
    return rows, yardstick_name


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def format_table(rows: list[Row]) -> str:
    header = f"{'set':<16}{'method':<30}{'backend':<10}{'median ms':>11}{'GB/s':>9}{'x fused SGD':>13}{'x ref':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        speedup = "" if r.speedup_vs_reference != r.speedup_vs_reference else f"{r.speedup_vs_reference:.2f}"
        lines.append(
            f"{r.param_set:<16}{r.method:<30}{r.backend:<10}{r.median_ms:>11.3f}{r.gb_per_s:>9.2f}"
            f"{r.vs_torch_fused_sgd:>13.2f}{speedup:>8}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m autolr_fused.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sets", default=None, help="comma-separated: " + ", ".join(PARAM_SETS))
    parser.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    parser.add_argument("--backends", default=None, help="comma-separated backends (default: all available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default="bench.json", help="JSON file to write")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    # transformer350m needs ~7 GB and seconds per reference step on a CPU: GPU default only.
    default_sets = "resnet50,transformer350m,many_small" if device.type == "cuda" else "resnet50,many_small"
    sets = (args.sets or default_sets).split(",")
    methods = args.methods.split(",") if args.methods else [*_peers(), *METHODS]
    supported = {"cpu": ("reference", "cpu", "triton"), "cuda": ("reference", "cuda", "triton")}[device.type]
    backends = args.backends.split(",") if args.backends else [b for b in available_backends() if b in supported]
    for name in sets:
        if name not in PARAM_SETS:
            parser.error(f"unknown parameter set {name!r}; choose from {', '.join(PARAM_SETS)}")

    copy_bw = copy_bandwidth(device, dtype) if device.type == "cuda" else float("nan")
    rows: list[Row] = []
    yardsticks: dict[str, str] = {}
    for name in sets:
        set_rows, yardstick_name = bench_set(name, device, dtype, methods, backends, args.warmup, args.steps)
        yardsticks[name] = yardstick_name
        for r in set_rows:
            r.vs_copy = r.gb_per_s * 1e9 / copy_bw
        rows += set_rows
        print(format_table(set_rows), flush=True)
        print()
    result = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "autolr_fused": alr.__version__,
        "commit": _commit(),
        "python": platform.python_version(),
        "copy_gb_per_s": copy_bw / 1e9 if copy_bw == copy_bw else None,
        "warmup": args.warmup,
        "steps": args.steps,
        "timing": "paired: each timed step alternates with a yardstick step; ratios over the yardstick beside them",
        "yardstick": yardsticks,
        "rows": [asdict(r) for r in rows],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")
    return 0
