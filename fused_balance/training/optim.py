"""BalancedAdamW: AdamW that steps on a weighted combination of K objectives' gradients, fused.

``balanced_step(grads, weights, segments)`` calls ``fb.balanced_adamw_step``: the combined
gradient d_p = sum_k w[seg(p), k] g_k,p is formed inside the AdamW kernel and never written to
memory. ``step()`` with no arguments is plain AdamW on ``p.grad`` (K = 1, weight 1), so the class
also drops in where a torch optimizer is expected. The update is torch.optim.AdamW's
(decoupled weight decay, bias correction); per-group ``lr``/``weight_decay``/``betas``/``eps``.
State layout (``step``, ``exp_avg``, ``exp_avg_sq`` per parameter) mirrors torch.optim.AdamW's.
"""
from __future__ import annotations

import numbers
from typing import Sequence

import torch

import fused_balance as fb
from fused_balance._validate import check_real
from fused_balance.backends import check_backend_choice
from fused_balance.training._fsdp import like_param, local_shard
from fused_balance.training._wrappers import shown_names
from fused_balance.training.bank import check_trainable

__all__ = ["BalancedAdamW", "make_optimizer"]


def make_optimizer(optimizer, named_params, *, lr: float, weight_decay: float, betas: tuple[float, float],
                   eps: float, backend: str | None):
    """ParetoLoRA's ``optimizer`` argument as an optimizer: a torch optimizer (a BalancedAdamW
    too) as it is, ``"fused_adamw"`` a BalancedAdamW built from the hyper-parameters, a callable
    ``params -> optimizer`` called, None as it is. Checked to hold every balanced parameter of
    ``named_params`` (``(name, param)`` pairs)."""
    params = [p for _, p in named_params]
    if isinstance(optimizer, str):
        if optimizer != "fused_adamw":
            raise ValueError(f"optimizer string must be 'fused_adamw', got {optimizer!r}")
        optimizer = BalancedAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, backend=backend)
    elif optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        if not callable(optimizer):
            raise TypeError("optimizer must be a torch optimizer, a factory params -> optimizer, "
                            f"'fused_adamw' or None, got {type(optimizer).__name__}")
        optimizer = optimizer(params)  # a factory
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"the optimizer factory returned a {type(optimizer).__name__}, "
                            "not a torch optimizer")
    if optimizer is not None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in named_params if id(p) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold {len(missing)} balanced parameter(s) "
                             f"({shown_names(missing)}): they would never be updated")
    return optimizer


def _check_hyper(group: dict, where: str) -> None:
    """Validate one param group's hyper-parameters (types and ranges) before it is added."""
    lr = check_real(group["lr"], f"{where}lr")
    if lr < 0.0:
        raise ValueError(f"invalid learning rate {lr} ({where}lr must be >= 0)")
    eps = check_real(group["eps"], f"{where}eps")
    if eps <= 0.0:
        raise ValueError(f"invalid eps {eps} ({where}eps must be > 0)")
    betas = group["betas"]
    if isinstance(betas, (str, bytes, torch.Tensor)) or not isinstance(betas, Sequence) or len(betas) != 2:
        raise TypeError(f"{where}betas must be a pair of floats, got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= check_real(beta, f"{where}betas[{i}]") < 1.0:
            raise ValueError(f"invalid betas {tuple(betas)} ({where}betas[{i}] must be in [0, 1))")
    decay = check_real(group["weight_decay"], f"{where}weight_decay")
    if decay < 0.0:
        raise ValueError(f"invalid weight_decay {decay} ({where}weight_decay must be >= 0)")
    if group.get("amsgrad") or group.get("maximize"):
        raise ValueError("BalancedAdamW supports neither amsgrad nor maximize")


class BalancedAdamW(torch.optim.Optimizer):
    """AdamW on a balanced combination of K objectives' gradients (see the module docstring).

    Every parameter must require grad, appear once and live on one device with the others (the
    fused step updates all of them in one pass; each keeps its own step count, like torch's). Bad input raises before
    anything is written: parameters, moments and step counts stay as they were.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, backend: str | None = None):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        _check_hyper(defaults, "")
        defaults["betas"] = tuple(float(b) for b in betas)
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of tensors or param-group dicts, got a single "
                            "Tensor; wrap it in a list")
        super().__init__(params, defaults)
        device = self.param_groups[0]["params"][0].device if self.param_groups[0]["params"] else None
        check_backend_choice(backend, device if device is not None else "cpu")
        self.backend = backend
        self.skipped_steps = 0

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, after checking the group's hyper-parameters and parameters
        (requires grad, not already held, one device for the whole optimizer)."""
        if not isinstance(param_group, dict):
            raise TypeError(f"a param group must be a dict, got {type(param_group).__name__}")
        index = len(self.param_groups)
        where = f"param group {index}: "
        params = param_group.get("params")
        if isinstance(params, torch.Tensor):
            params = [params]
        elif isinstance(params, set):
            raise TypeError(f"{where}params must be an ordered sequence, not a set")
        try:
            params = list(params)
        except TypeError:
            raise TypeError(f"{where}params must be a sequence of tensors, got "
                            f"{type(params).__name__}") from None
        held = {id(p): (i, j) for i, g in enumerate(self.param_groups) for j, p in enumerate(g["params"])}
        device = self.param_groups[0]["params"][0].device if self.param_groups else None
        seen = set()
        for j, p in enumerate(params):
            label = f"{where}parameter {j}"
            check_trainable(p, label, "BalancedAdamW steps every parameter it holds (weight decay "
                                      "included)")
            if id(p) in seen or id(p) in held:
                first = held.get(id(p))
                raise ValueError(f"{label} appears twice" + (f" (already parameter {first[1]} of param "
                                                              f"group {first[0]})" if first else ""))
            seen.add(id(p))
            device = device or p.device
            if p.device != device:
                raise ValueError(f"{label} is on {p.device} but the others are on {device}: the fused "
                                 "step needs all parameters on one device")
        merged = {**self.defaults, **param_group}
        _check_hyper(merged, where)
        super().add_param_group({**param_group, "params": params})

    # -- the parameter order every ``grads`` argument follows --------------------------------
    def flat_params(self) -> list[torch.Tensor]:
        """All parameters, group by group, in the order ``balanced_step``'s grads must follow."""
        return [p for group in self.param_groups for p in group["params"]]

    def _states(self, params) -> tuple[list[dict], dict]:
        """Every parameter's state; new ones are built aside and only committed after a step
        succeeded (a failed first step leaves the optimizer state empty)."""
        states, fresh = [], {}
        for p in params:
            state = self.state.get(p)
            if not state:
                state = {"step": torch.tensor(0.0),
                         "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                         "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
                fresh[p] = state
            states.append(state)
        return states, fresh

    @torch.no_grad()
    def balanced_step(self, grads: Sequence[Sequence[torch.Tensor]], weights: torch.Tensor,
                      segments=None, *, skip: torch.Tensor | bool | None = None,
                      active: Sequence[bool] | None = None) -> bool:
        """One AdamW step on sum_k weights[seg(p), k] * grads[k][p] for every parameter p
        (``flat_params()`` order). ``skip`` True (a bool, or a one-element tensor, read on the
        host here) leaves parameters, moments and step counts untouched; returns whether the
        step was taken. ``active`` (one bool per parameter): only those are stepped, the others
        keep their values, moments and step counts, like torch.optim.AdamW's parameters whose
        ``.grad`` is None (a parameter no objective reached). Every argument is checked before
        the first write."""
        params = self.flat_params()
        if skip is not None and bool(skip):
            self.skipped_steps += 1
            return False
        if not isinstance(weights, torch.Tensor):
            raise TypeError(f"weights must be a Tensor [S, K], got {type(weights).__name__}")
        if isinstance(grads, torch.Tensor) or not isinstance(grads, Sequence):
            raise TypeError(f"grads must be K sequences of {len(params)} tensors, got {type(grads).__name__}")
        for k, row in enumerate(grads):
            if isinstance(row, torch.Tensor) or not isinstance(row, Sequence):
                raise TypeError(f"grads[{k}] must be a sequence of {len(params)} tensors, got "
                                f"{type(row).__name__}")
            if len(row) != len(params):
                raise ValueError(f"grads[{k}] has {len(row)} tensors, the optimizer holds {len(params)}")
        if active is not None and len(active) != len(params):
            raise ValueError(f"active has {len(active)} entries, the optimizer holds {len(params)}")
        stepped = range(len(params)) if active is None else [i for i, a in enumerate(active) if a]
        if not stepped:
            return True
        states, fresh = self._states([params[i] for i in stepped])
        state_of = dict(zip(stepped, states))
        # Group by (betas, eps, step count): the fused call takes one of each, lr/decay are per
        # tensor. Step counts differ only when a parameter was inactive in some steps.
        by_hyper: dict[tuple, list[int]] = {}
        lrs, decays = [0.0] * len(params), [0.0] * len(params)
        # every step count in one host read (they live on the device after a planned step)
        read = torch.stack([state_of[i]["step"].reshape(()).float() for i in stepped]).tolist()
        counts = dict(zip(stepped, read))
        i = 0
        for group in self.param_groups:
            _check_hyper(group, "")  # a group edited since (a scheduler writing a bad lr)
            for _ in group["params"]:
                if i in state_of:
                    key = (tuple(group["betas"]), group["eps"], int(counts[i]) + 1)
                    by_hyper.setdefault(key, []).append(i)
                lrs[i], decays[i] = float(group["lr"]), float(group["weight_decay"])
                i += 1
        if weights.dim() not in (1, 2):
            raise ValueError(f"weights must be [S, K] (or [K]), got shape {tuple(weights.shape)}")
        if weights.dim() == 1:
            weights = weights.unsqueeze(0)
        seg_ids = _segment_list(segments, len(params), weights.shape[0])
        # FSDP2 parameters are DTensors: the fused op steps their local shards (and moments)
        params = [local_shard(p) for p in params]
        grads = [[local_shard(g) for g in row] for row in grads]
        exp_avgs = [local_shard(state_of[i]["exp_avg"]) if i in state_of else None for i in range(len(params))]
        exp_avg_sqs = [local_shard(state_of[i]["exp_avg_sq"]) if i in state_of else None for i in range(len(params))]
        calls = []
        for (betas, eps, step), idx in by_hyper.items():
            # The API wants segment ids 0..S'-1 without gaps: renumber this subset's segments.
            used = sorted({seg_ids[i] for i in idx})
            renumber = {s: j for j, s in enumerate(used)}
            sub_weights = weights if len(used) == weights.shape[0] else weights[used]
            whole = len(idx) == len(params)
            pick = (lambda seq: seq) if whole else (lambda seq, idx=idx: [seq[i] for i in idx])  # noqa: E731
            calls.append(dict(grads=[pick(row) for row in grads], weights=sub_weights,
                              segments=[renumber[s] for s in pick(seg_ids)], params=pick(params),
                              exp_avgs=pick(exp_avgs), exp_avg_sqs=pick(exp_avg_sqs), lrs=pick(lrs),
                              weight_decays=pick(decays), beta1=betas[0], beta2=betas[1], eps=eps,
                              step=step))
        if len(calls) > 1:
            # Several calls: check every one first with a skipped call (validation only, nothing
            # written), so an error in a later call cannot leave earlier groups stepped.
            skip_all = torch.ones(1, dtype=torch.bool, device=params[0].device)
            for call in calls:
                fb.balanced_adamw_step(**call, skip=skip_all, backend=self.backend)
        for call in calls:
            fb.balanced_adamw_step(**call, backend=self.backend)
        self.state.update(fresh)
        for state in states:
            state["step"] += 1
        return True

    # -- planned path (fused_balance.BalancePlan): O(1) host work per step --------------------
    @torch.no_grad()
    def planned_step(self, plan, weights: torch.Tensor, skip: torch.Tensor | None = None, *,
                     params: Sequence[torch.Tensor] | None = None) -> None:
        """One AdamW step on the combination ``plan`` forms from its bank with ``weights``
        ([S, K], on the device), in one op with no host read: ``skip`` (a one-element bool
        tensor, e.g. found_inf) is decided on the device and leaves everything untouched.

        The moments live in two flat buffers laid out like the plan's bank rows (each
        parameter's ``exp_avg`` / ``exp_avg_sq`` state is a view of them) and the step counts in
        one ``[P]`` device tensor (each parameter's ``step`` a 0-dim view); they are adopted from
        the current state on first use and again whenever the state was replaced
        (``load_state_dict``). Only the plan's live parameters (``plan.set_live``) are stepped.
        Hyper-parameters are read from a device table refreshed when a group changes (O(groups)).
        ``skipped_steps`` is not counted here (that would need a host read): callers that read
        ``skip`` count it, and call ``publish_planned_state`` when it was False. A parameter's
        state appears in ``state`` once it was stepped, as in torch's AdamW. ``params``: this
        optimizer's parameters behind the plan's tensors, in the plan's order, when the plan
        holds other tensors of them (FSDP2's local shards); default ``plan.params``."""
        flat = getattr(self, "_flat", None)
        if flat is None or flat.plan is not plan or not flat.intact(self.state):
            flat = self._flat = _FlatState.adopt(self, plan, plan.params if params is None else list(params))
        plan.adamw_step(weights, flat.exp_avg, flat.exp_avg_sq, flat.hyper_for(self.param_groups),
                        flat.step, skip)
        if skip is None:
            flat.publish_live(self)

    def publish_planned_state(self) -> None:
        """After a planned step known to be taken: the state of the parameters it stepped for the
        first time joins ``state`` (O(P) only when the plan's live set changed)."""
        self._flat.publish_live(self)


    @torch.no_grad()
    def step(self, closure=None):
        """Plain AdamW on ``p.grad``; like torch.optim.AdamW, parameters whose ``.grad`` is None
        are left alone (values, moments, step counts)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self.flat_params()
        active = [p.grad is not None for p in params]
        if not any(active):
            return loss
        grads = [p.grad if p.grad is not None else p for p in params]  # inactive: never read
        dtype = torch.float64 if params[0].dtype == torch.float64 else torch.float32
        self.balanced_step([grads], torch.ones(1, 1, dtype=dtype, device=params[0].device), None,
                           active=None if all(active) else active)
        return loss

    def state_dict(self):
        out = super().state_dict()
        out["skipped_steps"] = self.skipped_steps
        # FSDP2: the planned step's moments are DTensors over views of flat buffers, and torch
        # cannot pickle a DTensor whose local tensor starts inside its storage; the state handed
        # out holds copies of those (the optimizer keeps its views)
        out["state"] = {index: {name: _picklable(value) for name, value in state.items()}
                        for index, state in out["state"].items()}
        return out

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        skipped = int(state_dict.pop("skipped_steps", 0))
        super().load_state_dict(state_dict)
        self.skipped_steps = skipped


class _FlatState:
    """BalancedAdamW's state in the plan's layout: flat moments, a [P] step-count tensor, a hyper
    table. ``owners[i]`` is the optimizer's parameter behind the plan's tensor i (the same
    tensor, or the FSDP2 DTensor whose local shard it is); its published ``exp_avg`` /
    ``exp_avg_sq`` are views of the flat moments laid out like it (DTensors for FSDP2)."""

    def __init__(self, plan, owners, exp_avg, exp_avg_sq, step, m_views, v_views, step_views, published):
        self.plan, self.owners = plan, owners
        self.exp_avg, self.exp_avg_sq, self.step = exp_avg, exp_avg_sq, step
        self.m_views, self.v_views, self.step_views = m_views, v_views, step_views
        self.published = published  # per parameter: is its state in the optimizer's (views of these)?
        self._live_seen = None  # the plan's live list publish_live last saw
        self._hyper_key = None
        self._hyper = None

    @classmethod
    def adopt(cls, optimizer: "BalancedAdamW", plan, owners) -> "_FlatState":
        """O(P), once: the optimizer's state copied into flat buffers it then views."""
        params = optimizer.flat_params()
        if plan.params is None or owners is None or len(owners) != len(plan.params) \
                or len(owners) != len(params) or {id(p) for p in owners} != {id(p) for p in params}:
            raise ValueError("the plan's parameters are not the optimizer's parameters")
        group_of = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        plan.set_groups([group_of[id(p)] for p in owners])
        states = [optimizer.state.get(p) for p in owners]
        exp_avg, exp_avg_sq, step = plan.new_adamw_state()
        m_views = [like_param(p, m) for p, m in zip(owners, plan.views(exp_avg))]
        v_views = [like_param(p, v) for p, v in zip(owners, plan.views(exp_avg_sq))]
        held = [i for i, st in enumerate(states) if st]
        if held:  # one copy of the counts (not one host read per parameter)
            counts = torch.stack([states[i]["step"].reshape(()).to(step) for i in held])
            step.index_copy_(0, torch.tensor(held, device=step.device), counts)
        for st, m, v in zip(states, m_views, v_views):
            if st:
                local_shard(m).copy_(local_shard(st["exp_avg"]))
                local_shard(v).copy_(local_shard(st["exp_avg_sq"]))
        step_views = list(step.unbind(0))  # each parameter's 0-dim "step", as torch's AdamW keeps it
        # A parameter's state is published when it is first stepped (publish_live), as in torch's AdamW
        published = [bool(st) for st in states]
        for p, st, m, v, t, shown in zip(owners, states, m_views, v_views, step_views, published):
            if shown:
                optimizer.state[p] = {**(st or {}), "step": t, "exp_avg": m, "exp_avg_sq": v}
        return cls(plan, owners, exp_avg, exp_avg_sq, step, m_views, v_views, step_views, published)

    def publish_live(self, optimizer: "BalancedAdamW") -> None:
        """The state of parameters that joined the plan's live set, put in the optimizer's
        state (O(P) only when the live set changed)."""
        live = self.plan.live
        if live is self._live_seen:
            return
        for i, (p, alive) in enumerate(zip(self.owners, live)):
            if alive and not self.published[i]:
                optimizer.state[p] = {"step": self.step_views[i], "exp_avg": self.m_views[i],
                                      "exp_avg_sq": self.v_views[i]}
                self.published[i] = True
        self._live_seen = live

    def intact(self, state) -> bool:
        """O(1): the first and last parameter's state still are this layout's tensors."""
        for i in (0, -1):
            st = state.get(self.owners[i])
            if not self.published[i]:
                if st:
                    return False
                continue
            if not st or st.get("exp_avg") is not self.m_views[i] or st.get("exp_avg_sq") is not self.v_views[i] \
                    or st.get("step") is not self.step_views[i]:
                return False
        return True

    def hyper_for(self, groups) -> torch.Tensor:
        """The [G, 5] device table, rewritten in place only when a group's values changed."""
        key = tuple((g["lr"], g["weight_decay"], *g["betas"], g["eps"]) for g in groups)
        if key != self._hyper_key:
            for g in groups:
                _check_hyper(g, "")
            # in place when the shape holds: a captured step reads the new values
            self._hyper = self.plan.hyper_table(key, self.exp_avg.device, out=self._hyper)
            self._hyper_key = key
        return self._hyper


def _picklable(value):
    """A DTensor whose local tensor is a view into a larger storage as a DTensor over a copy of
    it (torch.save refuses the view: "invalid python storage"); anything else as it is."""
    local = local_shard(value)
    if local is value or local.storage_offset() == 0:
        return value
    return like_param(value, local.clone())


def _segment_list(segments, num_params: int, num_segments: int) -> list[int]:
    """Segment ids as a Python list (so the parameters can be split by hyper-parameters)."""
    if segments is None:
        return [0] * num_params
    if isinstance(segments, str):
        if segments == "global":
            return [0] * num_params
        if segments == "tensor":
            return list(range(num_params))
        raise ValueError(f"segments must be None, 'global', 'tensor' or P ids, got {segments!r}")
    ids = segments.tolist() if isinstance(segments, torch.Tensor) else list(segments)
    if len(ids) != num_params:
        raise ValueError(f"segments has {len(ids)} ids for {num_params} parameters")
    for p, s in enumerate(ids):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"segments[{p}] = {s!r} is not an int")
        if not 0 <= s < num_segments:
            raise ValueError(f"segments[{p}] = {s} is out of range: weights has {num_segments} rows")
    return [int(i) for i in ids]
