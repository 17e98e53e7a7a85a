"""Balancing policies: functions of the Gram alone, so they cost nothing next to the O(N) passes.

A policy is a callable ``(G, active) -> (weights, branch)``: G [S, K, K] (float64, finite,
symmetric), active [S, K] bool (the objectives whose gradient is non-zero in the segment),
weights [S, K] and a branch code per segment [S] (long; BRANCH_* below). It runs as torch ops on
G's device (torch.where everywhere: no host synchronisation). An objective whose gradient is zero
in a segment is left out there and the others are balanced, so a batch without image tokens never
produces NaN.

``policy=`` in policy_weights, pareto_combine, pareto_weights and ParetoLoRA takes a registered
name (POLICIES, or one added with register_policy) or such a callable. The built-in policies also
have a native solve (torch.ops.fused_balance.policy_weights: one C++ / CUDA op for the whole
batch), used whenever the extension is built; the torch code here is its reference and fallback.
"""
from __future__ import annotations

from typing import Callable

import torch

from fused_balance._validate import check_gram, check_real
from fused_balance.solvers import clean_gram, min_norm_float64, rounding_of

__all__ = ["POLICIES", "BRANCH_SUM", "BRANCH_RESCALE", "BRANCH_CONFLICT", "BRANCH_NAMES",
           "BuiltinPolicy", "SumPolicy", "MGDAPolicy", "ParetoLoRAPolicy", "MMParetoPolicy",
           "register_policy", "registered_policies", "resolve_policy", "gram_statistics",
           "policy_weights", "solve", "check_policy_args", "restore_sum_magnitude", "any_active_pair",
           "MAGNITUDE_RULES", "magnitude_code", "rescale_factor"]

BRANCH_SUM, BRANCH_RESCALE, BRANCH_CONFLICT = 0, 1, 2
BRANCH_NAMES = {BRANCH_SUM: "sum", BRANCH_RESCALE: "rescale", BRANCH_CONFLICT: "conflict"}

PolicyFn = Callable[[torch.Tensor, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]

# Pareto-LoRA's magnitude rule (its rescale branch, see ParetoLoRAPolicy), or an objective's index
MAGNITUDE_RULES = ("mean", "weaker")
_MAGNITUDE_CODES = {"mean": -1, "weaker": -2}  # csrc/policy.h MagnitudeRule


def rescale_factor(rescale) -> float:
    """The conflict branch's strength as a factor of the plain sum's norm: "none" 0 (the
    combination as the solve gives it), "sum" 1, a real γ > 0 itself (e.g. MMPareto's γ)."""
    if isinstance(rescale, str):
        if rescale not in ("none", "sum"):
            raise ValueError(f"rescale must be 'none', 'sum' or a factor γ > 0 of the plain sum's norm, "
                             f"got {rescale!r}")
        return 0.0 if rescale == "none" else 1.0
    return check_real(rescale, "rescale (a factor γ of the plain sum's norm)", low=0.0, low_open=True)


def magnitude_code(magnitude) -> int:
    """The native op's code of a magnitude rule: "mean" (or None) -1, "weaker" -2, a protected
    objective's index k >= 0 itself."""
    if magnitude is None:
        return _MAGNITUDE_CODES["mean"]
    if isinstance(magnitude, str) and magnitude in _MAGNITUDE_CODES:
        return _MAGNITUDE_CODES[magnitude]
    if isinstance(magnitude, int) and not isinstance(magnitude, bool) and magnitude >= 0:
        return magnitude
    raise ValueError(f"magnitude must be one of {MAGNITUDE_RULES} or the index (an int >= 0) of the objective "
                     f"to protect, got {magnitude!r}")


# ----------------------------------------------------------------------------- shared pieces
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


def restore_sum_magnitude(w: torch.Tensor, G: torch.Tensor, active: torch.Tensor, rounding: float,
                          only_up: bool = False, gamma: float = 1.0) -> torch.Tensor:
    """Scale w so that |sum_k w_k g_k| equals gamma |sum_k g_k| over the active objectives (the
    plain update's magnitude times gamma); ``only_up``: only when the combination is shorter. A combination that
    is zero to the Gram's rounding level (``rounding``, relative to (sum_k |w_k| |g_k|)^2: the
    gradients are Pareto-stationary) stays as it is: scaling it up would turn rounding noise
    into an update of full size."""
    target, current = _quadratic(active.to(G.dtype), G).clamp(min=0), _quadratic(w, G).clamp(min=0)
    reach = (w.abs() * torch.diagonal(G, dim1=-2, dim2=-1).clamp(min=0).sqrt()).sum(-1)
    ok = current > rounding * reach * reach
    # sqrt / sqrt, not sqrt of the ratio: the min-norm point can be ~1e30 times shorter than the
    # sum, and the ratio of the squares could leave the range where the factor itself does not.
    factor = torch.where(ok, gamma * target.sqrt() / torch.where(ok, current, torch.ones_like(current)).sqrt(),
                         torch.ones_like(current))
    if only_up:
        factor = factor.clamp(min=1.0)
    return w * factor[:, None]


def _branch(S: int, code: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((S,), code, dtype=torch.long, device=like.device)


def any_active_pair(pair_mask: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """[S] bool: pair_mask [S, K, K] holds for two distinct active objectives."""
    pair = active[:, :, None] & active[:, None, :]
    off_diagonal = ~torch.eye(active.shape[1], dtype=torch.bool, device=active.device)
    return (pair_mask & pair & off_diagonal).flatten(1).any(-1)


# ----------------------------------------------------------------------------- built-in policies
class BuiltinPolicy:
    """A policy with a native solve (``code`` selects it in the C++/CUDA op). ``reference`` is
    the torch implementation; calling the object uses the native op when it is loaded for G's
    device and nothing needs a gradient through the weights, else the reference."""

    name = ""
    code = -1
    non_conflicting = False  # g_k . d >= 0 for every active k, promised
    uses = ()                # which of the options (tau, rescale, magnitude) it reads
    default_rescale = "none"

    def __init__(self, *, tau: float = 5.0, rescale: str | float | None = None, rounding: float | None = None,
                 magnitude=None):
        self.tau = float(tau)
        self.rescale = self.default_rescale if rescale is None else rescale
        self.rescale_factor = rescale_factor(self.rescale)  # 0: the conflict branch is not rescaled
        self.rounding = rounding_of(torch.float32) if rounding is None else rounding
        self.magnitude = magnitude_code(magnitude)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tau={self.tau}, rescale={self.rescale!r}, magnitude={self.magnitude})"

    def __call__(self, G: torch.Tensor, active: torch.Tensor):
        if _native_available(G):
            return _native_solve(G, self, active)
        return self.reference(G, active)

    def reference(self, G: torch.Tensor, active: torch.Tensor):
        raise NotImplementedError


class SumPolicy(BuiltinPolicy):
    """Every objective weighted 1 (vanilla multi-loss training; a zero gradient adds nothing)."""

    name, code = "sum", 0

    def reference(self, G, active):
        return torch.ones_like(active, dtype=G.dtype), _branch(G.shape[0], BRANCH_SUM, G)


class MGDAPolicy(BuiltinPolicy):
    """The min-norm point of the active gradients (simplex weights; scaled to the plain sum's
    magnitude with rescale="sum", to γ times it with rescale=γ)."""

    name, code, non_conflicting, uses = "mgda", 1, True, ("rescale",)

    def reference(self, G, active):
        w = min_norm_float64(G, active, self.rounding)
        if self.rescale_factor > 0:
            w = restore_sum_magnitude(w, G, active, self.rounding, gamma=self.rescale_factor)
        return w, _branch(G.shape[0], BRANCH_CONFLICT, G)


class ParetoLoRAPolicy(BuiltinPolicy):
    """Per segment: two active gradients conflict (negative cosine) -> the min-norm combination
    (rescaled to the plain sum's magnitude by default); else the largest/smallest norm ratio
    exceeds tau -> the magnitude rule; else the plain sum. Magnitude rules (our choice, not the
    paper's, whose formula is not public): "mean" (default) brings every objective to the mean
    norm (w_k = mean / |g_k|: the stronger are scaled down); "weaker" raises only those below the
    mean to it (w_k = max(1, mean / |g_k|)); an objective's index k raises only that one (the
    protected objective, e.g. the image loss against dominating text gradients), the others keep
    weight 1, and nothing changes where k is not below the mean."""

    name, code, non_conflicting = "pareto_lora", 2, True
    uses, default_rescale = ("tau", "rescale", "magnitude"), "sum"

    def reference(self, G, active):
        norms, cosines = gram_statistics(G)
        minnorm = MGDAPolicy(rescale=self.rescale, rounding=self.rounding).reference(G, active)[0]
        conflict = any_active_pair(cosines < 0, active)
        big = torch.where(active, norms, torch.zeros_like(norms)).amax(-1)
        small = torch.where(active, norms, torch.full_like(norms, float("inf"))).amin(-1)
        imbalanced = (active.sum(-1) >= 2) & (big > self.tau * torch.where(torch.isfinite(small), small, big))
        count = active.sum(-1, keepdim=True).clamp(min=1).to(G.dtype)
        mean_norm = torch.where(active, norms, torch.zeros_like(norms)).sum(-1, keepdim=True) / count
        rescaled = torch.where(active, mean_norm / torch.where(active, norms, torch.ones_like(norms)),
                               torch.zeros_like(norms))
        if self.magnitude != _MAGNITUDE_CODES["mean"]:
            K = G.shape[-1]
            if self.magnitude >= K:
                raise ValueError(f"magnitude protects objective {self.magnitude} but there are K = {K} objectives")
            raised = rescaled.clamp(min=1.0)
            if self.magnitude >= 0:  # only the protected objective is raised
                protected = torch.arange(K, device=G.device) == self.magnitude
                raised = torch.where(protected, raised, torch.ones_like(raised))
            rescaled = torch.where(active, raised, torch.zeros_like(raised))
        branch = torch.where(conflict, BRANCH_CONFLICT, torch.where(imbalanced, BRANCH_RESCALE, BRANCH_SUM))
        weights = torch.where((branch == BRANCH_CONFLICT)[:, None], minnorm,
                              torch.where((branch == BRANCH_RESCALE)[:, None], rescaled, active.to(G.dtype)))
        return weights, branch


class MMParetoPolicy(BuiltinPolicy):
    """MMPareto (Wei & Hu, ICML 2024): per segment, every pair of active gradients agrees
    (cosine > 0) -> equal weights, else the min-norm weights; the combination is then scaled up
    to the plain sum's magnitude when it is shorter (rescale="sum", the default), to γ times it
    with rescale=γ (MMPareto's γ; our reading), or left as it is with rescale="none". A few
    lines on the shared pieces, as a user's policy would be."""

    name, code, non_conflicting = "mmpareto", 3, True
    uses, default_rescale = ("rescale",), "sum"

    def reference(self, G, active):
        _, cosines = gram_statistics(G)
        disagree = any_active_pair(cosines <= 0, active)
        equal = active.to(G.dtype) / active.sum(-1, keepdim=True).clamp(min=1)
        w = torch.where(disagree[:, None], min_norm_float64(G, active, self.rounding), equal)
        branch = torch.where(disagree, BRANCH_CONFLICT, BRANCH_SUM)
        if self.rescale_factor > 0:
            w = restore_sum_magnitude(w, G, active, self.rounding, only_up=True, gamma=self.rescale_factor)
        return w, branch


# ----------------------------------------------------------------------------- registry
_BUILTINS = {cls.name: cls for cls in (SumPolicy, MGDAPolicy, ParetoLoRAPolicy, MMParetoPolicy)}
POLICIES = tuple(_BUILTINS)
_USER: dict[str, Callable] = {}


def register_policy(name: str, fn: PolicyFn) -> None:
    """Register ``fn(G, active) -> (weights [S, K], branch [S])`` under ``name`` so that
    ``policy=name`` works everywhere (G float64 [S, K, K], active bool [S, K]; torch ops only,
    no host reads, so it runs on the Gram's device). A built-in name cannot be replaced; a user
    name can (the last registration wins)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a policy name must be a non-empty str, got {name!r}")
    if name in _BUILTINS:
        raise ValueError(f"{name!r} is a built-in policy and cannot be replaced")
    if not callable(fn):
        raise TypeError(f"a policy must be callable (G, active) -> (weights, branch), got {type(fn).__name__}")
    _USER[name] = fn


def registered_policies() -> tuple[str, ...]:
    """Every name ``policy=`` accepts: the built-ins, then the user's registrations."""
    return POLICIES + tuple(_USER)


def check_policy_args(policy, tau, rescale, magnitude=None) -> str | float | None:
    """Validate the policy arguments (before any work) and return the effective ``rescale``
    (None for a policy without that option)."""
    check_real(tau, "tau (a norm ratio threshold)", low=1.0, low_open=True, allow_inf=True)
    if rescale is not None:
        rescale_factor(rescale)
    magnitude_code(magnitude)
    if isinstance(policy, str) and policy in _BUILTINS:
        cls = _BUILTINS[policy]
        if rescale is not None and "rescale" not in cls.uses and rescale != cls.default_rescale:
            raise ValueError(f"policy {policy!r} has no rescale option (got rescale={rescale!r})")
        if magnitude not in (None, "mean") and "magnitude" not in cls.uses:
            raise ValueError(f"policy {policy!r} has no magnitude option (got magnitude={magnitude!r})")
        return (cls.default_rescale if rescale is None else rescale) if "rescale" in cls.uses else None
    if (isinstance(policy, str) and policy in _USER) or (callable(policy) and not isinstance(policy, str)):
        if rescale is not None or magnitude not in (None, "mean"):
            option = f"rescale={rescale!r}" if rescale is not None else f"magnitude={magnitude!r}"
            raise ValueError(f"{option} applies to the built-in policies only; "
                             f"policy {policy!r} chooses its own scale")
        return None
    raise ValueError(f"unknown policy {policy!r}; choose one of {registered_policies()} or pass a "
                     "callable (G, active) -> (weights, branch)")


def resolve_policy(policy, *, tau: float = 5.0, rescale: str | float | None = None,
                   rounding: float | None = None, magnitude=None) -> PolicyFn:
    """The callable for ``policy`` (a name or a callable) with its options bound."""
    rescale = check_policy_args(policy, tau, rescale, magnitude)
    if isinstance(policy, str):
        if policy in _BUILTINS:
            return _BUILTINS[policy](tau=tau, rescale=rescale, rounding=rounding, magnitude=magnitude)
        return _USER[policy]
    return policy


def _check_policy_output(out, S: int, K: int, policy, G: torch.Tensor):
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"policy {policy!r} must return (weights, branch), got {type(out).__name__}")
    weights, branch = out
    if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (S, K) or not weights.dtype.is_floating_point:
        raise ValueError(f"policy {policy!r} returned weights {getattr(weights, 'shape', weights)!r}; "
                         f"expected a floating-point tensor [S={S}, K={K}]")
    if not isinstance(branch, torch.Tensor) or tuple(branch.shape) != (S,) or branch.dtype.is_floating_point:
        raise ValueError(f"policy {policy!r} returned branch {getattr(branch, 'shape', branch)!r}; "
                         f"expected an integer tensor [S={S}]")
    if weights.device != G.device or branch.device != G.device:
        raise ValueError(f"policy {policy!r} returned tensors on another device than the Gram ({G.device})")
    return weights, branch.to(torch.long)


# ----------------------------------------------------------------------------- native solve
NATIVE_MAX_OBJECTIVES = 32  # policy::kMaxObjectives in csrc/policy.h; beyond it the reference runs
_NATIVE_READY: dict[str, bool] = {}
_LOAD_TRIED = [False]


def _native_available(G: torch.Tensor) -> bool:
    """Whether the C++ extension is loaded with a policy kernel for G's device. Never compiles:
    an extension already built for these sources is loaded on first use (once per process);
    otherwise the torch reference runs until the cpp backend builds and loads it."""
    if G.requires_grad and torch.is_grad_enabled():
        return False  # the native op has no derivative; the torch reference does
    if G.shape[-1] > NATIVE_MAX_OBJECTIVES:
        return False
    return _native_ready(G.device.type)


@torch.compiler.assume_constant_result  # torch.compile reads it once while tracing
def _native_ready(device: str) -> bool:
    if _NATIVE_READY.get(device):
        return True
    from fused_balance import _extension, ops  # late: the extension machinery is heavy to import

    if not _LOAD_TRIED[0]:
        _LOAD_TRIED[0] = True
        try:
            if _extension.is_built():
                ops._ops()
        except Exception:  # a broken cached build must not break the policies: use the reference
            pass
    ready = ops.policy_op_available(device)
    if ready:
        _NATIVE_READY[device] = True  # a loaded library stays loaded; "not yet" is asked again
    return ready


def _native_solve(G: torch.Tensor, policy: BuiltinPolicy, active: torch.Tensor | None):
    return torch.ops.fused_balance.policy_weights(
        G, policy.code, policy.tau, policy.rescale_factor, policy.rounding, active, policy.magnitude)


# ----------------------------------------------------------------------------- entry point
def policy_weights(G: torch.Tensor, policy="pareto_lora", *, tau: float = 5.0,
                   rescale: str | float | None = None, magnitude=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights [S, K] and branch [S] (BRANCH_SUM 0, BRANCH_RESCALE 1, BRANCH_CONFLICT 2) for
    ``policy``, a registered name or a callable ``(G, active) -> (weights, branch)``:

    - ``"sum"``: every objective weight 1 (vanilla multi-loss training).
    - ``"mgda"``: the min-norm point of the active objectives' gradients (weights on the simplex).
    - ``"pareto_lora"``: per segment, if two active gradients conflict (negative cosine) the
      min-norm combination; else if the largest/smallest gradient norm ratio exceeds ``tau``,
      the ``magnitude`` rule: "mean" (default) rescales each objective to the mean norm
      (w_k = mean_j |g_j| / |g_k|), "weaker" raises only those below the mean to it, an index k
      raises only objective k (protected) when it is below the mean; else the plain sum.
    - ``"mmpareto"``: per segment, all cosines > 0 -> equal weights, else min-norm; scaled up to
      the plain sum's magnitude when shorter (Wei & Hu, ICML 2024).

    ``rescale`` sets the strength of the min-norm (conflict) branch: "sum" multiplies its weights
    so the update has the plain sum's magnitude (the min-norm point is short), a real γ > 0 to γ
    times that magnitude, "none" leaves them on the simplex; default "none" for mgda, "sum" for
    pareto_lora and mmpareto (which only scales up, to at least γ times the sum's magnitude). The Gram is
    taken in float64 (non-finite entries as 0: they are flagged, not solved); weights come back
    in fp32 (fp64 for an fp64 Gram), saturated at the dtype's largest value.
    """
    G = check_gram(G)
    return solve(G, resolve_policy(policy, tau=tau, rescale=rescale, rounding=rounding_of(G.dtype),
                                   magnitude=magnitude), policy)


def solve(G: torch.Tensor, fn: PolicyFn, label=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``policy_weights`` for a checked Gram and a policy already resolved (``resolve_policy``):
    no argument is validated again, so a caller that solves every step (BalancePlan) resolves
    once. ``label`` names the policy in errors about a callable's output."""
    out_dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    if isinstance(fn, BuiltinPolicy) and _native_available(G):
        # The op cleans the Gram, decides `active` and casts the weights itself.
        return _native_solve(G if G.dtype in (torch.float32, torch.float64) else G.float(), fn, None)
    G = clean_gram(G)
    active = torch.diagonal(G, dim1=-2, dim2=-1) > 0
    S, K, _ = G.shape
    if isinstance(fn, BuiltinPolicy):
        weights, branch = fn.reference(G, active)
    else:
        weights, branch = _check_policy_output(fn(G, active), S, K, label if label is not None else fn, G)
    big = torch.finfo(out_dtype).max  # weights beyond the dtype's range saturate, never inf
    return weights.to(torch.float64).clamp(-big, big).to(out_dtype), branch
