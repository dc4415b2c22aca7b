"""The host side of the Triton backend: the ops ``autolr_fused_triton::<primitive>`` and their launches.

The five ops have the extension's schemas (``csrc/bindings.cpp``), so that the
wrappers of ``_ops.py`` turn the primitives' arguments into theirs for this
backend too, and its fake kernels serve ``torch.compile``. Each op is one
``launch`` of ``kernels.multi_tensor_kernel`` per dtype combination of its
tensors (usually one in all), plus one ``sum_partials_kernel`` launch for its
statistics.

The launch table, int64 on the device, laid out for a group of ``n`` tensors
and ``b`` blocks (``SLOTS = 8`` lists, an absent one all zeros)::

    [ data_ptr of slot s, tensor j : SLOTS * n ][ numel : n ][ caller's index : n ]
    [ tensor j of block k : b ][ chunk number of block k : b ]

followed, once per call, by ``[ first partial : N ][ partial count : N ]`` for
the reduction over all ``N`` tensors. Program ``k`` handles elements
``[c * CHUNK, (c + 1) * CHUNK)`` of its tensor ``j``. Tables are cached on the
device by their contents, so a step over the same tensors as a previous step
copies nothing to the device.

A tensor is processed in place when every list's tensor has its parameter's
dense memory layout (contiguous, channels_last, or any dense permutation, same
strides); otherwise on contiguous copies, copied back afterwards (slower).

Neither the kernels nor Triton itself are imported with this module, only on
first use (``kernels()``): Triton decides at decoration time whether a
``@triton.jit`` function is interpreted, its own (``tl.zeros``, ...) when
``triton.language`` is first imported, so a session that sets
``TRITON_INTERPRET=1`` after importing this package still gets interpreted
kernels.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import Tensor

from autolr_fused.backends import _ops
from autolr_fused.backends.primitives import check_regret_from_buffer

KERNELS_MODULE = "autolr_fused.backends.triton.kernels"
NAMESPACE = "autolr_fused_triton"
# Elements per program and per tile, by mode; None: the mode's default. The interpreter pays per
# operation, not per element, so it gets fewer, larger tiles. Tests lower both to cross block boundaries.
CHUNK: int | None = None
BLOCK: int | None = None
_TILE_SIZES = {True: (65536, 4096), False: (16384, 1024)}  # interpreted: (CHUNK, BLOCK)
NUM_WARPS = 4
REDUCE_BLOCK = 128
_TABLE_CACHE_SIZE = 32
_tables: collections.OrderedDict[tuple, Tensor] = collections.OrderedDict()


def kernels() -> ModuleType:
    """The device code, decorated (interpreted or compiled, as ``TRITON_INTERPRET`` says) on first use."""
    return sys.modules.get(KERNELS_MODULE) or importlib.import_module(KERNELS_MODULE)


def installed() -> bool:
    """Whether Triton can be imported (without importing it)."""
    if "triton" in sys.modules:
        return sys.modules["triton"] is not None  # None: imports of it are blocked
    return importlib.util.find_spec("triton") is not None


def interpreted() -> bool:
    """Whether the kernels are interpreted: fixed once they are loaded, until then what TRITON_INTERPRET says now."""
    module = sys.modules.get(KERNELS_MODULE)
    if module is not None:
        return module.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "on")


def loadable() -> bool:
    """Whether kernels loaded now would run: interpreted ones need Triton's own helpers interpreted too.

    ``triton.language`` imported before TRITON_INTERPRET=1 was set holds compiled helpers, which an
    interpreted kernel cannot call; the kernels are then not loaded at all.
    """
    if KERNELS_MODULE in sys.modules or not interpreted():
        return True
    language = sys.modules.get("triton.language")
    return language is None or type(language.zeros).__name__ == "InterpretedFunction"


def check_device(device: torch.device) -> None:
    """Refuse tensors the kernels cannot address (their pointers would be dereferenced blindly)."""
    expected = "cpu" if interpreted() else "cuda"
    if device.type != expected:
        mode = "interpreted (TRITON_INTERPRET=1)" if interpreted() else "compiled"
        raise RuntimeError(f"the {mode} triton backend runs on {expected} tensors, got tensors on {device}")


@dataclass
class Group:
    """One kernel launch: the tensors of one dtype combination."""

    table: Tensor  # int64, on the device: this group's part of the call's table
    n_tensors: int
    n_blocks: int
    partial_base: int  # row of this group's first block in the call's partials
    dtypes: tuple  # Triton dtype of each slot (float32 for an absent one)
    aligned: bool  # every data pointer is 16-byte aligned


@dataclass
class Plan:
    """One call's launches over its tensors."""

    device: torch.device
    n: int  # tensors in the call
    groups: list[Group]
    n_blocks: int  # blocks over all groups (rows of the partials)
    reduce_table: Tensor | None
    copies: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (original, contiguous working copy)
    # every working copy, read-only ones included: the table holds their addresses until the kernels ran
    keep_alive: list[Tensor] = field(default_factory=list)


def _dense_layout(t: Tensor) -> tuple | None:
    """t's (shape, strides) if its elements fill exactly numel consecutive locations, else None."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return None
        expected *= size
    return tuple(t.shape), tuple(st if s != 1 else 0 for s, st in zip(t.shape, t.stride()))


def _in_place(tensors: list[Tensor]) -> bool:
    """Whether the kernel can index every tensor of one position by the same linear memory offset."""
    if all(t.is_contiguous() for t in tensors):
        return True
    layout = _dense_layout(tensors[0])
    return layout is not None and all(_dense_layout(t) == layout for t in tensors[1:])


def _device_table(values: list[int], device: torch.device) -> Tensor:
    """``values`` as an int64 tensor on ``device``, from a small cache keyed by the values themselves."""
    key = (device, tuple(values))
    table = _tables.get(key)
    if table is None:
        table = torch.tensor(values, dtype=torch.int64)
        if device.type == "cuda":  # pinned, so that the copy does not wait for the stream
            table = table.pin_memory().to(device, non_blocking=True)
        _tables[key] = table
        if len(_tables) > _TABLE_CACHE_SIZE:
            _tables.popitem(last=False)
    else:
        _tables.move_to_end(key)
    return table


def tile_sizes() -> tuple[int, int]:
    """(CHUNK, BLOCK): elements per program and per tile."""
    chunk, block = _TILE_SIZES[interpreted()]
    return CHUNK or chunk, BLOCK or block


def plan(slots: Sequence[Sequence[Tensor] | None], written: Sequence[int]) -> Plan:
    """The launches of one call over the aligned lists ``slots`` (slot 0: the parameters; absent: None).

    ``written`` names the slots the kernel writes: where a tensor must run on
    contiguous copies, those copies are copied back by ``finish``. Works column
    by column (a few attribute reads per tensor, no per-block Python work
    beyond building the table).
    """
    k = kernels()
    chunk, _ = tile_sizes()
    n = len(slots[0])
    device = slots[0][0].device
    check_device(device)
    present = [s for s, tensors in enumerate(slots) if tensors is not None]
    columns = [list(slots[s]) for s in present]
    for s, column in zip(present, columns):
        if len(column) != n:
            raise ValueError(f"every tensor list must have one tensor per parameter ({n}), list {s} has {len(column)}")
    dtypes = list(zip(*[[t.dtype for t in column] for column in columns]))
    contiguous = [all(c) for c in zip(*[[t.is_contiguous() for t in column] for column in columns])]
    copies: list[tuple[Tensor, Tensor]] = []
    keep_alive: list[Tensor] = []
    by_dtypes: dict[tuple, list[int]] = {}
    for i in range(n):
        key = dtypes[i]
        if key not in by_dtypes and not all(d in k.KERNEL_DTYPES for d in key):
            raise TypeError(
                f"the triton kernels take float32, bfloat16 and float16 tensors; tensor {i} has dtypes {key}"
            )
        if not contiguous[i]:
            tensors = [column[i] for column in columns]
            if not _in_place(tensors):
                for slot, column, t in zip(present, columns, tensors):
                    column[i] = work = t.contiguous()
                    keep_alive.append(work)
                    if slot in written and work is not t:
                        copies.append((t, work))
        by_dtypes.setdefault(key, []).append(i)

    pointers = [[t.data_ptr() for t in column] for column in columns]
    numels = [t.numel() for t in columns[0]]
    n_slots = k.SLOTS.value
    values: list[int] = []
    layout: list[tuple[int, int, int, int, tuple, bool]] = []  # (offset, n_tensors, n_blocks, base, dtypes, aligned)
    first, count = [0] * n, [0] * n
    n_blocks = 0
    for key, members in by_dtypes.items():
        blocks = [-(-numels[i] // chunk) for i in members]
        group_blocks = sum(blocks)
        if not group_blocks:
            continue
        group_pointers = [0] * (n_slots * len(members))
        for slot, column in zip(present, pointers):
            group_pointers[slot * len(members) : (slot + 1) * len(members)] = [column[i] for i in members]
        for i, b in zip(members, blocks):
            first[i], count[i] = n_blocks, b
            n_blocks += b
        slot_dtypes = [k.tl.float32] * n_slots
        for slot, d in zip(present, key):
            slot_dtypes[slot] = k.KERNEL_DTYPES[d]
        aligned = not any(p & 15 for p in group_pointers)
        layout.append((len(values), len(members), group_blocks, n_blocks - group_blocks, tuple(slot_dtypes), aligned))
        values += group_pointers
        values += [numels[i] for i in members]
        values += members
        values += [j for j, b in enumerate(blocks) for _ in range(b)]
        values += [c for b in blocks for c in range(b)]
    reduce_offset = len(values)
    values += first + count
    table = _device_table(values, device)
    groups = [
        Group(table[offset:], n_tensors, blocks, base, dtypes, aligned)
        for offset, n_tensors, blocks, base, dtypes, aligned in layout
    ]
    return Plan(device, n, groups, n_blocks, table[reduce_offset:], copies, keep_alive)


def vector(x: Tensor | None, n: int, device: torch.device, name: str) -> tuple[Tensor | None, int]:
    """``(x as a contiguous float32 vector on device, mode)``: mode 0 absent, 1 one shared element, 2 one per tensor."""
    if x is None:
        return None, 0
    x = x.reshape(-1)
    if x.numel() not in (1, n):
        raise ValueError(f"{name} must have 1 or {n} elements (one per tensor), got {x.numel()}")
    x = x.to(device=device, dtype=torch.float32).contiguous()
    return x, 1 if x.numel() == 1 else 2


@dataclass
class Scalars:
    """The kernel's scalar arguments; the defaults are those of a launch that does not use them."""

    lr_value: float = 0.0
    lr: Tensor | None = None
    regret: Tensor | None = None
    grad_scale: Tensor | None = None
    boundary_scale: Tensor | None = None
    decay_value: float = 1.0
    accumulate_weight: float = 0.0
    weight_decay: float = 0.0
    momentum: float = 0.0
    one_minus_dampening: float = 1.0
    lerp_weight: float = 0.0
    beta2: float = 0.0
    one_minus_beta2: float = 0.0
    bias_correction1: float = 1.0
    bias_correction2_sqrt: float = 1.0
    eps: float = 0.0


def launch(
    flags: int, slots: Sequence[Sequence[Tensor] | None], written: Sequence[int], scalars: Scalars, columns: int
) -> Tensor:
    """Run ``multi_tensor_kernel`` with ``flags`` over the lists ``slots``; returns the ``(n, columns)`` statistics.

    ``columns`` is 0 for a launch without statistics (a ``(0, 3)`` tensor is returned, as the extension's
    ``sgd_step`` without a boundary does).
    """
    k = kernels()
    params = slots[0]
    device = params[0].device if params else torch.device("cpu")
    n = len(params)
    if not n:
        return torch.zeros((0, columns or 3), dtype=torch.float32, device=device)
    p = plan(slots, written)
    lr, lr_mode = vector(scalars.lr, n, device, "lr")
    regret, regret_mode = vector(scalars.regret, n, device, "regret")
    grad_scale, grad_scale_mode = vector(scalars.grad_scale, 1, device, "grad_scale")
    boundary_scale, scale_mode = vector(scalars.boundary_scale, n, device, "scale")
    flags |= k.GRAD_SCALE.value if grad_scale_mode else 0
    chunk, block = tile_sizes()
    partials = torch.empty(max(p.n_blocks, 1) * 3, dtype=torch.float32, device=device) if columns else None
    for group in p.groups:
        dummy = group.table  # for an absent pointer argument: never read
        k.multi_tensor_kernel[(group.n_blocks,)](
            group.table,
            group.n_tensors,
            group.n_blocks,
            dummy if partials is None else partials,
            group.partial_base,
            float(scalars.lr_value),
            dummy if lr is None else lr,
            dummy if regret is None else regret,
            dummy if grad_scale is None else grad_scale,
            dummy if boundary_scale is None else boundary_scale,
            float(scalars.decay_value),
            float(scalars.accumulate_weight),
            float(scalars.weight_decay),
            float(scalars.momentum),
            float(scalars.one_minus_dampening),
            float(scalars.lerp_weight),
            float(scalars.beta2),
            float(scalars.one_minus_beta2),
            float(scalars.bias_correction1),
            float(scalars.bias_correction2_sqrt),
            float(scalars.eps),
            *group.dtypes,
            FLAGS=flags | (k.ALIGNED.value if group.aligned else 0),
            LR_MODE=lr_mode,
            REGRET_MODE=regret_mode,
            SCALE_MODE=scale_mode,
            BLOCK=block,
            CHUNK=chunk,
            num_warps=NUM_WARPS,
        )
    stats = torch.zeros((n if columns else 0, columns or 3), dtype=torch.float32, device=device)
    if columns and p.groups:
        k.sum_partials_kernel[(n,)](
            partials, p.reduce_table, n, stats, COLUMNS=columns, BLOCK=REDUCE_BLOCK, num_warps=1
        )  # fmt: skip
    for original, work in p.copies:
        original.copy_(work)
    written_tensors = [t for s in written if slots[s] is not None for t in slots[s]]
    if written_tensors:  # autograd's view of in-place writes it did not see
        torch.autograd.graph.increment_version(written_tensors)
    return stats


def define(lib: torch.library.Library, schema: str, impl: Callable) -> None:
    """Declare ``autolr_fused_triton::<op>`` with ``schema``, run by ``impl`` on CPU and CUDA tensors.

    The lower-level ``torch.library.Library`` registration is used rather than
    ``torch.library.custom_op``, whose Python wrapper costs ~100 us plus ~1 us
    per tensor per call (torch 2.13), several times a small step's kernel time.
    """
    name = schema.split("(", 1)[0]
    lib.define(schema)
    for key in ("CPU", "CUDA"):
        lib.impl(name, impl, key)


def store_flags(store: int) -> int:
    """The FLAGS of sgd_step's ``store`` code (0 nothing, 1 the regularized gradient, 2 the direction)."""
    k = kernels()
    return 0 if store == 0 else k.STORE.value | (k.OF_REGULARIZED.value if store == 1 else 0)


_STATS = 3  # columns of the boundary statistics
_REDUCED = 2  # columns of (<a, prev>, ||a||^2)


def _sgd_flags(momentum: float, weight_decay: float, nesterov: bool, maximize: bool, first_step: bool) -> int:
    k = kernels()
    return (
        k.SGD.value
        | (k.MOMENTUM.value if momentum != 0 else 0)
        | (k.WEIGHT_DECAY.value if weight_decay != 0 else 0)
        | (k.NESTEROV.value if nesterov else 0)
        | (k.MAXIMIZE.value if maximize else 0)
        | (k.FIRST_STEP.value if first_step else 0)
    )


def _boundary_flags(snapshots: list[Tensor], scale: Tensor | None, accumulators: list[Tensor]) -> int:
    k = kernels()
    if not snapshots:
        return 0
    return k.BOUNDARY.value | (k.SCALED.value if scale is not None else 0) | (k.ACCUMULATE.value if accumulators else 0)


def _adam_flags(weight_decay: float, decoupled_weight_decay: bool, maximize: bool) -> int:
    k = kernels()
    decay = 0 if weight_decay == 0 else k.DECOUPLED.value if decoupled_weight_decay else k.WEIGHT_DECAY.value
    return k.ADAM.value | decay | (k.MAXIMIZE.value if maximize else 0)


def sgd_step(params, grads, buffers, lr, lr_value, momentum, dampening, weight_decay, nesterov, maximize,
             first_step, prevs, store, regret, snapshots, prev_displacements, scale, accumulators,
             accumulate_weight, grad_scale):  # fmt: skip
    k = kernels()
    if store and not prevs:
        raise ValueError("sgd_step: store needs prevs")
    # A regret without prevs reads the previous direction from the momentum buffers, before this step's update.
    from_buffer = regret is not None and not prevs
    if from_buffer:
        check_regret_from_buffer(momentum, nesterov, first_step, store)
    flags = (
        _sgd_flags(momentum, weight_decay, nesterov, maximize, first_step)
        | k.STEP.value
        | store_flags(store)
        | (k.REGRET.value if regret is not None else 0)
        | (k.REGRET_FROM_BUFFER.value if from_buffer else 0)
        | _boundary_flags(snapshots, scale, accumulators)
    )
    slots = [params, grads, buffers or None, None, prevs or None, snapshots or None, prev_displacements or None,
             accumulators or None]  # fmt: skip
    scalars = Scalars(
        lr_value=lr_value,
        lr=lr,
        regret=regret,
        grad_scale=grad_scale,
        boundary_scale=scale,
        accumulate_weight=accumulate_weight,
        weight_decay=weight_decay,
        momentum=momentum,
        one_minus_dampening=1.0 - dampening,
    )
    written = (0, 2, 4, 5, 6, 7) if store else (0, 2, 5, 6, 7)
    return launch(flags, slots, written, scalars, _STATS if snapshots else 0)


def sgd_reduce(params, grads, buffers, prevs, momentum, dampening, weight_decay, nesterov, maximize, first_step,
               of_direction, grad_scale):  # fmt: skip
    k = kernels()
    # the regularized gradient needs no momentum: the wrapper passes no buffers for it
    flags = _sgd_flags(momentum if of_direction else 0.0, weight_decay, nesterov, maximize, first_step)
    flags |= k.REDUCE.value | (0 if of_direction else k.OF_REGULARIZED.value)
    slots = [params, grads, buffers or None, None, prevs, None, None, None]
    scalars = Scalars(
        grad_scale=grad_scale, weight_decay=weight_decay, momentum=momentum, one_minus_dampening=1.0 - dampening
    )
    return launch(flags, slots, (), scalars, _REDUCED)


def boundary_pass(params, snapshots, prev_displacements, scale, accumulators, accumulate_weight):
    slots = [params, None, None, None, None, snapshots, prev_displacements, accumulators or None]
    scalars = Scalars(boundary_scale=scale, accumulate_weight=accumulate_weight)
    return launch(_boundary_flags(snapshots, scale, accumulators), slots, (5, 6, 7), scalars, _STATS)


def _adam_scalars(beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt, grad_scale) -> Scalars:
    return Scalars(
        grad_scale=grad_scale,
        weight_decay=weight_decay,
        lerp_weight=1 - beta1,
        beta2=beta2,
        one_minus_beta2=1 - beta2,
        bias_correction1=bias_correction1,
        bias_correction2_sqrt=bias_correction2_sqrt,
        eps=eps,
    )


def adam_step(params, grads, exp_avgs, exp_avg_sqs, lr, lr_value, beta1, beta2, eps, weight_decay,
              decoupled_weight_decay, maximize, bias_correction1, bias_correction2_sqrt, prevs, regret,
              grad_scale):  # fmt: skip
    k = kernels()
    if regret is not None and not prevs:
        raise ValueError("adam_step: regret needs prevs")
    flags = _adam_flags(weight_decay, decoupled_weight_decay, maximize) | k.STEP.value
    flags |= (store_flags(2) if prevs else 0) | (k.REGRET.value if regret is not None else 0)
    scalars = _adam_scalars(beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt, grad_scale)
    scalars.lr_value, scalars.lr, scalars.regret = lr_value, lr, regret
    scalars.decay_value = 1 - lr_value * weight_decay  # in double, as Python computes it for a float lr
    slots = [params, grads, exp_avgs, exp_avg_sqs, prevs or None, None, None, None]
    launch(flags, slots, (0, 2, 3, 4), scalars, 0)


def adam_reduce(params, grads, exp_avgs, exp_avg_sqs, prevs, beta1, beta2, eps, weight_decay,
                decoupled_weight_decay, maximize, bias_correction1, bias_correction2_sqrt, grad_scale):  # fmt: skip
    flags = _adam_flags(weight_decay, decoupled_weight_decay, maximize) | kernels().REDUCE.value
    scalars = _adam_scalars(beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt, grad_scale)
    slots = [params, grads, exp_avgs, exp_avg_sqs, prevs, None, None, None]
    return launch(flags, slots, (), scalars, _REDUCED)


# The extension's schemas (csrc/bindings.cpp), under this backend's namespace.
SCHEMAS = {
    sgd_step: "sgd_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] buffers, Tensor? lr, float lr_value, "
    "float momentum, float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step, "
    "Tensor(c!)[] prevs, int store, Tensor? regret, Tensor(d!)[] snapshots, Tensor(e!)[] prev_displacements, "
    "Tensor? scale, Tensor(f!)[] accumulators, float accumulate_weight, Tensor? grad_scale) -> Tensor",
    sgd_reduce: "sgd_reduce(Tensor[] params, Tensor[] grads, Tensor[] buffers, Tensor[] prevs, float momentum, "
    "float dampening, float weight_decay, bool nesterov, bool maximize, bool first_step, bool of_direction, "
    "Tensor? grad_scale) -> Tensor",
    boundary_pass: "boundary_pass(Tensor[] params, Tensor(a!)[] snapshots, Tensor(b!)[] prev_displacements, "
    "Tensor? scale, Tensor(c!)[] accumulators, float accumulate_weight) -> Tensor",
    adam_step: "adam_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
    "Tensor? lr, float lr_value, float beta1, float beta2, float eps, float weight_decay, "
    "bool decoupled_weight_decay, bool maximize, float bias_correction1, float bias_correction2_sqrt, "
    "Tensor(d!)[] prevs, Tensor? regret, Tensor? grad_scale) -> ()",
    adam_reduce: "adam_reduce(Tensor[] params, Tensor[] grads, Tensor[] exp_avgs, Tensor[] exp_avg_sqs, "
    "Tensor[] prevs, float beta1, float beta2, float eps, float weight_decay, bool decoupled_weight_decay, "
    "bool maximize, float bias_correction1, float bias_correction2_sqrt, Tensor? grad_scale) -> Tensor",
}

LIBRARY = torch.library.Library(NAMESPACE, "DEF")
for _impl, _schema in SCHEMAS.items():
    define(LIBRARY, _schema, _impl)
_ops.register_fakes(NAMESPACE, LIBRARY)
