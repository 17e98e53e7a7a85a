"""``.grad`` for parameters that cannot hold views of the plan's flat buffer: FSDP2's DTensors
(a DTensor over each view) and parameters of another dtype than the bank (a flat buffer of their
own dtype, cast from the bank-dtype one after each write). The plan writes the combination into
one flat buffer laid out like a bank row; ``FlatGrads`` makes those the parameters' ``.grad``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from fused_balance.training._fsdp import like_param, local_shard

__all__ = ["FlatGrads"]


class FlatGrads:
    """One ``.grad`` per parameter over the plan's flat layout, built once (see the module
    docstring): a view of the bank-dtype buffer, or of its cast in the parameter's dtype, wrapped
    as a DTensor for an FSDP2 parameter."""

    def __init__(self, params: Sequence[torch.Tensor], plan):
        self.params, self.plan = list(params), plan
        buffer = plan.buffer
        self.flat = torch.zeros(plan.offsets[-1], dtype=buffer.dtype, device=buffer.device)
        views = plan.views(self.flat)
        # one buffer per other dtype, rewritten from self.flat after each write (never on found_inf)
        self.casts = {d: torch.zeros_like(self.flat, dtype=d) for d in {p.dtype for p in self.params} - {buffer.dtype}}
        cast_views = {d: plan.views(f) for d, f in self.casts.items()}
        self.locals = [views[i] if p.dtype == buffer.dtype else cast_views[p.dtype][i]
                       for i, p in enumerate(self.params)]  # in the parameter's dtype
        self.grads = [like_param(p, local) for p, local in zip(self.params, self.locals)]
        self._scratch = self._scratch_views = None

    def write(self, result, live: Sequence[bool], accumulate: bool,
              keep_dead_grads: bool = False) -> Callable[[], None] | None:
        """The combination with ``result.weights`` as every live parameter's ``.grad`` (added to
        a ``.grad`` it holds with ``accumulate``). Nothing is written on ``found_inf``. A
        parameter out of the live set that still holds its ``.grad`` here gets None (a zero
        combination would be stepped), or a copy with ``keep_dead_grads``. Returns an undo
        putting back the ``.grad`` objects replaced here, or None when none was."""
        replaced = []
        if accumulate and any(alive and p.grad is not None for p, alive in zip(self.params, live)):
            if self._scratch is None:
                self._scratch = torch.empty_like(self.flat)
                self._scratch_views = self.plan.views(self._scratch)
            self._scratch.zero_()  # stays zero on found_inf: the adds below change nothing
            self.plan.combine_into(self._scratch, result.weights, result.found_inf)
            for i, (p, alive) in enumerate(zip(self.params, live)):
                if not alive:
                    continue
                if p.grad is None:
                    self.locals[i].copy_(self._scratch_views[i])
                    replaced.append((p, None))
                    p.grad = self.grads[i]
                else:
                    local_shard(p.grad).add_(self._scratch_views[i])
        else:
            self.plan.combine_into(self.flat, result.weights, result.found_inf)
            for cast in self.casts.values():  # the previous values where found_inf
                cast.copy_(torch.where(result.found_inf, cast, self.flat))
            for i, (p, alive) in enumerate(zip(self.params, live)):
                if alive and p.grad is not self.grads[i]:
                    replaced.append((p, p.grad))
                    p.grad = self.grads[i]
        for p, grad, alive in zip(self.params, self.grads, live):
            if not alive and p.grad is grad:
                p.grad = grad.clone() if keep_dead_grads else None
        if not replaced:
            return None

        def undo() -> None:
            for p, grad in replaced:
                p.grad = grad
        return undo
