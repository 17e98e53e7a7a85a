"""FSDP2 (``fully_shard``) under ParetoLoRA: the balanced combination as the parameters' gradients.

FSDP2's parameters are DTensors whose local shards the bank holds (GradBank fills them from the
reduce-scattered ``.grad`` of each objective's backward) and the plan balances (the Gram partials
summed over the shard group). The optimizer then needs DTensor gradients: ``DTensorGrads`` keeps
one per parameter, built once, whose local shard is a view of a flat buffer laid out like a bank
row, so the plan's ``combine_into`` writes every gradient in one op.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from fused_balance.training.bank import local_shard

__all__ = ["DTensorGrads"]


class DTensorGrads:
    """DTensor gradients for FSDP2 parameters over one flat buffer (see the module docstring)."""

    def __init__(self, params: Sequence[torch.Tensor], plan):
        from torch.distributed.tensor import DTensor

        self.params, self.plan = list(params), plan
        buffer = plan.buffer
        self.flat = torch.zeros(plan.offsets[-1], dtype=buffer.dtype, device=buffer.device)
        self.views = plan.views(self.flat)
        self.grads = [DTensor.from_local(view, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                         run_check=False) for p, view in zip(self.params, self.views)]
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
