"""Public API: every available backend against the float64 reference, policies, bad input."""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import fused_balance as fb
from fused_balance import reference
from shared import TOLERANCE, random_grads

BACKENDS = fb.available_backends("cpu")


def reference_gram64(grads, ids, S):
    flat = [t.double() for row in grads for t in row]
    return reference.gram(flat, len(grads), ids, S)


def segment_ids(mode, P, seed):
    if mode == "global":
        return None, [0] * P, 1
    if mode == "tensor":
        return "tensor", list(range(P)), P
    S = max(1, P // 3)
    ids = [p % S for p in range(P)]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(P, generator=gen).tolist()
    ids = [ids[i] for i in perm]
    return torch.tensor(ids), ids, S


sizes_st = st.lists(st.sampled_from([1, 2, 3, 7, 8, 15, 16, 17, 31, 64, 127, 300, 1001]), min_size=1, max_size=40)


@pytest.mark.parametrize("backend", BACKENDS)
@given(K=st.sampled_from([1, 2, 3, 5]), sizes=sizes_st,
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       mode=st.sampled_from(["global", "tensor", "ids"]), noncontig=st.booleans(), seed=st.integers(0, 2**16))
def test_gram_and_combine_match_float64_reference(backend, K, sizes, dtype, mode, noncontig, seed):
    grads = random_grads(K, sizes, dtype, seed, noncontiguous=noncontig)
    segments, ids, S = segment_ids(mode, len(sizes), seed)
    G = fb.gram(grads, segments, backend=backend)
    assert G.shape == (S, K, K)
    assert G.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    want = reference_gram64(grads, ids, S)
    rtol, atol = TOLERANCE[dtype]["gram"]
    scale = want.abs().amax().item() + 1.0
    torch.testing.assert_close(G.double(), want, rtol=rtol, atol=atol * scale)

    w = torch.rand(S, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) - 0.3
    rtol, atol = TOLERANCE[dtype]["output"]
    out = fb.combine(grads, w, segments, backend=backend)
    for p, o in enumerate(out):
        assert o.dtype == dtype and o.shape == grads[0][p].shape
        exact = sum(w[ids[p], k] * grads[k][p].double() for k in range(K))
        torch.testing.assert_close(o.double(), exact, rtol=rtol, atol=atol * 4)
    into = [torch.full_like(grads[0][p], 7.0) for p in range(len(sizes))]
    returned = fb.combine(grads, w, segments, out=into, backend=backend)
    assert returned[0] is into[0]
    for a, b in zip(into, out):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("policy", ["sum", "mgda", "pareto_lora"])
def test_pareto_combine_is_gram_weights_combine(backend, policy):
    grads = random_grads(2, [33, 5, 70, 1, 9], torch.float32, 11)
    grads[1] = [-0.5 * g + 0.01 * torch.randn_like(g) for g in grads[1]]  # conflict in some segments
    ids = [0, 0, 1, 1, 2]
    res = fb.pareto_combine(grads, ids, policy=policy, backend=backend)
    G = fb.gram(grads, ids, backend="torch")
    torch.testing.assert_close(res.gram, G, rtol=1e-5, atol=1e-5)
    w, branch = fb.policy_weights(G, policy)
    torch.testing.assert_close(res.weights, w, rtol=1e-4, atol=1e-6)
    assert torch.equal(res.branch, branch)
    norms = torch.diagonal(G, dim1=1, dim2=2).sqrt()
    torch.testing.assert_close(res.norms, norms)
    torch.testing.assert_close(res.cosines[:, 0, 1], G[:, 0, 1] / (norms[:, 0] * norms[:, 1]))
    assert not bool(res.found_inf)
    for p, d in enumerate(res.combined):
        s = ids[p]
        torch.testing.assert_close(d, w[s, 0] * grads[0][p] + w[s, 1] * grads[1][p], rtol=1e-4, atol=1e-5)


def test_mgda_combination_does_not_conflict_with_any_objective():
    # The min-norm direction d satisfies <d, g_k> >= |d|^2 >= 0 for every k (non-conflicting).
    grads = random_grads(3, [50, 20], torch.float64, 5)
    res = fb.pareto_combine(grads, policy="mgda", backend="torch")
    d = torch.cat([t.reshape(-1) for t in res.combined])
    for k in range(3):
        gk = torch.cat([t.reshape(-1) for t in grads[k]])
        assert float(d @ gk) >= float(d @ d) * (1 - 1e-9) - 1e-12


def test_pareto_lora_branches():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    # segment 0: conflict; segment 1: orthogonal with norm ratio 100 > tau; segment 2: balanced.
    g1 = [e1, 100 * e1, e1]
    g2 = [-e1 + 0.5 * e2, e2, e1 + e2]
    res = fb.pareto_combine([g1, g2], "tensor", policy="pareto_lora", tau=5.0, backend="torch")
    assert res.branch.tolist() == [2, 1, 0]
    # rescale: both objectives brought to their mean norm 50.5
    torch.testing.assert_close(res.weights[1], torch.tensor([50.5 / 100, 50.5]))
    torch.testing.assert_close(res.weights[2], torch.ones(2))
    # conflict: min-norm direction, restored to the plain sum's magnitude
    d = res.combined[0]
    assert math.isclose(float(d.norm()), float((g1[0] + g2[0]).norm()), rel_tol=1e-5)
    assert float(d @ g1[0]) >= 0 and float(d @ g2[0]) >= 0


def test_zero_objective_is_left_out_by_policies():
    g1 = [torch.randn(10), torch.randn(4)]
    g2 = [torch.zeros(10), torch.randn(4)]  # a segment without image signal
    for policy in ("mgda", "pareto_lora"):
        res = fb.pareto_combine([g1, g2], "tensor", policy=policy, backend="torch")
        assert torch.isfinite(res.weights).all()
        assert res.weights[0, 1] == 0 and res.weights[0, 0] > 0
        torch.testing.assert_close(res.combined[0] / res.weights[0, 0], g1[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nonfinite_gradient_flags_and_leaves_out_untouched(backend):
    grads = random_grads(2, [8, 3], torch.float32, 0)
    grads[1][0][2] = float("nan")
    out = [torch.full((8,), 3.0), torch.full((3,), 3.0)]
    res = fb.pareto_combine(grads, policy="pareto_lora", out=out, backend=backend)
    assert bool(res.found_inf)
    assert all(bool((o == 3.0).all()) for o in out)
    assert torch.isfinite(res.weights).all()
    grads[1][0][2] = float("inf")
    assert bool(fb.pareto_combine(grads, out=out, backend=backend).found_inf)
    assert all(bool((o == 3.0).all()) for o in out)


def test_gram_is_differentiable_through_reference():
    grads = [[torch.randn(5, dtype=torch.float64, requires_grad=True), torch.randn(2, dtype=torch.float64, requires_grad=True)]
             for _ in range(2)]
    flat = [t for row in grads for t in row]

    def f(*ts):
        return fb.gram([list(ts[:2]), list(ts[2:])], backend="torch")

    assert torch.autograd.gradcheck(f, flat)


# ----------------------------------------------------------------------------- bad input
def good():
    return [[torch.randn(3), torch.randn(2, 2)], [torch.randn(3), torch.randn(2, 2)]]


@pytest.mark.parametrize("bad, exc, match", [
    ([], ValueError, "empty"),
    ([[]], ValueError, "empty"),
    (torch.randn(2, 3), TypeError, "single Tensor"),
    ([[torch.randn(3)], [torch.randn(3), torch.randn(3)]], ValueError, r"grads\[1\] has 2"),
    ([[torch.randn(3)], [torch.randn(4)]], ValueError, r"grads\[1\]\[0\] has shape"),
    ([[torch.randn(3)], [torch.randn(3).double()]], TypeError, r"grads\[1\]\[0\] has dtype"),
    ([[torch.randn(3)], [3.0]], TypeError, r"grads\[1\]\[0\] is float"),
    ([[torch.arange(3)]], TypeError, "dtype"),
    ([[torch.randn(3)], [torch.randn(3, device="meta")]], ValueError, r"grads\[1\]\[0\] is on meta"),
])
def test_bad_grads(bad, exc, match):
    with pytest.raises(exc, match=match):
        fb.gram(bad, backend="torch")


@pytest.mark.parametrize("segments, exc, match", [
    ([0], ValueError, "has 1 ids"),
    ([0, -1], ValueError, r"segments\[1\] = -1"),
    ([0, 2], ValueError, "segment 1 has no tensor"),
    (torch.tensor([0.0, 1.0]), TypeError, "integers"),
    ("layers", ValueError, "segments="),
    ([0, 1.5], TypeError, r"segments\[1\]"),
])
def test_bad_segments(segments, exc, match):
    with pytest.raises(exc, match=match):
        fb.gram(good(), segments, backend="torch")


def test_bad_weights_and_out():
    with pytest.raises(ValueError, match=r"weights has shape \(2, 3\)"):
        fb.combine(good(), torch.ones(2, 3), "tensor", backend="torch")
    with pytest.raises(TypeError, match="weights must be a Tensor"):
        fb.combine(good(), [[1.0, 1.0]], backend="torch")
    with pytest.raises(ValueError, match=r"out\[1\] has shape"):
        fb.combine(good(), torch.ones(1, 2), out=[torch.empty(3), torch.empty(4)], backend="torch")
    with pytest.raises(ValueError, match="out has 1 tensors"):
        fb.combine(good(), torch.ones(1, 2), out=[torch.empty(3)], backend="torch")
    with pytest.raises(ValueError, match="unknown policy"):
        fb.pareto_combine(good(), policy="nash")
    with pytest.raises(ValueError, match="unknown backend"):
        fb.gram(good(), backend="cuda-magic")
    with pytest.raises(ValueError, match="step must be"):
        fb.balanced_adamw_step(good(), torch.ones(1, 2), None, [torch.zeros(3), torch.zeros(2, 2)],
                               [torch.zeros(3), torch.zeros(2, 2)], [torch.zeros(3), torch.zeros(2, 2)],
                               lrs=1e-3, step=0, backend="torch")


def test_use_backend_sets_default():
    assert fb.current_backend() == "auto"
    fb.use_backend("torch")
    try:
        assert fb.current_backend() == "torch"
        fb.gram(good())
    finally:
        fb.use_backend("auto")
    with pytest.raises(ValueError):
        fb.use_backend("nope")


@pytest.mark.parametrize("backend", BACKENDS)
def test_balanced_adamw_matches_torch_adamw(backend):
    torch.manual_seed(0)
    shapes = [(7,), (3, 5), (1,)]
    params = [torch.randn(s) for s in shapes]
    twin = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW([{"params": twin[:2], "lr": 1e-2}, {"params": twin[2:], "lr": 3e-3}],
                            weight_decay=0.1, betas=(0.8, 0.95), eps=1e-6)
    m = [torch.zeros(s) for s in shapes]
    v = [torch.zeros(s) for s in shapes]
    ids = [0, 1, 1]
    for step in range(1, 4):
        grads = [[torch.randn(s) for s in shapes] for _ in range(2)]
        w = torch.rand(2, 2)
        fb.balanced_adamw_step(grads, w, ids, params, m, v, lrs=[1e-2, 1e-2, 3e-3], weight_decays=0.1,
                               beta1=0.8, beta2=0.95, eps=1e-6, step=step, backend=backend)
        for p, t in enumerate(twin):
            t.grad = w[ids[p], 0] * grads[0][p] + w[ids[p], 1] * grads[1][p]
        opt.step()
    for a, b in zip(params, twin):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)
