"""BalancedAdamW: AdamW that steps on a weighted combination of K objectives' gradients, fused.

``balanced_step(grads, weights, segments)`` calls ``fb.balanced_adamw_step``: the combined
gradient d_p = sum_k w[seg(p), k] g_k,p is formed inside the AdamW kernel and never written to
memory. ``step()`` with no arguments is plain AdamW on ``p.grad`` (K = 1, weight 1), so the class
also drops in where a torch optimizer is expected. The update is torch.optim.AdamW's
(decoupled weight decay, bias correction); per-group ``lr``/``weight_decay``/``betas``/``eps``.
State layout (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter) mirrors torch.optim.AdamW's.
"""
from __future__ import annotations

from typing import Sequence

import torch

import fused_balance as fb

__all__ = ["BalancedAdamW"]


class BalancedAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, backend: str | None = None):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}")
        if not eps > 0.0:
            raise ValueError(f"invalid eps {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.backend = backend
        self.skipped_steps = 0

    # -- the parameter order every ``grads`` argument follows --------------------------------
    def flat_params(self) -> list[torch.Tensor]:
        """All parameters, group by group, in the order ``balanced_step``'s grads must follow."""
        return [p for group in self.param_groups for p in group["params"]]

    def _state_for(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def balanced_step(self, grads: Sequence[Sequence[torch.Tensor]], weights: torch.Tensor,
                      segments=None, *, skip: torch.Tensor | bool | None = None) -> bool:
        """One AdamW step on sum_k weights[seg(p), k] * grads[k][p] for every parameter p
        (``flat_params()`` order). ``skip`` True (a bool, or a one-element tensor, read on the
        host here) leaves parameters, moments and step counts untouched; returns whether the
        step was taken."""
        params = self.flat_params()
        if skip is not None and bool(skip):
            self.skipped_steps += 1
            return False
        for k, row in enumerate(grads):
            if len(row) != len(params):
                raise ValueError(f"grads[{k}] has {len(row)} tensors, the optimizer holds {len(params)}")
        states = [self._state_for(p) for p in params]
        steps = {float(s["step"]) for s in states}
        if len(steps) != 1:
            raise RuntimeError(f"parameters are at different step counts {sorted(steps)}; "
                               "BalancedAdamW steps all of them together")
        step = int(steps.pop()) + 1
        # Group by (betas, eps): the fused call takes one of each, lr/decay are per tensor.
        by_hyper: dict[tuple, list[int]] = {}
        lrs, decays = [], []
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("BalancedAdamW supports neither amsgrad nor maximize")
            for _ in group["params"]:
                by_hyper.setdefault((tuple(group["betas"]), group["eps"]), []).append(len(lrs))
                lrs.append(float(group["lr"]))
                decays.append(float(group["weight_decay"]))
        if weights.dim() == 1:
            weights = weights.unsqueeze(0)
        seg_ids = _segment_list(segments, len(params), weights.shape[0])
        for (betas, eps), idx in by_hyper.items():
            # The API wants segment ids 0..S'-1 without gaps: renumber this subset's segments.
            used = sorted({seg_ids[i] for i in idx})
            renumber = {s: j for j, s in enumerate(used)}
            sub_weights = weights if len(used) == weights.shape[0] else weights[used]
            fb.balanced_adamw_step(
                [[row[i] for i in idx] for row in grads], sub_weights,
                [renumber[seg_ids[i]] for i in idx],
                [params[i] for i in idx], [states[i]["exp_avg"] for i in idx],
                [states[i]["exp_avg_sq"] for i in idx], lrs=[lrs[i] for i in idx],
                weight_decays=[decays[i] for i in idx], beta1=betas[0], beta2=betas[1],
                eps=eps, step=step, backend=self.backend)
        for s in states:
            s["step"] += 1
        return True

    @torch.no_grad()
    def step(self, closure=None):
        """Plain AdamW on ``p.grad`` (parameters without a gradient count as zero-gradient only
        if some parameter has one; like torch, a step with no gradient at all does nothing)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self.flat_params()
        if all(p.grad is None for p in params):
            return loss
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        self.balanced_step([grads], torch.ones(1, 1, dtype=dtype, device=params[0].device), None)
        return loss

    def state_dict(self):
        out = super().state_dict()
        out["skipped_steps"] = self.skipped_steps
        return out

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        self.skipped_steps = int(state_dict.pop("skipped_steps", 0))
        super().load_state_dict(state_dict)


def _segment_list(segments, num_params: int, num_segments: int) -> list[int]:
    """Segment ids as a Python list (so the parameters can be split by hyper-parameters)."""
    if segments is None:
        return [0] * num_params
    if isinstance(segments, str):
        if segments == "tensor":
            return list(range(num_params))
        raise ValueError(f"segments must be None, 'tensor' or P ids, got {segments!r}")
    ids = segments.tolist() if isinstance(segments, torch.Tensor) else list(segments)
    if len(ids) != num_params:
        raise ValueError(f"segments has {len(ids)} ids for {num_params} parameters")
    return [int(i) for i in ids]
