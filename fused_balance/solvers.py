"""Min-norm (MGDA) weights from a batch of Gram matrices, on the Gram's device, sync-free.

The min-norm point of the convex hull of g_1..g_K is d = sum_k w_k g_k with
w = argmin_{w in simplex} w^T G w. It depends on G alone, so this works on [S, K, K] tensors of
a few hundred bytes while the O(N) work stays in the fused kernels.
"""
from __future__ import annotations

import torch

from fused_balance._validate import check_active, check_gram

__all__ = ["min_norm_weights", "min_norm_float64", "clean_gram", "rounding_of", "active_set_min_norm",
           "active_set_budget", "add_tolerance"]


def _two_objectives(G: torch.Tensor, active: torch.Tensor | None, rounding: float) -> torch.Tensor:
    """Closed form for K=2 (G float64, trace-normalised): w = (G22 - G12, G11 - G12) / |g1 - g2|^2,
    clamped to the simplex. Each weight and each vertex test uses its own numerator, never
    1 - gamma: when the norms differ by 1e5 or more, gamma lies within an ulp of 1 and 1 - gamma
    would round to 0, dropping a small weight whose product with the long gradient still matters.
    The gradients count as identical (every point is min-norm: (1/2, 1/2)) only when both
    numerators are at the Gram's rounding level; otherwise a non-positive numerator picks a vertex,
    so parallel gradients of different lengths get the shorter one however close the lengths."""
    g11, g22, g12 = G[:, 0, 0], G[:, 1, 1], G[:, 0, 1]
    to_first, to_second = g22 - g12, g11 - g12
    tol = rounding * (g11 + g22)
    identical = (to_first <= tol) & (to_second <= tol)
    safe = torch.where(identical, torch.ones_like(to_first), to_first + to_second)
    zero, one, half = torch.zeros_like(g11), torch.ones_like(g11), torch.full_like(g11, 0.5)
    first = torch.where(to_second <= 0, one, torch.where(to_first <= 0, zero, to_first / safe))
    second = torch.where(to_second <= 0, zero, torch.where(to_first <= 0, one, to_second / safe))
    first = torch.where(identical, half, first.clamp(0.0, 1.0))
    second = torch.where(identical, half, second.clamp(0.0, 1.0))
    if active is not None:  # scalars in torch.where, not new tensors: no host-to-device copies
        only_first = active[:, 0] & ~active[:, 1]
        only_second = active[:, 1] & ~active[:, 0]
        first = torch.where(only_first, 1.0, torch.where(only_second, 0.0, first))
        second = torch.where(only_first, 0.0, torch.where(only_second, 1.0, second))
    return torch.stack([first, second], dim=-1)


def active_set_budget(K: int) -> int:
    """Iterations of the masked active-set loop. Each iteration adds or drops one objective (a
    drop undoes an add), so a support of m objectives reached without drops takes m + 1.
    Finite termination is Wolfe's theorem, but no polynomial bound is known; measured on random
    and adversarial Grams up to K=32 the loop needs at most ~2K, so 4K + 4 leaves a 2x margin,
    and the tests check convergence (the KKT certificate) on every Gram they try. A segment that
    ran out of iterations still holds a point of the simplex with a lower objective than it began."""
    return 4 * K + 4


def add_tolerance(K: int) -> float:
    """How much an objective must lower the trace-normalised objective to enter the corral: the
    rounding level of (G w)_j in float64, so only rounding noise is ignored."""
    return 4.0 * K * torch.finfo(torch.float64).eps


def _affine_min_norm(G: torch.Tensor, corral: torch.Tensor) -> torch.Tensor:
    """v minimising v^T G v subject to sum(v) = 1 and v = 0 off the corral (v may be negative):
    the bordered KKT system [[G_CC, 1], [1^T, 0]] [v; mu] = [0; 1], with identity rows off the
    corral. The corral's points stay affinely independent (Wolfe), so the system is regular."""
    S, K, _ = G.shape
    eye = torch.eye(K, dtype=torch.bool, device=G.device)
    both = corral[:, :, None] & corral[:, None, :]
    A = G.new_zeros(S, K + 1, K + 1)
    A[:, :K, :K] = torch.where(both, G, eye.to(G.dtype).expand(S, K, K))
    border = corral.to(G.dtype)
    A[:, :K, K] = border
    A[:, K, :K] = border
    b = G.new_zeros(S, K + 1, 1)
    b[:, K] = 1.0
    v = torch.linalg.solve_ex(A, b)[0][:, :K, 0]  # solve_ex: no error check, so no sync
    return torch.where(corral, v, torch.zeros_like(v))


def active_set_min_norm(G: torch.Tensor, active: torch.Tensor,
                        max_iter: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Wolfe's minimum-norm-point method on a batch of float64 Grams [S, K, K] (trace-normalised),
    restricted to the ``active`` objectives; returns (weights [S, K], converged [S] bool).

    The corral C starts at the shortest active gradient. One iteration solves the affine min-norm
    problem on C (v): if v > 0 on C the point moves there and the objective j of least (G v)_j
    joins C when (G v)_j < v^T G v (it would shorten the point; otherwise the KKT conditions hold
    and the segment is done); else the point moves toward v until a weight reaches 0 and that
    objective leaves C. The norm decreases strictly from one corral to the next, so no corral
    repeats and the method terminates. Every segment runs the same fixed number of masked
    iterations (no data-dependent control flow, no host synchronisation); a finished segment
    stays put. The weights are always a point of the simplex, also when not converged.
    """
    S, K, _ = G.shape
    max_iter = active_set_budget(K) if max_iter is None else max_iter
    tol = add_tolerance(K)
    index = torch.arange(K, device=G.device)
    inf = torch.full((S, K), float("inf"), dtype=G.dtype, device=G.device)
    diag = torch.diagonal(G, dim1=-2, dim2=-1)
    start = torch.where(active, diag, inf).argmin(-1, keepdim=True)
    corral = (index[None] == start) & active.any(-1, keepdim=True)
    w = corral.to(G.dtype)
    done = ~active.any(-1)
    converged = done.clone()
    for _ in range(max_iter):
        v = _affine_min_norm(G, corral)
        solved = torch.isfinite(v).all(-1)
        inside = ((v > 0) | ~corral).all(-1) & solved
        # Inside: move to v and let the most descending objective in.
        Gv = torch.bmm(G, v[:, :, None])[:, :, 0]
        level = (v * Gv).sum(-1)
        entering, j = torch.where(active & ~corral, Gv, inf).min(-1)
        add = inside & (entering < level - tol)
        # Outside: move toward v until the first weight reaches 0; that objective leaves.
        shrinking = corral & (v <= 0)
        gap = w - v  # > 0 except for an objective that joined at weight 0 and got v = 0
        ratio = torch.where(shrinking, w / torch.where(shrinking & (gap > 0), gap, torch.ones_like(w)), inf)
        theta, leaving = ratio.min(-1)
        theta = torch.where(torch.isfinite(theta), theta, torch.zeros_like(theta)).clamp(0.0, 1.0)
        w_out = (w + theta[:, None] * (v - w)).clamp(min=0.0)
        keep = corral & (index[None] != leaving[:, None]) & (w_out > 0)
        w_out = torch.where(keep, w_out, torch.zeros_like(w_out))
        w_out = w_out / w_out.sum(-1, keepdim=True).clamp(min=torch.finfo(G.dtype).tiny)
        w_next = torch.where(inside[:, None], v, w_out)
        corral_next = torch.where(inside[:, None], corral | ((index[None] == j[:, None]) & add[:, None]), keep)
        frozen = (done | ~solved)[:, None]  # a failed solve (never seen) keeps the last point
        w = torch.where(frozen, w, w_next)
        corral = torch.where(frozen, corral, corral_next)
        converged = converged | (~done & inside & ~add)
        done = done | (inside & ~add) | ~solved
    return w, converged


def min_norm_weights(G: torch.Tensor, *, active: torch.Tensor | None = None,
                     max_iter: int | None = None) -> torch.Tensor:
    """Weights [S, K] on the simplex minimising w^T G[s] w for each segment s, exact for any K.

    K=1: 1. K=2: the closed form gamma = clamp((G22-G12)/(G11+G22-2 G12), 0, 1); (1/2, 1/2)
    only when g1 == g2 to rounding level. K > 2: Wolfe's active-set method
    (active_set_min_norm; ``max_iter`` overrides its iteration budget, 4K + 4). Computed in
    float64, returned in G's working dtype (fp32, or fp64 for fp64 G). No host synchronisation.
    ``active`` [S, K] (bool) restricts each segment to a face of the simplex (the policies leave
    out zero gradients that way); a segment with no active objective gets 1/K each. Degenerate
    Grams (zero, identical, opposite gradients) give finite simplex weights.
    """
    G = check_gram(G)
    active = check_active(active, G)
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"max_iter must be None or an int >= 1, got {max_iter!r}")
    out_dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    return min_norm_float64(clean_gram(G), active, rounding_of(G.dtype), max_iter).to(out_dtype)


def rounding_of(dtype: torch.dtype) -> float:
    """The relative rounding level of a Gram computed in ``dtype`` (at most fp32's: Grams of
    low-precision gradients are accumulated in fp32)."""
    return 4.0 * torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps


def clean_gram(G: torch.Tensor) -> torch.Tensor:
    """float64, non-finite entries zeroed (found_inf is reported elsewhere), symmetrised (halves
    first, so huge entries cannot overflow)."""
    G = torch.nan_to_num(G.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return 0.5 * G + 0.5 * G.transpose(1, 2)


def min_norm_float64(G: torch.Tensor, active: torch.Tensor | None, rounding: float,
                     max_iter: int | None = None) -> torch.Tensor:
    """min_norm_weights on a clean float64 Gram (see clean_gram), in float64."""
    S, K, _ = G.shape
    if K == 1:
        return torch.ones(S, 1, dtype=G.dtype, device=G.device)
    # The minimiser of w^T (cG) w is that of w^T G w; a trace of 1 puts every tolerance on one scale.
    trace = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1)
    G = G / torch.where(trace > 0, trace, torch.ones_like(trace))[:, None, None]
    if K == 2:
        return _two_objectives(G, active, rounding)
    if active is None:
        active = torch.ones(S, K, dtype=torch.bool, device=G.device)
    w, _ = active_set_min_norm(G, active, max_iter)
    none_active = ~active.any(-1, keepdim=True)
    return torch.where(none_active, torch.full_like(w, 1.0 / K), w)
