"""Robustness of the op layer, on every available backend:

- NaN/Inf gradients: found_inf, ``out`` untouched, a skipped balanced AdamW step changes nothing;
- extreme magnitudes (1e-30 .. 1e20 in fp32): finite weights equal to a float64 computation,
  and found_inf only for real NaN/Inf; all-zero objectives; fp16 values whose squares overflow;
- bad input on every public entry: a clear error naming the index and no partial update;
- determinism: bitwise identical results across calls and thread counts.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import fused_balance as fb
from fused_balance import api, reference
from bad_inputs import ADAMW_CASES, GRAM_CASES, adamw_case, adamw_state, meta, two_by_two
from shared import random_grads

BACKENDS = fb.available_backends("cpu")
F32_MAX = torch.finfo(torch.float32).max


def snapshot(*groups):
    return [[t.clone() for t in g] for g in groups]


def assert_unchanged(before, *groups):
    for old, new in zip(before, groups):
        for a, b in zip(old, new):
            assert torch.equal(a, b) or (torch.isnan(a).any() and torch.equal(a.isnan(), b.isnan())
                                         and torch.equal(a.nan_to_num(), b.nan_to_num()))


# ============================================================================ non-finite
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("K", [2, 3])
def test_nonfinite_gradient_is_flagged_and_nothing_is_written(backend, dtype, bad, K):
    shapes = [(17,), (4, 5), (1,)]
    ids = [0, 1, 1]
    for k, p in [(0, 0), (K - 1, 1), (K - 1, 2)]:
        grads = random_grads(K, shapes, seed=3, dtype=dtype)
        grads[k][p].view(-1)[-1] = bad
        out = [torch.full(s, 2.5, dtype=dtype) for s in shapes]
        before = snapshot(out)
        res = fb.pareto_combine(grads, ids, policy="pareto_lora", out=out, backend=backend)
        assert bool(res.found_inf)
        assert torch.isfinite(res.weights).all()
        assert_unchanged(before, out)
        # the fused step, skipped on the device by found_inf, changes no parameter nor state
        params, m, v = adamw_state(shapes, 5, dtype)
        before = snapshot(params, m, v)
        fb.balanced_adamw_step(grads, res.weights, ids, params, m, v, lrs=1e-2, weight_decays=0.1,
                               step=3, skip=res.found_inf, backend=backend)
        assert_unchanged(before, params, m, v)


@pytest.mark.parametrize("backend", BACKENDS)
def test_finite_gradients_are_written_and_stepped(backend):
    # the other side of the flag: finite gradients write `out` and move the parameters
    shapes = [(9,), (2, 3)]
    grads = random_grads(2, shapes, seed=1)
    out = [torch.zeros(s) for s in shapes]
    res = fb.pareto_combine(grads, "tensor", out=out, backend=backend)
    assert not bool(res.found_inf) and all(bool((o != 0).any()) for o in out)
    params, m, v = adamw_state(shapes, 2)
    before = snapshot(params)
    fb.balanced_adamw_step(grads, res.weights, "tensor", params, m, v, lrs=1e-2, step=1,
                           skip=res.found_inf, backend=backend)
    assert all(not torch.equal(a, b) for a, b in zip(before[0], params))


# ============================================================================ extreme range
def float64_truth(grads, ids, S, policy):
    """Weights, norms, cosines of the exact problem: the same fp32 values, in float64."""
    K = len(grads)
    flat64 = [t.double() for row in grads for t in row]
    G64 = reference.gram(flat64, K, ids, S)
    w64, branch = fb.policy_weights(G64, policy)
    norms, cosines = fb.gram_statistics(G64)
    return G64, w64, branch, norms, cosines


def assert_weights_match(w, w64, rtol=1e-4):
    """Per segment, relative to the segment's largest weight; weights beyond fp32 saturate."""
    want = w64.clamp(-F32_MAX, F32_MAX)
    scale = want.abs().amax(-1, keepdim=True).clamp(min=1e-30)
    err = ((w.double() - want) / scale).abs()
    assert (err <= rtol).all(), f"weights {w.tolist()} vs float64 {w64.tolist()}"


MAGNITUDES = [1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e15, 1e20]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["mgda", "pareto_lora", "sum"])
@pytest.mark.parametrize("K", [2, 3])
def test_extreme_magnitudes_give_correct_weights(backend, policy, K):
    """Every pair of objective magnitudes (one segment per pair, so segments needing the
    rescue sit next to ordinary ones); plus gradients whose scale varies inside a segment."""
    shapes, ids, scales = [], [], []
    pairs = list(itertools.combinations_with_replacement(MAGNITUDES, 2))
    for s, (a, b) in enumerate(pairs):
        shapes += [(40,), (3, 7)]
        ids += [s, s]
        scales.append((a, b))
    gen = torch.Generator().manual_seed(K)
    grads = [[None] * len(shapes) for _ in range(K)]
    for p, shape in enumerate(shapes):
        a, b = scales[ids[p]]
        for k in range(K):
            scale = (a, b, (a * b) ** 0.5)[k]
            grads[k][p] = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).float()
    S = len(pairs)
    res = fb.pareto_combine(grads, ids, policy=policy, backend=backend)
    G64, w64, branch64, norms64, cos64 = float64_truth(grads, ids, S, policy)
    assert not bool(res.found_inf), "finite gradients must never raise found_inf"
    assert torch.isfinite(res.weights).all() and torch.isfinite(res.norms).all()
    assert_weights_match(res.weights, w64)
    assert torch.equal(res.branch, branch64)
    torch.testing.assert_close(res.norms.double(), norms64, rtol=1e-5, atol=0)
    torch.testing.assert_close(res.cosines.double(), cos64, rtol=0, atol=1e-5)
    # the Gram is reported in fp32: exact where representable, saturated where not
    representable = G64.abs() <= F32_MAX
    torch.testing.assert_close(res.gram.double()[representable], G64[representable], rtol=1e-5, atol=1e-44)
    assert torch.isinf(res.gram[~representable]).all()
    # the combination equals the float64 one wherever the weights fit in fp32
    for p, d in enumerate(res.combined):
        s = ids[p]
        if w64[s].abs().max() > F32_MAX:
            continue
        exact = sum(w64[s, k] * grads[k][p].double() for k in range(K))
        scale = exact.abs().max().clamp(min=1e-300)
        assert ((d.double() - exact).abs() / scale).max() <= 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [1e-30, 1e-22, 1e18, 1e20])
def test_uniform_extreme_scale_equals_unit_scale(backend, dtype, scale):
    """The weights are scale-invariant: gradients times 1e-30 or 1e20 (whose fp32 squares
    underflow / overflow) must give the weights of the same gradients at scale 1."""
    shapes = [(64,), (8, 8), (5,)]
    ids = [0, 0, 1]
    unit = random_grads(2, shapes, seed=11, dtype=torch.float64)
    unit[1] = [-0.3 * a + b for a, b in zip(unit[0], unit[1])]  # some conflict
    scaled = [[(t * scale).to(dtype) for t in row] for row in unit]
    exact = [[t.double() / scale for t in row] for row in scaled]  # the values actually passed
    for policy in ("mgda", "pareto_lora"):
        res = fb.pareto_combine(scaled, ids, policy=policy, backend=backend)
        assert not bool(res.found_inf)
        want = fb.pareto_combine(exact, ids, policy=policy, backend="torch")
        torch.testing.assert_close(res.weights.double(), want.weights, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(res.cosines.double(), want.cosines, rtol=0, atol=1e-4)
        torch.testing.assert_close(res.norms.double() / scale, want.norms, rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pareto_weights_matches_pareto_combine(backend):
    grads = random_grads(3, [(30,), (2, 2)], seed=4, scales=(1e-30, 1.0, 1e18))
    a = fb.api.pareto_weights(grads, [0, 1], policy="pareto_lora", backend=backend)
    b = fb.pareto_combine(grads, [0, 1], policy="pareto_lora", backend=backend)
    assert a.combined is None
    for f in ("gram", "weights", "norms", "cosines", "found_inf", "branch"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f


def test_range_check_can_be_switched_off():
    grads = random_grads(2, [(50,)], seed=2, scales=(1e20, 1e20))
    assert not bool(fb.pareto_combine(grads, backend="torch").found_inf)
    api.set_range_check(False)
    try:  # the plain fp32 Gram overflows: without the check that reads as found_inf
        assert bool(fb.pareto_combine(grads, backend="torch").found_inf)
    finally:
        api.set_range_check(True)
    with pytest.raises(TypeError):
        api.set_range_check("yes")


def test_rescue_only_when_needed():
    """The cheap check fires on zero/tiny/huge diagonals and non-finite segments only."""
    G = torch.tensor([[[1.0, 0.1], [0.1, 2.0]],
                      [[0.0, 0.0], [0.0, 2.0]],
                      [[1e-35, 0.0], [0.0, 2.0]],
                      [[1.0, 0.0], [0.0, 1e38]],
                      [[float("inf"), 1.0], [1.0, 1.0]]])
    suspects = api._range_suspects(G)
    assert suspects.tolist() == [[False, False], [True, False], [True, False], [False, True], [True, True]]


# ============================================================================ zero gradients
@pytest.mark.parametrize("K", [2, 3])
def test_min_norm_with_a_zero_gradient_is_the_origin(K):
    g = torch.randn(K, 9, dtype=torch.float64)
    g[K - 1] = 0
    for dtype in (torch.float64, torch.float32):
        w = fb.min_norm_weights((g @ g.T).to(dtype)[None])
        assert torch.isfinite(w).all() and float(w.sum()) == pytest.approx(1.0)
        assert float(w[0, K - 1]) == pytest.approx(1.0)  # all weight on the zero gradient: d = 0
        assert float((w[0].double() @ g).norm()) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["mgda", "pareto_lora"])
@pytest.mark.parametrize("K", [2, 3])
def test_policies_leave_a_zero_objective_out(backend, policy, K):
    """Objective 0 is zero in segment 1: there the policy balances the others exactly as if
    objective 0 did not exist; segment 0 is untouched by it."""
    shapes = [(20,), (6,), (3, 3)]
    ids = [0, 1, 1]
    grads = random_grads(K, shapes, seed=8)
    grads[0][1].zero_()
    grads[0][2].zero_()
    res = fb.pareto_combine(grads, ids, policy=policy, backend=backend)
    assert not bool(res.found_inf) and torch.isfinite(res.weights).all()
    assert res.weights[1, 0] == 0
    others = [row[1:] for row in grads[1:]]  # the K-1 others on segment 1 alone
    alone = fb.pareto_combine(others, None, policy=policy, backend="torch")
    torch.testing.assert_close(res.weights[1, 1:], alone.weights[0], rtol=1e-5, atol=1e-7)
    for p in (1, 2):
        torch.testing.assert_close(res.combined[p], alone.combined[p - 1], rtol=1e-5, atol=1e-6)
    full = fb.pareto_combine([row[:1] for row in grads], None, policy=policy, backend="torch")
    torch.testing.assert_close(res.weights[0], full.weights[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_objectives_zero_gives_zero_update(backend):
    grads = [[torch.zeros(5), torch.zeros(2, 2)] for _ in range(3)]
    for policy in ("mgda", "pareto_lora", "sum"):
        res = fb.pareto_combine(grads, "tensor", policy=policy, backend=backend)
        assert not bool(res.found_inf) and torch.isfinite(res.weights).all()
        assert all(bool((d == 0).all()) for d in res.combined)


# ============================================================================ fp16 squares
@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_values_whose_squares_overflow_fp16(backend):
    gen = torch.Generator().manual_seed(0)
    shapes = [(33,), (7, 9)]
    grads = []
    for k in range(2):  # magnitudes 300..60000, random signs: squares up to 3.6e9 >> 65504
        row = []
        for s in shapes:
            mag = 300 + torch.rand(s, generator=gen) * 59700
            sign = torch.where(torch.rand(s, generator=gen) < 0.5, -1.0, 1.0)
            row.append((mag * sign).half())
        grads.append(row)
    G = fb.gram(grads, "tensor", backend=backend)
    G64 = reference.gram([t.double() for row in grads for t in row], 2, [0, 1], 2)
    assert torch.isfinite(G).all()
    torch.testing.assert_close(G.double(), G64, rtol=1e-5, atol=0)
    res = fb.pareto_combine(grads, "tensor", policy="mgda", backend=backend)
    assert not bool(res.found_inf)
    w64, _ = fb.policy_weights(G64, "mgda")
    torch.testing.assert_close(res.weights.double(), w64, rtol=1e-4, atol=1e-6)
    for p, d in enumerate(res.combined):  # convex weights: |d| <= 60000 fits fp16
        exact = w64[p, 0] * grads[0][p].double() + w64[p, 1] * grads[1][p].double()
        torch.testing.assert_close(d.double(), exact, rtol=2e-3, atol=1.0)


# ============================================================================ bad input
def assert_raises_and_unchanged(fn, exc, match, *groups):
    before = snapshot(*groups)
    with pytest.raises(exc, match=match):
        fn()
    assert_unchanged(before, *groups)


@pytest.mark.parametrize("case", list(GRAM_CASES))
def test_bad_grads_on_every_entry(case):
    make, exc, match = GRAM_CASES[case]
    good = two_by_two()
    bad = make(good)
    w = torch.ones(1, 2)
    params, m, v = adamw_state([(3,), (3,)], 0)
    out = [torch.zeros(3), torch.zeros(3)]
    calls = [lambda: fb.gram(bad), lambda: fb.combine(bad, w), lambda: fb.combine(bad, w, out=out),
             lambda: fb.pareto_combine(bad, out=out),
             lambda: fb.balanced_adamw_step(bad, w, None, params, m, v, lrs=0.1, step=1)]
    for call in calls:
        assert_raises_and_unchanged(call, exc, match, out, params, m, v, good[0], good[1])


def test_bad_segments_types():
    g = two_by_two()
    with pytest.raises(ValueError, match="1-D"):
        fb.gram(g, torch.zeros(1, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="segments must be"):
        fb.gram(g, 3)
    import numpy as np
    torch.testing.assert_close(fb.gram(g, np.array([0, 1])), fb.gram(g, [0, 1]))  # numpy ints are ints


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["weights K", "weights 3-D", "weights int", "weights meta", "weights list",
                                  "out dtype", "out meta", "out count", "out not tensor", "out twice",
                                  "out overlapping views", "out aliases a gradient", "out aliases a view of a gradient"])
def test_bad_combine_arguments(backend, case):
    g = two_by_two()
    w = torch.ones(1, 2)
    out = [torch.zeros(3), torch.zeros(3)]
    buf = torch.zeros(5)
    exc, match = ValueError, None
    if case == "weights K":
        w, match = torch.ones(1, 3), r"weights has shape \(1, 3\), expected \[S=1, K=2\]"
    elif case == "weights 3-D":
        w, match = torch.ones(1, 1, 2), r"weights has shape \(1, 1, 2\)"
    elif case == "weights int":
        w, exc, match = torch.ones(1, 2, dtype=torch.long), TypeError, "weights must be floating point"
    elif case == "weights meta":
        w, match = meta((1, 2)), "weights is on meta but the gradients are on cpu"
    elif case == "weights list":
        w, exc, match = [[1.0, 1.0]], TypeError, "weights must be a Tensor"
    elif case == "out dtype":
        out[1], exc, match = torch.zeros(3, dtype=torch.float64), TypeError, r"out\[1\] has dtype"
    elif case == "out meta":
        out[0], match = meta(), r"out\[0\] is on meta"
    elif case == "out count":
        out, match = out[:1], "out has 1 tensors, expected 2"
    elif case == "out not tensor":
        out[1], exc, match = [0.0, 0.0, 0.0], TypeError, r"out\[1\] is list"
    elif case == "out twice":
        out[1], match = out[0], r"out\[1\] shares memory with out\[0\]"
    elif case == "out overlapping views":
        out, match = [buf[:3], buf[2:]], r"out\[1\] shares memory with out\[0\]"
    elif case == "out aliases a gradient":
        out[1], match = g[1][0], r"(out\[1\] shares memory with grads\[1\]\[0\]|grads\[1\]\[0\] shares memory with out\[1\])"
    elif case == "out aliases a view of a gradient":
        out[0], match = g[0][1][:, None][:, 0], r"grads\[0\]\[1\] shares memory with out\[0\]|out\[0\] shares memory with grads\[0\]\[1\]"
    outs = [o for o in out if isinstance(o, torch.Tensor) and o.device.type == "cpu"]
    assert_raises_and_unchanged(lambda: fb.combine(g, w, out=out, backend=backend), exc, match, outs, g[0], g[1])
    if case.startswith("out"):
        assert_raises_and_unchanged(lambda: fb.pareto_combine(g, out=out, backend=backend), exc, match,
                                    outs, g[0], g[1])


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(policy="nash"), ValueError, "unknown policy"),
    (dict(policy=None), ValueError, "unknown policy"),
    (dict(tau="5"), TypeError, "tau .* must be a real number"),
    (dict(tau=1.0), ValueError, "tau .* must be > 1"),
    (dict(tau=float("nan")), ValueError, "tau .* must be finite"),
    (dict(rescale="max"), ValueError, "rescale must be"),
    (dict(distributed="model"), ValueError, "distributed='model'"),
    (dict(backend="gpu"), ValueError, "unknown backend"),
])
def test_bad_pareto_arguments_write_nothing(kwargs, exc, match):
    g = two_by_two()
    out = [torch.zeros(3), torch.zeros(3)]
    assert_raises_and_unchanged(lambda: fb.pareto_combine(g, out=out, **kwargs), exc, match, out, g[0], g[1])
    if "distributed" not in kwargs and "backend" not in kwargs:
        with pytest.raises(exc, match=match):
            fb.policy_weights(fb.gram(g), **kwargs)


@pytest.mark.parametrize("G, kwargs, exc, match", [
    ([[1.0]], {}, TypeError, "G must be a Tensor"),
    (torch.ones(2, 2, dtype=torch.long), {}, TypeError, "G must be floating point"),
    (torch.ones(2, 3, 4), {}, ValueError, r"G must have shape \[S, K, K\]"),
    (torch.ones(1, 2, 2, 2), {}, ValueError, "G must have shape"),
    (torch.ones(0, 0), {}, ValueError, "K >= 1"),
    (torch.eye(3)[None], dict(active=torch.ones(1, 2, dtype=torch.bool)), ValueError, r"active has shape \(1, 2\)"),
    (torch.eye(3)[None], dict(active=torch.ones(1, 3)), TypeError, "active must be a bool"),
    (torch.eye(3)[None], dict(active=torch.ones(1, 3, dtype=torch.bool, device="meta")), ValueError, "active is on meta"),
    (torch.eye(3)[None], dict(max_iter=0), ValueError, "max_iter"),
])
def test_bad_min_norm_arguments(G, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fb.min_norm_weights(G, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ADAMW_CASES)
def test_bad_adamw_arguments_update_nothing(backend, case):
    a, exc, match = adamw_case(case)
    cpu = lambda ts: [t for t in ts if isinstance(t, torch.Tensor) and t.device.type == "cpu"]  # noqa: E731
    groups = (cpu(a["params"]), cpu(a["exp_avgs"]), cpu(a["exp_avg_sqs"]), a["grads"][0], a["grads"][1])
    grads = a.pop("grads")
    call = lambda: fb.balanced_adamw_step(grads, **a, backend=backend)  # noqa: E731
    if exc is None:  # a valid call next to the invalid ones: views of one buffer that do not overlap
        call()
        return
    assert_raises_and_unchanged(call, exc, match, *groups)


# ============================================================================ determinism
def determinism_problem(K, seed=0):
    # a long tensor (split into many chunks by the parallel kernels), odd sizes, segments
    shapes = [(1 << 17,), (333, 129), (7,), (1,), (4097,)]
    grads = random_grads(K, shapes, seed=seed)
    grads[1] = [-0.4 * a + b for a, b in zip(grads[0], grads[1])]  # a conflict: the min-norm branch
    return grads, [0, 1, 1, 2, 0]


def run_ops(grads, ids, backend):
    G = fb.gram(grads, ids, backend=backend)
    w = torch.rand(3, len(grads), generator=torch.Generator().manual_seed(1))
    d = fb.combine(grads, w, ids, backend=backend)
    res = fb.pareto_combine(grads, ids, policy="pareto_lora", backend=backend)
    out = [torch.empty_like(t) for t in grads[0]]
    fb.pareto_combine(grads, ids, policy="mgda", out=out, backend=backend)
    tiny = [[t * 1e-30 for t in row] for row in grads]  # the float64 rescue path
    rescued = fb.pareto_combine(tiny, ids, policy="mgda", backend=backend)
    params, m, v = adamw_state([t.shape for t in grads[0]], 3)
    fb.balanced_adamw_step(grads, res.weights, ids, params, m, v, lrs=1e-3, weight_decays=0.01,
                           step=2, backend=backend)
    return [G, res.gram, res.weights, *d, *res.combined, *out, rescued.gram, rescued.weights,
            *rescued.combined, *params, *m, *v]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [2, 3])
def test_bitwise_determinism_across_calls_and_threads(backend, K):
    grads, ids = determinism_problem(K)
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 1, 2):
            torch.set_num_threads(n)
            results.append(run_ops(grads, ids, backend))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)
