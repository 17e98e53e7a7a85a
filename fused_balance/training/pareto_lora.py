"""ParetoLoRA: multi-objective LoRA training step on top of any optimizer.

Each step: every objective's gradient lands in a GradBank (one flat ``[K, N]`` buffer), one
``fb.pareto_combine`` call computes the per-segment Gram, the policy's weights and writes the
combination into ``p.grad``, then the wrapped optimizer steps (skipped, and counted, when a
gradient held NaN/Inf). With ``optimizer="fused_adamw"`` the combination is never materialised:
Gram -> weights -> ``fb.balanced_adamw_step``.

Segments (sets of tensors sharing one set of weights): ``"layer"`` (LoRA tensors grouped by the
transformer layer parsed from their names, everything outside a layer in one ``"other"``
segment), ``"tensor"``, ``"global"`` or a callable ``(name, param) -> hashable key``.
"""
from __future__ import annotations

import json
import re
from typing import Callable, Iterable, Mapping, Sequence

import torch

import fused_balance as fb
from fused_balance.training.bank import GradBank
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
    else:
        items = list(model_or_params)
        named = [(str(x[0]), x[1]) if isinstance(x, tuple) else (f"param.{i}", x)
                 for i, x in enumerate(items)]
    if not named:
        raise ValueError("no trainable parameters found")
    seen = set()
    for name, p in named:
        if not isinstance(p, torch.Tensor) or not p.requires_grad:
            raise ValueError(f"parameter {name!r} is not a tensor that requires grad")
        if id(p) in seen:
            raise ValueError(f"parameter {name!r} appears twice")
        seen.add(id(p))
    return named


class ParetoLoRA:
    """Balanced multi-objective steps for (LoRA) parameters.

    optimizer: a torch optimizer over (a superset of) the parameters; a callable
    ``params -> optimizer``; ``"fused_adamw"`` (a BalancedAdamW built from ``lr``,
    ``weight_decay``, ``betas``, ``eps``); a BalancedAdamW (fused path); or None (only
    ``backward``, for loops that step themselves, e.g. the Hugging Face Trainer).

    Trainable parameters outside the balanced set (when an explicit list is given) receive the
    plain sum of the objectives' gradients with ``fill="backward"`` and nothing with
    ``fill="batched"``.
    """

    def __init__(self, model_or_params, optimizer=None, policy: str = "pareto_lora",
                 segments: str | Callable = "layer", tau: float = 5.0, rescale: str | None = None,
                 objectives: Sequence[str] | None = None, backend: str | None = None, *,
                 fill: str = "backward", lr: float = 1e-3, weight_decay: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 record_history: bool = True, history_every: int = 1):
        if policy not in fb.POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose one of {fb.POLICIES}")
        self.named_params = _named(model_or_params)
        self.params = [p for _, p in self.named_params]
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
            optimizer = optimizer(self.params)  # a factory
        self.optimizer = optimizer
        self.fused = isinstance(optimizer, BalancedAdamW)
        if self.fused:  # grads must follow the optimizer's parameter order
            position = {id(p): i for i, p in enumerate(self.params)}
            try:
                self._fused_order = [position[id(p)] for p in optimizer.flat_params()]
            except KeyError:
                raise ValueError("the BalancedAdamW holds parameters ParetoLoRA does not balance") from None
        self.bank: GradBank | None = None
        self.step_count = 0
        self.skipped_steps = 0
        self._history: list[dict] = []
        self._scratch: list[torch.Tensor] | None = None

    # -- helpers ------------------------------------------------------------------------------
    @property
    def num_segments(self) -> int:
        return len(self.segment_names)

    def _loss_list(self, losses: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        if not isinstance(losses, Mapping) or not losses:
            raise ValueError("losses must be a non-empty dict {objective name: scalar loss}")
        if self.objectives is None:
            self.objectives = list(losses)
        if set(losses) != set(self.objectives):
            raise ValueError(f"losses have objectives {sorted(losses)}, expected {self.objectives}")
        if self.bank is None:
            self.bank = GradBank(self.params, len(self.objectives), mode=self.fill)
        return [losses[name] for name in self.objectives]

    def _record(self, losses, norms, cosines, weights, branch, found_inf, took_step):
        if not self.record_history or self.step_count % self.history_every:
            return
        self._history.append({
            "step": self.step_count, "losses": torch.stack([l.detach().reshape(()).float() for l in losses]),
            "norms": norms.detach(), "cosines": cosines.detach(), "weights": weights.detach(),
            "branch": branch.detach(), "found_inf": found_inf.detach(), "stepped": took_step})

    # -- the step -----------------------------------------------------------------------------
    def backward(self, losses: Mapping[str, torch.Tensor], *, accumulate: bool = True):
        """Per-objective gradients -> balanced combination in ``p.grad``. With ``accumulate``
        the combination is added to existing gradients (like ``loss.backward()``), otherwise it
        overwrites them. Returns the fb.ParetoResult (``found_inf``: nothing was written)."""
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
                                rescale=self.rescale, out=out, backend=self.backend)
        if out is self._scratch:
            ok = (~res.found_inf).to(out[0].dtype)  # on the device: no sync
            for p, d in zip(self.params, out):
                if p.grad is None:
                    p.grad = d * ok
                else:
                    p.grad.add_(d * ok)
        self._record(loss_list, res.norms, res.cosines, res.weights, res.branch, res.found_inf, None)
        self.step_count += 1
        return res

    def step(self, losses: Mapping[str, torch.Tensor]) -> bool:
        """One balanced optimizer step; returns False when it was skipped (NaN/Inf gradient)."""
        if self.optimizer is None:
            raise RuntimeError("ParetoLoRA was built without an optimizer: call backward() and step yourself")
        if self.fused:
            loss_list = self._loss_list(losses)
            self.bank.fill(loss_list)
            G = fb.gram(self.bank.grads, self.segment_ids, backend=self.backend)
            weights, branch = fb.policy_weights(G, self.policy, tau=self.tau, rescale=self.rescale)
            found_inf = ~torch.isfinite(G).all()
            grads = [[row[i] for i in self._fused_order] for row in self.bank.grads]
            took = self.optimizer.balanced_step(grads, weights,
                                                [self.segment_ids[i] for i in self._fused_order],
                                                skip=found_inf)
            norms, cosines = fb.gram_statistics(G)
            self._record(loss_list, norms, cosines, weights, branch, found_inf, took)
            self.step_count += 1
        else:
            recorded = len(self._history)
            res = self.backward(losses, accumulate=False)
            took = not bool(res.found_inf)
            if took:
                self.optimizer.step()
            if len(self._history) > recorded:
                self._history[-1]["stepped"] = took
        if not took:
            self.skipped_steps += 1
        return took

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
        branch [S], found_inf, stepped (None after a bare ``backward``). Tensors are moved to the CPU here, not during training."""
        for entry in self._history:
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                    entry[key] = value.cpu()
        return self._history

    def history_records(self) -> Iterable[dict]:
        """The history as JSON-ready dicts (one per step, one sub-dict per segment)."""
        names = self.objectives or []
        for e in self.history:
            segs = []
            for s, seg_name in enumerate(self.segment_names):
                rec = {"segment": seg_name,
                       "norms": dict(zip(names, e["norms"][s].tolist())),
                       "weights": dict(zip(names, e["weights"][s].tolist())),
                       "branch": fb.BRANCH_NAMES[int(e["branch"][s])]}
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
                "objectives": self.objectives, "fused": self.fused}

    def state_dict(self) -> dict:
        return {"settings": self._settings(), "step": self.step_count,
                "skipped_steps": self.skipped_steps,
                "history": [dict(e) for e in self.history],
                "optimizer": None if self.optimizer is None else self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        saved = state["settings"]
        mine = self._settings()
        for key in ("segment_names", "param_names", "fused"):
            if saved[key] != mine[key]:
                raise ValueError(f"checkpoint {key} {saved[key]!r} differ from this ParetoLoRA's {mine[key]!r}")
        if mine["objectives"] is not None and saved["objectives"] not in (None, mine["objectives"]):
            raise ValueError(f"checkpoint objectives {saved['objectives']} differ from {mine['objectives']}")
        self.policy, self.tau, self.rescale = saved["policy"], saved["tau"], saved["rescale"]
        self.objectives = saved["objectives"]
        self.step_count = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self._history = [dict(e) for e in state["history"]]
        if state.get("optimizer") is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
