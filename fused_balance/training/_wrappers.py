"""Models wrapped for multi-process training, as ParetoLoRA meets them.

- ``DistributedDataParallel`` (also what ``accelerate.Accelerator.prepare`` and the Hugging Face
  Trainer return for multi-process CPU/GPU training): DDP's reducer averages ``.grad`` during
  the first backward after a forward only, so with K backward passes per step it would average
  the first objective and leave the others per rank. ParetoLoRA therefore switches DDP's own
  reduction off (``require_backward_grad_sync = False``, what ``ddp.no_sync()`` does, read by
  DDP at forward time) and averages the bank's ``[K, N]`` buffer itself in one all-reduce over
  DDP's process group (``distributed="data"``): K·N·esize bytes per step, once.
- ``torch.compile`` (``_orig_mod``): looked through.
- FSDP2 (``fully_shard``): its parameters are DTensors; ParetoLoRA balances their local shards
  and sums the Gram partials over the shard group (``_fsdp.shard_group``). FSDP1
  (``FullyShardedDataParallel``) and DeepSpeed raise, naming the FSDP2 route (``FSDP_RECIPE``).

Names: parameter names are taken relative to the innermost model and a prefix shared by every
name (``module.``, ``_orig_mod.``, PEFT's ``base_model.model.``) is dropped, so segment and
state names do not depend on the wrapper and states move between wrapped and unwrapped models.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch.nn.parallel import DistributedDataParallel

__all__ = ["unwrap", "canonical_names", "check_not_fsdp", "adopt_ddp", "check_ddp_quiet", "FSDP_RECIPE",
           "shown_names"]

_SHARED_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")

FSDP_RECIPE = (
    "ParetoLoRA drives FSDP2 (torch.distributed.fsdp.fully_shard) directly: pass the fully_shard "
    "model and a torch optimizer (accelerate and the Trainer use FSDP2 with fsdp_version: 2). "
    "For replicated models use DistributedDataParallel, which ParetoLoRA also supports directly.")


def shown_names(names: Sequence[str]) -> str:
    """The first three of ``names`` for an error message, quoted, "..." when there are more."""
    return ", ".join(repr(n) for n in names[:3]) + (" ..." if len(names) > 3 else "")


def unwrap(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """(innermost model, the outermost DistributedDataParallel wrapper or None), looking through
    DDP and torch.compile; FSDP raises (``check_not_fsdp``)."""
    ddp = None
    while True:
        check_not_fsdp(model)
        if isinstance(model, DistributedDataParallel):
            ddp = ddp if ddp is not None else model
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model, ddp


def check_not_fsdp(model_or_params) -> None:
    """Raise, naming the FSDP2 route, for wrappers ParetoLoRA does not drive: FSDP1
    (``FullyShardedDataParallel``) and DeepSpeed (its engine, or ZeRO-3 partitioned
    parameters). FSDP2 (``fully_shard``) is driven (``_fsdp.shard_group``)."""
    if isinstance(model_or_params, torch.nn.Module):
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel
        except ImportError:
            FullyShardedDataParallel = ()
        if isinstance(model_or_params, FullyShardedDataParallel):
            raise NotImplementedError(f"FullyShardedDataParallel (FSDP1) is not driven by ParetoLoRA. {FSDP_RECIPE}")
        if type(model_or_params).__name__ == "DeepSpeedEngine":
            raise NotImplementedError(f"DeepSpeed is not driven by ParetoLoRA. {FSDP_RECIPE}")
        return
    for name, p in model_or_params:
        if hasattr(p, "ds_id"):  # ZeRO-3 partitions parameters in place
            raise NotImplementedError(f"parameter {name!r} is partitioned by DeepSpeed ZeRO: not driven by "
                                      f"ParetoLoRA. {FSDP_RECIPE}")


def canonical_names(names: Sequence[str]) -> list[str]:
    """Drop wrapper prefixes shared by every name (``module.`` of DDP, ``_orig_mod.`` of
    torch.compile, ``base_model.model.`` of PEFT), repeatedly. Only a prefix on every name is a
    wrapper's, so names stay unique."""
    names = list(names)
    while names:
        prefix = next((pre for pre in _SHARED_PREFIXES if all(n.startswith(pre) for n in names)), None)
        if prefix is None:
            break
        names = [n[len(prefix):] for n in names]
    return names


def adopt_ddp(ddp, params: Sequence[torch.Tensor], process_group, distributed: str):
    """Take over gradient averaging from ``ddp``; returns the process group to balance over.
    Checked first (nothing changes on an error): data mode, one group, every trainable parameter
    of the replicated model balanced (DDP no longer averages any gradient), no static graph."""
    if distributed != "data":
        raise ValueError(f"distributed={distributed!r} with DistributedDataParallel: DDP replicates "
                         "whole parameters, so gradients are averaged (distributed='data')")
    group = ddp.process_group
    if process_group is not None and process_group is not group:
        raise ValueError("process_group differs from the DistributedDataParallel module's own "
                         "process group: leave process_group=None to use DDP's")
    if getattr(ddp, "static_graph", False):
        raise ValueError("DistributedDataParallel(static_graph=True) schedules its own all-reduce "
                         "in the first backward regardless of no_sync: build DDP without "
                         "static_graph for ParetoLoRA")
    balanced = {id(p) for p in params}
    replicated = {id(p) for p in ddp.module.parameters()}
    outside = sum(1 for p in params if id(p) not in replicated)
    if outside:
        raise ValueError(f"{outside} balanced parameter(s) are not parameters of the "
                         "DistributedDataParallel module: pass the model DDP wraps")
    loose = [name for name, p in ddp.module.named_parameters()
             if p.requires_grad and id(p) not in balanced]
    if loose:
        raise ValueError(f"{len(loose)} trainable parameter(s) of the DDP model are not balanced "
                         f"({shown_names(loose)}): ParetoLoRA switches DDP's gradient averaging off, so they "
                         "would differ between ranks; freeze them or balance them too")
    switch_off_sync(ddp)
    return group


def switch_off_sync(ddp) -> None:
    """DDP's own gradient averaging off: what ``ddp.no_sync()`` sets, read at each forward."""
    ddp.require_backward_grad_sync = False


def check_ddp_quiet(ddp) -> None:
    """Raise before anything is written if DDP's reducer may average the next backward: its
    gradient sync was switched back on, or the last forward through it armed the reducer
    (it ran before ParetoLoRA took over, with sync on). O(1): two attribute reads."""
    if ddp.require_backward_grad_sync:
        raise RuntimeError("DistributedDataParallel gradient sync was switched back on "
                           "(require_backward_grad_sync=True, e.g. accelerator."
                           "trigger_sync_in_backward): ParetoLoRA averages the gradients itself; "
                           "leave DDP's sync off")
    if ddp.require_forward_param_sync and getattr(ddp, "_lazy_init_ran", True):
        raise RuntimeError("the last forward pass through the DistributedDataParallel model ran "
                           "with DDP's gradient sync on (before ParetoLoRA took over), or the "
                           "losses come from a forward that bypassed the DDP wrapper: build "
                           "ParetoLoRA (or call attach) before the forward pass, and run the "
                           "forward through the DDP model")
