"""ParetoLoRA: multi-objective LoRA training step on top of any optimizer.

Each step: every objective's gradient lands in a GradBank (one flat ``[K, N]`` buffer), one
``fb.pareto_combine`` call computes the per-segment Gram, the policy's weights and writes the
combination into ``p.grad``, then the wrapped optimizer steps (skipped, and counted, when a
gradient held NaN/Inf). With ``optimizer="fused_adamw"`` the combination is never materialised:
Gram -> weights -> ``fb.balanced_adamw_step``.

Distributed (``process_group=``): ``distributed="data"`` (each rank its own micro-batch: the
bank's ``[K, N]`` buffer is averaged over the ranks in ONE all-reduce, in place, then every rank
balances identically) or ``"sharded"`` (each rank holds a shard of every parameter, e.g. tensor
parallel or FSDP local shards: only the ``[S, K, K]`` Gram partials are all-reduced). Every rank
must call ``step``/``backward`` together, with the same objectives.

Segments (sets of tensors sharing one set of weights): ``"layer"`` (LoRA tensors grouped by the
transformer layer parsed from their names, everything outside a layer in one ``"other"``
segment), ``"tensor"``, ``"global"`` or a callable ``(name, param) -> hashable key``.
"""
from __future__ import annotations

import json
import re
from collections import deque
from typing import Callable, Iterable, Mapping, Sequence

import torch

import fused_balance as fb
from fused_balance.distributed import check_group
from fused_balance.policies import check_policy_args
from fused_balance.training.bank import GradBank, check_params
from fused_balance.training.optim import BalancedAdamW

__all__ = ["ParetoLoRA", "lora_parameters", "layer_key", "segment_ids_for"]

_LAYER = re.compile(r"(.*?(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+)(?:\.|$)")
_PEFT_PREFIX = "base_model.model."
OTHER = "other"


def lora_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable LoRA tensors (``lora_A``/``lora_B``/``lora_embedding_*``/DoRA magnitudes)
    and ``modules_to_save`` copies of a PEFT model, as (name, parameter) in model order."""
    return [(name, p) for name, p in model.named_parameters()
            if p.requires_grad and ("lora_" in name or "modules_to_save" in name)]


def layer_key(name: str) -> str:
    """``...model.layers.3.self_attn.q_proj.lora_A.default.weight`` -> ``model.layers.3``
    (the name up to the layer index, so an encoder's layer 3 and the LLM's layer 3 differ);
    names outside a numbered layer -> ``"other"``."""
    match = _LAYER.match(name)
    if match is None:
        return OTHER
    key = match.group(1)
    return key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key


def segment_ids_for(named_params: Sequence[tuple[str, torch.Tensor]],
                    segments: str | Callable = "layer") -> tuple[list[int], list[str]]:
    """(P segment ids, S segment names) for a segmentation rule; ids follow first appearance."""
    if segments == "global" or segments is None:
        return [0] * len(named_params), ["global"]
    if segments == "tensor":
        return list(range(len(named_params))), [n for n, _ in named_params]
    if segments == "layer":
        keyfn = lambda name, p: layer_key(name)  # noqa: E731
    elif callable(segments):
        keyfn = segments
    else:
        raise ValueError(f"segments must be 'layer', 'tensor', 'global' or a callable, got {segments!r}")
    ids, index = [], {}
    for name, p in named_params:
        key = keyfn(name, p)
        ids.append(index.setdefault(key, len(index)))
    return ids, [str(k) for k in index]


def _named(model_or_params) -> list[tuple[str, torch.Tensor]]:
    if isinstance(model_or_params, torch.nn.Module):
        named = lora_parameters(model_or_params)
        if not named:  # not a PEFT model: every trainable parameter
            named = [(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameter (all have requires_grad=False)")
    elif isinstance(model_or_params, (torch.Tensor, str, bytes, Mapping)) or model_or_params is None:
        raise TypeError("ParetoLoRA needs an nn.Module or a sequence of parameters / (name, "
                        f"parameter) pairs, got {type(model_or_params).__name__}")
    else:
        try:
            items = list(model_or_params)
        except TypeError:
            raise TypeError("ParetoLoRA needs an nn.Module or a sequence of parameters, got "
                            f"{type(model_or_params).__name__}") from None
        named = [(str(x[0]), x[1]) if isinstance(x, tuple) and len(x) == 2 else (f"param.{i}", x)
                 for i, x in enumerate(items)]
    check_params([p for _, p in named], "ParetoLoRA", names=[n for n, _ in named])
    return named


def _check_backend(backend, device) -> None:
    """Fail at construction, not halfway through the first step."""
    if backend not in (None, "auto") and backend not in fb.available_backends(device):
        raise ValueError(f"backend {backend!r} cannot run on {device.type} tensors here; available: "
                         f"{fb.available_backends(device)} (or None / 'auto')")


def _history_limit(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"history_limit must be None (unbounded) or an int >= 1, got {value!r}")
    return value


class ParetoLoRA:
    """Balanced multi-objective steps for (LoRA) parameters.

    optimizer: a torch optimizer over (a superset of) the parameters; a callable
    ``params -> optimizer``; ``"fused_adamw"`` (a BalancedAdamW built from ``lr``,
    ``weight_decay``, ``betas``, ``eps``); a BalancedAdamW (fused path); or None (only
    ``backward``, for loops that step themselves, e.g. the Hugging Face Trainer).

    Trainable parameters outside the balanced set (when an explicit list is given) receive the
    plain sum of the objectives' gradients with ``fill="backward"`` and nothing with
    ``fill="batched"``.

    ``process_group`` / ``distributed``: balance across ranks (see the module docstring); the
    optimizer then sees the same balanced gradient on every rank, so the ranks stay identical.

    ``history_limit``: the history keeps the last that many recorded steps (a ring buffer; None:
    all of them). Each entry holds a few [S, K] tensors on the training device until
    ``history`` is read, so an unbounded history grows with the run.

    Bad input (unknown or missing objectives, non-scalar losses, frozen or duplicate parameters,
    a loss on another device, ...) raises before anything is written: parameters, gradients,
    optimizer state, history and step counters stay as they were.
    """

    def __init__(self, model_or_params, optimizer=None, policy: str | Callable = "pareto_lora",
                 segments: str | Callable = "layer", tau: float = 5.0, rescale: str | None = None,
                 objectives: Sequence[str] | None = None, backend: str | None = None, *,
                 fill: str = "backward", lr: float = 1e-3, weight_decay: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 record_history: bool = True, history_every: int = 1,
                 history_limit: int | None = 10_000, process_group=None, distributed: str = "data"):
        check_policy_args(policy, tau, rescale)
        check_group(process_group, distributed)
        if backend is not None and not isinstance(backend, str):
            raise TypeError(f"backend must be a backend name or None, got {type(backend).__name__}")
        if fill not in ("backward", "batched"):
            raise ValueError(f"unknown fill mode {fill!r}; choose 'backward' or 'batched'")
        if objectives is not None:
            if isinstance(objectives, (str, bytes)) or not all(isinstance(o, str) for o in objectives):
                raise TypeError(f"objectives must be a sequence of names (str), got {objectives!r}")
            if not objectives or len(set(objectives)) != len(list(objectives)):
                raise ValueError(f"objectives must be distinct names, at least one: {objectives!r}")
        self.history_limit = _history_limit(history_limit)
        self.process_group, self.distributed = process_group, distributed
        self.named_params = _named(model_or_params)
        self.params = [p for _, p in self.named_params]
        _check_backend(backend, self.params[0].device)
        self.segment_ids, self.segment_names = segment_ids_for(self.named_params, segments)
        self.segments_rule = segments if isinstance(segments, str) else "callable"
        self.policy, self.tau, self.rescale = policy, float(tau), rescale
        self.backend, self.fill = backend, fill
        self.objectives = list(objectives) if objectives is not None else None
        self.record_history, self.history_every = record_history, max(1, int(history_every))
        if isinstance(optimizer, str):
            if optimizer != "fused_adamw":
                raise ValueError(f"optimizer string must be 'fused_adamw', got {optimizer!r}")
            optimizer = BalancedAdamW(self.params, lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay, backend=backend)
        elif optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            if not callable(optimizer):
                raise TypeError("optimizer must be a torch optimizer, a factory params -> optimizer, "
                                f"'fused_adamw' or None, got {type(optimizer).__name__}")
            optimizer = optimizer(self.params)  # a factory
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"the optimizer factory returned a {type(optimizer).__name__}, "
                                "not a torch optimizer")
        self.optimizer = optimizer
        self.fused = isinstance(optimizer, BalancedAdamW)
        if optimizer is not None:
            self._check_optimizer_holds_params(optimizer)
        if self.fused:  # grads must follow the optimizer's parameter order
            position = {id(p): i for i, p in enumerate(self.params)}
            try:
                self._fused_order = [position[id(p)] for p in optimizer.flat_params()]
            except KeyError:
                raise ValueError("the BalancedAdamW holds parameters ParetoLoRA does not balance") from None
            self._fused_segments = [self.segment_ids[i] for i in self._fused_order]
        self.bank: GradBank | None = None
        self.step_count = 0
        self.skipped_steps = 0
        self._history: deque = deque(maxlen=self.history_limit)
        self._history_on_device = 0  # trailing entries whose tensors still live on the device
        self._scratch: list[torch.Tensor] | None = None

    def _check_optimizer_holds_params(self, optimizer) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.named_params if id(p) not in held]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:3]) + (" ..." if len(missing) > 3 else "")
            raise ValueError(f"the optimizer does not hold {len(missing)} balanced parameter(s) "
                             f"({shown}): they would never be updated")

    # -- helpers ------------------------------------------------------------------------------
    @property
    def num_segments(self) -> int:
        return len(self.segment_names)

    def _loss_list(self, losses: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The losses in objective order, every one checked before any state changes."""
        if not isinstance(losses, Mapping):
            raise TypeError("losses must be a dict {objective name: scalar loss tensor}, got "
                            f"{type(losses).__name__}")
        if not losses:
            raise ValueError("losses is empty: expected {objective name: scalar loss tensor}")
        expected = self.objectives if self.objectives is not None else list(losses)
        if any(not isinstance(name, str) for name in losses):
            raise TypeError(f"objective names must be str, got {list(losses)!r}")
        missing = [name for name in expected if name not in losses]
        unknown = [name for name in losses if name not in expected]
        if missing or unknown:
            parts = ([f"missing objective(s) {missing}"] if missing else []) + \
                    ([f"unknown objective(s) {unknown}"] if unknown else [])
            raise ValueError(f"losses: {'; '.join(parts)} (this ParetoLoRA balances {expected})")
        bank = self.bank if self.bank is not None else GradBank(self.params, len(expected), mode=self.fill)
        loss_list = bank.check_losses([losses[name] for name in expected], names=expected)
        if not any(loss.requires_grad for loss in loss_list):
            raise ValueError("no loss requires grad (computed under torch.no_grad(), or detached?): "
                             "there is nothing to balance")
        self.objectives, self.bank = list(expected), bank
        return loss_list

    def _record(self, losses, norms, cosines, weights, branch, found_inf, took_step) -> dict | None:
        """Append this step's entry (every ``history_every`` steps); returns it, or None."""
        if not self.record_history or self.step_count % self.history_every:
            return None
        entry = {"step": self.step_count,
                 "losses": torch.stack([l.detach().reshape(()).float() for l in losses]),
                 "norms": norms.detach(), "cosines": cosines.detach(), "weights": weights.detach(),
                 "branch": branch.detach(), "found_inf": found_inf.detach(), "stepped": took_step}
        self._history.append(entry)  # the ring buffer drops the oldest beyond history_limit
        self._history_on_device += 1
        return entry

    # -- the step -----------------------------------------------------------------------------
    def backward(self, losses: Mapping[str, torch.Tensor], *, accumulate: bool = True):
        """Per-objective gradients -> balanced combination in ``p.grad``. With ``accumulate``
        the combination is added to existing gradients (like ``loss.backward()``), otherwise it
        overwrites them. Returns the fb.ParetoResult (``found_inf``: nothing was written)."""
        return self._backward(losses, accumulate)[0]

    def _backward(self, losses, accumulate: bool):
        loss_list = self._loss_list(losses)
        self.bank.fill(loss_list)
        if accumulate and any(p.grad is not None for p in self.params):
            if self._scratch is None:
                self._scratch = [torch.zeros_like(p) for p in self.params]
            out = self._scratch
        else:
            for p in self.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            out = [p.grad for p in self.params]
        res = fb.pareto_combine(self.bank.grads, self.segment_ids, policy=self.policy, tau=self.tau,
                                rescale=self.rescale, out=out, backend=self.backend,
                                process_group=self.process_group, distributed=self.distributed)
        if out is self._scratch:
            ok = (~res.found_inf).to(out[0].dtype)  # on the device: no sync
            for p, d in zip(self.params, out):
                if p.grad is None:
                    p.grad = d * ok
                else:
                    p.grad.add_(d * ok)
        entry = self._record(loss_list, res.norms, res.cosines, res.weights, res.branch, res.found_inf, None)
        self.step_count += 1
        return res, entry

    def step(self, losses: Mapping[str, torch.Tensor]) -> bool:
        """One balanced optimizer step; returns False when it was skipped (NaN/Inf gradient)."""
        if self.optimizer is None:
            raise RuntimeError("ParetoLoRA was built without an optimizer: call backward() and step yourself")
        if self.fused:
            loss_list = self._loss_list(losses)
            self.bank.fill(loss_list)
            # pareto_weights, not gram + policy_weights: it keeps the range rescue (tiny or huge
            # gradients) and raises found_inf only for a real NaN/Inf (then nothing is stepped).
            res = fb.pareto_weights(self.bank.grads, self.segment_ids, policy=self.policy,
                                    tau=self.tau, rescale=self.rescale, backend=self.backend,
                                    process_group=self.process_group, distributed=self.distributed)
            grads = [[row[i] for i in self._fused_order] for row in self.bank.grads]
            took = self.optimizer.balanced_step(grads, res.weights, self._fused_segments,
                                                skip=res.found_inf)
            self._record(loss_list, res.norms, res.cosines, res.weights, res.branch, res.found_inf, took)
            self.step_count += 1
        else:
            res, entry = self._backward(losses, accumulate=False)
            took = not bool(res.found_inf)
            if took:
                self.optimizer.step()
            if entry is not None:
                entry["stepped"] = took
        if not took:
            self.skipped_steps += 1
        return took

    def free_buffers(self) -> None:
        """Drop the [K, N] gradient bank and scratch space (allocated again by the next step),
        e.g. to give the memory back during evaluation."""
        self.bank = None
        self._scratch = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    # -- history ------------------------------------------------------------------------------
    @property
    def history(self) -> list[dict]:
        """Per recorded step: step, losses [K], norms [S,K], cosines [S,K,K], weights [S,K],
        branch [S], found_inf, stepped (None after a bare ``backward``); the last
        ``history_limit`` of them. Tensors are moved to the CPU here, not during training."""
        pending = min(self._history_on_device, len(self._history))
        for i in range(len(self._history) - pending, len(self._history)):
            entry = self._history[i]
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                    entry[key] = value.cpu()
        self._history_on_device = 0
        return list(self._history)

    def history_records(self) -> Iterable[dict]:
        """The history as JSON-ready dicts (one per step, one sub-dict per segment)."""
        names = self.objectives or []
        for e in self.history:
            segs = []
            for s, seg_name in enumerate(self.segment_names):
                rec = {"segment": seg_name,
                       "norms": dict(zip(names, e["norms"][s].tolist())),
                       "weights": dict(zip(names, e["weights"][s].tolist())),
                       "branch": fb.BRANCH_NAMES.get(int(e["branch"][s]), str(int(e["branch"][s])))}
                if len(names) == 2:
                    rec["cosine"] = float(e["cosines"][s, 0, 1])
                else:
                    rec["cosines"] = e["cosines"][s].tolist()
                segs.append(rec)
            yield {"step": e["step"], "losses": dict(zip(names, e["losses"].tolist())),
                   "found_inf": bool(e["found_inf"]), "stepped": e["stepped"], "segments": segs}

    def export_history(self, path) -> None:
        with open(path, "w") as f:
            for record in self.history_records():
                f.write(json.dumps(record) + "\n")

    # -- checkpoints --------------------------------------------------------------------------
    def _settings(self) -> dict:
        return {"policy": self.policy, "tau": self.tau, "rescale": self.rescale,
                "segments": self.segments_rule, "segment_names": list(self.segment_names),
                "param_names": [n for n, _ in self.named_params], "fill": self.fill,
                "objectives": self.objectives, "fused": self.fused, "history_every": self.history_every}

    def state_dict(self) -> dict:
        return {"settings": self._settings(), "step": self.step_count,
                "skipped_steps": self.skipped_steps,
                "history": [dict(e) for e in self.history],
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore settings, counters, history and the optimizer. Everything is checked first
        (and the optimizer, which checks its own state, loaded first): a mismatch changes nothing."""
        if not isinstance(state, Mapping) or not {"settings", "step", "skipped_steps", "history"} <= set(state):
            raise ValueError("not a ParetoLoRA state: expected a dict with settings, step, "
                             "skipped_steps and history")
        saved = state["settings"]
        mine = self._settings()
        for key in ("segment_names", "param_names", "fused"):
            if saved.get(key) != mine[key]:
                raise ValueError(f"checkpoint {key} {saved.get(key)!r} differ from this ParetoLoRA's {mine[key]!r}")
        if mine["objectives"] is not None and saved["objectives"] not in (None, mine["objectives"]):
            raise ValueError(f"checkpoint objectives {saved['objectives']} differ from {mine['objectives']}")
        check_policy_args(saved["policy"], saved["tau"], saved["rescale"])
        history = deque((dict(e) for e in state["history"]), maxlen=self.history_limit)
        if state.get("optimizer") is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.policy, self.tau, self.rescale = saved["policy"], saved["tau"], saved["rescale"]
        self.objectives = saved["objectives"]
        self.history_every = int(saved.get("history_every", self.history_every))
        self.step_count = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self._history = history
        self._history_on_device = len(history)
