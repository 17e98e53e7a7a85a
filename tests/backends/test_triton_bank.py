"""The Triton plan ops (kernels/bank.py: fused_balance::triton_bank_gram, triton_bank_combine_into,
triton_bank_adamw_) against an independent float64 reference built here from the bank and the
plan's table, and against the C++ ops (torch.ops.fused_balance.bank_*) on the same inputs.

Without a GPU this runs the Triton interpreter on CPU tensors (conftest.py sets TRITON_INTERPRET
before the kernels are imported), so sizes stay small: one parameter longer than a plan chunk
(PLAN_CHUNK_ELEMS) puts a chunk boundary inside a parameter, and the bank is a column slice of a
wider buffer (its row stride is not its row length).
"""
from __future__ import annotations

import pytest
import torch

import fused_balance as fb
from fused_balance.backends import available_backends
from fused_balance.plan import PLAN_CHUNK_ELEMS

pytest.importorskip("triton")

from fused_balance.kernels import backend as tb  # noqa: E402
from fused_balance.kernels import bank, common  # noqa: E402

DEVICE = "cpu" if common.INTERPRETED else "cuda"
_ok, _why = tb.availability(torch.device(DEVICE))
pytestmark = [pytest.mark.skipif(not _ok, reason=f"triton backend unavailable: {_why}"),
              pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="no C++ compiler for the extension")]

NUMELS = [5, PLAN_CHUNK_ELEMS + 9, 0, 7, 300]
SEGMENTS = [0, 1, 1, 0, 2]
S = 3
GROUPS = [0, 1, 1, 0, 1]
HYPER = [(1e-2, 0.1, 0.9, 0.999, 1e-8), (3e-3, 0.0, 0.8, 0.99, 1e-6)]
ns = torch.ops.fused_balance


def make_bank(K, dtype, seed=0, scales=None):
    """A [K, N] bank (a column slice of a [K, N + 5] buffer) drawn in float64, rounded to dtype."""
    gen = torch.Generator().manual_seed(seed)
    N = sum(NUMELS)
    values = torch.randn(K, N + 5, generator=gen, dtype=torch.float64)
    if scales is not None:
        values *= torch.tensor(scales, dtype=torch.float64)[:, None]
    return values.to(dtype).to(DEVICE)[:, :N]


def make_plan(buffer, params=None):
    return fb.BalancePlan(buffer, SEGMENTS, numels=NUMELS, params=params, groups=GROUPS)


def param_slices():
    """(segment, start, end) of every parameter in a bank row."""
    out, at = [], 0
    for s, n in zip(SEGMENTS, NUMELS):
        out.append((s, at, at + n))
        at += n
    return out


def gram64(buffer):
    """G[s] = X_s X_s^T in float64, X_s the bank columns of segment s's parameters."""
    X = buffer.detach().cpu().double()
    G = torch.zeros(S, X.shape[0], X.shape[0], dtype=torch.float64)
    for s, a, b in param_slices():
        G[s] += X[:, a:b] @ X[:, a:b].T
    return G


def weights_in_math_type(weights, dtype):
    """The weights as the kernels use them: rounded once to the math type, saturating in fp32."""
    if dtype == torch.float64:
        return weights.double()
    big = torch.finfo(torch.float32).max
    return weights.double().clamp(-big, big).float().double()


def combine_in_math_type(buffer, weights):
    """The rule the kernels follow, with torch's elementwise ops: w0*g0 + w1*g1 + ... in the
    math type (fp32, fp64 for an fp64 bank), each product and sum rounded, in objective order."""
    math = torch.float64 if buffer.dtype == torch.float64 else torch.float32
    X = buffer.detach().cpu().to(math)
    w = weights_in_math_type(weights.cpu(), buffer.dtype).to(math)
    out = torch.zeros(X.shape[1], dtype=math)
    for s, a, b in param_slices():
        d = w[s, 0] * X[0, a:b]
        for k in range(1, X.shape[0]):
            d = d + w[s, k] * X[k, a:b]
        out[a:b] = d
    return out


def combine64(buffer, weights):
    """sum_k w[seg, k] g_k per bank element in float64 (elements of no parameter: None)."""
    X = buffer.detach().cpu().double()
    w = weights_in_math_type(weights.cpu(), buffer.dtype)
    out = torch.full((X.shape[1],), float("nan"), dtype=torch.float64)
    for s, a, b in param_slices():
        out[a:b] = w[s] @ X[:, a:b]
    return out


# ------------------------------------------------------------------------------------- schemas
def test_schemas_are_the_cpp_ops():
    make_plan(make_bank(1, torch.float32))  # loads the C++ library
    for op in bank.BANK_OP_SCHEMAS:
        cpp = getattr(ns, op).default._schema
        triton = getattr(ns, "triton_" + op).default._schema
        assert str(triton).replace("triton_" + op, op, 1) == str(cpp)
    assert set(bank.plan_ops()) == {"gram", "combine_into", "adamw_"}


# ---------------------------------------------------------------------------------------- Gram
@pytest.mark.parametrize("K", [1, 2, 3, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_gram_is_the_float64_gram_and_the_cpp_ops(K, dtype):
    buffer = make_bank(K, dtype, seed=K)
    plan = make_plan(buffer)
    G, found_inf = ns.triton_bank_gram(buffer, plan._ranges, plan._seg_offsets, S)
    assert G.dtype == torch.float64 and G.shape == (S, K, K) and found_inf.dtype == torch.bool
    assert found_inf.shape == () and not bool(found_inf)
    assert torch.equal(G, G.transpose(1, 2))
    torch.testing.assert_close(G.cpu(), gram64(buffer), rtol=1e-13, atol=1e-10)
    G_cpp, inf_cpp = ns.bank_gram(buffer.cpu(), plan._ranges.cpu(), plan._seg_offsets.cpu(), S)
    torch.testing.assert_close(G.cpu(), G_cpp, rtol=1e-13, atol=1e-10)
    assert bool(inf_cpp) == bool(found_inf)


def test_gram_accumulates_in_float64_so_huge_and_tiny_gradients_stay_finite():
    """fp32 gradients of 1e30 square to 1e60 (inf in fp32) and 1e-30 to 1e-60 (0 in fp32)."""
    buffer = make_bank(2, torch.float32, seed=3, scales=[1e30, 1e-30])
    plan = make_plan(buffer)
    G, found_inf = ns.triton_bank_gram(buffer, plan._ranges, plan._seg_offsets, S)
    assert not bool(found_inf)
    torch.testing.assert_close(G.cpu(), gram64(buffer), rtol=1e-13, atol=0.0)
    assert bool((torch.diagonal(G, dim1=1, dim2=2)[:, 1] > 0).all())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_raises_found_inf(bad):
    buffer = make_bank(3, torch.float32, seed=4)
    buffer[2, NUMELS[0] + 40000 - PLAN_CHUNK_ELEMS] = bad  # in the second chunk of parameter 1
    plan = make_plan(buffer)
    G, found_inf = ns.triton_bank_gram(buffer, plan._ranges, plan._seg_offsets, S)
    assert bool(found_inf)
    assert not bool(G[1].isfinite().all()) and bool(G[0].isfinite().all())


def reduce_fixed_order(partials):
    """bank_common.h's reduce_partials_fixed_order, in Python floats."""
    lanes = [0.0] * 32
    for lane in range(32):
        for c in range(lane, len(partials), 32):
            lanes[lane] += partials[c]
    offset = 16
    while offset:
        for lane in range(offset):
            lanes[lane] += lanes[lane + offset]
        offset //= 2
    return lanes[0]


def test_segment_sum_follows_the_fixed_order_whatever_the_grid(monkeypatch):
    """40 chunks of one segment, one non-zero element each, so each chunk's partial is exact:
    the total depends only on the order the partials are added in, which must be the C++
    ops' (lanes strided over the table, then halving), with one launch or many."""
    chunks = 40
    numels = [PLAN_CHUNK_ELEMS] * chunks
    values = [1e8 if c % 7 == 0 else (3.0 if c % 2 else 1.0) for c in range(chunks)]
    buffer = torch.zeros(1, sum(numels), dtype=torch.float32, device=DEVICE)
    for c, x in enumerate(values):
        buffer[0, c * PLAN_CHUNK_ELEMS + 11] = x
    plan = fb.BalancePlan(buffer, None, numels=numels)
    assert plan._ranges.shape[0] == chunks
    want = reduce_fixed_order([x * x for x in values])
    assert want != sum(x * x for x in values)  # the order matters for these values
    G, _ = ns.triton_bank_gram(buffer, plan._ranges, plan._seg_offsets, 1)
    assert float(G[0, 0, 0]) == want
    G_cpp, _ = ns.bank_gram(buffer.cpu(), plan._ranges.cpu(), plan._seg_offsets.cpu(), 1)
    assert torch.equal(G.cpu(), G_cpp)
    monkeypatch.setattr(common, "MAX_GRID_X", 7)  # six launches of the partials
    before = common.LAUNCHES["bank_gram_partials"]
    G_sliced, found_inf = ns.triton_bank_gram(buffer, plan._ranges, plan._seg_offsets, 1)
    assert common.LAUNCHES["bank_gram_partials"] - before == 6
    assert torch.equal(G_sliced, G) and not bool(found_inf)


# ------------------------------------------------------------------------------------- combine
@pytest.mark.parametrize("K", [1, 2, 3, 9, 17])  # 17: past the unrolled rows, a loop
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_combine_into_is_the_float64_combination_and_the_cpp_ops(K, dtype):
    buffer = make_bank(K, dtype, seed=10 + K)
    plan = make_plan(buffer)
    weights = torch.rand(S, K, generator=torch.Generator().manual_seed(K), dtype=torch.float64).to(DEVICE)
    if dtype != torch.float16:  # beyond fp32: saturates at its largest value, not inf (fp64: kept)
        weights[2, 0] = 1e39
        s, first, end = param_slices()[-1]
        assert s == 2
        buffer[:, first:end] *= 1e-3  # so that the combination stays finite
    out = torch.full((buffer.shape[1] + 3,), 7.0, dtype=dtype, device=DEVICE)
    ns.triton_bank_combine_into(buffer, weights, plan._ranges, out, torch.tensor([False], device=DEVICE))
    assert bool((out[buffer.shape[1]:] == 7.0).all())  # past the last chunk: untouched
    exact = combine64(buffer, weights)
    tol = {torch.float64: 1e-15, torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
    reach = combine64(buffer.abs(), weights.abs())
    err = (out[:buffer.shape[1]].cpu().double() - exact).abs()
    subnormal_step = torch.finfo(dtype).eps * torch.finfo(dtype).tiny
    assert bool((err <= tol * reach + subnormal_step).all()), float((err - tol * reach).max())
    assert torch.equal(out[:buffer.shape[1]].cpu(), combine_in_math_type(buffer, weights).to(dtype))
    assert bool(out.isfinite().all())
    # the C++ op rounds the same way in the same order: equal bit for bit
    want = torch.full_like(out.cpu(), 7.0)
    ns.bank_combine_into(buffer.cpu(), weights.cpu(), plan._ranges.cpu(), want, None)
    assert torch.equal(out.cpu(), want)


def test_combine_into_with_skip_writes_nothing():
    buffer = make_bank(3, torch.float32, seed=20)
    plan = make_plan(buffer)
    out = torch.full((buffer.shape[1],), 7.0, device=DEVICE)
    ns.triton_bank_combine_into(buffer, torch.ones(S, 3, dtype=torch.float64, device=DEVICE), plan._ranges, out,
                                torch.tensor(True, device=DEVICE))
    assert bool((out == 7.0).all())


# --------------------------------------------------------------------------------------- AdamW
def adamw_state(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    N = sum(NUMELS)
    params = [torch.randn(n, generator=gen, dtype=torch.float64).to(dtype).to(DEVICE) for n in NUMELS]
    m = (0.1 * torch.randn(N, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)
    v = (0.01 * torch.rand(N, generator=gen, dtype=torch.float64)).to(dtype).to(DEVICE)
    step = torch.tensor([0.0, 3.0, 5.0, 1.0, 7.0], device=DEVICE)  # per-parameter counts differ
    return params, m, v, step


def adamw64(buffer, weights, params, m, v, step, live, steps):
    """AdamW in float64 on the combination rounded to the gradients' dtype, per parameter with its
    own group and count; the dead parameters keep everything."""
    p = [t.cpu().double() for t in params]
    m, v, step = (t.cpu().double().clone() for t in (m, v, step))
    d = combine_in_math_type(buffer, weights).to(buffer.dtype).double()
    for _ in range(steps):
        for i, (s, a, b) in enumerate(param_slices()):
            if not live[i]:
                continue
            lr, wd, b1, b2, eps = HYPER[GROUPS[i]]
            t = step[i] + 1
            p[i] = p[i] * (1 - lr * wd)
            m[a:b] = b1 * m[a:b] + (1 - b1) * d[a:b]
            v[a:b] = b2 * v[a:b] + (1 - b2) * d[a:b] ** 2
            p[i] = p[i] - lr / (1 - b1 ** t) * m[a:b] / ((v[a:b] / (1 - b2 ** t)).sqrt() + eps)
            step[i] = t
    return p, m, v, step


CASES = [(1, torch.float32, torch.float32), (3, torch.float32, torch.float32), (9, torch.float32, torch.float32),
         (2, torch.float64, torch.float64), (3, torch.bfloat16, torch.bfloat16), (3, torch.bfloat16, torch.float32)]


@pytest.mark.parametrize("live", [None, [True, False, True, True, False]], ids=["all", "live-mask"])
@pytest.mark.parametrize("K, grad_dtype, param_dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_adamw_is_float64_adamw_and_the_cpp_ops_bit_for_bit(K, grad_dtype, param_dtype, live):
    buffer = make_bank(K, grad_dtype, seed=30 + K)
    weights = torch.rand(S, K, generator=torch.Generator().manual_seed(K), dtype=torch.float64).to(DEVICE)
    params, m, v, step = adamw_state(param_dtype, seed=K)
    start = ([t.clone() for t in params], m.clone(), v.clone(), step.clone())
    plan = make_plan(buffer, params)
    hyper = plan.hyper_table(HYPER, DEVICE)
    live_t = None if live is None else torch.tensor(live, device=DEVICE)
    steps = 2
    for _ in range(steps):
        ns.triton_bank_adamw_(buffer, weights, plan._chunks, plan.param_pointers(), m, v, hyper, step, None, live_t)
    alive = live or [True] * len(NUMELS)
    # float64 AdamW: a rounding of the state per step
    p64, m64, v64, step64 = adamw64(buffer, weights, *start, alive, steps)
    rtol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2}[param_dtype]
    for got, want in zip(params, p64):
        torch.testing.assert_close(got.cpu().double(), want, rtol=rtol, atol=rtol * 1e-2)
    torch.testing.assert_close(m.cpu().double(), m64, rtol=rtol, atol=rtol * 1e-2)
    torch.testing.assert_close(v.cpu().double(), v64, rtol=rtol, atol=rtol * 1e-4)
    assert torch.equal(step.cpu().double(), step64)
    for i, (s, a, b) in enumerate(param_slices()):  # the dead parameters: untouched, bit for bit
        if not alive[i]:
            assert torch.equal(params[i], start[0][i]) and torch.equal(m[a:b], start[1][a:b])
            assert torch.equal(v[a:b], start[2][a:b])
    # the C++ op: m and v bit for bit (the rounding rule), the parameters too (the bias
    # corrections are correctly rounded on both sides here)
    twins = [t.cpu().clone() for t in start[0]]
    mc, vc, sc = start[1].cpu().clone(), start[2].cpu().clone(), start[3].cpu().clone()
    ptrs = torch.tensor([t.data_ptr() for t in twins], dtype=torch.long)
    for _ in range(steps):
        ns.bank_adamw_(buffer.cpu(), weights.cpu(), plan._chunks.cpu(), ptrs, mc, vc, hyper.cpu(), sc, None,
                       None if live_t is None else live_t.cpu())
    assert torch.equal(m.cpu(), mc) and torch.equal(v.cpu(), vc) and torch.equal(step.cpu(), sc)
    for got, want in zip(params, twins):
        assert torch.equal(got.cpu(), want)


def test_adamw_with_skip_changes_nothing_not_even_the_counts():
    buffer = make_bank(2, torch.float32, seed=40)
    params, m, v, step = adamw_state(torch.float32, seed=2)
    saved = [t.clone() for t in [*params, m, v, step]]
    plan = make_plan(buffer, params)
    ns.triton_bank_adamw_(buffer, torch.ones(S, 2, dtype=torch.float64, device=DEVICE), plan._chunks,
                          plan.param_pointers(), m, v, plan.hyper_table(HYPER, DEVICE), step,
                          torch.tensor([True], device=DEVICE), None)
    assert all(torch.equal(a, b) for a, b in zip([*params, m, v, step], saved))


def test_bf16_combination_is_rounded_before_the_moments():
    """The rounding rule: with fp32 parameters and a bf16 bank, m after one step from zero is
    (1 - beta1) * bf16(d), not (1 - beta1) * d."""
    buffer = make_bank(3, torch.bfloat16, seed=41)
    weights = torch.tensor([[0.3137, 1.7071, 0.5813]] * S, dtype=torch.float64, device=DEVICE)
    params, m, v, step = adamw_state(torch.float32, seed=3)
    m.zero_(), v.zero_(), step.zero_()
    plan = make_plan(buffer, params)
    ns.triton_bank_adamw_(buffer, weights, plan._chunks, plan.param_pointers(), m, v,
                          plan.hyper_table(HYPER, DEVICE), step, None, None)
    d = combine_in_math_type(buffer, weights).to(torch.bfloat16).float()
    one_minus_beta1 = torch.tensor([1 - HYPER[g][2] for g in GROUPS], dtype=torch.float64).float()
    for i, (s, a, b) in enumerate(param_slices()):
        assert torch.equal(m[a:b].cpu(), one_minus_beta1[i] * d[a:b])


# ----------------------------------------------------------------------------- argument checks
def test_bad_arguments_raise_clear_errors():
    buffer = make_bank(2, torch.float32, seed=50)
    params, m, v, step = adamw_state(torch.float32, seed=4)
    plan = make_plan(buffer, params)
    w = torch.ones(S, 2, dtype=torch.float64, device=DEVICE)
    out = torch.zeros(buffer.shape[1], device=DEVICE)
    bad = plan._ranges.clone()
    bad[0, 1] = 10 ** 6
    with pytest.raises(ValueError, match="out of range"):
        ns.triton_bank_gram(buffer, bad, plan._seg_offsets, S)
    with pytest.raises(ValueError, match="out of range"):  # segment 2 has no weights row
        ns.triton_bank_combine_into(buffer, w[:2], plan._ranges, out, None)
    with pytest.raises(ValueError, match="seg_offsets"):
        ns.triton_bank_gram(buffer, plan._ranges, plan._seg_offsets.flip(0).contiguous(), S)
    with pytest.raises(ValueError, match="weights must be"):
        ns.triton_bank_combine_into(buffer, torch.ones(S, 3, dtype=torch.float64), plan._ranges, out, None)
    with pytest.raises(ValueError, match="at least"):
        ns.triton_bank_combine_into(buffer, w, plan._ranges, out[:3], None)
    with pytest.raises(TypeError, match="dtype"):
        ns.triton_bank_combine_into(buffer, w, plan._ranges, out.double(), None)
    with pytest.raises(ValueError, match="at most 64"):
        ns.triton_bank_gram(torch.zeros(65, 8, device=DEVICE), plan._ranges[:0], plan._seg_offsets[:1] * 0, 1)
    hyper = plan.hyper_table(HYPER[:1], DEVICE)  # one group for a table using two
    with pytest.raises(ValueError, match="out of range"):
        ns.triton_bank_adamw_(buffer, w, plan._chunks, plan.param_pointers(), m, v, hyper, step, None, None)
    with pytest.raises(ValueError, match="hyper must"):
        ns.triton_bank_adamw_(buffer, w, plan._chunks, plan.param_pointers(), m, v, hyper.float(), step, None, None)
    with pytest.raises(ValueError, match="step must"):
        ns.triton_bank_adamw_(buffer, w, plan._chunks, plan.param_pointers(), m, v, plan.hyper_table(HYPER, DEVICE),
                              step[:2], None, None)


# ------------------------------------------------------------------------------------- opcheck
def test_opcheck_every_op():
    numels, segments = [12, 5, 1], [0, 1, 1]
    buffer = torch.randn(2, 18, generator=torch.Generator().manual_seed(11)).to(DEVICE)
    copies = [torch.zeros(n, device=DEVICE) for n in numels]  # written through the pointer table
    plan = fb.BalancePlan(buffer, segments, numels=numels, params=copies)
    weights = torch.rand(2, 2, dtype=torch.float64).to(DEVICE)
    torch.library.opcheck(ns.triton_bank_gram.default, (buffer, plan._ranges, plan._seg_offsets, 2))
    torch.library.opcheck(ns.triton_bank_combine_into.default,
                          (buffer, weights, plan._ranges, torch.zeros(18, device=DEVICE), None))
    m, v, step = plan.new_adamw_state()
    hyper = plan.hyper_table([(1e-3, 0.0, 0.9, 0.999, 1e-8)], DEVICE)
    torch.library.opcheck(ns.triton_bank_adamw_.default,
                          (buffer, weights, plan._chunks, plan.param_pointers(), m, v, hyper, step, None),
                          test_utils=("test_schema", "test_faketensor"))
