"""The `cpp` backend (torch.ops.fused_balance.*) against float64 oracles and the reference backend.

Every CPU comparison runs on each kernel path the machine supports (default, avx2, avx512), so
the scalar code of csrc/multi_tensor.h (also the GPU's arithmetic) and the SIMD code are both
checked. GPU tests run only where a GPU is present.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fused_balance import _extension, ops, reference
from shared import run_process

CHUNK = _extension.load().chunk_elems  # kChunkElems of csrc/multi_tensor.h
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", autouse=True)
def extension():
    module = _extension.load()
    ops._ops()  # the extension loaded and its Python parts registered
    yield module
    module.set_cpu_isa("auto")


def cpu_paths():
    return list(_extension.load().supported_cpu_isas())


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------- problem data
def _make(shape, dtype, gen, noncontig):
    """A tensor of `shape`; non-contiguous when asked (a strided view or a transpose)."""
    if not noncontig:
        return torch.randn(shape, generator=gen).to(dtype)
    if len(shape) == 2 and shape[0] > 1 and shape[1] > 1:
        return torch.randn(shape[::-1], generator=gen).to(dtype).t()
    n = 1
    for d in shape:
        n *= d
    return torch.randn(2 * n, generator=gen).to(dtype)[::2].reshape(shape)


class Problem:
    def __init__(self, K, shapes, dtype, segments, S, noncontig, seed):
        gen = torch.Generator().manual_seed(seed)
        self.K, self.P, self.S = K, len(shapes), S
        self.shapes, self.dtype, self.segments, self.noncontig = shapes, dtype, segments, noncontig
        self.flat = [_make(s, dtype, gen, noncontig) for _ in range(K) for s in shapes]
        self.weights = (torch.rand(S, K, generator=gen) * 2 - 0.5).to(acc_dtype(dtype))
        self.gen = gen

    def tensors_like_outputs(self, noncontig, positive=False):
        out = [_make(s, self.dtype, self.gen, noncontig) for s in self.shapes]
        return [o.abs() if positive else o for o in out]

    def __repr__(self):
        return (f"Problem(K={self.K}, P={self.P}, S={self.S}, dtype={self.dtype}, noncontig={self.noncontig}, "
                f"shapes={self.shapes[:6]}{'...' if self.P > 6 else ''})")


@st.composite
def problems(draw, dtypes=tuple(DTYPES)):
    K = draw(st.sampled_from([1, 2, 3, 5]))
    P = draw(st.one_of(st.integers(1, 12), st.integers(150, 200)))
    small = st.lists(st.integers(1, 37), min_size=1, max_size=2).map(tuple)
    shapes = draw(st.lists(small, min_size=P, max_size=P))
    if draw(st.booleans()):  # a tensor spanning several chunks, with a ragged last chunk
        big = draw(st.sampled_from([CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 17]))
        shapes[draw(st.integers(0, P - 1))] = (big,)
    mode = draw(st.sampled_from(["random", "per_tensor", "zero"]))
    if mode == "per_tensor":
        S, segments = P, list(range(P))
    elif mode == "zero":
        S, segments = 1, [0] * P
    else:
        S = draw(st.integers(1, 5))
        segments = draw(st.lists(st.integers(0, S - 1), min_size=P, max_size=P))
    dtype = draw(st.sampled_from(dtypes))
    noncontig = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return Problem(K, shapes, dtype, segments, S, noncontig, seed)


def each_cpu_path():
    """Yields every supported CPU path, leaving the automatic choice in place afterwards."""
    module = _extension.load()
    try:
        for name in cpu_paths():
            assert module.set_cpu_isa(name) == name
            yield name
    finally:
        module.set_cpu_isa("auto")


# ------------------------------------------------------------------------------- oracles
def gram64(pb):
    """G[s] = X_s X_s^T in float64, X_s = [K, all elements of segment s] (one product per segment)."""
    G = torch.zeros(pb.S, pb.K, pb.K, dtype=torch.float64)
    for s in range(pb.S):
        members = [p for p in range(pb.P) if pb.segments[p] == s]
        if members:
            X = torch.stack([torch.cat([pb.flat[k * pb.P + p].double().reshape(-1) for p in members])
                             for k in range(pb.K)])
            G[s] = X @ X.T
    return G


def gram_tolerance(G64, dtype):
    """|error| <= c * sqrt(G_kk G_ll) (Cauchy-Schwarz bound on sum |g_k||g_l|)."""
    diag = torch.diagonal(G64, dim1=1, dim2=2)
    scale = torch.sqrt(diag[:, :, None] * diag[:, None, :])
    return (1e-12 if dtype == torch.float64 else 1e-4) * scale + 1e-30


def combine_twin(pb, weights=None):
    """The combine with the documented rounding order (w0*g0 + w1*g1 + ..., each op rounded in the
    accumulate dtype, one final rounding to the input dtype), written independently in torch."""
    w = pb.weights if weights is None else weights
    acc = acc_dtype(pb.dtype)
    outs = []
    for p in range(pb.P):
        s = pb.segments[p]
        d = w[s, 0].to(acc) * pb.flat[p].to(acc)
        for k in range(1, pb.K):
            d = d + w[s, k].to(acc) * pb.flat[k * pb.P + p].to(acc)
        outs.append(d.to(pb.dtype))
    return outs


def combine64_bound(pb):
    """float64 combine and a bound on |w||g| per element."""
    w = pb.weights.double()
    exact, scale = [], []
    for p in range(pb.P):
        s = pb.segments[p]
        gs = [pb.flat[k * pb.P + p].double() for k in range(pb.K)]
        exact.append(sum(w[s, k] * gs[k] for k in range(pb.K)))
        scale.append(sum(w[s, k].abs() * gs[k].abs() for k in range(pb.K)))
    return exact, scale


REL = {torch.float32: 1e-6, torch.float64: 1e-14, torch.bfloat16: 8e-3, torch.float16: 1e-3}
ATOL = {torch.float32: 1e-30, torch.float64: 1e-300, torch.bfloat16: 1e-30, torch.float16: 1e-7}


def assert_close_to_exact(got, exact, scale, dtype, K):
    for g, e, s in zip(got, exact, scale):
        err = (g.double() - e).abs()
        bound = REL[dtype] * (K + 1) * s + REL[dtype] * e.abs() + ATOL[dtype]
        assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


def bits(t):
    t = t.contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]).clone()


# ---------------------------------------------------------------------------------- gram
@settings(max_examples=25, deadline=None)
@given(problems())
def test_gram_matches_float64_oracle_on_every_cpu_path(pb):
    G64 = gram64(pb)
    tol = gram_tolerance(G64, pb.dtype)
    for path in each_cpu_path():
        G = torch.ops.fused_balance.gram(pb.flat, pb.K, pb.segments, pb.S)
        assert G.shape == (pb.S, pb.K, pb.K) and G.dtype == acc_dtype(pb.dtype), path
        assert torch.equal(G, G.transpose(1, 2)), path
        assert bool(((G.double() - G64).abs() <= tol).all()), (path, pb, (G.double() - G64).abs().max())


def test_gram_agrees_with_reference_backend():
    pb = Problem(3, [(17, 5), (40000,), (1,), (300,)], torch.float32, [1, 0, 1, 2], 3, False, 7)
    G = ops.gram(pb.flat, pb.K, pb.segments, pb.S)
    torch.testing.assert_close(G, reference.gram(pb.flat, pb.K, pb.segments, pb.S), rtol=1e-5, atol=1e-4)


def test_gram_empty_segment_is_zero_and_many_objectives():
    # K = 9 takes the pairwise (any-K) path; segment 2 has no tensor.
    pb = Problem(9, [(33,), (CHUNK + 3,)], torch.float32, [0, 3], 4, False, 3)
    G64 = gram64(pb)
    for path in each_cpu_path():
        G = torch.ops.fused_balance.gram(pb.flat, pb.K, pb.segments, pb.S)
        assert torch.equal(G[1], torch.zeros(9, 9)) and torch.equal(G[2], torch.zeros(9, 9)), path
        assert bool(((G.double() - G64).abs() <= gram_tolerance(G64, pb.dtype)).all()), path


# ------------------------------------------------------------------------------- combine
@settings(max_examples=25, deadline=None)
@given(problems())
def test_combine_rounds_exactly_like_the_documented_order(pb):
    twin = combine_twin(pb)
    exact, scale = combine64_bound(pb)
    for path in each_cpu_path():
        out = torch.ops.fused_balance.combine(pb.flat, pb.weights, pb.segments)
        assert len(out) == pb.P
        for o, t, g in zip(out, twin, pb.flat):
            assert o.dtype == pb.dtype and o.shape == g.shape and o.is_contiguous()
            assert torch.equal(o, t), path
        assert_close_to_exact(out, exact, scale, pb.dtype, pb.K)


@settings(max_examples=20, deadline=None)
@given(problems(), st.booleans())
def test_combine_into_writes_the_combine(pb, out_noncontig):
    twin = combine_twin(pb)
    for path in each_cpu_path():
        out = pb.tensors_like_outputs(out_noncontig)
        torch.ops.fused_balance.combine_into(pb.flat, pb.weights, pb.segments, out, torch.tensor([False]))
        for o, t in zip(out, twin):
            assert torch.equal(o, t), path


def test_combine_into_may_overwrite_an_input_in_place():
    pb = Problem(2, [(CHUNK + 9,), (5, 7)], torch.float32, [0, 0], 1, False, 11)
    twin = combine_twin(pb)
    for path in each_cpu_path():
        flat = [g.clone() for g in pb.flat]
        torch.ops.fused_balance.combine_into(flat, pb.weights, pb.segments, flat[:pb.P], None)
        for o, t in zip(flat[:pb.P], twin):
            assert torch.equal(o, t), path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_rounding_matches_torch_including_special_values(dtype):
    """K=1 combine = w * g rounded once to the 16-bit type: overflow to inf, subnormals, ties,
    NaN and signed zeros must round as torch does, on the scalar (header) and SIMD paths."""
    info = torch.finfo(dtype)
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, info.max, -info.max, info.tiny, info.tiny / 8,
                             info.smallest_normal / 3, 65504.0 if dtype == torch.float16 else 1e38,
                             float("inf"), -float("inf"), 1e-7, 3e-8, 2.0 ** -24, 2.0 ** -25])
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([specials, torch.randn(1000, generator=gen) * 10.0 ** torch.randint(-9, 5, (1000,), generator=gen)])
    g = values.to(dtype)
    for w in [1.0, 0.5, 3.0, 1.0009765625, 1e-3]:
        weights = torch.tensor([[w]])
        expected = (g.float() * w).to(dtype)
        for path in each_cpu_path():
            out = torch.ops.fused_balance.combine([g], weights, [0])[0]
            assert torch.equal(bits(out), bits(expected)), (path, w)
    nan = torch.tensor([float("nan")] * 20, dtype=dtype)
    for path in each_cpu_path():
        assert torch.isnan(torch.ops.fused_balance.combine([nan], torch.tensor([[2.0]]), [0])[0]).all(), path


# --------------------------------------------------------------------------------- AdamW
ADAM_TOL = {torch.float32: (2e-6, 1e-7), torch.float64: (1e-12, 1e-14),
            torch.bfloat16: (2e-2, 2e-2), torch.float16: (3e-3, 3e-3)}


def adam_tolerance(grad_dtype, state_dtype):
    for low in (torch.bfloat16, torch.float16):
        if low in (grad_dtype, state_dtype):
            return ADAM_TOL[low]
    both64 = grad_dtype == state_dtype == torch.float64
    return ADAM_TOL[torch.float64 if both64 else torch.float32]


def fresh_state(pb, state_dtype, noncontig, seed=123):
    """(params, exp_avgs, exp_avg_sqs), the same values on every call, laid out as asked."""
    gen = torch.Generator().manual_seed(seed)
    params = [_make(s, state_dtype, gen, noncontig) for s in pb.shapes]
    exp_avgs = [_make(s, state_dtype, gen, noncontig) for s in pb.shapes]
    exp_avg_sqs = [_make(s, state_dtype, gen, noncontig).abs_() for s in pb.shapes]
    return params, exp_avgs, exp_avg_sqs


def adamw64(pb, state, lrs, wds, b1, b2, eps, step):
    """torch.optim.AdamW formulas in float64 on d = sum_k w g_k (float64, unrounded)."""
    exact, _ = combine64_bound(pb)
    bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
    out = []
    for d, p, m, v, lr, wd in zip(exact, *state, lrs, wds):
        p, m, v = p.double() * (1 - lr * wd), m.double(), v.double()
        m = b1 * m + (1 - b1) * d
        v = b2 * v + (1 - b2) * d * d
        p = p - lr / bc1 * m / ((v / bc2).sqrt() + eps)
        out.append((p, m, v))
    return [[o[i] for o in out] for i in range(3)]


@settings(max_examples=20, deadline=None)
@given(problems(), st.booleans(), st.integers(1, 1000), st.sampled_from(["same", "float32"]))
def test_balanced_adamw_matches_torch_adamw(pb, noncontig_state, step, state_kind):
    state_dtype = pb.dtype if state_kind == "same" else torch.float32
    lrs = [1e-3 * (1 + p % 3) for p in range(pb.P)]
    wds = [0.0 if p % 2 else 0.01 for p in range(pb.P)]
    b1, b2, eps = 0.9, 0.999, 1e-8
    ref = fresh_state(pb, state_dtype, noncontig_state)
    reference.balanced_adamw_(pb.flat, pb.K, pb.weights, pb.segments, *ref, lrs, wds, b1, b2, eps, step, None)
    exact = adamw64(pb, fresh_state(pb, state_dtype, noncontig_state), lrs, wds, b1, b2, eps, step)
    check_exact = state_dtype in (torch.float32, torch.float64) and pb.dtype in (torch.float32, torch.float64)
    rtol, atol = adam_tolerance(pb.dtype, state_dtype)
    for path in each_cpu_path():
        got = fresh_state(pb, state_dtype, noncontig_state)
        strides = [t.stride() for ts in got for t in ts]
        torch.ops.fused_balance.balanced_adamw_(pb.flat, pb.weights, pb.segments, *got, lrs, wds, b1, b2, eps,
                                                step, None)
        assert strides == [t.stride() for ts in got for t in ts]
        for which in range(3):
            for p in range(pb.P):
                g, r = got[which][p], ref[which][p]
                assert g.dtype == state_dtype
                torch.testing.assert_close(g, r, rtol=rtol, atol=atol, msg=lambda m: f"{path} {which} {p}: {m}")
                if check_exact:
                    torch.testing.assert_close(g.double(), exact[which][p], rtol=4 * rtol, atol=4 * atol)


def test_balanced_adamw_float64_params_with_float32_grads_and_one_lr():
    pb = Problem(2, [(100,), (CHUNK + 1,)], torch.float32, [0, 1], 2, False, 5)
    ref = fresh_state(pb, torch.float64, False)
    reference.balanced_adamw_(pb.flat, pb.K, pb.weights, pb.segments, *ref, [0.01] * 2, [0.1] * 2, 0.8, 0.99, 1e-6,
                              3, None)
    for path in each_cpu_path():
        got = fresh_state(pb, torch.float64, False)
        torch.ops.fused_balance.balanced_adamw_(pb.flat, pb.weights, pb.segments, *got, [0.01], [0.1], 0.8, 0.99,
                                                1e-6, 3, None)
        for a, b in zip(sum(got, []), sum(ref, [])):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=path)


# ---------------------------------------------------------------------------------- skip
@pytest.mark.parametrize("noncontig", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_skip_true_leaves_outputs_bitwise_untouched(dtype, noncontig):
    pb = Problem(2, [(3, 5), (CHUNK + 5,), (1,)], dtype, [0, 1, 0], 2, False, 1)
    for path in each_cpu_path():
        out = pb.tensors_like_outputs(noncontig)
        before = [bits(o) for o in out]
        torch.ops.fused_balance.combine_into(pb.flat, pb.weights, pb.segments, out, torch.tensor(True))
        assert all(torch.equal(bits(o), b) for o, b in zip(out, before)), path
        state = [pb.tensors_like_outputs(noncontig, positive=True) for _ in range(3)]
        before = [bits(t) for ts in state for t in ts]
        torch.ops.fused_balance.balanced_adamw_(pb.flat, pb.weights, pb.segments, *state, [1e-3], [0.1], 0.9,
                                                0.999, 1e-8, 1, torch.tensor([True]))
        assert all(torch.equal(bits(t), b) for t, b in zip([t for ts in state for t in ts], before)), path
        torch.ops.fused_balance.balanced_adamw_(pb.flat, pb.weights, pb.segments, *state, [1e-3], [0.1], 0.9,
                                                0.999, 1e-8, 1, torch.tensor([False]))
        assert not all(torch.equal(bits(t), b) for t, b in zip([t for ts in state for t in ts], before)), path


# ------------------------------------------------------------------------- determinism
def test_results_do_not_depend_on_the_thread_count():
    shapes = [(CHUNK * 3 + 11,), (4096, 16), (16, 4096), (12345,)] * 6
    pb = Problem(2, shapes, torch.float32, [p % 3 for p in range(len(shapes))], 3, False, 2)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            G = torch.ops.fused_balance.gram(pb.flat, pb.K, pb.segments, pb.S)
            out = torch.ops.fused_balance.combine(pb.flat, pb.weights, pb.segments)
            state = fresh_state(pb, torch.float32, False)
            torch.ops.fused_balance.balanced_adamw_(pb.flat, pb.weights, pb.segments, *state, [1e-3], [0.0], 0.9,
                                                    0.999, 1e-8, 2, None)
            results.append((G, out, state))
    finally:
        torch.set_num_threads(threads)
    (G1, out1, st1), (G2, out2, st2) = results
    assert torch.equal(bits(G1), bits(G2))
    assert all(torch.equal(a, b) for a, b in zip(out1, out2))
    assert all(torch.equal(a, b) for x, y in zip(st1, st2) for a, b in zip(x, y))


# ------------------------------------------------------------------------------ autograd
def small_fp64(K=2, shapes=((3,), (2, 2), (5,)), segments=(0, 1, 0), S=2, seed=0):
    pb = Problem(K, list(shapes), torch.float64, list(segments), S, False, seed)
    flat = [g.clone().requires_grad_(True) for g in pb.flat]
    weights = pb.weights.clone().requires_grad_(True)
    return pb, flat, weights


def test_gradcheck_gram():
    pb, flat, _ = small_fp64(K=3)

    def fn(*gs):
        return torch.ops.fused_balance.gram(list(gs), pb.K, pb.segments, pb.S)

    assert torch.autograd.gradcheck(fn, tuple(flat))
    assert torch.autograd.gradgradcheck(fn, tuple(flat))


def test_gradcheck_combine_wrt_grads_and_weights():
    pb, flat, weights = small_fp64(K=2)

    def fn(w, *gs):
        return tuple(torch.ops.fused_balance.combine(list(gs), w, pb.segments))

    assert torch.autograd.gradcheck(fn, (weights, *flat))
    assert torch.autograd.gradgradcheck(fn, (weights, *flat))


def test_gram_backward_matches_reference_autograd_in_float32():
    pb = Problem(2, [(7,), (CHUNK + 2,)], torch.float32, [0, 0], 1, False, 4)
    a = [g.clone().requires_grad_(True) for g in pb.flat]
    b = [g.clone().requires_grad_(True) for g in pb.flat]
    upstream = torch.randn(1, 2, 2)
    (ops.gram(a, 2, pb.segments, 1) * upstream).sum().backward()
    (reference.gram(b, 2, pb.segments, 1) * upstream).sum().backward()
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-4)


# ------------------------------------------- compile (opcheck: tests/backends/test_conformance.py)
def test_torch_compile_fullgraph_gram_then_combine():
    pb = Problem(2, [(8, 3), (40,), (1,)], torch.float32, [0, 1, 1], 2, False, 12)

    def balance(gs):
        G = torch.ops.fused_balance.gram(gs, 2, pb.segments, pb.S)
        norms = torch.diagonal(G, dim1=1, dim2=2).sqrt()
        w = norms.sum(1, keepdim=True) / (2 * norms + 1e-12)
        return G, torch.ops.fused_balance.combine(gs, w, pb.segments)

    compiled = torch.compile(balance, fullgraph=True, backend="aot_eager")
    G_c, out_c = compiled(pb.flat)
    G_e, out_e = balance(pb.flat)
    torch.testing.assert_close(G_c, G_e, rtol=0, atol=0)
    for a, b in zip(out_c, out_e):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# -------------------------------------------------------------------------------- errors
def test_direct_calls_with_bad_arguments_raise_clear_errors():
    g = [torch.randn(3), torch.randn(4)]
    with pytest.raises(ValueError, match="shape"):
        torch.ops.fused_balance.gram(g, 2, [0], 1)
    with pytest.raises(ValueError, match="segment_ids"):
        torch.ops.fused_balance.gram([torch.randn(3)], 1, [1], 1)
    with pytest.raises(ValueError, match="multiple"):
        torch.ops.fused_balance.gram([torch.randn(3)] * 3, 2, [0], 1)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.fused_balance.gram([torch.ones(3, dtype=torch.int32)], 1, [0], 1)
    with pytest.raises(TypeError, match="dtype"):
        torch.ops.fused_balance.gram([torch.randn(3), torch.randn(3, dtype=torch.float64)], 2, [0], 1)
    with pytest.raises(ValueError, match="weights"):
        torch.ops.fused_balance.combine([torch.randn(3)], torch.ones(2), [0])
    with pytest.raises(ValueError, match="one-element bool"):
        torch.ops.fused_balance.combine_into([torch.randn(3)], torch.ones(1, 1), [0], [torch.empty(3)],
                                             torch.tensor([1.0]))
    with pytest.raises(ValueError, match="step"):
        torch.ops.fused_balance.balanced_adamw_([torch.randn(3)], torch.ones(1, 1), [0], [torch.randn(3)],
                                                [torch.zeros(3)], [torch.zeros(3)], [1e-3], [0.0], 0.9, 0.999,
                                                1e-8, 0, None)
    with pytest.raises(ValueError):
        _extension.load().set_cpu_isa("sse9")


# -------------------------------------------------------------------------- build / ISA
def test_build_info_reports_the_cpu_path_and_cuda_status():
    info = _extension.build_info()
    assert info["built"] is True
    assert info["cpu_isa"] in ("default", "avx2", "avx512")
    assert info["cpu_isa"] == cpu_paths()[-1]  # automatic choice = the best the CPU supports
    cap = torch.backends.cpu.get_cpu_capability()
    if "AVX2" in cap or "AVX512" in cap:
        assert "avx2" in cpu_paths()
    assert isinstance(info["cuda_compiled"], bool) and isinstance(info["cuda_reason"], str)
    assert Path(info["build_dir"]).is_dir()


def test_forced_cpu_path_through_the_environment():
    code = ("from fused_balance import _extension as e; m = e.load(); print(m.cpu_isa())")
    env = dict(os.environ, FUSED_BALANCE_CPU_ISA="default", PYTHONPATH=str(REPO))
    result = run_process([sys.executable, "-c", code], "loading the extension with a forced CPU path", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "default"


def _toolkit_present() -> bool:
    if os.environ.get("FUSED_BALANCE_NO_CUDA", "") not in ("", "0"):
        return False
    if not (torch.version.cuda and torch.cuda._is_compiled()):
        return False
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    return any(r and (Path(r) / "bin" / "nvcc").is_file() for r in roots)


def test_cuda_kernels_are_compiled_and_registered_when_a_toolkit_exists():
    info = _extension.build_info()
    if _toolkit_present():
        assert info["cuda_compiled"], f"a CUDA toolkit exists but CUDA was not compiled: {info['cuda_reason']}"
    for op in ("gram", "combine", "combine_into", "balanced_adamw_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_balance::{op}", "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_balance::{op}", "CUDA") == info["cuda_compiled"]


def test_availability_contract():
    ok, reason = ops.availability(torch.device("cpu"))
    assert ok and isinstance(reason, str)
    ok, reason = ops.availability(torch.device("cuda"))
    assert ok == (torch.cuda.is_available() and _extension.build_info()["cuda_compiled"]), reason


# ---------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def to_cuda(pb):
    pb.flat = [g.cuda() for g in pb.flat]
    pb.weights = pb.weights.cuda()
    return pb


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 2, 3, 5, 9])
def test_cuda_ops_match_the_cpu_oracles(dtype, K):
    shapes = [(1,), (37, 3), (CHUNK + 5,), (2 * CHUNK,), (999,)]
    segments = [0, 2, 1, 0, 2]
    for noncontig in (False, True):
        pb = Problem(K, shapes, dtype, segments, 4, noncontig, K)
        G64 = gram64(pb)
        twin = combine_twin(pb)
        exact, scale = combine64_bound(pb)
        to_cuda(pb)
        G = torch.ops.fused_balance.gram(pb.flat, K, segments, 4)
        assert G.is_cuda and G.dtype == acc_dtype(dtype)
        assert bool(((G.cpu().double() - G64).abs() <= gram_tolerance(G64, dtype)).all())
        G_again = torch.ops.fused_balance.gram(pb.flat, K, segments, 4)
        assert torch.equal(G, G_again)  # deterministic: no atomics
        out = torch.ops.fused_balance.combine(pb.flat, pb.weights, segments)
        for o, t in zip(out, twin):
            assert torch.equal(o.cpu(), t)
        assert_close_to_exact([o.cpu() for o in out], exact, scale, dtype, K)
        target = [torch.empty_like(t).cuda() for t in twin]
        if noncontig:
            target = [torch.empty(t.shape[::-1], dtype=dtype, device="cuda").t() if t.dim() == 2 else
                      torch.empty(2 * t.numel(), dtype=dtype, device="cuda")[::2].view(t.shape) for t in twin]
        before = [bits(t) for t in target]
        torch.ops.fused_balance.combine_into(pb.flat, pb.weights, segments, target, torch.tensor(True, device="cuda"))
        assert all(torch.equal(bits(t), b) for t, b in zip(target, before))
        torch.ops.fused_balance.combine_into(pb.flat, pb.weights, segments, target, torch.tensor(False, device="cuda"))
        for o, t in zip(target, twin):
            assert torch.equal(o.cpu(), t)


@gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_adamw_matches_cpu(dtype):
    pb = Problem(2, [(1,), (37, 3), (CHUNK + 5,)], dtype, [0, 1, 1], 2, False, 3)
    cpu_state = fresh_state(pb, dtype, False)
    torch.ops.fused_balance.balanced_adamw_(pb.flat, pb.weights, pb.segments, *cpu_state, [1e-3], [0.01], 0.9,
                                            0.999, 1e-8, 5, None)
    gpu_state = [[t.cuda() for t in ts] for ts in fresh_state(pb, dtype, False)]
    flat_gpu = [g.cuda() for g in pb.flat]
    torch.ops.fused_balance.balanced_adamw_(flat_gpu, pb.weights.cuda(), pb.segments, *gpu_state, [1e-3], [0.01],
                                            0.9, 0.999, 1e-8, 5, torch.tensor([False], device="cuda"))
    # Same element update (multi_tensor.h, explicitly rounded ops): equal up to sqrt/div rounding.
    rtol, atol = ADAM_TOL[dtype]
    for a, b in zip(sum(gpu_state, []), sum(cpu_state, [])):
        torch.testing.assert_close(a.cpu(), b, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- the build cache
def _isolated_cache(tmp_path):
    """A build cache of its own holding this process's finished build (the library and its
    'finished' marker), plus the lock file torch >= 2.14 leaves behind after every build."""
    built = _extension._build_spec().build_dir
    folder = tmp_path / "cache" / built.name
    folder.mkdir(parents=True)
    library = _extension._library_path(_extension._build_spec())
    (folder / library.name).write_bytes(library.read_bytes())
    (folder / _extension._FINISHED).write_text(built.name)
    (folder / "lock").touch()
    return folder


def test_a_finished_build_is_imported_whatever_lock_file_torch_left(tmp_path):
    _extension.load()
    folder = _isolated_cache(tmp_path)
    code = ("import sys; from fused_balance import _extension as e; m = e.build(verbose=False); "
            "print(m.cpu_isa(), 'torch.utils.cpp_extension' in sys.modules)")
    env = dict(os.environ, FUSED_BALANCE_BUILD_DIR=str(folder.parent))
    result = run_process([sys.executable, "-c", code], "importing a finished build", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1] == "False"  # never went through torch's JIT (ninja, its lock)
    assert "building" not in result.stderr


def test_waiting_for_another_build_names_it_and_gives_up_in_time(tmp_path):
    import fcntl

    _extension.load()
    folder = _isolated_cache(tmp_path)
    (folder / _extension._FINISHED).unlink()  # unfinished: the process must build, or wait
    with open(folder / _extension._BUILD_LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242 0\n")
        held.flush()
        code = "from fused_balance import _extension as e; e.build(verbose=False)"
        env = dict(os.environ, FUSED_BALANCE_BUILD_DIR=str(folder.parent), FUSED_BALANCE_BUILD_WAIT="2")
        result = run_process([sys.executable, "-c", code], "a build waiting on a held lock", env=env,
                             timeout=300)
    assert result.returncode != 0
    assert "waiting for process 4242" in result.stderr, result.stderr[-2000:]
    assert "TimeoutError" in result.stderr and "gave up after" in result.stderr, result.stderr[-2000:]
    assert str(folder) in result.stderr
