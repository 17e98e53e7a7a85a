"""Gram matrices G[s, k, l] = sum_{p in s} <g[k][p], g[l][p]> over all tensors in two launches.

Stage 1 (one launch): program c takes chunk c (CHUNK elements of one tensor), loads the K
objectives' slices as a [KP, BLOCK] tile (KP = next power of two >= K, addresses from the pointer
table), accumulates x_k * x_l lane-wise in a [KP, KP, BLOCK] register tile and writes the upper
triangle of its partial Gram, K(K+1)/2 values, to row c of ``partials`` (fp32; fp64 for fp64
inputs; bf16/fp16 are upcast on load).

Stage 2 (one launch): program s sums the partial rows of segment s's chunks, in the fixed order
of the plan's segment chunk list, and writes the symmetric [K, K] block. No float atomics, so the
result is the same on every run (for a given kernel configuration: autotuning may pick another
BLOCK in another process; FUSED_BALANCE_TRITON_AUTOTUNE=0 pins it).

Autograd: dL/dg[k][p] = sum_l (dG[s,k,l] + dG[s,l,k]) g[l][p], i.e. a combine with K outputs and
weights (dG + dG^T) -- one launch of the combine kernel.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_balance._dtypes import accumulate_dtype

from . import common
from .pointer_table import chunk_plan, pointer_table


@triton.jit
def _accumulate_products(acc, base, idx, mask, ACC: tl.constexpr):
    x = tl.load(base[:, None] + idx[None, :], mask=mask, other=0.0).to(ACC)  # [KP, BLOCK]
    return acc + x[:, None, :] * x[None, :, :]


@triton.jit
def gram_partials_kernel(table, chunk_tensor, chunk_offset, sizes, partials, num_tensors,
                         first_program,
                         K: tl.constexpr, KP: tl.constexpr, IN_DTYPE: tl.constexpr,
                         ACC: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                         BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) + first_program
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_offset + c)
    length = tl.minimum(tl.load(sizes + t) - start, CHUNK)

    rows = tl.arange(0, KP)
    row_ok = rows < K
    address = tl.load(table + rows.to(tl.int64) * num_tensors + t, mask=row_ok, other=0)
    base = address.to(tl.pointer_type(IN_DTYPE)) + start
    if ALIGNED:  # every tensor starts 16-byte aligned and chunks start at multiples of CHUNK
        base = tl.multiple_of(base, 16)

    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([KP, KP, BLOCK], dtype=ACC)
    # Whole blocks carry only the (lane-constant) row mask, so loads can be vectorised; the
    # ragged tail is masked per lane.
    full = length - length % BLOCK
    for i in range(0, full, BLOCK):
        acc = _accumulate_products(acc, base, i + lanes, row_ok[:, None], ACC)
    idx = full + lanes
    acc = _accumulate_products(acc, base, idx, row_ok[:, None] & (idx < length)[None, :], ACC)
    block = tl.sum(acc, axis=2)  # [KP, KP]

    k = rows[:, None]
    l = rows[None, :]
    pair = k * K - (k * (k - 1)) // 2 + (l - k)  # row-major index of (k, l), k <= l
    kk: tl.constexpr = K * (K + 1) // 2
    tl.store(partials + c * kk + pair, block, mask=(k <= l) & (l < K))


@triton.jit
def gram_reduce_kernel(partials, segment_chunk_ptr, segment_chunks, out, first_program,
                       K: tl.constexpr, KP: tl.constexpr, ACC: tl.constexpr,
                       RBLOCK: tl.constexpr):
    s = tl.program_id(0).to(tl.int64) + first_program
    lo = tl.load(segment_chunk_ptr + s)
    hi = tl.load(segment_chunk_ptr + s + 1)

    rows = tl.arange(0, KP)
    k = rows[:, None]
    l = rows[None, :]
    a = tl.minimum(k, l)
    b = tl.maximum(k, l)
    pair = a * K - (a * (a - 1)) // 2 + (b - a)  # (k, l) and (l, k) read the same partial
    valid = (k < K) & (l < K)
    kk: tl.constexpr = K * (K + 1) // 2

    r = tl.arange(0, RBLOCK)
    acc = tl.zeros([RBLOCK, KP, KP], dtype=ACC)
    for i in range(lo, hi, RBLOCK):
        idx = i + r
        in_range = idx < hi
        chunk = tl.load(segment_chunks + idx, mask=in_range, other=0)
        acc += tl.load(partials + chunk[:, None, None] * kk + pair[None, :, :],
                       mask=in_range[:, None, None] & valid[None, :, :], other=0.0)
    total = tl.sum(acc, axis=0)
    tl.store(out + s * (K * K) + k * K + l, total, mask=valid)


# Fixed configuration per padded K when autotuning is off: ~4 values per thread and row (one
# 16-byte load) while the [KP, KP, BLOCK] accumulator stays within ~80 registers (ptxas, sm_90).
_DEFAULTS = {1: (1024, 4), 2: (512, 4), 4: (256, 4), 8: (128, 4)}


def _default(meta):
    if common.INTERPRETED:  # no registers to spare there, but every loop trip costs
        return common.INTERPRETER_BLOCK, 4
    return _DEFAULTS.get(meta["KP"], (64, 2))


def _candidates(major, meta):
    kp = meta["KP"]
    return common.block_candidates(major, kp * kp, fallback=_default(meta))


_partials = common.TunedKernel(gram_partials_kernel, key=["K", "IN_DTYPE"],
                               candidates=_candidates, default=_default, shape_params=("KP",))


def reduce_block(kp: int) -> int:
    """Partial rows per loop trip of stage 2: wide, because one program walks all chunks of its
    segment (a 40 M-parameter global segment has ~2.5 k) and each trip is two dependent loads."""
    return max(16, min(256, 1024 // (kp * kp)))


def gram_forward(flat: list[torch.Tensor], num_objectives: int, segment_ids: list[int],
                 num_segments: int) -> torch.Tensor:
    """The two launches; ``flat`` as in fused_balance.backends (made contiguous here)."""
    K = num_objectives
    flat = [t.contiguous() for t in flat]
    P = len(flat) // K
    device, dtype = flat[0].device, flat[0].dtype
    acc = accumulate_dtype(dtype)
    plan = chunk_plan([t.numel() for t in flat[:P]], segment_ids, num_segments, device)
    table = pointer_table(flat, device)
    KP = triton.next_power_of_2(K)
    acc_tl = common.accumulate_tl_dtype(dtype)
    partials = torch.empty(plan.num_chunks, K * (K + 1) // 2, dtype=acc, device=device)
    out = torch.empty(num_segments, K, K, dtype=acc, device=device)
    with common.device_guard(device):
        common.launch_over_programs(
            plan.num_chunks,
            lambda first, count: _partials(
                (count,), table.addresses, plan.chunk_tensor_d, plan.chunk_offset_d, plan.sizes_d,
                partials, P, first, K=K, KP=KP, IN_DTYPE=common.TL_DTYPES[dtype], ACC=acc_tl,
                ALIGNED=table.aligned, CHUNK=plan.chunk),
            "gram_partials")
        common.launch_over_programs(
            num_segments,
            lambda first, count: gram_reduce_kernel[(count,)](
                partials, plan.segment_chunk_ptr_d, plan.segment_chunks_d, out, first,
                K=K, KP=KP, ACC=acc_tl, RBLOCK=reduce_block(KP)),
            "gram_reduce")
    return out


@torch.library.custom_op("fused_balance::triton_gram", mutates_args=())
def triton_gram(flat: list[torch.Tensor], num_objectives: int, segment_ids: list[int],
                num_segments: int) -> torch.Tensor:
    return gram_forward(flat, num_objectives, segment_ids, num_segments)


@triton_gram.register_fake
def _(flat, num_objectives, segment_ids, num_segments):
    K = num_objectives
    return flat[0].new_empty((num_segments, K, K), dtype=accumulate_dtype(flat[0].dtype))


def _setup_context(ctx, inputs, output):
    flat, num_objectives, segment_ids, num_segments = inputs
    ctx.save_for_backward(*flat)
    ctx.num_objectives = num_objectives
    ctx.segment_ids = segment_ids


def _backward(ctx, grad_gram):
    from .combine import split_flat_output  # combine imports nothing from here: no cycle

    flat = ctx.saved_tensors
    K = ctx.num_objectives
    P = len(flat) // K
    weights = grad_gram + grad_gram.transpose(1, 2)  # [S, K(out), K(in)]
    buffer = torch.ops.fused_balance.triton_combine(list(flat), K, weights, ctx.segment_ids)
    return split_flat_output(buffer, flat[:P], K), None, None, None


triton_gram.register_autograd(_backward, setup_context=_setup_context)
