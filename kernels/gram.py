"""Gram matrices G[s, k, l] = sum_{p in s} <g[k][p], g[l][p]> over all tensors in two launches.

Stage 1 (one launch): program c takes chunk c (CHUNK elements of one tensor), loads the K
objectives' slices as a [KP, BLOCK] tile (KP = next power of two >= K, addresses from the pointer
table), accumulates x_k * x_l lane-wise in a [KP, KP, BLOCK] register tile and writes the upper
triangle of its partial Gram, K(K+1)/2 values, to row c of ``partials`` (fp32; fp64 for fp64
inputs; bf16/fp16 are upcast on load). Past 8 objectives the tile is split into [8, 8] blocks of
objectives and only the upper-triangle block pairs are computed, one pass each, so the
accumulator stays in registers for any K.

Stage 2 (one launch): program s sums the partial rows of segment s's chunks, in the fixed order
of the chunk table's segment chunk list, and writes the symmetric [K, K] block. No float atomics, so the
result is the same on every run (for a given kernel configuration: autotuning may pick another
BLOCK in another process; FUSED_BALANCE_TRITON_AUTOTUNE=0 pins it).

Schemas, fake kernels and autograd are those of the C++ ops (fused_balance.ops).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_balance._dtypes import accumulate_dtype
from fused_balance.ops import define_family

from . import common
from .pointer_table import chunk_table, pointer_table


@triton.jit
def _accumulate_products(acc, base_a, base_b, idx, mask_a, mask_b, ACC: tl.constexpr):
    a = tl.load(base_a[:, None] + idx[None, :], mask=mask_a, other=0.0).to(ACC)  # [KB, BLOCK]
    b = tl.load(base_b[:, None] + idx[None, :], mask=mask_b, other=0.0).to(ACC)
    return acc + a[:, None, :] * b[None, :, :]


@triton.jit
def _block_pair_partial(table, t, start, length, num_tensors, partials, c, row_a, row_b,
                        K: tl.constexpr, IN_DTYPE: tl.constexpr, ACC: tl.constexpr,
                        ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """Products of objective rows ``row_a`` x ``row_b`` (KB each) over the chunk, stored into the
    upper triangle of row c of ``partials``."""
    ok_a = row_a < K
    ok_b = row_b < K
    base_a = tl.load(table + row_a.to(tl.int64) * num_tensors + t, mask=ok_a, other=0)
    base_b = tl.load(table + row_b.to(tl.int64) * num_tensors + t, mask=ok_b, other=0)
    base_a = base_a.to(tl.pointer_type(IN_DTYPE)) + start
    base_b = base_b.to(tl.pointer_type(IN_DTYPE)) + start
    if ALIGNED:  # every tensor starts 16-byte aligned and chunks start at multiples of CHUNK
        base_a = tl.multiple_of(base_a, 16)
        base_b = tl.multiple_of(base_b, 16)

    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([row_a.shape[0], row_b.shape[0], BLOCK], dtype=ACC)
    # Whole blocks carry only the (lane-constant) row masks, so loads can be vectorised; the
    # ragged tail is masked per lane.
    full = length - length % BLOCK
    for i in range(0, full, BLOCK):
        acc = _accumulate_products(acc, base_a, base_b, i + lanes, ok_a[:, None], ok_b[:, None],
                                   ACC)
    idx = full + lanes
    tail = (idx < length)[None, :]
    acc = _accumulate_products(acc, base_a, base_b, idx, ok_a[:, None] & tail,
                               ok_b[:, None] & tail, ACC)
    block = tl.sum(acc, axis=2)  # [KB, KB]

    k = row_a[:, None]
    l = row_b[None, :]
    pair = k * K - (k * (k - 1)) // 2 + (l - k)  # row-major index of (k, l), k <= l
    kk: tl.constexpr = K * (K + 1) // 2
    tl.store(partials + c * kk + pair, block, mask=(k <= l) & (l < K))


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

    # The [KP, KP, BLOCK] accumulator outgrows the register file past 8 objectives (255
    # registers and kilobytes of spills per thread at K = 9..32), so larger K walks the upper
    # triangle of [KB, KB] objective blocks, one pass over the chunk per block pair (the chunk's
    # rows come back from L1/L2). KP <= 8 is a single block: all K^2 products in one pass.
    KB: tl.constexpr = KP if KP <= 8 else 8
    NB: tl.constexpr = KP // KB
    rows = tl.arange(0, KB)
    for bi in tl.static_range(NB):
        for bj in tl.static_range(bi, NB):
            _block_pair_partial(table, t, start, length, num_tensors, partials, c,
                                bi * KB + rows, bj * KB + rows, K, IN_DTYPE, ACC, ALIGNED,
                                BLOCK)


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
# 16-byte load) while the [KB, KB, BLOCK] accumulator stays within ~80 registers (ptxas, sm_90);
# KP >= 16 runs [8, 8] blocks, as KP = 8.
_DEFAULTS = {1: (1024, 4), 2: (512, 4), 4: (256, 4)}


def _tile_rows(meta):
    """Accumulator rows of one block pair plus its two loaded rows, in 32-bit registers."""
    kb = min(meta["KP"], 8)
    return (kb * kb + 2 * kb) * common.registers_per_value(meta["ACC"])


def _default(meta):
    if common.INTERPRETED:  # no registers to spare there, but every loop trip costs
        return common.INTERPRETER_BLOCK, 4
    if meta["KP"] in _DEFAULTS:
        return _DEFAULTS[meta["KP"]]
    # [8, 8] blocks: 64 accumulators per lane; fp64 takes register pairs, so half the lanes
    return (128, 4) if common.registers_per_value(meta["ACC"]) == 1 else (64, 2)


def _candidates(major, meta):
    return common.block_candidates(major, _tile_rows(meta), fallback=_default(meta))


_partials = common.TunedKernel(gram_partials_kernel, key=["K", "IN_DTYPE"],
                               candidates=_candidates, default=_default, shape_params=("KP", "ACC"))


def reduce_block(kp: int) -> int:
    """Partial rows per loop trip of stage 2: wide, because one program walks all chunks of its
    segment (a 40 M-parameter global segment has ~2.5 k) and each trip is two dependent loads."""
    return max(1, min(256, 1024 // (kp * kp)))  # the [RBLOCK, KP, KP] tile: ~8 values a thread


def gram(flat: list[torch.Tensor], num_objectives: int, segment_ids: list[int],
         num_segments: int) -> torch.Tensor:
    """The two launches; ``flat`` as in fused_balance.backends (made contiguous here)."""
    K = num_objectives
    flat = [t.contiguous() for t in flat]
    P = len(flat) // K
    device, dtype = flat[0].device, flat[0].dtype
    acc = accumulate_dtype(dtype)
    layout = chunk_table([t.numel() for t in flat[:P]], segment_ids, num_segments, device)
    table = pointer_table(flat, device)
    KP = triton.next_power_of_2(K)
    acc_tl = common.accumulate_tl_dtype(dtype)
    partials = torch.empty(layout.num_chunks, K * (K + 1) // 2, dtype=acc, device=device)
    out = torch.empty(num_segments, K, K, dtype=acc, device=device)
    with common.device_guard(device):
        common.launch_over_programs(
            layout.num_chunks,
            lambda first, count: _partials(
                (count,), table.addresses, layout.chunk_tensor_d, layout.chunk_offset_d, layout.sizes_d,
                partials, P, first, K=K, KP=KP, IN_DTYPE=common.TL_DTYPES[dtype], ACC=acc_tl,
                ALIGNED=table.aligned, CHUNK=layout.chunk),
            "gram_partials")
        common.launch_over_programs(
            num_segments,
            lambda first, count: gram_reduce_kernel[(count,)](
                partials, layout.segment_chunk_ptr_d, layout.segment_chunks_d, out, first,
                K=K, KP=KP, ACC=acc_tl, RBLOCK=reduce_block(KP)),
            "gram_reduce")
    return out


define_family("triton_")
torch.library.impl("fused_balance::triton_gram", ("cpu", "cuda"))(gram)
