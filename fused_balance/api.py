"""The public functions: validate everything, pick a backend, run the fused passes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fused_balance import _validate as V
from fused_balance import distributed as D
from fused_balance.backends import resolve_backend
from fused_balance.distributed import DISTRIBUTED_MODES
from fused_balance.policies import check_policy_args, gram_statistics, policy_weights
from fused_balance.solvers import min_norm_weights

__all__ = ["gram", "combine", "pareto_combine", "pareto_weights", "balanced_adamw_step",
           "ParetoResult", "min_norm_weights", "policy_weights", "set_range_check", "DISTRIBUTED_MODES"]


@dataclass
class ParetoResult:
    """What one balancing pass produced. Every field is a tensor on the gradients' device, so
    reading none of them forces a host synchronisation."""

    combined: list | None   # P tensors (the ``out`` tensors when given); None from pareto_weights
    gram: torch.Tensor      # [S, K, K], fp32 (fp64 for fp64 gradients); see "Range" in pareto_combine
    weights: torch.Tensor   # [S, K]
    norms: torch.Tensor     # [S, K]
    cosines: torch.Tensor   # [S, K, K]
    found_inf: torch.Tensor  # 0-dim bool: a gradient held NaN/Inf; ``out`` was left untouched
    branch: torch.Tensor    # [S] long: BRANCH_SUM 0, BRANCH_RESCALE 1, BRANCH_CONFLICT 2 (min-norm)


# ----------------------------------------------------------------------------- Gram
def _gram_of(problem, impl, process_group=None) -> torch.Tensor:
    # Nothing to differentiate: no_grad skips the ops' autograd wrappers (same values).
    with torch.set_grad_enabled(torch.is_grad_enabled() and problem.requires_grad):
        G = impl.gram(problem.flat, problem.num_objectives, problem.segment_ids, problem.num_segments)
    if process_group is not None:  # sharded gradients: only the [S, K, K] partials travel
        G = D.all_reduce_sum(G, process_group)
    return G


def gram(grads, segments=None, *, backend: str | None = None, process_group=None) -> torch.Tensor:
    """G[s, k, l] = sum over tensors p of segment s of <grads[k][p], grads[l][p]>.

    grads: K sequences of P tensors; segments: None (one segment), "tensor" or P segment ids.
    Returns [S, K, K] in fp32 (fp64 for fp64 gradients), differentiable. With a process group the
    gradients are taken as shards and the partial Grams are summed over the ranks (one
    all-reduce of S·K·K·4 bytes, ·8 for fp64). This is the raw Gram of the backend: entries of
    gradients beyond fp32's range saturate (see pareto_weights for the range-safe pipeline).
    """
    problem = V.check_problem(grads, segments)
    D.check_group(process_group, "sharded")
    impl = resolve_backend(backend, problem.device)
    return _gram_of(problem, impl, process_group)


# ----------------------------------------------------------------------------- range rescue
# fp32 Grams square fp32 values in fp32: elements below ~1e-19 lose bits to underflow (all of
# them below ~2.6e-23: the Gram is exactly 0) and norms above ~1e19 overflow to inf, which
# would look like a NaN/Inf gradient. The rescue recomputes the Gram of the affected segments
# in float64, where every product of two fp32 values is exact and in range, and solves the
# policy there. Why float64 rather than power-of-two scaling: scaling objective k by c_k turns
# G into D G D, whose min-norm weights differ from G's, so the scaled Gram must be unscaled in a
# wider type anyway (an fp32 Gram cannot hold 1e-60 and 1e30 side by side); and it needs no
# scale bookkeeping across ranks.
_CHUNK_BYTES = 1 << 27  # float64 copies made per rescue chunk (bounded peak memory)
_RANGE_CHECK = {"enabled": True}


def set_range_check(enabled: bool) -> None:
    """Turn the range check of pareto_combine / pareto_weights on (default) or off. Off saves
    the one device-to-host read per call on a GPU; gradients must then stay within fp32's
    comfortable range (about 1e-19 .. 1e18 per element), else weights may be wrong or found_inf
    may be raised by an overflow. During CUDA graph capture the check is skipped anyway (a
    capture cannot synchronise)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _RANGE_CHECK["enabled"] = enabled


def _range_suspects(G: torch.Tensor) -> torch.Tensor:
    """[S, K] bool, from the Gram alone (a few tiny ops, no pass over the gradients): pairs
    (segment, objective) whose fp32 Gram may be wrong. Below ``low`` a product lost bits to
    underflow or the gradient is zero (told apart later); above ``high`` the policies' sums of
    Gram entries could overflow; a non-finite segment is either overflow or a real NaN/Inf.
    ``low`` = tiny·2^30 bounds the underflow error of up to 2^30 products at 2^-24 relative."""
    K = G.shape[-1]
    finfo = torch.finfo(G.dtype)
    low, high = finfo.tiny * 2.0 ** 30, finfo.max / (4.0 * K * K)
    diag = torch.diagonal(G, dim1=-2, dim2=-1)
    finite = torch.isfinite(G).flatten(1).all(-1, keepdim=True)
    return ~finite | (diag < low) | (diag > high)


def _segment_members(problem) -> list:
    members = [[] for _ in range(problem.num_segments)]
    for p, s in enumerate(problem.segment_ids):
        members[s].append(p)
    return members


def _pair_amax(problem, members, pairs, dtype) -> torch.Tensor:
    """[S, K]: max |g| over the tensors of each (segment, objective) pair listed (0 elsewhere;
    NaN reported as +inf). One _foreach_norm over just those tensors."""
    K, P, S = problem.num_objectives, problem.num_tensors, problem.num_segments
    tensors, index = [], []
    for s, k in pairs:
        for p in members[s]:
            t = problem.flat[k * P + p]
            if t.numel():
                tensors.append(t.detach())
                index.append(s * K + k)
    amax = torch.zeros(S * K, dtype=dtype, device=problem.device)
    if tensors:
        values = torch.stack(torch._foreach_norm(tensors, ord=float("inf"))).to(dtype)
        values = torch.where(torch.isnan(values), torch.full_like(values, float("inf")), values)
        amax.scatter_reduce_(0, torch.tensor(index, device=problem.device), values, "amax")
    return amax.view(S, K)


def _float64_gram(problem, impl, members, segments) -> torch.Tensor:
    """The float64 Gram of the listed segments, from float64 copies made chunk by chunk."""
    K, P = problem.num_objectives, problem.num_tensors
    local = {s: i for i, s in enumerate(segments)}
    G = torch.zeros(len(segments), K, K, dtype=torch.float64, device=problem.device)
    chunk, chunk_bytes = [], 0
    tensors = [p for s in segments for p in members[s]]
    for i, p in enumerate(tensors):
        chunk.append(p)
        chunk_bytes += 8 * K * problem.flat[p].numel()
        if chunk_bytes >= _CHUNK_BYTES or i == len(tensors) - 1:
            copies = [problem.flat[k * P + q].detach().to(torch.float64) for k in range(K) for q in chunk]
            ids = [local[problem.segment_ids[q]] for q in chunk]
            G += impl.gram(copies, K, ids, len(segments))
            chunk, chunk_bytes = [], 0
    return G


@dataclass
class _Balance:
    gram: torch.Tensor
    weights: torch.Tensor
    branch: torch.Tensor
    norms: torch.Tensor
    cosines: torch.Tensor
    found_inf: torch.Tensor


def _rescue(problem, impl, bal: _Balance, suspects, process_group, policy, options) -> _Balance:
    """Tell zero from underflowing gradients and overflow from NaN/Inf by the inf-norm of the
    suspect pairs, then redo the Gram of the segments that need it in float64. Every decision is
    taken on reduced values, so all ranks of a group agree and issue the same collectives."""
    members = _segment_members(problem)
    amax = _pair_amax(problem, members, suspects.nonzero().tolist(), bal.gram.dtype)
    if process_group is not None:
        D.all_reduce_max_(amax, process_group)
    amax = amax.cpu()
    if not torch.isfinite(amax).all():  # a gradient really holds NaN/Inf: nothing will be written
        return bal
    rescued = (suspects & (amax > 0)).any(-1).nonzero().flatten().tolist()
    if not rescued:  # only exact zeros: the fp32 Gram was right
        return bal
    G64 = _float64_gram(problem, impl, members, rescued)
    if process_group is not None:
        G64 = D.all_reduce_sum(G64, process_group)
    w64, b64 = policy_weights(G64, policy, **options)
    n64, c64 = gram_statistics(G64)
    big = torch.finfo(bal.weights.dtype).max  # weights beyond fp32 (norm ratios > 1e38) saturate
    index = torch.tensor(rescued, device=problem.device)

    def splice(base, part):
        out = base.detach().clone()
        out[index] = part.to(base.dtype)
        return out

    return _Balance(splice(bal.gram, G64), splice(bal.weights, w64.clamp(-big, big)),
                    splice(bal.branch, b64), splice(bal.norms, n64), splice(bal.cosines, c64),
                    torch.zeros((), dtype=torch.bool, device=problem.device))


def _balance(problem, impl, policy, options, process_group, distributed) -> _Balance:
    """Gram -> weights, range-checked; collectives per ``distributed`` (see pareto_combine).
    ``options``: the policy's keyword arguments (tau, rescale, magnitude)."""
    if process_group is not None and distributed == "data":
        D.average_gradients_(problem.flat, process_group)
        process_group = None  # identical gradients everywhere from here on
    G = _gram_of(problem, impl, process_group)
    weights, branch = policy_weights(G, policy, **options)
    norms, cosines = gram_statistics(G)
    bal = _Balance(G, weights, branch, norms, cosines, ~torch.isfinite(G).all())
    if G.dtype == torch.float64 or not _RANGE_CHECK["enabled"]:  # fp64: nothing wider to use
        return bal
    if G.is_cuda and torch.cuda.is_current_stream_capturing():
        return bal
    # Read after the policy work is queued, so on a GPU this one small copy waits for the Gram
    # and policy kernels but nothing else stalls behind it.
    suspects = _range_suspects(G).cpu()
    if not bool(suspects.any()):
        return bal
    with torch.no_grad():
        return _rescue(problem, impl, bal, suspects, process_group, policy, options)


# ----------------------------------------------------------------------------- combine
def combine(grads, weights, segments=None, *, out=None, backend: str | None = None):
    """d[p] = sum_k weights[seg(p), k] * grads[k][p]; new tensors, or written into ``out``
    (which must not share memory with a gradient or with each other)."""
    problem = V.check_problem(grads, segments)
    w = V.check_weights(weights, problem)
    outs = None if out is None else _checked_out(out, problem)
    impl = resolve_backend(backend, problem.device)
    if outs is None:
        return impl.combine(problem.flat, problem.num_objectives, w, problem.segment_ids)
    with torch.no_grad():
        impl.combine_into(problem.flat, problem.num_objectives, w, problem.segment_ids, outs, None)
    return outs


def _checked_out(out, problem) -> list:
    return V.check_written([("out", out)], problem)[0]


def pareto_weights(grads, segments=None, *, policy="mgda", tau: float = 5.0,
                   rescale: str | float | None = None, magnitude=None, backend: str | None = None,
                   process_group=None, distributed: str = "data") -> ParetoResult:
    """The first half of pareto_combine: Gram -> range check -> weights, statistics and
    found_inf, without the combination (``combined`` is None). Use it in place of
    ``gram`` + ``policy_weights`` when the weights feed a fused step (balanced_adamw_step):
    it keeps the range rescue and the NaN/Inf semantics of pareto_combine."""
    problem = V.check_problem(grads, segments)
    options = dict(tau=tau, rescale=check_policy_args(policy, tau, rescale, magnitude), magnitude=magnitude)
    D.check_group(process_group, distributed)
    impl = resolve_backend(backend, problem.device)
    bal = _balance(problem, impl, policy, options, process_group, distributed)
    return ParetoResult(None, bal.gram, bal.weights, bal.norms, bal.cosines, bal.found_inf, bal.branch)


def pareto_combine(grads, segments=None, *, policy="mgda", tau: float = 5.0,
                   rescale: str | float | None = None, magnitude=None, out=None, backend: str | None = None,
                   process_group=None, distributed: str = "data") -> ParetoResult:
    """Gram -> weights (``policy``: a registered name, "sum", "mgda", "pareto_lora", "mmpareto", or
    a callable (G, active) -> (weights, branch); ``tau``, ``rescale``, ``magnitude``: its options,
    see policy_weights) -> combine.

    With ``out`` the combination is written there, unless a gradient is non-finite
    (``found_inf``), in which case ``out`` is left untouched (decided on the device).

    Distributed, with ``process_group`` (every rank must call with the same segments, policy
    and mode; all ranks get the same weights):

    - ``distributed="data"``: each rank holds whole gradients of its own batch. They are
      averaged over the ranks first, IN PLACE, with one all-reduce of K·N·esize bytes (straight
      on the buffer when the K·P gradients tile one contiguous buffer such as a GradBank's,
      otherwise through one flattened bucket), then balanced identically everywhere.
    - ``distributed="sharded"``: each rank holds a shard of every objective's gradient (FSDP:
      the DTensors' ``to_local()``; shards may be empty). Only the S·K·K Gram partials are
      all-reduced (S·K·K·4 bytes; ·8 for fp64); each rank combines its own shards.

    Range: fp32/bf16 gradients from ~1e-38 to ~1e38 give correct weights, norms and cosines.
    When the Gram shows a possibly underflowed (tiny or zero) or overflowed diagonal, the
    suspect pairs' max |g| tells zeros and NaN/Inf apart from range trouble and the affected
    segments' Gram is recomputed in float64 (the rescue; rare). ``found_inf`` is true only for
    a real NaN/Inf in a gradient. ``gram`` is still reported in fp32, so its entries saturate
    where the true value is beyond fp32 (use ``found_inf``, not ``isfinite(gram)``); weights that
    exceed fp32 (rescale factors for norm ratios beyond ~1e38) saturate at its largest value.
    Cost of the check: a few ops on the [S, K, K] Gram and one read of an [S, K] mask, free on
    a CPU and one small device-to-host copy (a synchronisation) per call on a GPU, taken after
    the policy kernels are queued (``set_range_check(False)`` removes it; skipped under CUDA
    graph capture). Only when it fires: an inf-norm pass over the suspect (segment, objective)
    gradients and a second small read (an all-zero objective, e.g. a batch without images,
    costs just that), and for real range trouble a float64 Gram of the affected segments.
    """
    problem = V.check_problem(grads, segments)
    options = dict(tau=tau, rescale=check_policy_args(policy, tau, rescale, magnitude), magnitude=magnitude)
    D.check_group(process_group, distributed)
    outs = None if out is None else _checked_out(out, problem)
    impl = resolve_backend(backend, problem.device)
    bal = _balance(problem, impl, policy, options, process_group, distributed)
    w = bal.weights.to(problem.accumulate_dtype)
    if outs is None:
        combined = impl.combine(problem.flat, problem.num_objectives, w, problem.segment_ids)
    else:
        with torch.no_grad():
            impl.combine_into(problem.flat, problem.num_objectives, w, problem.segment_ids, outs,
                              bal.found_inf.reshape(1))
        combined = outs
    return ParetoResult(combined, bal.gram, bal.weights, bal.norms, bal.cosines, bal.found_inf,
                        bal.branch)


# ----------------------------------------------------------------------------- fused AdamW
def balanced_adamw_step(grads, weights, segments, params, exp_avgs, exp_avg_sqs, *, lrs,
                        weight_decays=0.0, beta1: float = 0.9, beta2: float = 0.999,
                        eps: float = 1e-8, step: int, skip: torch.Tensor | None = None,
                        backend: str | None = None) -> None:
    """One AdamW step (torch.optim.AdamW's update) of every params[p] on the combined gradient
    d_p = sum_k weights[seg(p), k] grads[k][p], fused: d is never materialised. exp_avgs and
    exp_avg_sqs are updated in place; ``step`` counts from 1 (bias correction); ``skip`` (a
    one-element bool tensor on the gradients' device) leaves everything untouched when True,
    decided on the device. lrs / weight_decays: one float for all tensors or one per tensor.
    Every argument is checked before the first write; params, exp_avgs and exp_avg_sqs must not
    share memory with each other or with a gradient."""
    problem = V.check_problem(grads, segments)
    w = V.check_weights(weights, problem)
    P = problem.num_tensors
    params, exp_avgs, exp_avg_sqs = V.check_written(
        [("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)], problem)
    lrs = V.per_tensor_floats(lrs, P, "lrs")
    weight_decays = V.per_tensor_floats(weight_decays, P, "weight_decays")
    beta1 = V.check_real(beta1, "beta1", low=0.0, high=1.0, high_open=True)
    beta2 = V.check_real(beta2, "beta2", low=0.0, high=1.0, high_open=True)
    eps = V.check_real(eps, "eps", low=0.0, low_open=True)
    step = V.check_step(step)
    skip = V.check_skip(skip, problem.device)
    impl = resolve_backend(backend, problem.device)
    with torch.no_grad():
        impl.balanced_adamw_(problem.flat, problem.num_objectives, w, problem.segment_ids, params,
                             exp_avgs, exp_avg_sqs, lrs, weight_decays, beta1, beta2, eps, step, skip)
