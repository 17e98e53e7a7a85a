"""ParetoLoRA's planned step: one ``fb.BalancePlan`` over a GradBank, validated once, O(1) host work
per step. Gram -> weights (the bank averaged over a data-parallel group first, or the Gram
partials summed over a sharded one) -> the combination into the live parameters' ``.grad``
(views of the plan's flat buffer, or ``FlatGrads`` where ``.grad`` cannot be such a view) and the
optimizer's step, or the plan's fused AdamW. It knows nothing of losses, history or checkpoints.

``ReachTracker`` says which tensors and segments some objective reached in a window (``Reach``).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

import fused_balance as fb
from fused_balance.distributed import all_reduce_gram_, average_gradients_
from fused_balance.policies import gram_statistics
from fused_balance.training._flat_grads import FlatGrads

__all__ = ["PlannedEngine", "Reach", "ReachTracker", "in_list_dtype"]


def in_list_dtype(gram, weights, bank_dtype: torch.dtype):
    """(gram, weights, norms, cosines) of a float64 plan result, in the list API's dtype for a
    bank of ``bank_dtype``."""
    acc = torch.float64 if bank_dtype == torch.float64 else torch.float32
    big = torch.finfo(acc).max
    norms, cosines = (t.to(acc) for t in gram_statistics(gram))
    return gram.to(acc), weights.clamp(-big, big).to(acc), norms, cosines


class Reach(NamedTuple):
    """What one window reached: ``live`` per tensor, ``live_segments`` per segment, the ``dead``
    tensors' names; ``key`` changes whenever these may have."""
    key: tuple
    live: list
    live_segments: list
    dead: list


class ReachTracker:
    """Which tensors and segments are live (some objective reached them in this window), rebuilt
    only when the bank's reached set changes (rarely: the first steps), so a step costs no
    per-tensor work."""

    def __init__(self, names: Sequence[str], segment_ids: Sequence[int], num_segments: int):
        self.names, self.segment_ids, self.num_segments = list(names), list(segment_ids), num_segments
        self._cache: Reach | None = None

    def __call__(self, bank, all_live: bool) -> Reach:
        """The reach of ``bank``'s window; every tensor live with ``all_live``."""
        key = (id(bank), bank.reached_version, id(bank.grads), all_live)  # grads: new views after a buffer swap
        if self._cache is None or self._cache.key != key:
            live = [True] * len(self.names) if all_live else list(bank.reached)
            live_segments = [False] * self.num_segments
            for alive, s in zip(live, self.segment_ids):
                live_segments[s] = live_segments[s] or alive
            dead = [name for name, alive in zip(self.names, live) if not alive]
            self._cache = Reach(key, live, live_segments, dead)
        return self._cache


class PlannedEngine:
    """Balanced steps over ``bank`` through one ``fb.BalancePlan``, built here for the policy
    settings (``magnitude``: a rule, or the protected objective's index) and ``backend``.

    ``process_group`` / ``distributed``: see ParetoLoRA. ``reach`` (a ReachTracker) gives the live
    tensors; under a process group every tensor counts as reached. ``flat_grads_needed``: the
    parameters' ``.grad`` cannot be views of the plan's flat buffer (FSDP2's DTensors, another
    dtype than the bank's), so ``FlatGrads`` holds them. ``optimizer`` steps after the write;
    a BalancedAdamW is stepped by the plan's fused AdamW instead."""

    def __init__(self, bank, params: Sequence[torch.Tensor], segment_ids: Sequence[int], *, policy, tau, rescale,
                 magnitude, backend, process_group, distributed: str, reach: ReachTracker, flat_grads_needed: bool,
                 optimizer, fused: bool):
        self.bank, self.params = bank, list(params)
        self.plan = fb.BalancePlan(bank, segment_ids, params=bank.tensors, policy=policy, tau=tau, rescale=rescale,
                                   backend=backend, magnitude=magnitude)
        self.process_group, self.distributed = process_group, distributed
        self.optimizer, self.fused = optimizer, fused
        self._reach = reach
        self._flat_grads_needed = flat_grads_needed
        self._flat_grads = None  # built at the first write (the fused AdamW never writes .grad)
        self._live_key = None  # the Reach key the plan's live mask was set for

    def reach(self) -> Reach:
        return self._reach(self.bank, self.process_group is not None)

    def _weights(self, keep_dead_grads: bool = False):
        """The bank averaged over a data-parallel group, the weights, the live mask (a tensor
        that left it keeps a copy of its ``.grad`` with ``keep_dead_grads``: balance and backward
        leave unreached tensors' gradients alone; step replaces ``.grad``)."""
        plan = self.plan
        if self.process_group is None:
            res = plan.weights()
        elif self.distributed == "data":  # every rank balances the mean bank
            average_gradients_([self.bank.buffer], self.process_group)  # one all-reduce, K·N
            res = plan.weights()
        else:  # each rank holds shards: the Gram partials are summed, (S·K·K + 1) float64
            res = plan.weights(all_reduce_gram_(*plan.gram(), self.process_group))
        reach = self.reach()  # cached: rebuilt only when the reached set changes
        if self._live_key != reach.key:
            plan.set_live(reach.live, keep_dead_grads=keep_dead_grads)
            self._live_key = reach.key
        return res

    def _write(self, accumulate: bool, keep_dead_grads: bool = False):
        """The combination into the live ``.grad`` through the plan (added to what they hold with
        ``accumulate``). Returns the result and an undo for a skip: None when nothing needs
        undoing (every ``.grad`` already was its view), else a callable putting back the ``.grad``
        the write replaced (one C++ loop when they were None, as after ``zero_grad``)."""
        plan, res = self.plan, self._weights(keep_dead_grads)
        if self._flat_grads_needed:  # DTensors, or another dtype, over the plan's flat buffer
            if self._flat_grads is None:
                self._flat_grads = FlatGrads(self.params, plan)
            return res, self._flat_grads.write(res, self.reach().live, accumulate, keep_dead_grads)
        state = plan.grads_state()
        undo = None
        if state == "none":
            undo = plan.clear_grads
        elif state == "mixed":
            saved = [p.grad for p in self.params]

            def undo():
                for p, g in zip(self.params, saved):
                    p.grad = g
        plan.combine_into_grads(res, accumulate=accumulate)
        return res, undo

    def balance(self, accumulate: bool):
        """The combination into ``.grad`` (added to it with ``accumulate``); unreached tensors
        keep theirs. Returns the result (statistics in the list API's dtype) and False when the
        host learnt of a skip (``found_inf``: the ``.grad`` replaced were put back), else None."""
        res, undo = self._write(accumulate, keep_dead_grads=True)
        took = None
        if undo is not None and bool(res.found_inf):  # views attached for nothing: take them back
            undo()
            took = False
        gram, weights, norms, cosines = in_list_dtype(res.gram, res.weights, self.bank.dtype)
        return fb.ParetoResult(None, gram, weights, norms, cosines, res.found_inf, res.branch), took

    def step(self):
        """Gram -> weights -> combine into ``.grad`` and the optimizer's step (or the fused AdamW).
        Returns the result (the float64 Gram and weights, no statistics: they are made only when
        wanted, ``in_list_dtype``) and whether it stepped."""
        if self.fused:
            res = self._weights()
            self.optimizer.planned_step(self.plan, res.weights, skip=res.found_inf, params=self.params)
            took = not bool(res.found_inf)  # the one host read: step() reports whether it stepped
            if took:
                self.optimizer.publish_planned_state()
            else:
                self.optimizer.skipped_steps += 1
        else:
            res, undo = self._write(accumulate=False)
            took = not bool(res.found_inf)  # the one host read: step() reports whether it stepped
            try:
                if took:
                    self.optimizer.step()
            except BaseException:  # .grad back to what it was (None after zero_grad)
                took = False
                raise
            finally:
                if not took and undo is not None:
                    undo()
        return fb.ParetoResult(None, res.gram, res.weights, None, None, res.found_inf, res.branch), took
