"""The Triton device code of the five primitives: one multi-tensor kernel, specialised by a constexpr flag mask.

``multi_tensor_kernel`` takes, through the launch table of ``_launch.py``, up
to eight aligned tensor lists ("slots"):

====  =====================  ===================================================
slot  list                   read / written
====  =====================  ===================================================
P     params                 read; written by a step
G     grads                  read (divided by ``grad_scale``), never written
A     momentum buffers (SGD) read unless ``FIRST_STEP``; written by a step
      or exp_avgs (Adam)
B     exp_avg_sqs (Adam)     read; written by a step
PREV  prevs                  read for ``REGRET`` (unless ``REGRET_FROM_BUFFER``) and
                             ``REDUCE``; written by ``STORE``
SNAP  snapshots              read, written by ``BOUNDARY``
DISP  prev_displacements     read, written by ``BOUNDARY``
ACC   accumulators (f32)     read, written by ``ACCUMULATE``
====  =====================  ===================================================

and per-tensor float32 vectors ``lr``, ``regret``, the boundary ``scale``
(absent, one shared element or one per tensor: the ``*_MODE`` constexprs)
and the 1-element ``grad_scale``.
What one launch does is the bit mask ``FLAGS``: the direction (``SGD``,
``ADAM`` or none for the boundary pass alone), then ``STEP`` (the update
``p += regret * prev; p *= 1 - lr * wd (AdamW); p -= lr * d`` and the state
writes) or ``REDUCE`` (the statistics ``(<a, prev>, ||a||^2)`` of the
regularized gradient or direction ``a``, no writes), and ``BOUNDARY`` (the
snapshot pass after the update, statistics ``(<u, prev_disp>, ||u||^2,
||prev_disp||^2)``). The direction and boundary arithmetic is written once,
in ``sgd_direction``, ``adam_direction`` and ``boundary_tile``.

Arithmetic is float32 in ``reference.py``'s order, rounded once when stored
(``to_storage``). Statistics are deterministic: each program writes its
block's float32 sums to one row of ``partials``; ``sum_partials_kernel`` adds
each tensor's rows in block order (no atomics).

Interpreted or compiled is fixed when this module is imported (Triton decides
at decoration time): ``_launch.py`` imports it on first use, not before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Whether these kernels are interpreted (TRITON_INTERPRET=1 when they were decorated): they then run on CPU
# tensors, whose data_ptr the interpreter dereferences as host memory.
INTERPRET = bool(triton.knobs.runtime.interpret)
_FMA_BY_HAND = tl.constexpr(INTERPRET)

KERNEL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}

# FLAGS bits, tested as ``BIT & FLAGS`` (under the interpreter FLAGS arrives as a plain int, which cannot
# be the left operand of a constexpr). The direction:
SGD = tl.constexpr(1 << 0)
ADAM = tl.constexpr(1 << 1)
# what the launch does with it:
STEP = tl.constexpr(1 << 2)
REDUCE = tl.constexpr(1 << 3)
STORE = tl.constexpr(1 << 4)  # write a (see OF_REGULARIZED) into prevs
REGRET = tl.constexpr(1 << 5)
BOUNDARY = tl.constexpr(1 << 6)
SCALED = tl.constexpr(1 << 7)  # the boundary divides by a scale
ACCUMULATE = tl.constexpr(1 << 8)
# the direction's options:
OF_REGULARIZED = tl.constexpr(1 << 9)  # a = the regularized gradient r, else the direction d
MAXIMIZE = tl.constexpr(1 << 10)
WEIGHT_DECAY = tl.constexpr(1 << 11)  # coupled (L2): g += weight_decay * p
DECOUPLED = tl.constexpr(1 << 12)  # AdamW: p *= 1 - lr * weight_decay
MOMENTUM = tl.constexpr(1 << 13)
FIRST_STEP = tl.constexpr(1 << 14)
NESTEROV = tl.constexpr(1 << 15)
GRAD_SCALE = tl.constexpr(1 << 16)
ALIGNED = tl.constexpr(1 << 17)  # every data pointer is 16-byte aligned (vector loads)
REGRET_FROM_BUFFER = tl.constexpr(1 << 18)  # the regret's previous direction is the old momentum buffer (SGD)
# How a per-tensor scalar (lr, regret, the boundary scale) is given is its *_MODE constexpr: see per_tensor_scalar.

# Launch arguments that change with the tensors: not specialised on, so that a new tensor count compiles nothing.
COUNTS = ("n_tensors", "n_blocks", "partial_base")
SLOTS = tl.constexpr(8)


@triton.jit
def fma(x, y, z):
    """``x * y + z`` rounded once, as torch's vectorised CPU ops and the GPU's fused multiply-add round it.

    The interpreter evaluates ``tl.fma`` as two roundings; in float64 the float32 product is exact and
    the sum rounds (twice, which differs from one rounding only in rare ties).
    """
    if _FMA_BY_HAND:
        r = (tl.cast(x, tl.float64) * tl.cast(y, tl.float64) + tl.cast(z, tl.float64)).to(tl.float32)
    else:
        r = tl.fma(x, y, z)
    return r


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """float32 ``x`` rounded once, to nearest even, into ``DTYPE``.

    bfloat16 by hand: the interpreter's float32 -> bfloat16 cast truncates; this is the GPU's rounding.
    """
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = bits + (((bits >> 16) & 1) + 0x7FFF)
        rounded = tl.where(x != x, bits | 0x400000, rounded)  # NaN stays a (quiet) NaN
        y = (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(DTYPE)
    return y


@triton.jit
def load_f32(ptr, offs, mask):
    """Elements ``offs`` of ``ptr`` as float32; ``mask`` None for a full (unmasked, vectorisable) tile."""
    if mask is None:
        x = tl.load(ptr + offs)
    else:
        x = tl.load(ptr + offs, mask=mask, other=0.0)
    return x.to(tl.float32)


@triton.jit
def store(ptr, offs, mask, x):
    """float32 ``x`` rounded into ``ptr``'s dtype at ``offs``."""
    tl.store(ptr + offs, to_storage(x, ptr.dtype.element_ty), mask=mask)


@triton.jit
def zero_masked(x, mask):
    """``x`` with the lanes outside ``mask`` set to 0, so that they add nothing to a statistic (0/0 included)."""
    if mask is not None:
        x = tl.where(mask, x, 0.0)
    return x


@triton.jit
def per_tensor_scalar(default, ptr, index, MODE: tl.constexpr):
    """``default`` (MODE 0: absent), ``ptr[0]`` (1: one shared element) or ``ptr[index]`` (2: one per tensor)."""
    if MODE == 1:
        x = tl.load(ptr)
    elif MODE == 2:
        x = tl.load(ptr + index)
    else:
        x = default
    return x


@triton.jit
def sgd_direction(r, buf, momentum, one_minus_dampening, FLAGS: tl.constexpr):
    """torch.optim.SGD's (direction d, new momentum buffer) from the regularized gradient r."""
    new_buf = r
    d = r
    if MOMENTUM & FLAGS:
        if (FIRST_STEP & FLAGS) == 0:
            new_buf = fma(one_minus_dampening, r, buf * momentum)
        if NESTEROV & FLAGS:
            d = fma(momentum, new_buf, r)
        else:
            d = new_buf
    return d, new_buf


@triton.jit
def adam_direction(g, m, v, hyper):
    """torch.optim.Adam's (direction d, new first moment, new second moment) from the regularized gradient g."""
    _, _, _, lerp_weight, beta2, one_minus_beta2, bias_correction1, bias_correction2_sqrt, eps = hyper
    # torch's lerp: start + w * (end - start) for |w| < 0.5, else end + (w - 1) * (end - start)
    if lerp_weight < 0.5:
        m = fma(lerp_weight, g - m, m)
    else:
        m = fma(lerp_weight - 1.0, g - m, g)
    v = fma(one_minus_beta2 * g, g, v * beta2)
    denom = tl.math.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    d = tl.math.div_rn(tl.math.div_rn(m, bias_correction1), denom)
    return d, m, v


@triton.jit
def boundary_tile(p, offs, mask, snap_ptr, disp_ptr, acc_ptr, scale, accumulate_weight, stats, FLAGS: tl.constexpr):
    """The snapshot pass of one tile at parameter values ``p`` (float32 of the stored parameters)."""
    s0, s1, s2 = stats
    snap = load_f32(snap_ptr, offs, mask)
    prev = load_f32(disp_ptr, offs, mask)
    u = p - snap
    if SCALED & FLAGS:
        u = tl.math.div_rn(u, scale)
    u = zero_masked(u, mask)
    store(disp_ptr, offs, mask, u)
    store(snap_ptr, offs, mask, p)
    if ACCUMULATE & FLAGS:
        store(acc_ptr, offs, mask, fma(accumulate_weight, p, load_f32(acc_ptr, offs, mask)))
    return s0 + u * prev, s1 + u * u, s2 + prev * prev


@triton.jit
def tile(offs, mask, ptrs, scalars, hyper, stats, FLAGS: tl.constexpr):
    """Everything ``FLAGS`` asks of one tile; returns the running statistics ``stats`` (three BLOCK vectors)."""
    p_ptr, g_ptr, a_ptr, b_ptr, prev_ptr, snap_ptr, disp_ptr, acc_ptr = ptrs
    lr, regret, grad_scale, boundary_scale, decay_factor, accumulate_weight = scalars
    weight_decay, momentum, one_minus_dampening = hyper[0], hyper[1], hyper[2]
    s0, s1, s2 = stats
    if (STEP | WEIGHT_DECAY | BOUNDARY) & FLAGS:  # a reduction without weight decay does not read p
        p = load_f32(p_ptr, offs, mask)
    if (SGD | ADAM) & FLAGS:
        g = load_f32(g_ptr, offs, mask)
        if GRAD_SCALE & FLAGS:
            g = tl.math.div_rn(g, grad_scale)
        if MAXIMIZE & FLAGS:
            g = -g
        if ADAM & FLAGS:  # reference.py rounds the (float32 when unscaled) gradient to the moments' dtype
            g = to_storage(g, a_ptr.dtype.element_ty).to(tl.float32)
        if WEIGHT_DECAY & FLAGS:
            g = fma(weight_decay, p, g)
        if ADAM & FLAGS:
            d, new_a, new_b = adam_direction(g, load_f32(a_ptr, offs, mask), load_f32(b_ptr, offs, mask), hyper)
        else:
            buf = g
            if (MOMENTUM & FLAGS) and (FIRST_STEP & FLAGS) == 0:
                buf = load_f32(a_ptr, offs, mask)
            d, new_a = sgd_direction(g, buf, momentum, one_minus_dampening, FLAGS)
            new_b = new_a
        if OF_REGULARIZED & FLAGS:
            a = g
        else:
            a = d
        if REGRET_FROM_BUFFER & FLAGS:
            prev = buf  # the momentum buffer before this step's update
        elif (REGRET | REDUCE) & FLAGS:
            prev = load_f32(prev_ptr, offs, mask)
        if REDUCE & FLAGS:
            a = zero_masked(a, mask)
            s0 += a * prev
            s1 += a * a
        if STEP & FLAGS:
            if REGRET & FLAGS:
                p = fma(prev, regret, p)
            if DECOUPLED & FLAGS:
                p = p * decay_factor
            p = to_storage(fma(d, -lr, p), p_ptr.dtype.element_ty)
            tl.store(p_ptr + offs, p, mask=mask)
            p = p.to(tl.float32)  # the boundary pass sees the parameters as stored
            if (MOMENTUM | ADAM) & FLAGS:
                store(a_ptr, offs, mask, new_a)
            if ADAM & FLAGS:
                store(b_ptr, offs, mask, new_b)
            if STORE & FLAGS:
                store(prev_ptr, offs, mask, a)
    if BOUNDARY & FLAGS:
        s0, s1, s2 = boundary_tile(p, offs, mask, snap_ptr, disp_ptr, acc_ptr, boundary_scale, accumulate_weight,
                                   (s0, s1, s2), FLAGS)  # fmt: skip
    return s0, s1, s2


@triton.jit
def slot_pointer(table, n_tensors, t, SLOT: tl.constexpr, DTYPE: tl.constexpr, FLAGS: tl.constexpr):
    """The data pointer of tensor ``t`` of list ``SLOT``, typed; marked 16-byte aligned with ``ALIGNED``."""
    ptr = tl.load(table + SLOT * n_tensors + t).to(tl.pointer_type(DTYPE))
    if ALIGNED & FLAGS:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit(do_not_specialize=COUNTS)
def multi_tensor_kernel(
    table,
    n_tensors,
    n_blocks,
    partials,
    partial_base,
    lr_value,
    lr_ptr,
    regret_ptr,
    grad_scale_ptr,
    boundary_scale_ptr,
    decay_value,
    accumulate_weight,
    weight_decay,
    momentum,
    one_minus_dampening,
    lerp_weight,
    beta2,
    one_minus_beta2,
    bias_correction1,
    bias_correction2_sqrt,
    eps,
    P_DT: tl.constexpr,
    G_DT: tl.constexpr,
    A_DT: tl.constexpr,
    B_DT: tl.constexpr,
    PREV_DT: tl.constexpr,
    SNAP_DT: tl.constexpr,
    DISP_DT: tl.constexpr,
    ACC_DT: tl.constexpr,
    FLAGS: tl.constexpr,
    LR_MODE: tl.constexpr,
    REGRET_MODE: tl.constexpr,
    SCALE_MODE: tl.constexpr,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """Program k: elements ``[c * CHUNK, (c + 1) * CHUNK)`` of tensor ``t`` (block k of the table), in tiles."""
    pid = tl.program_id(0)
    blocks = table + (SLOTS + 2) * n_tensors
    t = tl.load(blocks + pid)
    start = tl.load(blocks + n_blocks + pid) * CHUNK  # int64: 64-bit offsets
    count = tl.minimum(tl.load(table + SLOTS * n_tensors + t) - start, CHUNK)
    index = tl.load(table + (SLOTS + 1) * n_tensors + t)  # the tensor's position in the caller's lists
    ptrs = (
        slot_pointer(table, n_tensors, t, 0, P_DT, FLAGS),
        slot_pointer(table, n_tensors, t, 1, G_DT, FLAGS),
        slot_pointer(table, n_tensors, t, 2, A_DT, FLAGS),
        slot_pointer(table, n_tensors, t, 3, B_DT, FLAGS),
        slot_pointer(table, n_tensors, t, 4, PREV_DT, FLAGS),
        slot_pointer(table, n_tensors, t, 5, SNAP_DT, FLAGS),
        slot_pointer(table, n_tensors, t, 6, DISP_DT, FLAGS),
        slot_pointer(table, n_tensors, t, 7, ACC_DT, FLAGS),
    )
    lr = per_tensor_scalar(lr_value, lr_ptr, index, LR_MODE)
    if LR_MODE != 0:  # else 1 - lr * weight_decay came from the host, in double as Python computes it
        decay_value = 1.0 - lr * weight_decay
    scalars = (
        lr,
        per_tensor_scalar(0.0, regret_ptr, index, REGRET_MODE),
        per_tensor_scalar(1.0, grad_scale_ptr, 0, (GRAD_SCALE & FLAGS) != 0),
        per_tensor_scalar(1.0, boundary_scale_ptr, index, SCALE_MODE),
        decay_value,
        accumulate_weight,
    )
    hyper = (weight_decay, momentum, one_minus_dampening, lerp_weight, beta2, one_minus_beta2, bias_correction1,
             bias_correction2_sqrt, eps)  # fmt: skip
    zeros = tl.zeros((BLOCK,), tl.float32)
    stats = (zeros, zeros, zeros)
    full = count - count % BLOCK
    for off in range(0, full, BLOCK):  # full tiles unmasked, so that loads and stores vectorise
        stats = tile(start + off + tl.arange(0, BLOCK), None, ptrs, scalars, hyper, stats, FLAGS)
    if full < count:
        offs = start + full + tl.arange(0, BLOCK)
        stats = tile(offs, offs < start + count, ptrs, scalars, hyper, stats, FLAGS)
    if (REDUCE | BOUNDARY) & FLAGS:
        s0, s1, s2 = stats
        row = partials + (partial_base + pid).to(tl.int64) * 3
        tl.store(row, tl.sum(s0, 0))
        tl.store(row + 1, tl.sum(s1, 0))
        tl.store(row + 2, tl.sum(s2, 0))


@triton.jit(do_not_specialize=COUNTS)
def sum_partials_kernel(partials, reduce_table, n_tensors, out, COLUMNS: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``i`` of ``out``: the sum, in block order, of tensor ``i``'s partial rows (deterministic)."""
    i = tl.program_id(0)
    first = tl.load(reduce_table + i)
    count = tl.load(reduce_table + n_tensors + i)
    for c in tl.static_range(COLUMNS):
        acc = tl.zeros((BLOCK,), tl.float32)
        for k in range(0, count, BLOCK):
            rows = k + tl.arange(0, BLOCK)
            acc += tl.load(partials + (first + rows) * 3 + c, mask=rows < count, other=0.0)
        tl.store(out + i * COLUMNS + c, tl.sum(acc, 0))
