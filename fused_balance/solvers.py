"""Min-norm (MGDA) weights from a batch of Gram matrices, on the Gram's device, sync-free.

The min-norm point of the convex hull of g_1..g_K is d = sum_k w_k g_k with
w = argmin_{w in simplex} w^T G w. It depends on G alone, so this works on [S, K, K] tensors of
a few hundred bytes while the O(N) work stays in the fused kernels.
"""
from __future__ import annotations

import torch

from fused_balance._validate import check_active, check_gram

__all__ = ["min_norm_weights", "project_to_simplex"]


def project_to_simplex(v: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean projection of each row of ``v`` [..., K] onto the probability simplex; with a
    bool mask ``active`` the projection is onto the face spanned by the active coordinates
    (inactive ones get exactly 0). Rows with no active coordinate come back all zero."""
    if active is not None:
        v = torch.where(active, v, torch.full_like(v, -1e30))
    u, _ = torch.sort(v, dim=-1, descending=True)
    css = torch.cumsum(u, dim=-1) - 1.0
    idx = torch.arange(1, v.shape[-1] + 1, device=v.device, dtype=v.dtype)
    rho = ((u - css / idx) > 0).sum(dim=-1, keepdim=True).clamp(min=1)
    theta = css.gather(-1, rho - 1) / rho.to(v.dtype)
    w = (v - theta).clamp(min=0)
    if active is not None:
        w = torch.where(active, w, torch.zeros_like(w))
    return w


def _two_objectives(G: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
    g11, g22, g12 = G[:, 0, 0], G[:, 1, 1], G[:, 0, 1]
    # w = (to_first, to_second) / denom with to_first = G22 - G12, to_second = G11 - G12 and
    # denom = their sum = |g1 - g2|^2. Each weight and each vertex test uses its own numerator,
    # never 1 - gamma: when the norms differ by 1e5 or more, gamma lies within an ulp of 1 and
    # 1 - gamma would round to 0, dropping a small weight whose product with the long gradient
    # still matters.
    to_first, to_second = g22 - g12, g11 - g12
    denom = to_first + to_second
    scale = (g11 + g22).clamp(min=torch.finfo(G.dtype).tiny)
    degenerate = denom <= 1e-12 * scale  # g1 == g2 (or both zero): every point is min-norm
    safe = torch.where(degenerate, torch.ones_like(denom), denom)
    zero, one, half = torch.zeros_like(denom), torch.ones_like(denom), torch.full_like(denom, 0.5)
    first = torch.where(to_second <= 0, one, torch.where(to_first <= 0, zero, to_first / safe))
    second = torch.where(to_second <= 0, zero, torch.where(to_first <= 0, one, to_second / safe))
    w = torch.stack([torch.where(degenerate, half, first.clamp(0.0, 1.0)),
                     torch.where(degenerate, half, second.clamp(0.0, 1.0))], dim=-1)
    if active is not None:
        only_first = active[:, 0] & ~active[:, 1]
        only_second = active[:, 1] & ~active[:, 0]
        w = torch.where(only_first[:, None], w.new_tensor([1.0, 0.0]), w)
        w = torch.where(only_second[:, None], w.new_tensor([0.0, 1.0]), w)
    return w


def _batched_solve(A: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Solve A x = b for a batch of tiny systems [..., n, n] by Gauss-Jordan elimination with
    partial pivoting, n steps of whole-batch tensor ops: far faster than one LAPACK call per
    system for thousands of 3x3..9x9 systems, and free of host synchronisation on a GPU."""
    n = A.shape[-1]
    batch = A.shape[:-2]
    Ab = torch.cat([A, b[..., None]], -1).reshape(-1, n, n + 1)
    rows = torch.arange(n, device=A.device)
    for i in range(n):
        pivot_row = Ab[:, i:, i].abs().argmax(-1) + i
        order = rows.expand(Ab.shape[0], n).clone()
        order[:, i] = pivot_row
        order.scatter_(1, pivot_row[:, None], i)
        Ab = Ab.gather(1, order[:, :, None].expand(-1, -1, n + 1))
        pivot = Ab[:, i, i]
        pivot = torch.where(pivot.abs() > torch.finfo(A.dtype).tiny, pivot, torch.ones_like(pivot))
        Ab_i = Ab[:, i] / pivot[:, None]
        Ab = Ab - Ab[:, :, i:i + 1] * Ab_i[:, None, :]
        Ab[:, i] = Ab_i
    return Ab[:, :, n].reshape(*batch, n)


def _kkt_solutions(G: torch.Tensor, sup: torch.Tensor, ridge: float = 1e-10) -> torch.Tensor:
    """For each segment and each candidate support sup [S, M, K]: the solution of the KKT system
    G_s w = lambda 1, sum w = 1, w = 0 off the support. A tiny ridge (G is trace-normalised)
    makes rank-deficient Grams solvable and picks the least-norm weights among equal optima."""
    S, M, K = sup.shape
    eye = torch.eye(K, dtype=G.dtype, device=G.device)
    A = torch.zeros(S, M, K + 1, K + 1, dtype=G.dtype, device=G.device)
    both = sup[..., :, None] & sup[..., None, :]
    A[..., :K, :K] = torch.where(both, G[:, None] + ridge * eye, torch.where(sup[..., :, None] | sup[..., None, :], 0.0, eye))
    border = sup.to(G.dtype)  # symmetric bordering with multiplier -lambda
    A[..., :K, K] = border
    A[..., K, :K] = border
    b = torch.zeros(S, M, K + 1, dtype=G.dtype, device=G.device)
    b[..., K] = 1.0
    x = _batched_solve(A, b)[..., :K]
    return torch.where(sup, x, torch.zeros_like(x))


def _best_feasible(G: torch.Tensor, candidates: torch.Tensor, tol: float) -> torch.Tensor:
    """Among candidate weights [S, M, K], the feasible (simplex) one of least w^T G w."""
    feasible = (candidates >= -tol).all(-1) & ((candidates.sum(-1) - 1).abs() <= 1e3 * tol)
    feasible &= torch.isfinite(candidates).all(-1)
    w = candidates.clamp(min=0)
    w = w / w.sum(-1, keepdim=True).clamp(min=torch.finfo(G.dtype).tiny)
    objective = torch.einsum("smk,skl,sml->sm", w, G, w)
    objective = torch.where(feasible, objective, torch.full_like(objective, float("inf")))
    best = objective.argmin(-1)
    return w.gather(1, best[:, None, None].expand(-1, 1, w.shape[-1]))[:, 0]


def _support_enumeration(G: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Exact min-norm weights for small K: solve the KKT system on every support (2^K - 1 tiny
    systems, batched) and keep the feasible solution of least norm. Singletons are always
    feasible, and the optimum's support is among the candidates, so this is the global minimum."""
    S, K, _ = G.shape
    codes = torch.arange(1, 2 ** K, device=G.device)
    supports = ((codes[:, None] >> torch.arange(K, device=G.device)) & 1).bool()  # [M, K]
    G64 = G.to(torch.float64)
    candidates = _kkt_solutions(G64, supports[None].expand(S, -1, -1))
    allowed = ~(supports[None] & ~active[:, None]).any(-1)  # supports inside the active face
    candidates = torch.where(allowed[..., None], candidates, torch.full_like(candidates, -1.0))
    w = _best_feasible(G64, candidates, tol=1e-10)
    none_active = ~active.any(-1, keepdim=True)
    return torch.where(none_active, torch.full_like(w, 1.0 / K), w).to(G.dtype)


def _projected_gradient(G: torch.Tensor, active: torch.Tensor, max_iter: int) -> torch.Tensor:
    """Accelerated projected gradient (FISTA) for larger K, then an exact solve on its support."""
    S, K, _ = G.shape
    count = active.sum(-1, keepdim=True).clamp(min=1).to(G.dtype)
    w = torch.where(active, 1.0 / count, torch.zeros_like(count))
    lipschitz = torch.linalg.eigvalsh(G)[:, -1].clamp(min=1e-12)[:, None]  # of the gradient G w
    y, t = w, 1.0
    for _ in range(max_iter):
        w_next = project_to_simplex(y - torch.bmm(G, y[:, :, None])[:, :, 0] / lipschitz, active)
        t_next = 0.5 * (1.0 + (1.0 + 4.0 * t * t) ** 0.5)
        y = w_next + ((t - 1.0) / t_next) * (w_next - w)
        w, t = w_next, t_next
    w64, G64 = w.to(torch.float64), G.to(torch.float64)
    polished = _kkt_solutions(G64, (w > 1e-7)[:, None, :])
    return _best_feasible(G64, torch.cat([w64[:, None], polished], 1), tol=1e-10).to(G.dtype)


def min_norm_weights(G: torch.Tensor, *, active: torch.Tensor | None = None, max_iter: int = 500,
                     max_enumeration_k: int = 8) -> torch.Tensor:
    """Weights [S, K] on the simplex minimising w^T G[s] w for each segment s.

    K=1: 1. K=2: the closed form gamma = clamp((G22-G12)/(G11+G22-2 G12), 0, 1), gamma=1/2 when
    g1 == g2. 2 < K <= max_enumeration_k: exact, by solving the KKT system on every support in
    one batched call. Larger K: accelerated projected gradient with a fixed iteration budget,
    then an exact solve on the support found. No host synchronisation either way. ``active`` [S, K] (bool) restricts
    each segment to a face of the simplex (the policies leave out zero gradients that way).
    Degenerate Grams (zero, identical, opposite gradients) give finite simplex weights.
    """
    G = check_gram(G)
    active = check_active(active, G)
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if isinstance(max_enumeration_k, bool) or not isinstance(max_enumeration_k, int):
        raise TypeError(f"max_enumeration_k must be an int, got {max_enumeration_k!r}")
    work_dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    G = G.to(work_dtype)
    S, K, _ = G.shape
    G = 0.5 * (G + G.transpose(1, 2))
    # Scale invariance: the minimiser of w^T (cG) w is that of w^T G w; normalise for conditioning.
    trace = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1)
    G = G / torch.where(trace > 0, trace, torch.ones_like(trace))[:, None, None]
    G = torch.nan_to_num(G, nan=0.0, posinf=0.0, neginf=0.0)  # found_inf is reported elsewhere
    if K == 1:
        return torch.ones(S, 1, dtype=work_dtype, device=G.device)
    if K == 2:
        return _two_objectives(G, active)
    if active is None:
        active = torch.ones(S, K, dtype=torch.bool, device=G.device)
    if K <= max_enumeration_k:
        return _support_enumeration(G, active)
    return _projected_gradient(G, active, max_iter)
