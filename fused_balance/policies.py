"""Balancing policies: functions of the Gram alone, so they cost nothing next to the O(N) passes.

Each maps G [S, K, K] to weights [S, K] and a branch code per segment (torch.where everywhere:
no host synchronisation). An objective whose gradient is zero in a segment is left out there
(weight 0) and the others are balanced, so a batch without image tokens never produces NaN.
"""
from __future__ import annotations

import torch

from fused_balance._validate import check_gram, check_real
from fused_balance.solvers import min_norm_weights

__all__ = ["POLICIES", "BRANCH_NAMES", "gram_statistics", "policy_weights", "check_policy_args"]

POLICIES = ("sum", "mgda", "pareto_lora")
BRANCH_SUM, BRANCH_RESCALE, BRANCH_CONFLICT = 0, 1, 2
BRANCH_NAMES = {BRANCH_SUM: "sum", BRANCH_RESCALE: "rescale", BRANCH_CONFLICT: "conflict"}
_DEFAULT_RESCALE = {"sum": "none", "mgda": "none", "pareto_lora": "sum"}


def gram_statistics(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norms [S, K], cosines [S, K, K]) from a Gram; a cosine with a zero gradient is 0."""
    diag = torch.diagonal(G, dim1=-2, dim2=-1).clamp(min=0)
    norms = diag.sqrt()
    denom = norms[:, :, None] * norms[:, None, :]
    cosines = torch.where(denom > 0, G / torch.where(denom > 0, denom, torch.ones_like(denom)),
                          torch.zeros_like(G))
    return norms, cosines.clamp(-1.0, 1.0)


def _quadratic(w: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    return torch.einsum("sk,skl,sl->s", w, G, w)


def _restore_sum_magnitude(w: torch.Tensor, G: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """Scale w so that |sum_k w_k g_k| equals |sum_k g_k| (the plain update's magnitude)."""
    ones = active.to(G.dtype)
    target, current = _quadratic(ones, G).clamp(min=0), _quadratic(w, G).clamp(min=0)
    ok = current > 0
    # sqrt / sqrt, not sqrt of the ratio: the min-norm point can be ~1e30 times shorter than
    # the sum, and target / current would overflow fp32 where the factor itself does not.
    factor = torch.where(ok, target.sqrt() / torch.where(ok, current, torch.ones_like(current)).sqrt(),
                         torch.ones_like(current))
    return _saturate(w * factor[:, None])


def _saturate(w: torch.Tensor) -> torch.Tensor:
    """Weights beyond the dtype's range (norm ratios past ~1e38 in fp32) saturate, never inf."""
    big = torch.finfo(w.dtype).max
    return w.clamp(-big, big)


def check_policy_args(policy, tau, rescale) -> str:
    """Validate the policy arguments (before any work) and return the effective ``rescale``."""
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {POLICIES}")
    rescale = _DEFAULT_RESCALE[policy] if rescale is None else rescale
    if not isinstance(rescale, str) or rescale not in ("none", "sum"):
        raise ValueError(f"rescale must be 'none' or 'sum', got {rescale!r}")
    check_real(tau, "tau (a norm ratio threshold)", low=1.0, low_open=True, allow_inf=True)
    return rescale


def policy_weights(G: torch.Tensor, policy: str = "pareto_lora", *, tau: float = 5.0,
                   rescale: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [S, K] and branch [S] (0 sum, 1 rescale, 2 conflict/min-norm) for ``policy``:

    - ``"sum"``: every objective weight 1 (vanilla multi-loss training).
    - ``"mgda"``: the min-norm point of the active objectives' gradients (weights on the simplex).
    - ``"pareto_lora"``: per segment, if two active gradients conflict (negative cosine) the
      min-norm combination; else if the largest/smallest gradient norm ratio exceeds ``tau``,
      each objective rescaled to the mean norm (w_k = mean_j |g_j| / |g_k|); else the plain sum.

    ``rescale="sum"`` multiplies min-norm weights so the update has the plain sum's magnitude
    (the min-norm point is short); default "none" for mgda, "sum" for pareto_lora.
    """
    rescale = check_policy_args(policy, tau, rescale)
    G = check_gram(G)
    G = torch.nan_to_num(G.to(torch.float64 if G.dtype == torch.float64 else torch.float32),
                         nan=0.0, posinf=0.0, neginf=0.0)  # non-finite input is flagged, not solved
    S, K, _ = G.shape
    norms, cosines = gram_statistics(G)
    active = norms > 0
    ones = torch.ones(S, K, dtype=G.dtype, device=G.device)
    sum_branch = torch.full((S,), BRANCH_SUM, dtype=torch.long, device=G.device)
    if policy == "sum":
        return ones, sum_branch

    minnorm = min_norm_weights(G, active=active)
    if rescale == "sum":
        minnorm = _restore_sum_magnitude(minnorm, G, active)
    if policy == "mgda":
        return minnorm, torch.full_like(sum_branch, BRANCH_CONFLICT)

    pair_active = active[:, :, None] & active[:, None, :]
    conflict = ((cosines < 0) & pair_active).flatten(1).any(-1)
    big = torch.where(active, norms, torch.zeros_like(norms)).amax(-1)
    small = torch.where(active, norms, torch.full_like(norms, float("inf"))).amin(-1)
    imbalanced = active.sum(-1) >= 2
    imbalanced = imbalanced & (big > tau * torch.where(torch.isfinite(small), small, big))
    count = active.sum(-1, keepdim=True).clamp(min=1).to(G.dtype)
    mean_norm = torch.where(active, norms, torch.zeros_like(norms)).sum(-1, keepdim=True) / count
    safe = torch.where(active, norms, torch.ones_like(norms))
    rescaled = _saturate(torch.where(active, mean_norm / safe, torch.zeros_like(norms)))
    branch = torch.where(conflict, BRANCH_CONFLICT, torch.where(imbalanced, BRANCH_RESCALE, BRANCH_SUM))
    weights = torch.where((branch == BRANCH_CONFLICT)[:, None], minnorm,
                          torch.where((branch == BRANCH_RESCALE)[:, None], rescaled, active.to(G.dtype)))
    return weights, branch
