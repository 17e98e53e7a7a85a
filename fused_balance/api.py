"""The public functions: validate once, pick a backend, run the fused passes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fused_balance import _validate as V
from fused_balance.backends import resolve_backend
from fused_balance.policies import gram_statistics, policy_weights
from fused_balance.solvers import min_norm_weights

__all__ = ["gram", "combine", "pareto_combine", "balanced_adamw_step", "ParetoResult",
           "min_norm_weights", "policy_weights"]

DISTRIBUTED_MODES = ("data", "sharded")


@dataclass
class ParetoResult:
    """What one balancing pass produced. Every field is a tensor on the gradients' device, so
    reading none of them forces a host synchronisation."""

    combined: list          # P tensors (the ``out`` tensors when given)
    gram: torch.Tensor      # [S, K, K], fp32 (fp64 for fp64 gradients)
    weights: torch.Tensor   # [S, K]
    norms: torch.Tensor     # [S, K]
    cosines: torch.Tensor   # [S, K, K]
    found_inf: torch.Tensor  # 0-dim bool: a gradient held NaN/Inf; ``out`` was left untouched
    branch: torch.Tensor    # [S] long: 0 sum, 1 rescale, 2 conflict (min-norm)


def _check_group(process_group, mode):
    if process_group is None:
        return
    if mode not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed={mode!r}: choose one of {DISTRIBUTED_MODES}")
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError("process_group given but torch.distributed is not initialised")


def _average_across_ranks_(flat, process_group) -> None:
    """Data parallel: average every objective's gradients over the ranks in one bucketed
    all-reduce (K*N elements), in place."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    bucket = _flatten_dense_tensors([t.detach() for t in flat])
    torch.distributed.all_reduce(bucket, group=process_group)
    bucket /= torch.distributed.get_world_size(process_group)
    with torch.no_grad():
        for t, avg in zip(flat, _unflatten_dense_tensors(bucket, flat)):
            t.copy_(avg)


def _gram(problem, backend, process_group=None):
    G = resolve_backend(backend, problem.device).gram(
        problem.flat, problem.num_objectives, problem.segment_ids, problem.num_segments)
    if process_group is not None:  # sharded gradients: only the [S, K, K] partials travel
        torch.distributed.all_reduce(G, group=process_group)
    return G


def gram(grads, segments=None, *, backend: str | None = None, process_group=None) -> torch.Tensor:
    """G[s, k, l] = sum over tensors p of segment s of <grads[k][p], grads[l][p]>.

    grads: K sequences of P tensors; segments: None (one segment), "tensor" or P segment ids.
    Returns [S, K, K] in fp32 (fp64 for fp64 gradients), differentiable. With a process group the
    gradients are taken as shards and the partial Grams are summed over the ranks.
    """
    problem = V.check_problem(grads, segments)
    _check_group(process_group, "sharded")
    return _gram(problem, backend, process_group)


def combine(grads, weights, segments=None, *, out=None, backend: str | None = None):
    """d[p] = sum_k weights[seg(p), k] * grads[k][p]; new tensors, or written into ``out``."""
    problem = V.check_problem(grads, segments)
    w = V.check_weights(weights, problem)
    impl = resolve_backend(backend, problem.device)
    if out is None:
        return impl.combine(problem.flat, problem.num_objectives, w, problem.segment_ids)
    outs = V.check_out(out, problem)
    impl.combine_into(problem.flat, problem.num_objectives, w, problem.segment_ids, outs, None)
    return outs


def pareto_combine(grads, segments=None, *, policy: str = "mgda", tau: float = 5.0,
                   rescale: str | None = None, out=None, backend: str | None = None,
                   process_group=None, distributed: str = "data") -> ParetoResult:
    """Gram -> weights (``policy``: "sum", "mgda", "pareto_lora"; see policy_weights) -> combine.

    With ``out`` the combination is written there, unless a gradient is non-finite
    (``found_inf``), in which case ``out`` is left untouched (decided on the device).
    With ``process_group``: ``distributed="data"`` averages the gradients over the ranks first
    (in place, one all-reduce of K*N elements); ``"sharded"`` treats each rank's tensors as
    shards and all-reduces only the S*K*K Gram partials; both give every rank the same weights.
    """
    problem = V.check_problem(grads, segments)
    _check_group(process_group, distributed)
    outs = None if out is None else V.check_out(out, problem)
    impl = resolve_backend(backend, problem.device)
    if process_group is not None and distributed == "data":
        _average_across_ranks_(problem.flat, process_group)
        G = _gram(problem, backend)
    else:
        G = _gram(problem, backend, process_group)
    weights, branch = policy_weights(G, policy, tau=tau, rescale=rescale)
    found_inf = ~torch.isfinite(G).all()
    w = weights.to(problem.accumulate_dtype)
    if outs is None:
        combined = impl.combine(problem.flat, problem.num_objectives, w, problem.segment_ids)
    else:
        impl.combine_into(problem.flat, problem.num_objectives, w, problem.segment_ids, outs,
                          found_inf.reshape(1))
        combined = outs
    norms, cosines = gram_statistics(G)
    return ParetoResult(combined, G, weights, norms, cosines, found_inf, branch)


def balanced_adamw_step(grads, weights, segments, params, exp_avgs, exp_avg_sqs, *, lrs,
                        weight_decays=0.0, beta1: float = 0.9, beta2: float = 0.999,
                        eps: float = 1e-8, step: int, skip: torch.Tensor | None = None,
                        backend: str | None = None) -> None:
    """One AdamW step (torch.optim.AdamW's update) of every params[p] on the combined gradient
    d_p = sum_k weights[seg(p), k] grads[k][p], fused: d is never materialised. exp_avgs and
    exp_avg_sqs are updated in place; ``step`` counts from 1 (bias correction); ``skip`` (a
    one-element bool tensor) leaves everything untouched when True, decided on the device.
    lrs / weight_decays: one float for all tensors or one per tensor."""
    problem = V.check_problem(grads, segments)
    w = V.check_weights(weights, problem)
    P = problem.num_tensors
    params = V.check_out(params, problem, "params")
    exp_avgs = V.check_out(exp_avgs, problem, "exp_avgs")
    exp_avg_sqs = V.check_out(exp_avg_sqs, problem, "exp_avg_sqs")
    lrs = V.per_tensor_floats(lrs, P, "lrs")
    weight_decays = V.per_tensor_floats(weight_decays, P, "weight_decays")
    if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
        raise ValueError(f"betas must lie in [0, 1), got ({beta1}, {beta2})")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an int >= 1 (bias correction), got {step!r}")
    if skip is not None:
        if not isinstance(skip, torch.Tensor) or skip.numel() != 1:
            raise ValueError("skip must be a one-element bool tensor")
        skip = skip.reshape(1).to(device=problem.device, dtype=torch.bool)
    impl = resolve_backend(backend, problem.device)
    impl.balanced_adamw_(problem.flat, problem.num_objectives, w, problem.segment_ids, params,
                         exp_avgs, exp_avg_sqs, lrs, weight_decays, float(beta1), float(beta2),
                         float(eps), int(step), skip)
