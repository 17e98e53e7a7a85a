"""The plan ops in Triton: ``fused_balance::triton_bank_gram``, ``triton_bank_combine_into`` and
``triton_bank_adamw_``, with the schemas and semantics of the C++ ops ``bank_gram`` ...
(csrc/bank_cpu.cpp is the specification, csrc/bank_common.h the argument checks).

The K gradients live in one ``[K, N]`` bank and fused_balance.BalancePlan built the chunk table
once (multi_tensor.h, PlanColumn: start, length, segment, param, offset in the param, group), so a
call uploads nothing and reads nothing back: the weights, skip flag, live mask, step counts and
hyper-parameters are all read on the device, and a planned step can be captured in a CUDA graph.

- bank_gram, two launches. Stage 1: program (c, b) multiplies the rows of objective block pair b
  over chunk c, every product and sum in float64 (a product of two fp32 / bf16 / fp16 values is
  exact there), and stores its share of chunk c's K(K+1)/2 partials. K <= 8 is one block pair:
  each bank element is loaded once; past 8 objectives the [8, 8] block pairs of the upper
  triangle each read their two row blocks. Stage 2: program (s, pairs) sums segment s's chunk
  partials in the order of bank_common.h's reduce_partials_fixed_order (32 lanes strided over the
  chunks in table order, then halving), so the result does not depend on the grid; a non-finite
  total raises found_inf (stored False by stage 1's first program: no extra launch).
- bank_combine_into, one launch: out = sum_k w[seg, k] g_k, the weights rounded once to the math
  type (saturating beyond fp32's range), products and sums rounded in objective order, as
  multi_tensor.h's combine_element.
- bank_adamw_, two launches: AdamW on the combination (rounded to a 16-bit gradient dtype first,
  then AdamW in the parameters' accumulate dtype, with multi_tensor.h's adamw_update order of
  roundings), parameters reached through the int64 pointer table; then every stepped parameter's
  count + 1 (a second launch, so no chunk reads a count already moved).

Combine and AdamW are launched with ``enable_fp_fusion=False``: an FMA would round w*g + d once
instead of twice and leave the C++ op's results. The bias corrections need beta ** step for a
step count read on the device; the interpreter has no pow, so it is computed by squaring in
double-double arithmetic (rounded once, as a correctly rounded pow would be): m and v equal the
C++ op's bit for bit, and the parameters agree wherever C's pow is correctly rounded.

Tables are checked as the C++ ops check them: O(1) shape checks always; the chunk ranges against
the bank on the CPU (where reading the table costs no device read), and on a GPU in the kernels,
which skip an out-of-range chunk (the Gram stores NaN for it, so found_inf is raised) and assert
under TRITON_DEBUG=1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_balance.ops import _bank_adamw_fake, _bank_combine_into_fake, _bank_gram_fake
from fused_balance.plan import PLAN_CHUNK_ELEMS

from . import common
from .common import cast_for_store

# multi_tensor.h: PlanColumn and HyperColumn
# (tl.constexpr: the kernels read them too)
_COL_START, _COL_LENGTH, _COL_SEGMENT, _COL_PARAM, _COL_PARAM_OFFSET, _COL_GROUP = (tl.constexpr(i) for i in range(6))
_PLAN_COLUMNS = tl.constexpr(6)
_HYPER_COLUMNS = tl.constexpr(5)
_CHUNK_ELEMS = tl.constexpr(PLAN_CHUNK_ELEMS)
# The objectives a launch takes (bank_cuda.cu's kMaxObjectives): combine unrolls its K rows.
MAX_OBJECTIVES = 64
# bank_common.h: kReduceLanes, the width of the fixed-order stage-2 sum
_REDUCE_LANES = 32
# Every bank kernel runs 4 warps (_gram_block and _vector_block size their blocks for it).
NUM_WARPS = 4
# Combine and AdamW compile without FMA contraction: w*g + d rounds twice, as in the C++ ops.
EXACT_ROUNDING = {"enable_fp_fusion": False}
# Step counts per count_steps_kernel program.
COUNT_BLOCK = 1024
_FLOAT_MAX = 3.4028234663852886e38

# The C++ schemas (csrc/ops_cpu.cpp), defined under the prefix triton_.
BANK_OP_SCHEMAS = {
    "bank_gram": "(Tensor bank, Tensor chunks, Tensor seg_offsets, int num_segments) -> (Tensor, Tensor)",
    "bank_combine_into": "(Tensor bank, Tensor weights, Tensor chunks, Tensor(a!) out, Tensor? skip) -> ()",
    "bank_adamw_": ("(Tensor bank, Tensor weights, Tensor chunks, Tensor param_ptrs, Tensor(a!) exp_avg, "
                    "Tensor(b!) exp_avg_sq, Tensor hyper, Tensor(c!) step, Tensor? skip, Tensor? live=None) -> ()"),
}


# ------------------------------------------------------------------------------- device pieces
@triton.jit
def _chunk_fields(chunks, c, row, num_segments):
    """Row c of the table: (start, length, segment, in range?) checked against the bank's row
    and the weights' rows (bank_cuda.cu's check_chunk)."""
    r = chunks + c * _PLAN_COLUMNS
    start = tl.load(r + _COL_START)
    length = tl.load(r + _COL_LENGTH)
    segment = tl.load(r + _COL_SEGMENT)
    valid = (start >= 0) & (length >= 1) & (length <= _CHUNK_ELEMS) & (start + length <= row)
    valid = valid & (segment >= 0) & (segment < num_segments)
    tl.device_assert(valid, "fused_balance: a chunk of the plan table is out of range")
    return start, length, segment, valid


@triton.jit
def _weight(ptr, ACC: tl.constexpr):
    """A float64 weight in the math type; beyond fp32's range it saturates (weight_as<float>)."""
    w = tl.load(ptr).to(tl.float64)
    if ACC == tl.float32:
        w = tl.where(w > 3.4028234663852886e38, 3.4028234663852886e38, w)
        w = tl.where(w < -3.4028234663852886e38, -3.4028234663852886e38, w)
    return w.to(ACC)


@triton.jit
def _load(ptrs, mask):
    """Masked, or not at all for whole blocks (mask None), so that loads can be vectorised."""
    if mask is None:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _store(ptrs, value, mask):
    if mask is None:
        tl.store(ptrs, value)
    else:
        tl.store(ptrs, value, mask=mask)


@triton.jit
def _combination(bank, ld, w_row, pos, mask, K: tl.constexpr, ACC: tl.constexpr):
    """sum_k w[k] g_k[pos] in ACC, each product and sum rounded, in objective order. Up to 16
    rows unrolled, so their loads are in flight together; past that a loop (all 64 rows hoisted
    spill registers on sm_90)."""
    ld = ld.to(tl.int64)  # k * ld passes 2**31 for a large bank; the JIT types an ld below 2**31 i32
    d = _weight(w_row, ACC) * _load(bank + pos, mask).to(ACC)
    if K <= 16:
        for k in tl.static_range(1, K):
            d = d + _weight(w_row + k, ACC) * _load(bank + k * ld + pos, mask).to(ACC)
    else:
        for k in range(1, K):
            d = d + _weight(w_row + k, ACC) * _load(bank + k * ld + pos, mask).to(ACC)
    return d


@triton.jit
def _aligned_body(start, length, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """How a chunk is walked so that whole blocks start at multiples of VEC elements (16 bytes
    when the bank, its ld and the flat buffers are 16-byte aligned, which the launcher's
    specialisation tells the compiler): (head, first, full) -- elements [start, start + head)
    and [first + full, start + length) one masked block each, [first, first + full) in whole
    unmasked blocks."""
    head = tl.minimum((VEC - start % VEC) % VEC, length)
    first = start + head
    full = (length - head) // BLOCK * BLOCK
    return head, first, full


# ----------------------------------------------------------------------------------- Gram
@triton.jit
def _pair_block(x_a, x_b):
    return x_a[:, None, :] * x_b[None, :, :]


@triton.jit
def bank_gram_partials_kernel(bank, ld, chunks, partials, found_inf, row, num_segments, first_program,
                              K: tl.constexpr, KB: tl.constexpr, NB: tl.constexpr,
                              BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) + first_program
    b = tl.program_id(1)
    if (c == 0) & (b == 0):  # stage 2 (later on the stream) raises it where a total is not finite
        tl.store(found_inf, False)
    start, length, segment, valid = _chunk_fields(chunks, c, row, num_segments)
    length = tl.where(valid, length, 0)
    start = tl.where(valid, start, 0)
    # block pair b of the upper triangle, row-major: (bi, bj), bi <= bj < NB
    bi = b * 0
    for i in tl.static_range(1, NB):
        bi = tl.where(b >= i * NB - (i * (i - 1)) // 2, i, bi)
    bj = bi + b - (bi * NB - (bi * (bi - 1)) // 2)

    rows = tl.arange(0, KB)
    k = bi * KB + rows
    l = bj * KB + rows
    base_a = bank + k.to(tl.int64) * ld + start
    base_b = bank + l.to(tl.int64) * ld + start
    ok_a = (k < K)[:, None]
    ok_b = (l < K)[:, None]
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([KB, KB, BLOCK], dtype=tl.float64)
    full = length // BLOCK * BLOCK
    for i in range(0, full, BLOCK):  # whole blocks: lane-constant masks
        idx = (i + lanes)[None, :]
        acc += _pair_block(tl.load(base_a[:, None] + idx, mask=ok_a, other=0.0).to(tl.float64),
                           tl.load(base_b[:, None] + idx, mask=ok_b, other=0.0).to(tl.float64))
    idx = (full + lanes)[None, :]
    tail = idx < length
    acc += _pair_block(tl.load(base_a[:, None] + idx, mask=ok_a & tail, other=0.0).to(tl.float64),
                       tl.load(base_b[:, None] + idx, mask=ok_b & tail, other=0.0).to(tl.float64))
    block = tl.sum(acc, axis=2)  # [KB, KB]
    block = tl.where(valid, block, float("nan"))  # a bad table row poisons the Gram: found_inf

    kk = k[:, None]
    ll = l[None, :]
    pair = kk * K - (kk * (kk - 1)) // 2 + (ll - kk)  # multi_tensor.h's pair_index
    npairs: tl.constexpr = K * (K + 1) // 2
    tl.store(partials + c * npairs + pair, block, mask=(kk <= ll) & (ll < K))


@triton.jit
def bank_gram_reduce_kernel(partials, seg_offsets, gram, found_inf, num_chunks,
                            K: tl.constexpr, PB: tl.constexpr, LANES: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    npairs: tl.constexpr = K * (K + 1) // 2
    q = tl.program_id(1) * PB + tl.arange(0, PB)
    q_ok = q < npairs
    lo = tl.load(seg_offsets + s)
    hi = tl.load(seg_offsets + s + 1)
    valid = (lo >= 0) & (lo <= hi) & (hi <= num_chunks)
    tl.device_assert(valid, "fused_balance: seg_offsets out of range")
    hi = tl.where(valid, hi, lo)

    lane = tl.arange(0, LANES)
    acc = tl.zeros([LANES, PB], dtype=tl.float64)
    for c0 in range(lo, hi, LANES):  # lane l: chunks lo + l, lo + l + 32, ... in table order
        c = c0 + lane
        acc += tl.load(partials + c[:, None] * npairs + q[None, :],
                       mask=(c < hi)[:, None] & q_ok[None, :], other=0.0)
    # lane l += lane l + 16, then + 8, ..., lane 0 += lane 1 (each a sum of two: order-free)
    tl.static_assert(LANES == 32)
    acc = tl.sum(tl.reshape(acc, [2, 16, PB]), axis=0)
    acc = tl.sum(tl.reshape(acc, [2, 8, PB]), axis=0)
    acc = tl.sum(tl.reshape(acc, [2, 4, PB]), axis=0)
    acc = tl.sum(tl.reshape(acc, [2, 2, PB]), axis=0)
    total = tl.sum(acc, axis=0)  # [2, PB] -> [PB]: lane 0 + lane 1
    total = tl.where(valid, total, float("nan"))

    k = q * 0
    for r in tl.static_range(1, K):  # pair q -> (k, l) (pair_of_index)
        k = tl.where(q >= r * K - (r * (r - 1)) // 2, r, k)
    l = k + q - (k * K - (k * (k - 1)) // 2)
    out = gram + s * (K * K)
    tl.store(out + k * K + l, total, mask=q_ok)
    tl.store(out + l * K + k, total, mask=q_ok)
    bad = tl.max(tl.where(q_ok & ((total != total) | (tl.abs(total) == float("inf"))), 1, 0), axis=0)
    tl.store(found_inf, True, mask=bad > 0)


def _gram_block(K: int) -> tuple[int, int, int]:
    """(KB, NB, BLOCK): objectives per block, blocks, elements per loop trip. The [KB, KB, BLOCK]
    float64 accumulator stays within ~64 doubles a thread (4 warps): all K <= 8 in one block."""
    kb = min(triton.next_power_of_2(K), 8)
    nb = triton.cdiv(K, kb)
    if common.INTERPRETED:
        return kb, nb, common.INTERPRETER_BLOCK
    per_thread = max(1, min(8, 32 // (kb * kb)))
    return kb, nb, 128 * per_thread


def _reduce_pairs(K: int) -> int:
    return min(triton.next_power_of_2(K * (K + 1) // 2), 64)


# -------------------------------------------------------------------------------- combine
@triton.jit
def _combine_block(bank, ld, w_row, out, pos, mask, K: tl.constexpr, ACC: tl.constexpr,
                   OUT_DTYPE: tl.constexpr):
    d = _combination(bank, ld, w_row, pos, mask, K, ACC)
    _store(out + pos, cast_for_store(d, OUT_DTYPE), mask)


@triton.jit
def bank_combine_kernel(bank, ld, chunks, weights, out, skip, row, num_segments, first_program,
                        K: tl.constexpr, DTYPE: tl.constexpr, ACC: tl.constexpr, HAS_SKIP: tl.constexpr,
                        VEC: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) + first_program
    start, length, segment, run = _chunk_fields(chunks, c, row, num_segments)
    if HAS_SKIP:
        run = run & (tl.load(skip) == 0)
    if run:
        w_row = weights + segment * K
        lanes = tl.arange(0, BLOCK)
        head, first, full = _aligned_body(start, length, VEC, BLOCK)
        _combine_block(bank, ld, w_row, out, start + lanes, lanes < head, K, ACC, DTYPE)
        for i in range(0, full, BLOCK):
            pos = tl.multiple_of(first + i, VEC) + lanes
            _combine_block(bank, ld, w_row, out, pos, None, K, ACC, DTYPE)
        pos = first + full + lanes
        _combine_block(bank, ld, w_row, out, pos, pos < start + length, K, ACC, DTYPE)


def _vector_block(*dtypes: torch.dtype) -> tuple[int, int]:
    """(VEC, BLOCK) of a streaming kernel over 4 warps: VEC elements make 16 bytes of the
    narrowest dtype streamed; each thread moves one such vector per array and trip."""
    vec = max(16 // d.itemsize for d in dtypes)
    return vec, (common.INTERPRETER_BLOCK if common.INTERPRETED else 128 * vec)


# ---------------------------------------------------------------------------------- AdamW
@triton.jit
def _two_prod(a, b):
    """(a*b, its rounding error) exactly, by Dekker's splitting (no FMA: the interpreter's fma
    rounds twice)."""
    split = (a * 0.0 + 134217728.0) + 1.0  # 2**27 + 1, built in float64 (not an fp32 literal)
    ca = split * a
    a_hi = ca - (ca - a)
    a_lo = a - a_hi
    cb = split * b
    b_hi = cb - (cb - b)
    b_lo = b - b_hi
    p = a * b
    return p, ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


@triton.jit
def _dd_mul(ah, al, bh, bl):
    p, e = _two_prod(ah, bh)
    e = e + (ah * bl + al * bh)
    hi = p + e
    return hi, e - (hi - p)


@triton.jit
def _pow_step(base, t):
    """base ** t (float64, 0 <= t < 2**25: float32 step counts are exact to 2**24) by squaring in
    double-double arithmetic, rounded once at the end."""
    rh = base * 0.0 + 1.0
    rl = base * 0.0
    bh = base
    bl = base * 0.0
    for bit in tl.static_range(25):
        nh, nl = _dd_mul(rh, rl, bh, bl)
        take = ((t >> bit) & 1) != 0
        rh = tl.where(take, nh, rh)
        rl = tl.where(take, nl, rl)
        bh, bl = _dd_mul(bh, bl, bh, bl)
    return rh


@triton.jit
def _adamw_block(bank, ld, w_row, p_base, m, v, pos, start, mask, decay, beta1, one_minus_beta1, beta2,
                 one_minus_beta2, bias_correction2, eps, step_size, K: tl.constexpr,
                 G_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, GA: tl.constexpr, A: tl.constexpr):
    pp = p_base + (pos - start)
    p = _load(pp, mask).to(A)
    mm = _load(m + pos, mask).to(A)
    vv = _load(v + pos, mask).to(A)
    d = _combination(bank, ld, w_row, pos, mask, K, GA)
    if G_DTYPE != GA:  # a 16-bit gradient: its combination rounded to that dtype (round_through)
        d = cast_for_store(d, G_DTYPE).to(tl.float32)
    d = d.to(A)
    # multi_tensor.h's adamw_update, rounding for rounding
    p = p * decay
    mm = beta1 * mm + one_minus_beta1 * d
    vv = beta2 * vv + (one_minus_beta2 * d) * d
    if A == tl.float64:  # fp64 division and sqrt are correctly rounded
        p = p - (step_size * mm) / (tl.sqrt(vv / bias_correction2) + eps)
    else:  # fp32 `/` and tl.sqrt may be approximate on the GPU
        p = p - tl.div_rn(step_size * mm, tl.sqrt_rn(tl.div_rn(vv, bias_correction2)) + eps)
    _store(pp, cast_for_store(p, P_DTYPE), mask)
    _store(m + pos, cast_for_store(mm, P_DTYPE), mask)
    _store(v + pos, cast_for_store(vv, P_DTYPE), mask)


@triton.jit
def bank_adamw_kernel(bank, ld, chunks, weights, param_ptrs, m, v, hyper, step, skip, live, row,
                      num_segments, num_params, num_groups, first_program,
                      K: tl.constexpr, G_DTYPE: tl.constexpr, P_DTYPE: tl.constexpr, GA: tl.constexpr,
                      A: tl.constexpr, HAS_SKIP: tl.constexpr, HAS_LIVE: tl.constexpr, VEC: tl.constexpr,
                      BLOCK: tl.constexpr):
    c = tl.program_id(0).to(tl.int64) + first_program
    start, length, segment, valid = _chunk_fields(chunks, c, row, num_segments)
    param = tl.load(chunks + c * _PLAN_COLUMNS + _COL_PARAM)
    param_offset = tl.load(chunks + c * _PLAN_COLUMNS + _COL_PARAM_OFFSET)
    group = tl.load(chunks + c * _PLAN_COLUMNS + _COL_GROUP)
    fits = (param >= 0) & (param < num_params) & (param_offset >= 0) & (group >= 0) & (group < num_groups)
    tl.device_assert(fits, "fused_balance: a chunk's parameter or group is out of range")
    valid = valid & fits
    param = tl.where(valid, param, 0)
    group = tl.where(valid, group, 0)
    run = valid
    if HAS_SKIP:
        run = run & (tl.load(skip) == 0)
    if HAS_LIVE:  # not reached this step: not stepped
        run = run & (tl.load(live + param, mask=valid, other=0) != 0)
    if run:
        # The step being taken: the stored count + 1; constants in float64, rounded once to A
        # (make_adamw_consts).
        t = tl.load(step + param).to(tl.int64) + 1
        h = hyper + group * _HYPER_COLUMNS
        lr = tl.load(h + 0)
        weight_decay = tl.load(h + 1)
        b1 = tl.load(h + 2)
        b2 = tl.load(h + 3)
        eps = tl.load(h + 4).to(A)
        decay = (1.0 - lr * weight_decay).to(A)
        beta1 = b1.to(A)
        one_minus_beta1 = (1.0 - b1).to(A)
        beta2 = b2.to(A)
        one_minus_beta2 = (1.0 - b2).to(A)
        bias_correction2 = (1.0 - _pow_step(b2, t)).to(A)
        step_size = (lr / (1.0 - _pow_step(b1, t))).to(A)

        p_base = tl.load(param_ptrs + param).to(tl.pointer_type(P_DTYPE)) + param_offset
        w_row = weights + segment * K
        lanes = tl.arange(0, BLOCK)
        head, first, full = _aligned_body(start, length, VEC, BLOCK)
        _adamw_block(bank, ld, w_row, p_base, m, v, start + lanes, start, lanes < head, decay, beta1,
                     one_minus_beta1, beta2, one_minus_beta2, bias_correction2, eps, step_size, K,
                     G_DTYPE, P_DTYPE, GA, A)
        for i in range(0, full, BLOCK):
            pos = tl.multiple_of(first + i, VEC) + lanes
            _adamw_block(bank, ld, w_row, p_base, m, v, pos, start, None, decay, beta1,
                         one_minus_beta1, beta2, one_minus_beta2, bias_correction2, eps, step_size,
                         K, G_DTYPE, P_DTYPE, GA, A)
        pos = first + full + lanes
        _adamw_block(bank, ld, w_row, p_base, m, v, pos, start, pos < start + length, decay, beta1,
                     one_minus_beta1, beta2, one_minus_beta2, bias_correction2, eps, step_size, K,
                     G_DTYPE, P_DTYPE, GA, A)


@triton.jit
def count_steps_kernel(step, skip, live, num_params, HAS_SKIP: tl.constexpr, HAS_LIVE: tl.constexpr,
                       BLOCK: tl.constexpr):
    run = True
    if HAS_SKIP:
        run = tl.load(skip) == 0
    if run:
        p = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        stepped = p < num_params
        if HAS_LIVE:
            stepped = stepped & (tl.load(live + p, mask=stepped, other=0) != 0)
        tl.store(step + p, tl.load(step + p, mask=stepped, other=0.0) + 1.0, mask=stepped)


# ------------------------------------------------------------------------------ host checks
def _fail(op: str, message: str, error=ValueError):
    raise error(f"fused_balance::{op}: {message}")


def _check_bank(op: str, bank: torch.Tensor) -> tuple[int, int, int]:
    """(K, ld, row) of a [K, N] bank with contiguous rows (bank_common.h's check_bank)."""
    if not isinstance(bank, torch.Tensor) or bank.dim() != 2:
        _fail(op, f"bank must be a [K, N] tensor, got {tuple(getattr(bank, 'shape', ()))}")
    if bank.shape[0] < 1:
        _fail(op, "bank has no objective row")
    if bank.stride(1) != 1 or (bank.shape[0] > 1 and bank.stride(0) < bank.shape[1]):
        _fail(op, f"bank rows must be contiguous, got strides {bank.stride()}")
    if bank.dtype not in common.TL_DTYPES:
        _fail(op, f"unsupported dtype {bank.dtype} (expected float32, float64, bfloat16 or float16)", TypeError)
    if bank.shape[0] > MAX_OBJECTIVES:
        _fail(op, f"at most {MAX_OBJECTIVES} objectives")
    K = bank.shape[0]
    return K, (bank.stride(0) if K > 1 else bank.shape[1]), bank.shape[1]


def _check_on(op: str, what: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        _fail(op, f"{what} is on {t.device}, the bank on {device}")


def _check_chunks(op: str, chunks: torch.Tensor, device: torch.device) -> None:
    if not (isinstance(chunks, torch.Tensor) and chunks.dtype == torch.long and chunks.dim() == 2
            and chunks.shape[1] == _PLAN_COLUMNS.value and chunks.is_contiguous()):
        _fail(op, f"chunks must be a contiguous int64 [C, {_PLAN_COLUMNS.value}] table (build it with "
                  "fused_balance.BalancePlan)")
    _check_on(op, "chunks", chunks, device)


def _check_flat(op: str, what: str, t: torch.Tensor, row: int, device: torch.device) -> None:
    if not t.is_contiguous() or t.numel() < row:
        _fail(op, f"{what} must be a contiguous buffer of at least {row} elements, got shape {tuple(t.shape)}")
    _check_on(op, what, t, device)


def _check_weights_and_skip(op, weights, skip, K, device) -> None:
    if weights.dim() != 2 or weights.shape[1] != K:
        _fail(op, f"weights must be [S, K={K}], got shape {tuple(weights.shape)}")
    if not weights.is_floating_point():
        _fail(op, f"weights must be floating point, got {weights.dtype}", TypeError)
    _check_on(op, "weights", weights, device)
    if skip is not None:
        if skip.numel() != 1 or skip.dtype != torch.bool:
            _fail(op, f"skip must be a one-element bool tensor, got {skip.dtype} of shape {tuple(skip.shape)}")
        _check_on(op, "skip", skip, device)


def _check_table_ranges(op, chunks, row, num_segments, num_params=None, num_groups=None) -> None:
    """Every chunk against the bank, like bank_cpu.cpp's read_chunks: O(C) and only for a table
    in host memory, where it costs no device read (the GPU kernels check their own chunk)."""
    if chunks.device.type != "cpu" or chunks.shape[0] == 0:
        return
    start, length, segment, param, offset, group = chunks.unbind(1)
    ok = ((start >= 0) & (length >= 1) & (length <= PLAN_CHUNK_ELEMS) & (start + length <= row)
          & (segment >= 0) & (segment < num_segments) & (param >= 0) & (offset >= 0) & (group >= 0))
    if num_params is not None:
        ok &= (param < num_params) & (group < num_groups)
    if not bool(ok.all()):
        c = int((~ok).nonzero()[0, 0])
        _fail(op, f"chunk {c} of the table is out of range (start {int(start[c])}, length {int(length[c])}, "
                  f"segment {int(segment[c])} for a row of {row} elements and {num_segments} segments)")


def _check_segment_order(op, chunks, seg_offsets, num_segments) -> None:
    """seg_offsets groups the chunks by segment (bank_cpu.cpp's bank_gram checks; host tables only)."""
    if seg_offsets.device.type != "cpu":
        return
    if int(seg_offsets[0]) != 0 or int(seg_offsets[-1]) != chunks.shape[0]:
        _fail(op, "seg_offsets must run from 0 to the chunk count")
    counts = seg_offsets[1:] - seg_offsets[:-1]
    if bool((counts < 0).any()):
        _fail(op, "seg_offsets must not decrease")
    owner = torch.repeat_interleave(torch.arange(num_segments), counts)
    wrong = (chunks[:, _COL_SEGMENT.value] != owner).nonzero()
    if wrong.numel():
        c = int(wrong[0, 0])
        _fail(op, f"chunk {c} is not in segment {int(owner[c])}")


# ------------------------------------------------------------------------------- the ops
def bank_gram(bank: torch.Tensor, chunks: torch.Tensor, seg_offsets: torch.Tensor,
              num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    op = "bank_gram"
    K, ld, row = _check_bank(op, bank)
    if num_segments < 1:
        _fail(op, "num_segments must be >= 1")
    _check_chunks(op, chunks, bank.device)
    if not (seg_offsets.dtype == torch.long and seg_offsets.numel() == num_segments + 1
            and seg_offsets.is_contiguous() and seg_offsets.device == bank.device):
        _fail(op, f"seg_offsets must be a contiguous int64 [S + 1] tensor on {bank.device}")
    _check_table_ranges(op, chunks, row, num_segments)
    _check_segment_order(op, chunks, seg_offsets, num_segments)
    C = chunks.shape[0]
    npairs = K * (K + 1) // 2
    gram = torch.empty(num_segments, K, K, dtype=torch.float64, device=bank.device)
    # written False by the first partials program when there is one (no extra launch)
    found_inf = (torch.empty if C else torch.zeros)((), dtype=torch.bool, device=bank.device)
    partials = torch.empty(max(C, 1) * npairs, dtype=torch.float64, device=bank.device)
    kb, nb, block = _gram_block(K)
    pb = _reduce_pairs(K)
    with common.device_guard(bank.device):
        common.launch_over_programs(
            C,
            lambda first, count: bank_gram_partials_kernel[(count, nb * (nb + 1) // 2)](
                bank, ld, chunks, partials, found_inf, row, num_segments, first, K=K, KB=kb, NB=nb,
                BLOCK=block, num_warps=NUM_WARPS),
            "bank_gram_partials")
        bank_gram_reduce_kernel[(num_segments, triton.cdiv(npairs, pb))](
            partials, seg_offsets, gram, found_inf, C, K=K, PB=pb, LANES=_REDUCE_LANES, num_warps=NUM_WARPS)
        common.LAUNCHES["bank_gram_reduce"] += 1
    return gram, found_inf


def bank_combine_into(bank: torch.Tensor, weights: torch.Tensor, chunks: torch.Tensor, out: torch.Tensor,
                      skip: torch.Tensor | None) -> None:
    op = "bank_combine_into"
    K, ld, row = _check_bank(op, bank)
    _check_chunks(op, chunks, bank.device)
    _check_weights_and_skip(op, weights, skip, K, bank.device)
    _check_flat(op, "out", out, row, bank.device)
    if out.dtype != bank.dtype:
        _fail(op, f"out has dtype {out.dtype}, the bank {bank.dtype}", TypeError)
    _check_table_ranges(op, chunks, row, weights.shape[0])
    w = weights.to(torch.float64).contiguous()  # no-op for the plan's float64 weights
    vec, block = _vector_block(bank.dtype)
    with common.device_guard(bank.device):
        common.launch_over_programs(
            chunks.shape[0],
            lambda first, count: bank_combine_kernel[(count,)](
                bank, ld, chunks, w, out, w if skip is None else skip.reshape(1), row, w.shape[0], first,
                K=K, DTYPE=common.TL_DTYPES[bank.dtype], ACC=common.accumulate_tl_dtype(bank.dtype), HAS_SKIP=skip is not None, VEC=vec,
                BLOCK=block, num_warps=NUM_WARPS, **EXACT_ROUNDING),
            "bank_combine_into")


def bank_adamw_(bank: torch.Tensor, weights: torch.Tensor, chunks: torch.Tensor, param_ptrs: torch.Tensor,
                exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, hyper: torch.Tensor, step: torch.Tensor,
                skip: torch.Tensor | None, live: torch.Tensor | None = None) -> None:
    op = "bank_adamw_"
    K, ld, row = _check_bank(op, bank)
    device = bank.device
    _check_chunks(op, chunks, device)
    _check_weights_and_skip(op, weights, skip, K, device)
    if not (param_ptrs.dtype == torch.long and param_ptrs.dim() == 1 and param_ptrs.is_contiguous()
            and param_ptrs.device == device):
        _fail(op, f"param_ptrs must be a contiguous int64 [P] tensor on {device}")
    _check_flat(op, "exp_avg", exp_avg, row, device)
    _check_flat(op, "exp_avg_sq", exp_avg_sq, row, device)
    if exp_avg_sq.dtype != exp_avg.dtype or exp_avg.dtype not in common.TL_DTYPES:
        _fail(op, f"exp_avg / exp_avg_sq must have the parameters' dtype {exp_avg.dtype}", TypeError)
    if not (hyper.dtype == torch.float64 and hyper.dim() == 2 and hyper.shape[1] == _HYPER_COLUMNS.value
            and hyper.is_contiguous() and hyper.device == device):
        _fail(op, f"hyper must be a contiguous float64 [G, {_HYPER_COLUMNS.value}] tensor on {device} (lr, "
                  "weight_decay, beta1, beta2, eps per group)")
    P = param_ptrs.numel()
    if not (step.numel() == P and step.dtype == torch.float32 and step.is_contiguous() and step.device == device):
        _fail(op, f"step must be a contiguous float32 [P] tensor on {device} (each parameter's steps taken so "
                  f"far; incremented where stepped), got shape {tuple(step.shape)} for {P} parameters")
    if live is not None and not (live.dtype == torch.bool and live.numel() == P and live.is_contiguous()
                                 and live.device == device):
        _fail(op, f"live must be None or a contiguous bool [P] tensor on {device} (the parameters this step "
                  "updates)")
    _check_table_ranges(op, chunks, row, weights.shape[0], P, hyper.shape[0])
    w = weights.to(torch.float64).contiguous()
    skip_flag = w if skip is None else skip.reshape(1)
    live_flags = w if live is None else live
    vec, block = _vector_block(bank.dtype, exp_avg.dtype)
    flags = dict(HAS_SKIP=skip is not None, HAS_LIVE=live is not None)
    with common.device_guard(device):
        common.launch_over_programs(
            chunks.shape[0],
            lambda first, count: bank_adamw_kernel[(count,)](
                bank, ld, chunks, w, param_ptrs, exp_avg, exp_avg_sq, hyper, step, skip_flag, live_flags, row,
                w.shape[0], P, hyper.shape[0], first, K=K, G_DTYPE=common.TL_DTYPES[bank.dtype],
                P_DTYPE=common.TL_DTYPES[exp_avg.dtype], GA=common.accumulate_tl_dtype(bank.dtype),
                A=common.accumulate_tl_dtype(exp_avg.dtype), VEC=vec, BLOCK=block, num_warps=NUM_WARPS,
                **EXACT_ROUNDING, **flags),
            "bank_adamw")
        if P:
            count_steps_kernel[(triton.cdiv(P, COUNT_BLOCK),)](step, skip_flag, live_flags, P, BLOCK=COUNT_BLOCK,
                                                               num_warps=NUM_WARPS, **flags)
            common.LAUNCHES["bank_count_steps"] += 1


# ---------------------------------------------------------------------------- registration
_IMPLS = {"bank_gram": bank_gram, "bank_combine_into": bank_combine_into, "bank_adamw_": bank_adamw_}
_FAKES = {"bank_gram": _bank_gram_fake, "bank_combine_into": _bank_combine_into_fake,
          "bank_adamw_": _bank_adamw_fake}

for _op, _schema in BANK_OP_SCHEMAS.items():
    _name = f"fused_balance::triton_{_op}"
    torch.library.define(_name, _schema)
    torch.library.impl(_name, ("cpu", "cuda"))(_IMPLS[_op])
    torch.library.register_fake(_name)(_FAKES[_op])


def plan_ops() -> dict:
    """The three ops as fused_balance.ops.plan_ops() gives the C++ ones (OpOverloads, resolved
    once): what a BalancePlan calls."""
    ns = torch.ops.fused_balance
    return {"gram": ns.triton_bank_gram.default, "combine_into": ns.triton_bank_combine_into.default,
            "adamw_": ns.triton_bank_adamw_.default}
