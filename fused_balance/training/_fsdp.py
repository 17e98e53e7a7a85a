"""FSDP2 (``fully_shard``) under ParetoLoRA: which group shards the parameters (``shard_group``),
the shard each process holds (``local_shard``), and a local tensor laid out like a parameter
(``like_param``).

FSDP2's parameters are DTensors whose local shards the bank holds (GradBank fills them from the
reduce-scattered ``.grad`` of each objective's backward) and the plan balances (the Gram partials
summed over the shard group). The optimizer then needs DTensor gradients and state:
``training._flat_grads.FlatGrads`` and BalancedAdamW wrap views of flat buffers with
``like_param``.
"""
from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch without DTensor: nothing is sharded
    DTensor = None

__all__ = ["like_param", "local_shard", "shard_group"]


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
