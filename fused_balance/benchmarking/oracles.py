"""Reference oracles of the benchmark suite, independent of every contender's arithmetic: the Gram
in float64 tensor by tensor, the exact min-norm weights by enumerating supports, and the classic
host-side solvers (closed form for K = 2, Frank-Wolfe) in Python floats. The suite checks every
contender's result against them; tests/bench checks them against the KKT conditions."""
from __future__ import annotations

import itertools

import torch

__all__ = ["exact_gram", "exact_min_norm_weights", "closed_form_min_norm", "frank_wolfe_min_norm"]


def exact_gram(grads) -> torch.Tensor:
    """Gram in float64, tensor by tensor (independent of every contender's arithmetic)."""
    K = len(grads)
    G = torch.zeros(K, K, dtype=torch.float64)
    for tensors in zip(*grads):
        flat = torch.stack([t.reshape(-1).to(torch.float64) for t in tensors])
        G += (flat @ flat.T).cpu()
    return G


def _solve_small(A: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when (numerically) singular."""
    n = len(b)
    M = [row[:] + [b[i]] for i, row in enumerate(A)]
    scale = max((abs(x) for row in A for x in row), default=0.0) or 1.0
    for col in range(n):
        pivot = max(range(col, n), key=lambda r: abs(M[r][col]))
        if abs(M[pivot][col]) <= 1e-13 * scale:
            return None
        M[col], M[pivot] = M[pivot], M[col]
        for r in range(n):
            if r != col:
                f = M[r][col] / M[col][col]
                for c in range(col, n + 1):
                    M[r][c] -= f * M[col][c]
    return [M[i][n] / M[i][i] for i in range(n)]


def _quadratic(w, G) -> float:
    return sum(w[i] * G[i][j] * w[j] for i in range(len(w)) for j in range(len(w)))


def exact_min_norm_weights(G) -> list[float]:
    """argmin of w^T G w over the simplex, exactly, by enumerating supports: on each support S
    solve G_SS w = lam 1, sum w = 1; keep the feasible solution of least value. The optimum's
    support is one of them, so for the small K here this is the global minimum."""
    G = [[float(x) for x in row] for row in (G.tolist() if hasattr(G, "tolist") else G)]
    K = len(G)
    best, best_value = None, float("inf")
    for size in range(1, K + 1):
        for support in itertools.combinations(range(K), size):
            n = len(support)
            A = [[G[i][j] for j in support] + [1.0] for i in support] + [[1.0] * n + [0.0]]
            x = _solve_small(A, [0.0] * n + [1.0])
            if x is None or min(x[:n]) < -1e-12:
                continue
            w = [0.0] * K
            for i, s in enumerate(support):
                w[s] = max(0.0, x[i])
            total = sum(w)
            w = [v / total for v in w]
            value = _quadratic(w, G)
            if value < best_value:
                best, best_value = w, value
    return best


def closed_form_min_norm(g11: float, g12: float, g22: float) -> list[float]:
    """K=2: gamma = clamp((g22 - g12) / (g11 + g22 - 2 g12), 0, 1); w = (gamma, 1 - gamma)."""
    denom = g11 + g22 - 2.0 * g12
    if denom <= 1e-12 * max(g11 + g22, 1e-300):
        return [0.5, 0.5]
    gamma = min(1.0, max(0.0, (g22 - g12) / denom))
    return [gamma, 1.0 - gamma]


def frank_wolfe_min_norm(G, max_iter: int = 250, tol: float = 1e-6) -> list[float]:
    """The classic MGDA solver in Python floats: closed form for K=2, else Frank-Wolfe with exact
    line search from the centre of the simplex."""
    G = [[float(x) for x in row] for row in G]
    K = len(G)
    if K == 1:
        return [1.0]
    if K == 2:
        return closed_form_min_norm(G[0][0], G[0][1], G[1][1])
    w = [1.0 / K] * K
    for _ in range(max_iter):
        Gw = [sum(G[i][j] * w[j] for j in range(K)) for i in range(K)]
        t = min(range(K), key=Gw.__getitem__)
        a = sum(w[i] * Gw[i] for i in range(K))      # |d|^2
        b = Gw[t]                                      # <d, g_t>
        c = G[t][t]                                    # |g_t|^2
        denom = a - 2.0 * b + c
        gamma = 1.0 if denom <= 0 else min(1.0, max(0.0, (a - b) / denom))
        w = [(1.0 - gamma) * v for v in w]
        w[t] += gamma
        if gamma < tol:
            break
    return w
