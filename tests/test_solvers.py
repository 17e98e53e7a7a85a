"""min_norm_weights against a float64 brute-force oracle and the min-norm KKT conditions."""
import itertools

import pytest
import torch
from hypothesis import given, strategies as st

import fused_balance as fb


def brute_force_min_norm(G: torch.Tensor) -> float:
    """min over the simplex of w^T G w (float64), by solving the KKT system on every support."""
    G = G.double()
    K = G.shape[0]
    best = float("inf")
    for size in range(1, K + 1):
        for support in itertools.combinations(range(K), size):
            idx = list(support)
            A = torch.zeros(size + 1, size + 1, dtype=torch.float64)
            A[:size, :size] = G[idx][:, idx]
            A[:size, size] = -1
            A[size, :size] = 1
            b = torch.zeros(size + 1, dtype=torch.float64)
            b[size] = 1
            x = torch.linalg.lstsq(A, b[:, None], driver="gelsd").solution[:size, 0]
            if (x >= -1e-12).all() and abs(x.sum() - 1) < 1e-9:
                w = torch.zeros(K, dtype=torch.float64)
                w[idx] = x.clamp(min=0)
                best = min(best, float(w @ G @ w))
    return best


def random_gram(S, K, N, seed, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(S, K, N, generator=gen, dtype=torch.float64)
    scales = torch.exp(torch.randn(S, K, 1, generator=gen, dtype=torch.float64) * 2)
    g = g * scales
    return (g @ g.transpose(1, 2)).to(dtype)


def assert_kkt(G, w, rel_tol):
    G = G.double()
    w = w.double()
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0], dtype=torch.float64), atol=1e-6, rtol=0)
    v = torch.einsum("skl,sl->sk", G, w)
    obj = torch.einsum("sk,sk->s", w, v)
    scale = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1)[:, None]
    # Stationarity with complementary slackness: (G w)_i >= w^T G w, with equality on the support.
    assert (v >= obj[:, None] - rel_tol * scale).all()
    on_support = w > 1e-4
    assert ((v - obj[:, None]).abs() <= rel_tol * scale)[on_support].all()


@given(K=st.sampled_from([2, 3, 4, 5]), S=st.integers(1, 4), N=st.integers(1, 8), seed=st.integers(0, 10_000))
def test_min_norm_matches_brute_force_and_kkt(K, S, N, seed):
    G = random_gram(S, K, N, seed)
    w = fb.min_norm_weights(G)
    assert w.shape == (S, K)
    assert_kkt(G, w, rel_tol=1e-6)
    for s in range(S):
        got = float(w[s].double() @ G[s] @ w[s].double())
        want = brute_force_min_norm(G[s])
        assert got <= want + 1e-9 * float(torch.trace(G[s])) + 1e-300


@given(K=st.sampled_from([2, 3, 5]), seed=st.integers(0, 10_000))
def test_float32_gram_satisfies_kkt(K, seed):
    G = random_gram(3, K, 6, seed, dtype=torch.float32)
    w = fb.min_norm_weights(G)
    assert w.dtype == torch.float32
    assert_kkt(G, w, rel_tol=2e-4)


def test_two_objective_closed_form():
    g1 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    g2 = torch.tensor([0.0, 2.0], dtype=torch.float64)
    G = torch.stack([torch.stack([g1 @ g1, g1 @ g2]), torch.stack([g2 @ g1, g2 @ g2])])
    w = fb.min_norm_weights(G)[0]
    # min over gamma of |gamma g1 + (1-gamma) g2|^2 = gamma^2 + 4 (1-gamma)^2 -> gamma = 4/5
    torch.testing.assert_close(w, torch.tensor([0.8, 0.2], dtype=torch.float64))


@pytest.mark.parametrize("K", [2, 3, 5])
@pytest.mark.parametrize("case", ["zero", "identical", "opposite", "one_zero"])
def test_degenerate_grams_give_finite_simplex_weights(K, case):
    g = torch.randn(K, 7, dtype=torch.float64)
    if case == "zero":
        g.zero_()
    elif case == "identical":
        g[:] = g[0]
    elif case == "opposite":
        g[1] = -g[0]
    elif case == "one_zero":
        g[0] = 0
    G = (g @ g.T)[None]
    w = fb.min_norm_weights(G)
    assert torch.isfinite(w).all() and (w >= 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=torch.float64))
    if case in ("opposite", "one_zero"):  # the min-norm point is the origin
        d = w[0] @ g
        assert d.norm() <= 1e-6 * g.norm()


@given(K=st.sampled_from([2, 3, 5]), seed=st.integers(0, 10_000), scale=st.sampled_from([1e-20, 1e-3, 1.0, 1e20]))
def test_permutation_and_scale_invariance(K, seed, scale):
    G = random_gram(1, K, 5, seed)
    w = fb.min_norm_weights(G)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(seed))
    w_perm = fb.min_norm_weights(G[:, perm][:, :, perm])
    # The min-norm point d = sum w_k g_k is unique even where w is not: compare objectives.
    obj = lambda G_, w_: float(w_[0] @ G_[0] @ w_[0])  # noqa: E731
    assert abs(obj(G, w) - obj(G[:, perm][:, :, perm], w_perm)) <= 1e-8 * float(G[0].trace())
    w_scaled = fb.min_norm_weights(G * scale)
    assert abs(obj(G, w) - obj(G, w_scaled)) <= 1e-8 * float(G[0].trace())


def test_active_mask_restricts_to_a_face():
    G = random_gram(2, 4, 6, 3)
    active = torch.tensor([[True, False, True, True], [False, True, False, False]])
    w = fb.min_norm_weights(G, active=active)
    assert (w[~active] == 0).all()
    torch.testing.assert_close(w[1], torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    sub = G[0][[0, 2, 3]][:, [0, 2, 3]]
    assert abs(float(w[0] @ G[0] @ w[0]) - brute_force_min_norm(sub)) <= 1e-8 * float(sub.trace())


def test_bad_gram_shapes_raise():
    with pytest.raises(ValueError, match="shape"):
        fb.min_norm_weights(torch.zeros(2, 3, 4))
    with pytest.raises(TypeError):
        fb.min_norm_weights([[1.0]])
