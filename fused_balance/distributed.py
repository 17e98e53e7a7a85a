"""Collectives for balancing across ranks (torch.distributed, any backend: gloo, nccl, ...).

Two ways to spread the K objectives' gradients over R ranks, both giving every rank the same
weights (so the ranks never diverge):

- ``"data"`` (data parallel, every rank holds whole gradients of its own batch): average all K*P
  gradients over the ranks in ONE bucketed all-reduce, then balance identically everywhere.
  Traffic: one all-reduce of K·N·esize bytes (N parameters per objective, esize the gradient's
  element size), the same as DDP would move for K separate backward passes.
- ``"sharded"`` (FSDP / ZeRO style, every rank holds a shard of every objective's gradient):
  every Gram entry is a sum over elements, so each rank computes the Gram of its shards and
  only the [S, K, K] partials are summed: one all-reduce of S·K·K·4 bytes (·8 for fp64
  gradients), independent of N. Each rank then combines its own shards with the common weights.
  With FSDP2 (``fully_shard``) pass each parameter's ``p.grad.to_local()`` after one backward
  per objective (FSDP's reduce-scatter has already averaged them over the data-parallel
  ranks; uneven and empty shards are fine) and the shard group (for HSDP, the mesh's shard
  dimension group, after FSDP's replicate all-reduce); ``out=[p.grad.to_local() ...]``
  writes the combination straight into the DTensor gradients.

The extended-range path of ``fused_balance.api`` (gradients whose squares leave fp32's range)
adds, only when it fires, an all-reduce-max of S·K·4 bytes and an all-reduce of the rescued
segments' float64 Gram partials (S_r·K·K·8 bytes); every decision it takes is made from reduced
values, so all ranks take the same branch and issue the same collectives.
"""
from __future__ import annotations

import torch

__all__ = ["DISTRIBUTED_MODES", "check_group", "contiguous_span", "average_gradients_",
           "all_reduce_sum", "all_reduce_max_", "all_reduce_gram_"]

DISTRIBUTED_MODES = ("data", "sharded")


def check_group(process_group, mode: str) -> None:
    """Validate ``distributed=`` always and the group when one is given (before any write)."""
    if not isinstance(mode, str) or mode not in DISTRIBUTED_MODES:
        raise ValueError(f"distributed={mode!r}: choose one of {DISTRIBUTED_MODES}")
    if process_group is None:
        return
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise RuntimeError("process_group given but torch.distributed is not initialised")
    if not isinstance(process_group, torch.distributed.ProcessGroup):
        raise TypeError(f"process_group must be a torch.distributed.ProcessGroup, got "
                        f"{type(process_group).__name__}")


def contiguous_span(tensors) -> torch.Tensor | None:
    """A 1-D view of the memory the tensors tile, if they are contiguous views of one storage
    laid end to end in list order (a GradBank's [K, N] buffer in objective-major order);
    otherwise None. Reducing the span in place updates every tensor without a bucket copy."""
    first = tensors[0]
    try:
        storage = first.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a plain storage
        return None
    base = storage.data_ptr()
    offset = first.storage_offset()
    expected = offset
    for t in tensors:
        if (not t.is_contiguous() or t.untyped_storage().data_ptr() != base
                or t.storage_offset() != expected):
            return None
        expected += t.numel()
    span = torch.empty(0, dtype=first.dtype, device=first.device)
    return span.set_(storage, offset, (expected - offset,), (1,))


def average_gradients_(flat, process_group) -> None:
    """Replace every tensor of ``flat`` by its mean over the ranks, in place, with one
    all-reduce of K·N·esize bytes: straight on the gradients' buffer when they tile one
    (``contiguous_span``), else on a flattened bucket copied back afterwards.

    fp16 is divided by the world size before the sum (a sum of R values near 65504 would
    overflow where their mean does not); other dtypes are summed, then divided."""
    world = torch.distributed.get_world_size(process_group)
    with torch.no_grad():
        detached = [t.detach() for t in flat]
        span = contiguous_span(detached)
        bucket = span if span is not None else torch.cat([t.reshape(-1) for t in detached])
        predivide = bucket.dtype == torch.float16
        if predivide:
            bucket.div_(world)
        torch.distributed.all_reduce(bucket, group=process_group)
        if not predivide:
            bucket.div_(world)
        if span is None:
            pieces = bucket.split([t.numel() for t in detached])
            torch._foreach_copy_(detached, [piece.view(t.shape) for piece, t in zip(pieces, detached)])


def all_reduce_sum(tensor: torch.Tensor, process_group) -> torch.Tensor:
    """Sum over the ranks. Differentiable (through torch.distributed.nn) when ``tensor``
    requires grad, so a sharded ``fb.gram`` can sit inside a loss; else in place."""
    if tensor.requires_grad:
        from torch.distributed.nn.functional import all_reduce
        return all_reduce(tensor, group=process_group)
    torch.distributed.all_reduce(tensor, group=process_group)
    return tensor


def all_reduce_max_(tensor: torch.Tensor, process_group) -> torch.Tensor:
    """Elementwise max over the ranks, in place. NaN is mapped to +inf first: a max reduction
    need not propagate NaN (gloo's drops it depending on the order), +inf always wins."""
    tensor.copy_(torch.where(torch.isnan(tensor), torch.full_like(tensor, float("inf")), tensor))
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX, group=process_group)
    return tensor


def all_reduce_gram_(gram: torch.Tensor, found_inf: torch.Tensor, process_group) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum a float64 ``[S, K, K]`` Gram of gradient shards over the ranks and raise
    ``found_inf`` everywhere if any rank raised it: ONE all-reduce of (S·K·K + 1)·8 bytes, on
    the device (no host read). Returns the reduced (gram, found_inf)."""
    packed = torch.cat([gram.reshape(-1), found_inf.reshape(1).to(gram.dtype)])
    torch.distributed.all_reduce(packed, group=process_group)
    return packed[:-1].view(gram.shape), packed[-1] > 0
