"""Weighted combination d[o][p] = sum_k w[seg(p), o, k] g[k][p] over all tensors in one launch.

The public combine has one output per tensor (weights [S, K]); the kernel takes KO outputs
(weights [S, KO, K]) because the Gram backward is exactly that with KO = K, and the combine
backward is that with the roles of inputs and outputs swapped. Program c takes chunk c, loads the
[KP, BLOCK] input tile once and writes the [KO, BLOCK] outputs in the output dtype (rounded to
nearest even from the fp32/fp64 accumulator).

Outputs go either into one fresh flat buffer [KO, total] (``combine``: a plain pointer plus the
tensor's start, nothing to build) or through a pointer table (``combine_into``: P existing
tensors, e.g. ``.grad``). ``skip`` (one-element bool tensor) is read inside the kernel: when it
holds True the program returns before touching memory, with no host synchronisation.

Autograd of ``triton_combine``: dL/dg[k][p] = sum_o w[s, o, k] gbar[o][p] (a combine with the
transposed weights) and dL/dw[s, o, k] = sum_{p in s} <gbar[o][p], g[k][p]> (one Gram launch pair
over [gbar_1..gbar_KO, g_1..g_K], the off-diagonal block).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import common
from .common import cast_for_store
from .pointer_table import chunk_plan, flat_layout, pointer_table


@triton.jit
def _combine_block(base, out_base, w, idx, in_mask, out_mask, ACC: tl.constexpr,
                   OUT_DTYPE: tl.constexpr):
    x = tl.load(base[:, None] + idx[None, :], mask=in_mask, other=0.0).to(ACC)  # [KP, BLOCK]
    d = tl.sum(w[:, :, None] * x[None, :, :], axis=1)  # [KOP, BLOCK]
    tl.store(out_base[:, None] + idx[None, :], cast_for_store(d, OUT_DTYPE), mask=out_mask)


@triton.jit
def combine_kernel(table, chunk_tensor, chunk_offset, sizes, starts, segment, weights,
                   out_table, out_flat, skip, num_tensors, total, first_program,
                   K: tl.constexpr, KP: tl.constexpr, KO: tl.constexpr, KOP: tl.constexpr,
                   IN_DTYPE: tl.constexpr, OUT_DTYPE: tl.constexpr, ACC: tl.constexpr,
                   OUT_FLAT: tl.constexpr, HAS_SKIP: tl.constexpr, ALIGNED: tl.constexpr,
                   CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    run = True
    if HAS_SKIP:
        run = tl.load(skip) == 0
    if run:
        c = tl.program_id(0).to(tl.int64) + first_program
        t = tl.load(chunk_tensor + c)
        start = tl.load(chunk_offset + c)
        length = tl.minimum(tl.load(sizes + t) - start, CHUNK)
        s = tl.load(segment + t)

        rows = tl.arange(0, KP)
        row_ok = rows < K
        address = tl.load(table + rows.to(tl.int64) * num_tensors + t, mask=row_ok, other=0)
        base = address.to(tl.pointer_type(IN_DTYPE)) + start

        outs = tl.arange(0, KOP)
        out_ok = outs < KO
        w = tl.load(weights + (s * KO + outs[:, None]) * K + rows[None, :],
                    mask=out_ok[:, None] & row_ok[None, :], other=0.0).to(ACC)  # [KOP, KP]
        if OUT_FLAT:  # rows of total elements, tensor starts padded to 16 elements
            out_base = out_flat + outs.to(tl.int64) * total + tl.load(starts + t) + start
        else:
            out_address = tl.load(out_table + outs.to(tl.int64) * num_tensors + t, mask=out_ok,
                                  other=0)
            out_base = out_address.to(tl.pointer_type(OUT_DTYPE)) + start
        if ALIGNED:
            base = tl.multiple_of(base, 16)
            out_base = tl.multiple_of(out_base, 16)

        lanes = tl.arange(0, BLOCK)
        full = length - length % BLOCK
        for i in range(0, full, BLOCK):  # whole blocks: lane-constant masks, vector access
            _combine_block(base, out_base, w, i + lanes, row_ok[:, None], out_ok[:, None], ACC,
                           OUT_DTYPE)
        idx = full + lanes
        tail = (idx < length)[None, :]
        _combine_block(base, out_base, w, idx, row_ok[:, None] & tail, out_ok[:, None] & tail,
                       ACC, OUT_DTYPE)


def _default(meta):
    if common.INTERPRETED:
        return common.INTERPRETER_BLOCK, 4
    tile = meta["KP"] * meta["KOP"] * common.registers_per_value(meta["ACC"])
    block = max(128, min(2048, 4096 // tile))
    return block, (8 if block >= 2048 else 4)


def _candidates(major, meta):
    rows = meta["KP"] * (meta["KOP"] + 1) * common.registers_per_value(meta["ACC"])
    return common.block_candidates(major, rows, fallback=_default(meta))


# Autotuned only for fresh outputs (combine); combine_into writes in place and runs fixed.
_combine_tuned = common.TunedKernel(combine_kernel, key=["K", "KO", "IN_DTYPE", "OUT_FLAT"],
                                    candidates=_candidates, default=_default,
                                    shape_params=("KP", "KOP", "ACC"))


def _fixed(grid, *args, **meta):
    block, warps = _default(meta)
    combine_kernel[grid](*args, **meta, BLOCK=block, num_warps=warps)


def _launch(flat, K, weights, segment_ids, *, out_flat=None, out_list=None, skip=None):
    """One launch (per 2**31 - 1 programs) of the combine kernel; flat must be contiguous."""
    P = len(flat) // K
    device, dtype = flat[0].device, flat[0].dtype
    w3 = (weights if weights.dim() == 3 else weights.unsqueeze(1)).contiguous()
    KO, num_segments = w3.shape[1], w3.shape[0]
    plan = chunk_plan([t.numel() for t in flat[:P]], segment_ids, num_segments, device)
    table = pointer_table(flat, device)
    if out_list is not None:
        outs = pointer_table(out_list, device)
        out_table, out_dtype, out_ptr, aligned = outs.addresses, out_list[0].dtype, w3, outs.aligned
        kernel = _fixed  # in place: never autotuned (timing runs would rewrite the outputs)
    else:
        out_table, out_dtype, out_ptr, aligned = table.addresses, out_flat.dtype, out_flat, True
        kernel = _combine_tuned
    meta = dict(K=K, KP=triton.next_power_of_2(K), KO=KO, KOP=triton.next_power_of_2(KO),
                IN_DTYPE=common.TL_DTYPES[dtype], OUT_DTYPE=common.TL_DTYPES[out_dtype],
                ACC=common.accumulate_tl_dtype(dtype), OUT_FLAT=out_list is None,
                HAS_SKIP=skip is not None, ALIGNED=table.aligned and aligned, CHUNK=plan.chunk)
    skip_ptr = skip if skip is not None else w3
    with common.device_guard(device):
        common.launch_over_programs(
            plan.num_chunks,
            lambda first, count: kernel(
                (count,), table.addresses, plan.chunk_tensor_d, plan.chunk_offset_d,
                plan.sizes_d, plan.starts_d, plan.segment_d, w3, out_table, out_ptr, skip_ptr, P,
                plan.total, first, **meta),
            "combine" if out_list is None else "combine_into")


def flat_output_shape(flat, num_objectives, weights):
    """[total] for weights [S, K], [KO, total] for weights [S, KO, K] (padded flat_layout)."""
    P = len(flat) // num_objectives
    _, total = flat_layout([t.numel() for t in flat[:P]])
    return (total,) if weights.dim() == 2 else (weights.shape[1], total)


def combine_forward(flat, num_objectives, weights, segment_ids):
    """Fresh flat output: [total] for weights [S, K], [KO, total] for weights [S, KO, K]."""
    flat = [t.contiguous() for t in flat]
    # Gaps between the padded tensor starts stay uninitialised: only the views are handed out.
    out = torch.empty(flat_output_shape(flat, num_objectives, weights), dtype=flat[0].dtype,
                      device=flat[0].device)
    _launch(flat, num_objectives, weights, segment_ids, out_flat=out)
    return out


def combine_into_forward(flat, num_objectives, weights, segment_ids, out, skip):
    flat = [t.contiguous() for t in flat]
    # The kernel writes through addresses, so it needs contiguous outputs: write into contiguous
    # copies (which hold the old values, in case of skip) and copy back.
    staged = [o if o.is_contiguous() else o.contiguous() for o in out]
    _launch(flat, num_objectives, weights, segment_ids, out_list=staged,
            skip=None if skip is None else skip.reshape(1))
    for o, s in zip(out, staged):
        if s is not o:
            o.copy_(s)


def split_flat_output(buffer: torch.Tensor, like, rows: int) -> list[torch.Tensor]:
    """Views of a [rows, total] flat buffer (flat_layout) as rows * P tensors (row-major),
    shaped like the P tensors ``like`` (the first P of an objective-major list)."""
    starts, _ = flat_layout([t.numel() for t in like])
    return [row.narrow(0, start, t.numel()).view(t.shape)
            for row in buffer.reshape(rows, -1)
            for start, t in zip(starts, like)]


@torch.library.custom_op("fused_balance::triton_combine", mutates_args=())
def triton_combine(flat: list[torch.Tensor], num_objectives: int, weights: torch.Tensor,
                   segment_ids: list[int]) -> torch.Tensor:
    return combine_forward(flat, num_objectives, weights, segment_ids)


@triton_combine.register_fake
def _(flat, num_objectives, weights, segment_ids):
    return flat[0].new_empty(flat_output_shape(flat, num_objectives, weights))


def _setup_context(ctx, inputs, output):
    flat, num_objectives, weights, segment_ids = inputs
    ctx.save_for_backward(weights, *flat)
    ctx.num_objectives = num_objectives
    ctx.segment_ids = segment_ids


def _backward(ctx, grad_buffer):
    weights, *flat = ctx.saved_tensors
    K = ctx.num_objectives
    P = len(flat) // K
    w3 = weights if weights.dim() == 3 else weights.unsqueeze(1)
    KO, S = w3.shape[1], w3.shape[0]
    grad_out = split_flat_output(grad_buffer.to(flat[0].dtype).contiguous(), flat[:P], KO)
    grad_flat = grad_weights = None
    if ctx.needs_input_grad[0]:
        buffer = torch.ops.fused_balance.triton_combine(grad_out, KO, w3.transpose(1, 2),
                                                        ctx.segment_ids)
        grad_flat = split_flat_output(buffer, flat[:P], K)
    if ctx.needs_input_grad[2]:
        G = torch.ops.fused_balance.triton_gram(grad_out + list(flat), KO + K, ctx.segment_ids, S)
        grad_weights = G[:, :KO, KO:].to(weights.dtype).reshape(weights.shape)
    return grad_flat, None, grad_weights, None


triton_combine.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fused_balance::triton_combine_into", mutates_args=("out",))
def triton_combine_into(flat: list[torch.Tensor], num_objectives: int, weights: torch.Tensor,
                        segment_ids: list[int], out: list[torch.Tensor],
                        skip: Optional[torch.Tensor]) -> None:
    combine_into_forward(flat, num_objectives, weights, segment_ids, out, skip)


@triton_combine_into.register_fake
def _(flat, num_objectives, weights, segment_ids, out, skip):
    return None
