"""FSDP2 (``fully_shard``) under ParetoLoRA: which group shards the parameters (``shard_group``),
the shard each process holds (``local_shard``), and the balanced combination as the parameters'
gradients (``DTensorGrads``).

FSDP2's parameters are DTensors whose local shards the bank holds (GradBank fills them from the
reduce-scattered ``.grad`` of each objective's backward) and the plan balances (the Gram partials
summed over the shard group). The optimizer then needs DTensor gradients: ``DTensorGrads`` keeps
one per parameter, built once, whose local shard is a view of a flat buffer laid out like a bank
row, so the plan's ``combine_into`` writes every gradient in one op.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch without DTensor: nothing is sharded
    DTensor = None

__all__ = ["DTensorGrads", "like_param", "local_shard", "shard_group"]


def local_shard(p: torch.Tensor) -> torch.Tensor:
    """The tensor this process holds of ``p``: the local shard of a DTensor (FSDP2's
    ``fully_shard`` parameters; the same memory, no copy), else ``p`` itself."""
    if DTensor is not None and isinstance(p, DTensor):
        with torch.no_grad():
            return p.to_local()
    return p


def like_param(p: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    """``local`` (shaped like ``p``'s local shard) as a tensor laid out like ``p``: a DTensor on
    ``p``'s mesh with its placements over ``local``'s memory when ``p`` is one (the gradients and
    optimizer state FSDP2 expects), else ``local`` itself."""
    if DTensor is not None and isinstance(p, DTensor):
        return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                  run_check=False)
    return local


def shard_group(named) -> "torch.distributed.ProcessGroup | None":
    """The process group over which FSDP2 (``fully_shard``) parameters are sharded: the mesh
    dimension their one ``Shard`` placement is on (a 1-D mesh, or HSDP's (replicate, shard)
    mesh, where FSDP has already all-reduced over the replicas). None when no parameter is a
    DTensor. Other layouts (a mix of DTensors and plain tensors, several sharded dimensions as
    in FSDP + tensor parallel, parameters on different meshes) raise NotImplementedError."""
    if DTensor is None:
        return None
    sharded = [(n, p) for n, p in named if isinstance(p, DTensor)]
    if not sharded:
        return None
    if len(sharded) != len(named):
        plain = next(n for n, p in named if not isinstance(p, DTensor))
        raise NotImplementedError(f"parameter {plain!r} is a plain tensor but {sharded[0][0]!r} is a DTensor: "
                                  "ParetoLoRA balances either FSDP2-sharded parameters only or none")
    from torch.distributed.tensor import Replicate, Shard
    mesh, dims = sharded[0][1].device_mesh, set()
    for name, p in sharded:
        shard_dims = [d for d, placement in enumerate(p.placements) if isinstance(placement, Shard)]
        others_replicated = all(isinstance(pl, (Shard, Replicate)) for pl in p.placements)
        if p.device_mesh != mesh or len(shard_dims) != 1 or not others_replicated:
            raise NotImplementedError(f"parameter {name!r} is a DTensor with placements {p.placements} on "
                                      f"{p.device_mesh}: ParetoLoRA balances FSDP2 / HSDP parameters (one sharded "
                                      "mesh dimension, the others replicated, one mesh for all)")
        dims.add(shard_dims[0])
    if len(dims) != 1:
        raise NotImplementedError(f"parameters are sharded over different mesh dimensions {sorted(dims)}")
    return mesh.get_group(dims.pop())


class DTensorGrads:
    """DTensor gradients for FSDP2 parameters over one flat buffer (see the module docstring)."""

    def __init__(self, params: Sequence[torch.Tensor], plan):
        self.params, self.plan = list(params), plan
        buffer = plan.buffer
        self.flat = torch.zeros(plan.offsets[-1], dtype=buffer.dtype, device=buffer.device)
        self.views = plan.views(self.flat)
        self.grads = [like_param(p, view) for p, view in zip(self.params, self.views)]
        self._scratch = self._scratch_views = None

    def write(self, result, live: Sequence[bool], accumulate: bool) -> Callable[[], None] | None:
        """The combination with ``result.weights`` as every live parameter's ``.grad`` (added to
        a ``.grad`` it holds with ``accumulate``). Nothing is written on ``found_inf``. Returns
        an undo putting back the ``.grad`` objects replaced here, or None when none was."""
        replaced = []
        held = any(alive and p.grad is not None for p, alive in zip(self.params, live))
        if accumulate and held:
            if self._scratch is None:
                self._scratch = torch.empty_like(self.flat)
                self._scratch_views = self.plan.views(self._scratch)
            self._scratch.zero_()  # stays zero on found_inf: the adds below change nothing
            self.plan.combine_into(self._scratch, result.weights, result.found_inf)
            for i, (p, alive) in enumerate(zip(self.params, live)):
                if not alive:
                    continue
                if p.grad is None:
                    self.views[i].copy_(self._scratch_views[i])
                    replaced.append((p, None))
                    p.grad = self.grads[i]
                else:
                    local_shard(p.grad).add_(self._scratch_views[i])
        else:
            self.plan.combine_into(self.flat, result.weights, result.found_inf)
            for i, (p, alive) in enumerate(zip(self.params, live)):
                if alive and p.grad is not self.grads[i]:
                    replaced.append((p, p.grad))
                    p.grad = self.grads[i]
        if not replaced:
            return None

        def undo() -> None:
            for p, grad in replaced:
                p.grad = grad
        return undo
