"""Balanced AdamW: one launch reads the K gradients, p, m and v once and writes p, m and v.

The combined gradient d = sum_k w[seg(p), k] g[k][p] lives only in registers. It is rounded to the
gradients' dtype before the update, as fused_balance.reference (which materialises it) does, then
AdamW runs in the parameters' accumulate dtype exactly as reference.balanced_adamw_ writes it:

    p <- p * (1 - lr * wd)
    m <- beta1 * m + (1 - beta1) * d
    v <- beta2 * v + (1 - beta2) * d * d
    p <- p - (lr / bc1) * m / (sqrt(v / bc2) + eps)

Hyper-parameters travel in one small device tensor of the accumulate dtype (an fp32 scalar kernel
argument would round fp64 hyper-parameters): [beta1, 1-beta1, beta2, 1-beta2, eps, bc2] followed
by (1 - lr*wd, lr/bc1) once when every tensor shares them, or per tensor. ``skip`` is read in the
kernel: when True no program touches memory.

Never autotuned: the kernel updates its operands in place, and an autotuner's timing runs would
apply the step several times.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_balance._dtypes import accumulate_dtype
from fused_balance.ops import define_family

from . import common
from .common import cast_for_store, weighted_chunk
from .pointer_table import chunk_table, hyper_table, pointer_table


@triton.jit
def _adamw_block(grad_base, w, p_base, m_base, v_base, idx, grad_mask, mask, beta1,
                 one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction2, decay, step_size,
                 G_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
                 V_DTYPE: tl.constexpr, G_ACC: tl.constexpr, ACC: tl.constexpr):
    x = tl.load(grad_base[:, None] + idx[None, :], mask=grad_mask, other=0.0).to(G_ACC)
    # The combined gradient, rounded to the gradients' dtype as reference.combine returns it.
    d = cast_for_store(tl.sum(x * w[:, None], axis=0), G_DTYPE).to(ACC)
    p = tl.load(p_base + idx, mask=mask, other=0.0).to(ACC)
    m = tl.load(m_base + idx, mask=mask, other=0.0).to(ACC)
    v = tl.load(v_base + idx, mask=mask, other=0.0).to(ACC)
    p = p * decay
    m = beta1 * m + one_minus_beta1 * d
    v = beta2 * v + one_minus_beta2 * d * d
    if ACC == tl.float64:  # fp64 division and sqrt are always correctly rounded
        p = p - step_size * m / (tl.sqrt(v / bias_correction2) + eps)
    else:  # fp32 `/` and tl.sqrt may be approximate on the GPU: ask for IEEE rounding
        p = p - tl.div_rn(step_size * m, tl.sqrt_rn(tl.div_rn(v, bias_correction2)) + eps)
    tl.store(p_base + idx, cast_for_store(p, P_DTYPE), mask=mask)
    tl.store(m_base + idx, cast_for_store(m, M_DTYPE), mask=mask)
    tl.store(v_base + idx, cast_for_store(v, V_DTYPE), mask=mask)


@triton.jit
def balanced_adamw_kernel(grad_table, state_table, chunk_tensor, chunk_offset, sizes, segment,
                          weights, hyper, skip, num_tensors, first_program,
                          K: tl.constexpr, KP: tl.constexpr, G_DTYPE: tl.constexpr,
                          P_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr, V_DTYPE: tl.constexpr,
                          G_ACC: tl.constexpr, ACC: tl.constexpr, PER_TENSOR: tl.constexpr,
                          HAS_SKIP: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr,
                          BLOCK: tl.constexpr):
    run = True
    if HAS_SKIP:
        run = tl.load(skip) == 0
    if run:
        t, start, length, grad_base, row_ok, w = weighted_chunk(
            grad_table, chunk_tensor, chunk_offset, sizes, segment, weights, num_tensors,
            first_program, K, KP, G_DTYPE, G_ACC, CHUNK)

        p_base = tl.load(state_table + t).to(tl.pointer_type(P_DTYPE)) + start
        m_base = tl.load(state_table + num_tensors + t).to(tl.pointer_type(M_DTYPE)) + start
        v_base = tl.load(state_table + 2 * num_tensors + t).to(tl.pointer_type(V_DTYPE)) + start
        if ALIGNED:
            grad_base = tl.multiple_of(grad_base, 16)
            p_base = tl.multiple_of(p_base, 16)
            m_base = tl.multiple_of(m_base, 16)
            v_base = tl.multiple_of(v_base, 16)

        beta1 = tl.load(hyper + 0)
        one_minus_beta1 = tl.load(hyper + 1)
        beta2 = tl.load(hyper + 2)
        one_minus_beta2 = tl.load(hyper + 3)
        eps = tl.load(hyper + 4)
        bias_correction2 = tl.load(hyper + 5)
        if PER_TENSOR:
            decay = tl.load(hyper + 6 + 2 * t)
            step_size = tl.load(hyper + 7 + 2 * t)
        else:
            decay = tl.load(hyper + 6)
            step_size = tl.load(hyper + 7)

        lanes = tl.arange(0, BLOCK)
        full = length - length % BLOCK
        for i in range(0, full, BLOCK):  # whole blocks: lane-constant masks, vector access
            _adamw_block(grad_base, w, p_base, m_base, v_base, i + lanes, row_ok[:, None], True,
                         beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bias_correction2,
                         decay, step_size, G_DTYPE, P_DTYPE, M_DTYPE, V_DTYPE, G_ACC, ACC)
        idx = full + lanes
        tail = idx < length
        _adamw_block(grad_base, w, p_base, m_base, v_base, idx, row_ok[:, None] & tail[None, :],
                     tail, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                     bias_correction2, decay, step_size, G_DTYPE, P_DTYPE, M_DTYPE, V_DTYPE,
                     G_ACC, ACC)


def _default_config(K, fp64=False):
    if common.INTERPRETED:
        return common.INTERPRETER_BLOCK, 4
    # Live tile: K gradient rows plus p, m, v. 512 x 4 warps = 4 values per thread and array
    # (one 16-byte access each), under 72 registers for K <= 5 (ptxas, sm_90 and sm_80).
    # fp64 takes register pairs: half the block from K = 9 (K = 32 spilled at 256).
    if triton.next_power_of_2(K) <= 8:
        return 512, 4
    return (128, 4) if fp64 else (256, 4)


def _run_group(flat, K, weights, segment_ids, params, exp_avgs, exp_avg_sqs, lrs,
               weight_decays, beta1, beta2, eps, step, skip):
    P = len(params)
    device = params[0].device
    acc = accumulate_dtype(params[0].dtype)
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    hyper = [beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, bc2]
    per_tensor = len(set(lrs)) > 1 or len(set(weight_decays)) > 1
    pairs = zip(lrs, weight_decays) if per_tensor else [(lrs[0], weight_decays[0])]
    for lr, wd in pairs:
        hyper += [1.0 - lr * wd, lr / bc1]
    hyper_d = hyper_table(hyper, acc, device)  # pinned, non-blocking: no sync per step

    state = [t if t.is_contiguous() else t.contiguous()
             for t in list(params) + list(exp_avgs) + list(exp_avg_sqs)]
    state_table = pointer_table(state, device)
    grad_table = pointer_table(flat, device)
    layout = chunk_table([t.numel() for t in params], segment_ids, weights.shape[0], device)
    w = weights.contiguous()
    dtype = flat[0].dtype
    block, warps = _default_config(K, fp64=torch.float64 in (dtype, params[0].dtype))
    meta = dict(K=K, KP=triton.next_power_of_2(K), G_DTYPE=common.TL_DTYPES[dtype],
                P_DTYPE=common.TL_DTYPES[params[0].dtype],
                M_DTYPE=common.TL_DTYPES[exp_avgs[0].dtype],
                V_DTYPE=common.TL_DTYPES[exp_avg_sqs[0].dtype],
                G_ACC=common.accumulate_tl_dtype(dtype),
                ACC=common.accumulate_tl_dtype(params[0].dtype),
                PER_TENSOR=per_tensor, HAS_SKIP=skip is not None,
                ALIGNED=grad_table.aligned and state_table.aligned, CHUNK=layout.chunk,
                BLOCK=block, num_warps=warps)
    skip_ptr = skip.reshape(1) if skip is not None else w
    with common.device_guard(device):
        common.launch_over_programs(
            layout.num_chunks,
            lambda first, count: balanced_adamw_kernel[(count,)](
                grad_table.addresses, state_table.addresses, layout.chunk_tensor_d,
                layout.chunk_offset_d, layout.sizes_d, layout.segment_d, w, hyper_d, skip_ptr, P, first,
                **meta),
            "balanced_adamw")
    for original, staged in zip(list(params) + list(exp_avgs) + list(exp_avg_sqs), state):
        if staged is not original:
            original.copy_(staged)


def balanced_adamw_(grads, weights, segment_ids, params, exp_avgs, exp_avg_sqs, lrs,
                    weight_decays, beta1, beta2, eps, step, skip) -> None:
    K = weights.shape[1]
    grads = [t.contiguous() for t in grads]
    P = len(params)
    # One launch per (param, exp_avg, exp_avg_sq) dtype triple: the pointer casts are static.
    # Ordinary training has one triple, hence one launch.
    groups: dict = {}
    for p in range(P):
        key = (params[p].dtype, exp_avgs[p].dtype, exp_avg_sqs[p].dtype)
        groups.setdefault(key, []).append(p)
    for members in groups.values():
        if len(members) == P:
            pick = lambda seq: list(seq)  # noqa: E731
            sub_grads = grads
        else:
            pick = lambda seq: [seq[i] for i in members]  # noqa: E731
            sub_grads = [grads[k * P + i] for k in range(K) for i in members]
        _run_group(sub_grads, K, weights, pick(segment_ids), pick(params), pick(exp_avgs),
                   pick(exp_avg_sqs), pick(lrs), pick(weight_decays), beta1, beta2, eps, step,
                   skip)


define_family("triton_")
torch.library.impl("fused_balance::triton_balanced_adamw_", ("cpu", "cuda"))(balanced_adamw_)
