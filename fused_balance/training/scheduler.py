r"""BalanceScheduler: balance the learning of model components (e.g. feature encoder vs. LLM).

After CoMMIT (Wu et al., 2024: a learning-balance coefficient between the feature encoder and the
LLM drives their learning rates); the exact formula here is ours.

Components c = 1..C are sets of parameters, each living in its own optimizer param group(s)
(build them with ``BalanceScheduler.param_groups``). Components given as modules need
``model=``: every trainable parameter of the model must be in a component or in ``rest=``
(parameters trained at the base learning rate, outside the balance, e.g. a projector), else
ValueError naming those left out. Call ``scheduler.step()`` right after
``optimizer.step()`` (before ``zero_grad``); the scheduler snapshots the parameters in an
optimizer step pre-hook, so it knows each component's update Δ_c = θ_c,t − θ_c,t−1.

Per step t:

1. Statistics, one fused ``fb.gram`` call over the two "objectives" [g, Δ] with segments =
   component id (g: the gradient in ``p.grad`` that produced the update):
   G[c] = [[|g_c|², <g_c, Δ_c>], [<g_c, Δ_c>, |Δ_c|²]].
2. Learning contribution of c, the first-order loss decrease its update alone causes:
   s_c = −<g_c, Δ_c>.
   Exact mode (``exact_every = M`` and a ``probe_fn``): every M steps s_c is replaced by
   KL_c = KL(p_{θ_{t−1} + Δ_c} ‖ p_{θ_{t−1}}), the mean KL divergence of the output distribution
   on a fixed probe batch when only component c's update is applied, brought to the
   first-order scale: s_c = KL_c · Σ_j max(s_j, 0) / Σ_j KL_j (s_j: this step's first-order
   scores; the running average's total when that is <= 0). The KL ranking then moves κ with
   the same weight (1 − β) as any step, instead of being lost in the units.
3. Smoothing against noise and oscillation: an EMA of the raw contributions,
   ŝ_c ← β ŝ_c + (1 − β) s_c (ŝ starts at the first s), and the shares
   σ̄_c = max(ŝ_c, 0) / Σ_j max(ŝ_j, 0) (no update while every ŝ_j <= 0). Averaging the
   contributions before normalising means noisy steps near convergence, where every s_c is
   tiny, barely move the shares. The learning-balance coefficient of two components is
   κ_t = σ̄_1 = ŝ_enc / (ŝ_enc + ŝ_llm) ∈ [0, 1]; balance means σ̄_c = τ_c (targets, default 1/C).
4. Multipliers, integral control in log space with a dead band δ, damped by a confidence
   ρ_t = Σ_j max(ŝ_j, 0) / max_{t' <= t} Σ_j max(ŝ_j, 0) ∈ (0, 1] (how much learning is still
   happening compared with its peak: near convergence the shares are noise and must not wind
   the multipliers up):
   e_c = τ_c − σ̄_c if |τ_c − σ̄_c| > δ else 0,
   log m_c ← clip(log m_c + η ρ_t e_c, log m_min, log m_max),
   so the lagging component (σ̄_c < τ_c) has its learning rate raised, the leading one lowered.
5. Learning rates: lr_g = base_lr_g · m_c for every param group g of component c. A learning rate
   changed by someone else since the scheduler last wrote it (another LR scheduler) becomes the
   new base, so the multipliers compose with schedules that recompute the rate from their own
   base each step (LambdaLR, OneCycleLR, closed-form cosine) stepped before this one; chainable
   schedules that scale the current rate (StepLR, ExponentialLR) would compound the multiplier.

Optional auxiliary loss (``aux_weight`` λ > 0), scaled by the lag
ℓ_t = max_c max(0, (τ_c − σ̄_c) / τ_c) ∈ [0, 1] (exactly zero once balanced), a mean over the masked
positions, in one of two forms (``aux``):
- "entropy" (default): ``auxiliary_loss(logits, mask)`` = −λ · ℓ_t · H̄(softmax(logits)). While a
  component lags, it rewards keeping the output distribution from collapsing (a peaked softmax
  makes the cross-entropy gradient p − y vanish), so gradient keeps flowing into the lagging one.
- "distribution_change", our reading of CoMMIT's label-free auxiliary loss that pushes the
  components to change the generation distribution: ``auxiliary_loss(logits, mask,
  previous_logits)`` = −λ · ℓ_t · mean KL(softmax(previous_logits) ‖ softmax(logits)), with
  previous_logits = ``previous_outputs(lambda: model(batch).logits)`` (called before the forward
  with grad), the same forward at θ_{t−1} = θ_t − Δ (the components' parameters before the last
  step ``step()`` measured; ``rest`` stays at θ_t): one extra no-grad forward per step. Its gradient per position, p_θ − p_{t−1},
  moves the output distribution further from where the last step left it ("keep it moving"); it
  reaches every component through the logits, not the lagging one alone. Without a measured Δ
  (before the first step, after ``load_state_dict``, between ``optimizer.step()`` and ``step()``)
  ``previous_outputs`` runs at θ_t, and the term and its gradient are zero (to rounding).

Normalisation (``normalise``): "none" (default) counts s_c as above; "parameters" divides every
s_c (first-order and KL alike) by component c's trainable parameter count n_c, so κ compares the
learning per parameter. Under Adam −<g_c, Δ_c> ≈ lr·‖g_c‖₁ grows with n_c: a side holding the
full-rank tensors (projector, embeddings, head) next to the other side's LoRA factors otherwise
takes most of the share for its size alone. On the accepted encoder+LLM testbed (README) no
variant (raw, per parameter, KL window) reached constant rates' accuracy sooner, so the defaults
stay the simplest ("none", "first_order", L = 1) and constant rates remain the recommendation.

Measure (``measure``) and window (``update_every`` = L): "first_order" (default) is step 2 above;
"kl" takes s_c = KL_c (as in exact mode, unscaled) at every step, so κ is the ratio of the
components' changes of the output distribution on ``probe_fn``'s batch (pass a closure over the
current training batch for the generation distribution on the training data). With L > 1 the
contributions of L steps are averaged and enter the running average once, at the window's end,
where the multipliers (and rates) move; between, the rates stay. L = 1 is step 3 as written.

Defaults: β = 0.9, η = 0.1, δ = 0.05, m ∈ [0.25, 8]. ``history`` keeps the last
``history_limit`` (default 10 000) step records.
"""
from __future__ import annotations

import contextlib
import math
from collections import deque
from typing import Callable, Mapping, Sequence

import torch

import fused_balance as fb
from fused_balance._validate import check_real
from fused_balance.training.history import check_history_limit

__all__ = ["BalanceScheduler"]

# How a component's contribution is counted: as it is ("none"), or per trainable parameter
# ("parameters": a side holding more parameters, e.g. full-rank embeddings and a head next to
# LoRA factors, does not take a larger share for its count alone; under Adam, where
# −<g, Δ> ≈ lr·‖g‖₁, the raw share grows with the parameter count).
NORMALISATIONS = ("none", "parameters")
# What counts as a component's learning: the first-order loss decrease −<g_c, Δ_c> ("first_order",
# with exact KL steps every ``exact_every``), or, every step, the change its update alone causes
# in the output distribution on the probe batch, KL(p_{θ + Δ_c} ‖ p_θ) ("kl"; C + 1 forward passes
# of ``probe_fn`` per step, e.g. on the current training batch).
MEASURES = ("first_order", "kl")
# The auxiliary loss's form (module docstring): reward the output entropy, or the change of the
# output distribution since the parameters before the last step.
AUX_FORMS = ("entropy", "distribution_change")


def _params_of(component, name: str = "component") -> list[torch.Tensor]:
    if isinstance(component, torch.nn.Module):
        return [p for p in component.parameters() if p.requires_grad]
    if isinstance(component, (torch.Tensor, str, bytes, Mapping)):
        raise TypeError(f"component {name!r} must be an nn.Module or a sequence of parameters, got "
                        f"{type(component).__name__}")
    try:
        return list(component)
    except TypeError:
        raise TypeError(f"component {name!r} must be an nn.Module or a sequence of parameters, got "
                        f"{type(component).__name__}") from None


def _check_coverage(components, component_params, model, rest, optimizer=None) -> list[torch.Tensor]:
    """The ``rest`` parameters, after checking that components given as modules leave no
    trainable parameter behind: of ``model`` when given; else (constructor) of ``optimizer``;
    building groups from modules without ``model`` raises (the left-outs would be in no group
    and never trained, without a word)."""
    rest_params = [] if rest is None else _params_of(rest, "rest")
    covered = {id(p) for ps in component_params.values() for p in ps}
    if any(id(p) in covered for p in rest_params):
        raise ValueError("a parameter of rest= also belongs to a component")
    covered |= {id(p) for p in rest_params}
    modules = [n for n, c in components.items() if isinstance(c, torch.nn.Module)]
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        left = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
    elif not modules:
        return rest_params
    elif optimizer is None:
        raise ValueError(f"components {modules} are given as modules: pass model= (the whole "
                         "model) so that every trainable parameter is checked to be in a "
                         "component or in rest=; or give the components as parameter lists")
    else:
        left = [f"param group {i} parameter {j}" for i, group in enumerate(optimizer.param_groups)
                for j, p in enumerate(group["params"]) if p.requires_grad and id(p) not in covered]
    if left:
        shown = ", ".join(left[:5]) + (f", ... ({len(left)} in all)" if len(left) > 5 else "")
        raise ValueError(f"trainable parameters outside every component: {shown}. Add them to a "
                         "component, or pass rest=[...] to train them at the base learning "
                         "rate outside the balance")
    return rest_params




class BalanceScheduler:
    def __init__(self, optimizer: torch.optim.Optimizer,
                 components: Mapping[str, Sequence[torch.Tensor] | torch.nn.Module], *,
                 target: Mapping[str, float] | None = None, beta: float = 0.9, eta: float = 0.1,
                 dead_band: float = 0.05, m_min: float = 0.25, m_max: float = 8.0,
                 exact_every: int = 0, probe_fn: Callable[[], torch.Tensor] | None = None,
                 aux_weight: float = 0.0, backend: str | None = None,
                 history_limit: int | None = 10_000, model: torch.nn.Module | None = None,
                 rest: Sequence[torch.Tensor] | torch.nn.Module | None = None, normalise: str = "none",
                 measure: str = "first_order", update_every: int = 1, aux: str = "entropy"):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        from fused_balance.training.optim import BalancedAdamW
        if isinstance(optimizer, BalancedAdamW):
            raise ValueError("BalanceScheduler reads each component's .grad and update, which the fused "
                             "BalancedAdamW path never writes (it would silently do nothing): use a torch "
                             "optimizer (e.g. torch.optim.AdamW over BalanceScheduler.param_groups(...)) "
                             "with ParetoLoRA")
        if not isinstance(components, Mapping):
            raise TypeError("components must be a dict {name: module or parameters}, got "
                            f"{type(components).__name__}")
        if len(components) < 2:
            raise ValueError("BalanceScheduler needs at least two components")
        beta, eta, dead_band = check_real(beta, "beta"), check_real(eta, "eta"), check_real(dead_band, "dead_band")
        m_min, m_max = check_real(m_min, "m_min"), check_real(m_max, "m_max")
        aux_weight = check_real(aux_weight, "aux_weight")
        if not (0.0 <= beta < 1.0) or eta < 0 or dead_band < 0 or not (0 < m_min <= 1.0 <= m_max):
            raise ValueError("need 0 <= beta < 1, eta >= 0, dead_band >= 0, 0 < m_min <= 1 <= m_max")
        if aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {aux_weight}")
        if isinstance(exact_every, bool) or not isinstance(exact_every, int) or exact_every < 0:
            raise TypeError(f"exact_every must be an int >= 0, got {exact_every!r}")
        if exact_every and probe_fn is None:
            raise ValueError("exact_every needs a probe_fn() returning logits on a fixed probe batch")
        if measure not in MEASURES:
            raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
        if measure == "kl" and probe_fn is None:
            raise ValueError('measure="kl" needs a probe_fn() returning logits (e.g. on the current training batch)')
        if measure == "kl" and exact_every:
            raise ValueError('measure="kl" measures KL every step already; leave exact_every at 0')
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise TypeError(f"update_every must be an int >= 1, got {update_every!r}")
        if probe_fn is not None and not callable(probe_fn):
            raise TypeError(f"probe_fn must be callable, got {type(probe_fn).__name__}")
        check_history_limit(history_limit)
        if normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {NORMALISATIONS}, got {normalise!r}")
        if not isinstance(aux, str) or aux not in AUX_FORMS:
            raise ValueError(f"aux must be one of {AUX_FORMS}, got {aux!r}")
        self.optimizer = optimizer
        self.names = list(components)
        if any(not isinstance(n, str) for n in self.names):
            raise TypeError(f"component names must be str, got {self.names!r}")
        C = len(self.names)
        self.component_params = {n: _params_of(components[n], n) for n in self.names}
        owner: dict[int, int] = {}
        device = None
        for c, n in enumerate(self.names):
            if not self.component_params[n]:
                raise ValueError(f"component {n!r} has no trainable parameter")
            for j, p in enumerate(self.component_params[n]):
                label = f"component {n!r} parameter {j}"
                if not isinstance(p, torch.Tensor):
                    raise TypeError(f"{label} is a {type(p).__name__}, not a tensor")
                if not p.requires_grad:
                    raise ValueError(f"{label} does not require grad (frozen): it is never updated, "
                                     "leave it out of the component")
                if id(p) in owner:
                    other = self.names[owner[id(p)]]
                    raise ValueError(f"{label} appears twice" if other == n else
                                     f"a parameter belongs to both {other!r} and {n!r}")
                owner[id(p)] = c
                device = device or p.device
                if p.device != device:
                    raise ValueError(f"{label} is on {p.device} but the others are on {device}: the "
                                     "fused statistics need every component on one device")
        rest_params = _check_coverage(components, self.component_params, model, rest, optimizer)
        for p in rest_params:
            owner.setdefault(id(p), None)
        # Param group -> component (every group's parameters must belong to a single component).
        self.group_component: list[int | None] = []
        in_optimizer = set()
        for i, group in enumerate(optimizer.param_groups):
            cs = {owner.get(id(p)) for p in group["params"]}  # None: rest, not balanced
            in_optimizer.update(id(p) for p in group["params"])
            if len(cs) > 1:
                raise ValueError(f"optimizer param group {i} mixes components {cs}; build the groups "
                                 "with BalanceScheduler.param_groups(components, lr=...)")
            self.group_component.append(cs.pop() if cs else None)
        missing = [n for n in self.names if any(id(p) not in in_optimizer for p in self.component_params[n])]
        if any(id(p) not in in_optimizer for p in rest_params):
            missing.append("rest")
        if missing:
            raise ValueError(f"components {missing} have parameters the optimizer does not hold")
        tgt = dict(target) if target is not None else {n: 1.0 / C for n in self.names}
        absent = [n for n in self.names if n not in tgt]
        unknown = [n for n in tgt if n not in self.names]
        if absent or unknown:
            raise ValueError(f"target needs one share per component {self.names}: "
                             f"missing {absent}, unknown {unknown}")
        for n, v in tgt.items():
            if check_real(v, f"target[{n!r}]") <= 0:
                raise ValueError(f"target[{n!r}] = {v} must be > 0")
        total = sum(tgt.values())
        self.target = [tgt[n] / total for n in self.names]
        self.beta, self.eta, self.dead_band = float(beta), float(eta), float(dead_band)
        self.m_min, self.m_max = float(m_min), float(m_max)
        self.exact_every, self.probe_fn = int(exact_every), probe_fn
        self.aux_weight, self.aux, self.backend = float(aux_weight), aux, backend
        self.normalise, self.measure, self.update_every = normalise, measure, int(update_every)
        self.params = [p for n in self.names for p in self.component_params[n]]
        self._counts = [sum(p.numel() for p in self.component_params[n]) for n in self.names]
        self.segment_ids = [c for c, n in enumerate(self.names) for _ in self.component_params[n]]
        self.log_multipliers = [0.0] * C
        self.scores_ema: list[float] | None = None
        self.window: list[float] = [0.0] * C  # sum of the finite contributions since the last update
        self.window_steps = 0
        self.shares_ema: list[float] | None = None
        self.peak_total = 0.0
        self.step_count = 0
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self._written = list(self.base_lrs)
        self.history_limit = history_limit
        self.history: deque = deque(maxlen=history_limit)  # one record per step, the last history_limit
        self._snapshot: list[torch.Tensor] | None = None
        self._snapshot_fresh = False
        self._delta_ready = False  # the snapshot buffer holds Δ of the last measured step
        self._hook = optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.snapshot())

    @staticmethod
    def param_groups(components: Mapping[str, Sequence[torch.Tensor] | torch.nn.Module], *,
                     model: torch.nn.Module | None = None,
                     rest: Sequence[torch.Tensor] | torch.nn.Module | None = None,
                     **group_options) -> list[dict]:
        """Optimizer param groups, one per component (``group_options`` apply to all, and
        ``{name: {...}}`` entries in it override per component), plus one group (``component``
        None) for ``rest``: parameters trained at the base learning rate, outside the balance.
        With components given as modules, ``model`` is required and every trainable parameter
        of it must be in a component or in ``rest`` (else ValueError naming those left out:
        a parameter outside every group would never be trained)."""
        rest_params = _check_coverage(components, {n: _params_of(c, n) for n, c in components.items()},
                                      model, rest)
        groups = []
        common = {k: v for k, v in group_options.items() if k not in components}
        for name, comp in components.items():
            per = group_options.get(name, {}) if isinstance(group_options.get(name), dict) else {}
            groups.append({"params": _params_of(comp), "component": name, **common, **per})
        if rest_params:
            groups.append({"params": rest_params, "component": None, **common})
        return groups

    def close(self) -> None:
        """Detach the optimizer hook."""
        self._hook.remove()

    # -- per-step ---------------------------------------------------------------------------
    @torch.no_grad()
    def snapshot(self) -> None:
        """Remember θ before the optimizer step (called by the pre-hook; call it yourself before
        an update that does not go through ``optimizer.step()``)."""
        if self._snapshot is None:
            self._snapshot = [p.detach().clone() for p in self.params]
        else:
            for buf, p in zip(self._snapshot, self.params):
                buf.copy_(p)
        self._snapshot_fresh, self._delta_ready = True, False

    @property
    def multipliers(self) -> dict[str, float]:
        return {n: math.exp(lm) for n, lm in zip(self.names, self.log_multipliers)}

    @property
    def kappa(self) -> float | None:
        """Learning-balance coefficient: the smoothed share of the first component."""
        return None if self.shares_ema is None else self.shares_ema[0]

    @torch.no_grad()
    def step(self) -> dict | None:
        """Update the balance statistics and the learning rates after ``optimizer.step()``.
        Returns this step's record (None when no update was observed since the last call)."""
        if not self._snapshot_fresh:
            self._apply_lrs()
            return None
        self._snapshot_fresh = False
        deltas = self._snapshot
        for d, p in zip(deltas, self.params):
            torch.sub(p, d, out=d)  # the snapshot buffer now holds Δ = θ_t − θ_{t−1}
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        dtype = grads[0].dtype
        if any(t.dtype != dtype for t in grads + deltas):
            grads = [g.float() for g in grads]
            deltas_in = [d.float() for d in deltas]
        else:
            deltas_in = deltas
        G = fb.gram([grads, deltas_in], self.segment_ids, backend=self.backend).double().cpu()
        scores = self._normalised((-G[:, 0, 1]).tolist())
        source = "first_order"
        self.step_count += 1
        first_order = scores
        if self.measure == "kl":
            scores, source = self._normalised(self._kl_scores(deltas)), "kl"
        elif self.exact_every and self.step_count % self.exact_every == 0:
            scores = self._kl_on_first_order_scale(self._normalised(self._kl_scores(deltas)), scores)
            source = "kl"
        record = {"step": self.step_count, "scores": scores, "source": source,
                  "first_order_scores": first_order,
                  "grad_norms": G[:, 0, 0].clamp(min=0).sqrt().tolist(),
                  "update_norms": G[:, 1, 1].clamp(min=0).sqrt().tolist()}
        if all(math.isfinite(x) for x in scores):
            self.window = [w + x for w, x in zip(self.window, scores)]
            self.window_steps += 1
        update = self.step_count % self.update_every == 0  # the rates move at the window's end
        record["updated"] = update
        if update and self.window_steps:  # the window's mean contributions enter the running average
            mean = [w / self.window_steps for w in self.window]
            self.window, self.window_steps = [0.0] * len(self.names), 0
            if self.scores_ema is None:
                self.scores_ema = mean
            else:
                self.scores_ema = [self.beta * e + (1.0 - self.beta) * x
                                   for e, x in zip(self.scores_ema, mean)]
        positive = [max(0.0, e) for e in (self.scores_ema or [])]
        total = sum(positive)
        if update and total > 0:
            self.shares_ema = [x / total for x in positive]
            self.peak_total = max(self.peak_total, total)
            confidence = total / self.peak_total
            record["confidence"] = confidence
            for c, (tau, ema) in enumerate(zip(self.target, self.shares_ema)):
                err = tau - ema
                if abs(err) > self.dead_band:
                    step = self.eta * confidence * err
                    self.log_multipliers[c] = min(max(self.log_multipliers[c] + step,
                                                      math.log(self.m_min)), math.log(self.m_max))
        record["shares_ema"] = None if self.shares_ema is None else list(self.shares_ema)
        record["kappa"] = self.kappa
        record["multipliers"] = [math.exp(lm) for lm in self.log_multipliers]
        self._apply_lrs()
        record["lrs"] = list(self._written)
        self.history.append(record)
        self._delta_ready = True
        return record

    def _normalised(self, scores: list[float]) -> list[float]:
        """The contributions as ``normalise`` says: as they are, or per trainable parameter."""
        if self.normalise == "parameters":
            return [x / n for x, n in zip(scores, self._counts)]
        return scores

    def _apply_lrs(self) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            c = self.group_component[i]
            if float(group["lr"]) != self._written[i]:  # changed elsewhere: the new base
                self.base_lrs[i] = float(group["lr"])
            lr = self.base_lrs[i] * (1.0 if c is None else math.exp(self.log_multipliers[c]))
            group["lr"] = lr
            self._written[i] = lr

    def _kl_on_first_order_scale(self, kl: list[float], first_order: list[float]) -> list[float]:
        """KL scores rescaled to this step's first-order total (or, when that is <= 0, the
        running average's): the KL ranking and shares, in the units of the running average.
        KL divergences (~1e-6..1e-4) and loss decreases (~1e-3..1e-2) are different units;
        averaged raw, a KL step would only shrink every average alike and leave κ unmoved."""
        total_kl = sum(kl)
        scale = sum(max(0.0, x) for x in first_order) or sum(max(0.0, e) for e in (self.scores_ema or []))
        if total_kl <= 0 or not math.isfinite(total_kl) or scale <= 0:
            return kl
        return [x * scale / total_kl for x in kl]

    @contextlib.contextmanager
    def _previous_parameters(self, deltas: list[torch.Tensor] | None):
        """Under no_grad: the components' parameters at θ − Δ inside the block (untouched when
        deltas is None), bitwise θ again after it, also on error. Written in place, not by
        swapping ``.data``: sharded wrappers (FSDP2) read the parameters' own storage."""
        current = [] if deltas is None else [p.detach().clone() for p in self.params]
        try:
            for p, d in zip(self.params, deltas or ()):
                p.sub_(d)  # θ_{t-1} (to rounding)
            yield
        finally:
            for p, saved in zip(self.params, current):
                p.copy_(saved)  # bitwise back to θ_t

    def previous_outputs(self, fn: Callable[[], torch.Tensor]):
        """``fn()`` (e.g. ``lambda: model(batch).logits``) under no_grad at θ_{t−1} = θ_t − Δ, the
        components' parameters before the last step ``step()`` measured; its result detached, the
        parameters bitwise θ_t again afterwards (also when fn raises). Without a measured Δ (before
        the first step, after ``load_state_dict``, between ``optimizer.step()`` and ``step()``) fn
        runs at θ_t. For ``auxiliary_loss(..., previous_logits=)`` with aux="distribution_change".
        Call it before the forward you backpropagate through: it writes the parameters in place,
        and autograd refuses a graph whose saved parameters were written since."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        with torch.no_grad(), self._previous_parameters(self._snapshot if self._delta_ready else None):
            out = fn()
            return out.detach() if isinstance(out, torch.Tensor) else out

    def _kl_scores(self, deltas) -> list[float]:
        """KL(p_{θ_prev + Δ_c} ‖ p_{θ_prev}) on the probe batch, per component c."""
        with self._previous_parameters(deltas):
            ref = torch.log_softmax(self.probe_fn().float(), dim=-1)
            scores = []
            for c in range(len(self.names)):
                for p, d, cid in zip(self.params, deltas, self.segment_ids):
                    if cid == c:
                        p.add_(d)
                moved = torch.log_softmax(self.probe_fn().float(), dim=-1)
                kl = (moved.exp() * (moved - ref)).sum(-1).mean()
                scores.append(max(0.0, float(kl)))
                for p, d, cid in zip(self.params, deltas, self.segment_ids):
                    if cid == c:
                        p.sub_(d)
            return scores

    # -- auxiliary loss -----------------------------------------------------------------------
    def lag(self) -> float:
        """How far the most lagging component is below its target share, relative, in [0, 1]."""
        if self.shares_ema is None:
            return 0.0
        return max(max(0.0, (t - e) / t) for t, e in zip(self.target, self.shares_ema))

    def auxiliary_loss(self, logits: torch.Tensor, mask: torch.Tensor | None = None,
                       previous_logits: torch.Tensor | None = None) -> torch.Tensor:
        """The auxiliary loss over the positions in ``mask`` (module docstring), in float32, cast
        to logits.dtype: aux="entropy": −aux_weight · lag · mean entropy of softmax(logits);
        aux="distribution_change": −aux_weight · lag · mean KL(softmax(previous_logits) ‖
        softmax(logits)), previous_logits (detached) from ``previous_outputs``. A zero tensor
        when aux_weight · lag is 0 or no position is masked."""
        if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point or logits.dim() < 1:
            raise TypeError("logits must be a floating tensor [..., vocab]")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
                raise TypeError("mask must be a bool tensor of logits.shape[:-1]")
            if mask.shape != logits.shape[:-1] or mask.device != logits.device:
                raise ValueError(f"mask has shape {tuple(mask.shape)} on {mask.device}, expected "
                                 f"{tuple(logits.shape[:-1])} on {logits.device}")
        if self.aux == "entropy" and previous_logits is not None:
            raise ValueError('previous_logits belongs to aux="distribution_change"; this scheduler has aux="entropy"')
        if self.aux == "distribution_change":
            if previous_logits is None:
                raise ValueError('aux="distribution_change" needs previous_logits, the same forward at the '
                                 "parameters before the last step: previous_logits = "
                                 "scheduler.previous_outputs(lambda: model(batch).logits)")
            if not isinstance(previous_logits, torch.Tensor) or not previous_logits.dtype.is_floating_point:
                raise TypeError("previous_logits must be a floating tensor of logits' shape")
            if previous_logits.shape != logits.shape or previous_logits.device != logits.device:
                raise ValueError(f"previous_logits has shape {tuple(previous_logits.shape)} on "
                                 f"{previous_logits.device}, expected {tuple(logits.shape)} on {logits.device}")
        weight = self.aux_weight * self.lag()
        if weight == 0.0:
            return logits.new_zeros(())
        logp = torch.log_softmax(logits.float(), dim=-1)
        if self.aux == "entropy":
            per_position = -(logp.exp() * logp).sum(-1)
        else:  # KL(p_prev ‖ p_θ): its gradient p_θ − p_prev moves p_θ away from p_prev
            previous = torch.log_softmax(previous_logits.detach().float(), dim=-1)
            per_position = (previous.exp() * (previous - logp)).sum(-1)
        if mask is not None:
            per_position = per_position[mask]
        if per_position.numel() == 0:
            return logits.new_zeros(())
        return (-weight * per_position.mean()).to(logits.dtype)

    # -- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"names": list(self.names), "target": list(self.target), "beta": self.beta,
                "eta": self.eta, "dead_band": self.dead_band, "m_min": self.m_min,
                "m_max": self.m_max, "exact_every": self.exact_every, "aux_weight": self.aux_weight,
                "normalise": self.normalise, "measure": self.measure, "update_every": self.update_every,
                "aux": self.aux,
                "window": list(self.window), "window_steps": self.window_steps,
                "log_multipliers": list(self.log_multipliers),
                "scores_ema": None if self.scores_ema is None else list(self.scores_ema),
                "shares_ema": None if self.shares_ema is None else list(self.shares_ema),
                "peak_total": self.peak_total, "step": self.step_count, "base_lrs": list(self.base_lrs),
                "written": list(self._written), "history": [dict(h) for h in self.history]}

    _STATE_KEYS = ("names", "target", "beta", "eta", "dead_band", "m_min", "m_max", "exact_every",
                   "aux_weight", "log_multipliers", "scores_ema", "shares_ema", "peak_total", "step",
                   "base_lrs", "written", "history")

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict; everything is checked first, so a mismatch changes nothing."""
        if not isinstance(state, Mapping):
            raise TypeError(f"a BalanceScheduler state must be a dict, got {type(state).__name__}")
        absent = [k for k in self._STATE_KEYS if k not in state]
        if absent:
            raise ValueError(f"not a BalanceScheduler state: missing {absent}")
        if state["names"] != self.names:
            raise ValueError(f"checkpoint components {state['names']} differ from {self.names}")
        if len(state["base_lrs"]) != len(self.optimizer.param_groups) or \
                len(state["written"]) != len(self.optimizer.param_groups):
            raise ValueError("checkpoint has a different number of optimizer param groups")
        C = len(self.names)
        for key in ("target", "log_multipliers"):
            if len(state[key]) != C:
                raise ValueError(f"checkpoint {key} has {len(state[key])} entries for {C} components")
        if state["exact_every"] and self.probe_fn is None:
            raise ValueError("checkpoint uses exact_every but this scheduler has no probe_fn")
        normalise = state.get("normalise", "none")  # states from before the option: raw contributions
        if normalise not in NORMALISATIONS:
            raise ValueError(f"checkpoint normalise {normalise!r} is not one of {NORMALISATIONS}")
        measure, update_every = state.get("measure", "first_order"), state.get("update_every", 1)
        if measure not in MEASURES or (measure == "kl" and self.probe_fn is None):
            raise ValueError(f"checkpoint measure {measure!r} needs one of {MEASURES} (and 'kl' a probe_fn)")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ValueError(f"checkpoint update_every {update_every!r} is not an int >= 1")
        window = state.get("window", [0.0] * C)
        if len(window) != C:
            raise ValueError(f"checkpoint window has {len(window)} entries for {C} components")
        aux = state.get("aux", "entropy")  # states from before the option: the entropy form
        if aux not in AUX_FORMS:
            raise ValueError(f"checkpoint aux {aux!r} is not one of {AUX_FORMS}")
        self.normalise, self.measure, self.update_every = normalise, measure, int(update_every)
        self.aux, self._delta_ready = aux, False  # the Δ held belongs to the parameters before the load
        self.window, self.window_steps = list(window), int(state.get("window_steps", 0))
        for key in ("target", "beta", "eta", "dead_band", "m_min", "m_max", "exact_every",
                    "aux_weight"):
            setattr(self, key, state[key])
        self.log_multipliers = list(state["log_multipliers"])
        self.scores_ema = None if state["scores_ema"] is None else list(state["scores_ema"])
        self.shares_ema = None if state["shares_ema"] is None else list(state["shares_ema"])
        self.peak_total = float(state["peak_total"])
        self.step_count = int(state["step"])
        self.base_lrs = list(state["base_lrs"])
        self._written = list(state["written"])
        self.history = deque((dict(h) for h in state["history"]), maxlen=self.history_limit)
        for group, lr in zip(self.optimizer.param_groups, self._written):
            group["lr"] = lr
