"""min_norm_weights against a float64 brute-force oracle and the min-norm KKT conditions."""
import itertools

import pytest
import torch
from hypothesis import given, strategies as st

import fused_balance as fb
from fused_balance.solvers import active_set_min_norm


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


# ----------------------------------------------------------------------------- every K up to 32
def exact_qp_objective(G: torch.Tensor) -> float:
    """min over the simplex of w^T G w by quadprog (an independent dual active-set QP solver)."""
    quadprog = pytest.importorskip("quadprog", reason="quadprog is in the test extras")
    import numpy as np

    Gn = G.double().numpy()
    K, trace = Gn.shape[0], float(np.trace(Gn))
    constraints = np.hstack([np.ones((K, 1)), np.eye(K)])
    bounds = np.r_[1.0, np.zeros(K)]
    x = quadprog.solve_qp(Gn / trace + 1e-13 * np.eye(K), np.zeros(K), constraints, bounds, meq=1)[0]
    x = np.clip(x, 0, None)
    x /= x.sum()
    return float(x @ Gn @ x)


def adversarial_gradients(kind: str, K: int, seed: int) -> torch.Tensor:
    """[K, N] float64 gradients whose min-norm problem is hard in a named way."""
    gen = torch.Generator().manual_seed(seed)
    N = 3 * K
    g = torch.randn(K, N, generator=gen, dtype=torch.float64)
    if kind == "scaled":           # norms over ~8 orders of magnitude: the old solver's failure
        return g * torch.exp(3 * torch.randn(K, 1, generator=gen, dtype=torch.float64))
    if kind == "tiny":             # the origin almost inside the hull: a min-norm point ~1e-3 short
        return g - (1 - 1e-3) * g.mean(0)
    if kind == "near_degenerate":  # K nearly identical gradients
        return torch.randn(1, N, generator=gen, dtype=torch.float64) + 1e-6 * g
    if kind == "rank_deficient":   # K points in a 2-d affine plane away from the origin
        low = torch.randn(K, 2, generator=gen, dtype=torch.float64) @ torch.randn(2, N, generator=gen, dtype=torch.float64)
        return 3 * torch.randn(1, N, generator=gen, dtype=torch.float64) + low
    return g  # "random"


KINDS = ["random", "scaled", "tiny", "near_degenerate", "rank_deficient"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("K", [2, 3, 4, 6, 8, 10, 12, 16, 20, 24, 32])
def test_min_norm_is_exact_and_non_conflicting_for_every_k(K, kind):
    """KKT conditions, g_k . d >= 0 for every objective (MGDA's promise), the exact QP's objective
    and a converged active set, for K = 2 ... 32 (the old projected-gradient solver missed the
    optimum by up to ~1e5x and returned directions with g_k . d = -1.9 |d|^2 here)."""
    g = torch.stack([adversarial_gradients(kind, K, seed) for seed in range(4)])  # [S, K, N]
    G = g @ g.transpose(1, 2)
    w = fb.min_norm_weights(G)
    assert_kkt(G, w, rel_tol=1e-9)
    d = torch.einsum("sk,skn->sn", w, g)
    d_sq = (d * d).sum(-1)
    assert (torch.einsum("skn,sn->sk", g, d) >= -1e-6 * d_sq[:, None]).all()
    for s in range(G.shape[0]):
        trace = float(G[s].trace())
        assert float(d_sq[s]) <= exact_qp_objective(G[s]) * (1 + 1e-7) + 1e-13 * trace
    if K > 2:
        Gn = G / torch.diagonal(G, dim1=1, dim2=2).sum(-1)[:, None, None]
        _, converged = active_set_min_norm(Gn, torch.ones(G.shape[:2], dtype=torch.bool))
        assert converged.all(), "the iteration budget did not suffice"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("K", [3, 4, 6])
def test_min_norm_matches_brute_force_on_adversarial_grams(K, kind):
    g = torch.stack([adversarial_gradients(kind, K, seed) for seed in range(3)])
    G = g @ g.transpose(1, 2)
    w = fb.min_norm_weights(G)
    for s in range(G.shape[0]):
        got = float(w[s] @ G[s] @ w[s])
        assert got <= brute_force_min_norm(G[s]) * (1 + 1e-9) + 1e-13 * float(G[s].trace())


@pytest.mark.parametrize("first_shorter", [True, False])
def test_parallel_gradients_of_nearly_equal_length_pick_the_shorter(first_shorter):
    """Identical gradients are decided at rounding level only: lengths 1.2e-6 apart are not."""
    g1 = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    g2 = g1 * (1 + 1.2e-6)
    g = torch.stack([g1, g2] if first_shorter else [g2, g1])
    w = fb.min_norm_weights((g @ g.T)[None])[0]
    expected = [1.0, 0.0] if first_shorter else [0.0, 1.0]
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64), atol=0, rtol=0)
    same = torch.stack([g1, g1])
    torch.testing.assert_close(fb.min_norm_weights((same @ same.T)[None])[0],
                               torch.tensor([0.5, 0.5], dtype=torch.float64))


def test_active_set_keeps_zero_objectives_out_for_large_k():
    g = adversarial_gradients("scaled", 12, 0)
    active = torch.ones(1, 12, dtype=torch.bool)
    active[0, [1, 5, 7]] = False
    G = (g @ g.T)[None]
    w = fb.min_norm_weights(G, active=active)
    assert (w[~active] == 0).all()
    keep = active[0].nonzero().flatten()
    sub = G[0][keep][:, keep]
    assert float(w[0] @ G[0] @ w[0]) <= exact_qp_objective(sub) * (1 + 1e-7) + 1e-13 * float(sub.trace())
