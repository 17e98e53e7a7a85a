"""Weighted combination d[p] = sum_k w[seg(p), k] g[k][p] over all tensors in one launch.

Program c takes chunk c, loads the [KP, BLOCK] input tile once and writes the combination in
the output dtype (rounded to nearest even from the fp32/fp64 accumulator) through a pointer
table of the P outputs: fresh tensors (``triton_combine``) or existing ones, e.g. ``.grad``
(``triton_combine_into``). ``skip`` (one-element bool tensor) is read inside the kernel: when it
holds True the program returns before touching memory, with no host synchronisation.

Schemas, fake kernels and autograd are those of the C++ ops (fused_balance.ops).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_balance.ops import define_family

from . import common
from .common import cast_for_store, weighted_chunk
from .pointer_table import chunk_table, pointer_table


@triton.jit
def _combine_block(base, out_base, w, idx, in_mask, out_mask, ACC: tl.constexpr,
                   OUT_DTYPE: tl.constexpr):
    x = tl.load(base[:, None] + idx[None, :], mask=in_mask, other=0.0).to(ACC)  # [KP, BLOCK]
    d = tl.sum(w[:, None] * x, axis=0)  # [BLOCK]
    tl.store(out_base + idx, cast_for_store(d, OUT_DTYPE), mask=out_mask)


@triton.jit
def combine_kernel(table, chunk_tensor, chunk_offset, sizes, segment, weights, out_table, skip,
                   num_tensors, first_program,
                   K: tl.constexpr, KP: tl.constexpr, IN_DTYPE: tl.constexpr,
                   OUT_DTYPE: tl.constexpr, ACC: tl.constexpr, HAS_SKIP: tl.constexpr,
                   ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    run = True
    if HAS_SKIP:
        run = tl.load(skip) == 0
    if run:
        t, start, length, base, row_ok, w = weighted_chunk(
            table, chunk_tensor, chunk_offset, sizes, segment, weights, num_tensors,
            first_program, K, KP, IN_DTYPE, ACC, CHUNK)
        out_base = tl.load(out_table + t).to(tl.pointer_type(OUT_DTYPE)) + start
        if ALIGNED:
            base = tl.multiple_of(base, 16)
            out_base = tl.multiple_of(out_base, 16)

        lanes = tl.arange(0, BLOCK)
        full = length - length % BLOCK
        for i in range(0, full, BLOCK):  # whole blocks: lane-constant masks, vector access
            _combine_block(base, out_base, w, i + lanes, row_ok[:, None], None, ACC, OUT_DTYPE)
        idx = full + lanes
        tail = idx < length
        _combine_block(base, out_base, w, idx, row_ok[:, None] & tail[None, :], tail, ACC,
                       OUT_DTYPE)


def _default(meta):
    if common.INTERPRETED:
        return common.INTERPRETER_BLOCK, 4
    tile = meta["KP"] * common.registers_per_value(meta["ACC"])
    block = max(128, min(2048, 4096 // tile))
    return block, (8 if block >= 2048 else 4)


def _candidates(major, meta):
    rows = (meta["KP"] + 1) * common.registers_per_value(meta["ACC"])
    return common.block_candidates(major, rows, fallback=_default(meta))


# Autotuned only for fresh outputs (combine); combine_into writes in place and runs fixed.
_combine_tuned = common.TunedKernel(combine_kernel, key=["K", "IN_DTYPE"],
                                    candidates=_candidates, default=_default,
                                    shape_params=("KP", "ACC"))


def _fixed(grid, *args, **meta):
    block, warps = _default(meta)
    combine_kernel[grid](*args, **meta, BLOCK=block, num_warps=warps)


def _launch(grads, weights, segment_ids, out, skip, tuned: bool, fresh_out: bool = False):
    """One launch (per 2**31 - 1 programs); ``grads`` and ``out`` must be contiguous;
    ``fresh_out``: ``out`` was allocated by this call (its table is never cached)."""
    K = weights.shape[1]
    P = len(out)
    device, dtype = grads[0].device, grads[0].dtype
    w = weights.contiguous()
    layout = chunk_table([t.numel() for t in out], segment_ids, w.shape[0], device)
    table = pointer_table(grads, device)
    outs = pointer_table(out, device, cache=not fresh_out)
    meta = dict(K=K, KP=triton.next_power_of_2(K), IN_DTYPE=common.TL_DTYPES[dtype],
                OUT_DTYPE=common.TL_DTYPES[out[0].dtype], ACC=common.accumulate_tl_dtype(dtype),
                HAS_SKIP=skip is not None, ALIGNED=table.aligned and outs.aligned,
                CHUNK=layout.chunk)
    kernel = _combine_tuned if tuned else _fixed  # in place: never timed (it would rewrite out)
    skip_ptr = skip if skip is not None else w
    with common.device_guard(device):
        common.launch_over_programs(
            layout.num_chunks,
            lambda first, count: kernel(
                (count,), table.addresses, layout.chunk_tensor_d, layout.chunk_offset_d,
                layout.sizes_d, layout.segment_d, w, outs.addresses, skip_ptr, P, first, **meta),
            "combine" if tuned else "combine_into")


def combine(grads: list[torch.Tensor], weights: torch.Tensor,
            segment_ids: list[int]) -> list[torch.Tensor]:
    grads = [t.contiguous() for t in grads]
    P = len(grads) // weights.shape[1]
    out = [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads[:P]]
    _launch(grads, weights, segment_ids, out, None, tuned=True, fresh_out=True)
    return out


def combine_into(grads: list[torch.Tensor], weights: torch.Tensor, segment_ids: list[int],
                 out: list[torch.Tensor], skip: torch.Tensor | None) -> None:
    grads = [t.contiguous() for t in grads]
    # The kernel writes through addresses, so it needs contiguous outputs: write into contiguous
    # copies (which hold the old values, in case of skip) and copy back.
    staged = [o if o.is_contiguous() else o.contiguous() for o in out]
    _launch(grads, weights, segment_ids, staged, None if skip is None else skip.reshape(1),
            tuned=False)
    for o, s in zip(out, staged):
        if s is not o:
            o.copy_(s)


define_family("triton_")
torch.library.impl("fused_balance::triton_combine", ("cpu", "cuda"))(combine)
torch.library.impl("fused_balance::triton_combine_into", ("cpu", "cuda"))(combine_into)
