"""ParetoLoRA: multi-objective LoRA training step on top of any optimizer.

Each step: every objective's gradient lands in a GradBank (one flat ``[K, N]`` buffer); a
``fb.BalancePlan`` built once over the bank computes the per-segment Gram, the policy's weights
and writes the combination into the live parameters' ``.grad`` (views of one flat buffer), then
the wrapped optimizer steps (skipped, and counted, when a gradient held NaN/Inf). With
``optimizer="fused_adamw"`` the combination is never materialised: Gram -> weights -> the plan's
fused AdamW. ``step``, ``balance`` and ``backward`` all take the plan, whatever the backend (its
bank ops: ``fused_balance.backends``) and process group: one engine. The list API
(``fb.pareto_combine``, ``fb.balanced_adamw_step``) is for custom loops.

Distributed (``process_group=``): ``distributed="data"`` (each rank its own micro-batch: the
bank's ``[K, N]`` buffer is averaged over the ranks in ONE all-reduce, in place, then every rank
balances identically) or ``"sharded"`` (each rank holds a shard of every parameter, e.g. tensor
parallel or FSDP local shards: only the ``[S, K, K]`` Gram partials are all-reduced). Every rank
must call ``step``/``backward`` together, with the same objectives.
A DistributedDataParallel model (torchrun + DDP, ``accelerator.prepare``, the Hugging Face
Trainer) needs no argument: its group is used and DDP's own reduction is switched off, so the
traffic is the one all-reduce of K·N elements per step (``fused_balance.training._wrappers``).

Segments (sets of tensors sharing one set of weights): ``"layer"`` (by sub-model and layer index,
tensors outside a numbered layer by their module; see ``fused_balance.training.segments``),
``"tensor"``, ``"global"`` or a callable ``(name, param) -> hashable key``.

ParetoLoRA coordinates parts with one job each: ``objectives`` (the objectives' names, the
losses dict's checks, the magnitude rule), ``engine`` (the planned step over the bank),
``history`` (the step history), ``bank`` (the gradients), ``optim`` (the optimizer argument).
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Iterable, Mapping, Sequence

import torch

from fused_balance import _extension
from fused_balance.backends import check_backend_choice
from fused_balance.distributed import check_group
from fused_balance.training import _fsdp, _wrappers
from fused_balance.training.bank import GradBank
from fused_balance.training.engine import PlannedEngine, Reach, ReachTracker, in_list_dtype
from fused_balance.training.history import StepHistory
from fused_balance.training.objectives import Objectives, check_magnitude, magnitude_rule
from fused_balance.training.optim import BalancedAdamW, make_optimizer
from fused_balance.training.segments import layer_key, lora_parameters, named_parameters_of, segment_ids_for

__all__ = ["ParetoLoRA", "lora_parameters", "layer_key", "segment_ids_for"]


def _named(model_or_params) -> list[tuple[str, torch.Tensor]]:
    if isinstance(model_or_params, torch.nn.Module):
        model_or_params, _ = _wrappers.unwrap(model_or_params)  # names without DDP's "module."
    named = named_parameters_of(model_or_params, "ParetoLoRA")
    _wrappers.check_not_fsdp(named)
    return list(zip(_wrappers.canonical_names([n for n, _ in named]), [p for _, p in named]))


def _bank_dtype(named, fused: bool) -> torch.dtype:
    """The bank's dtype: the parameters' own, or for parameters of several dtypes the widest
    (their gradients are cast into it and the combination back into each ``.grad``). Refused at
    construction with the fix: several dtypes under the fused AdamW (one kernel steps one dtype)
    and non-contiguous parameters under it (written through a pointer table, element by element
    of a flat range)."""
    dtypes = {p.dtype for _, p in named}
    if fused and len(dtypes) > 1:
        raise TypeError(f"the balanced parameters have several dtypes {sorted(map(str, dtypes))}: the fused AdamW "
                        "steps one dtype; convert them to one (e.g. model.to(torch.bfloat16)) or use a torch "
                        "optimizer")
    if fused:
        strided = [name for name, p in named if not _fsdp.local_shard(p).is_contiguous()]
        if strided:
            raise ValueError(f"the fused AdamW writes contiguous parameters only; {strided[0]!r} is not: make "
                             "it contiguous (p.data = p.data.contiguous()) or use a torch optimizer")
    widest = named[0][1].dtype
    for dtype in dtypes:
        widest = torch.promote_types(widest, dtype)
    return widest


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
    A DistributedDataParallel model (also accelerate's / the Trainer's wrapper) is detected:
    its process group is used, DDP's own gradient averaging is switched off and the bank is
    averaged once per step instead (see ``attach``). An FSDP2 model (``fully_shard``, also
    accelerate's / the Trainer's with ``fsdp_version: 2``) needs no argument either: its local
    shards are balanced, the Gram partials summed over its shard group (one all-reduce of
    S·K·K + 1 float64 per step besides FSDP's own collectives), with a torch optimizer or the
    fused AdamW (which steps the local shards; its moments are DTensors like the parameters).

    Tensors no objective reached in a step's window (``dead_tensors``, e.g. LoRA on a VQ model
    that token losses never run through, or an expert no token was routed to) are neither
    written nor stepped, like after a plain backward: ``balance``/``backward`` leave their
    ``.grad`` as it was (None after ``zero_grad``); ``step``, which replaces ``.grad``, also
    drops the balanced gradient a previous step left there. Under a process group every tensor
    counts as reached (the ranks must step the same tensors).

    A NaN/Inf loss skips the step like a NaN/Inf gradient: nothing is written, the step is
    counted in ``skipped_steps``, the history names the objectives, a warning the first time.

    ``rescale`` (the conflict branch's strength, see ``fb.policy_weights``): "sum" (pareto_lora's
    and mmpareto's default: the plain sum's magnitude), "none", or a factor γ > 0 of it.

    ``magnitude`` (pareto_lora's rule where one gradient is more than ``tau`` times another, see
    ``fb.policy_weights``): "mean" (default), "weaker", or the name of the objective to protect
    (only it is raised to the mean norm, e.g. ``magnitude="image"``).

    ``history_limit``: the history keeps the last that many recorded steps (a ring buffer; None:
    all of them). Each entry holds a few [S, K] tensors on the training device until
    ``history`` is read, so an unbounded history grows with the run.

    ``pending_micro_batches`` (read-only): the micro-batches ``accumulate`` gathered since the
    last balance (0 between steps).

    Bad input (unknown or missing objectives, non-scalar losses, frozen or duplicate parameters,
    a loss on another device, ...) raises before anything is written: parameters, gradients,
    optimizer state, history and step counters stay as they were.
    """

    def __init__(self, model_or_params, optimizer=None, policy: str | Callable = "pareto_lora",
                 segments: str | Callable = "layer", tau: float = 5.0, rescale: str | float | None = None,
                 objectives: Sequence[str] | None = None, backend: str | None = None, *,
                 fill: str = "backward", lr: float = 1e-3, weight_decay: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 record_history: bool = True, history_every: int = 1,
                 history_limit: int | None = 10_000, process_group=None, distributed: str = "data",
                 magnitude: str = "mean"):
        check_magnitude(policy, tau, rescale, magnitude, objectives)
        check_group(process_group, distributed)
        if fill not in ("backward", "batched"):
            raise ValueError(f"unknown fill mode {fill!r}; choose 'backward' or 'batched'")
        self._objectives = Objectives(objectives)
        self._steps = StepHistory(history_limit, history_every, record_history)
        self.named_params = _named(model_or_params)
        self.params = [p for _, p in self.named_params]
        # FSDP2 (fully_shard): the local shards are balanced, the Gram summed over the shard group
        shard_group = _fsdp.shard_group(self.named_params)
        if shard_group is not None:
            if process_group is not None and process_group is not shard_group:
                raise ValueError("the parameters are FSDP2-sharded: their shard group is used; leave "
                                 "process_group out")
            process_group, distributed = shard_group, "sharded"
        self.process_group, self.distributed = process_group, distributed
        self._fsdp = shard_group is not None
        check_backend_choice(backend, self.params[0].device, bank_ops=True)
        self.segment_ids, self.segment_names = segment_ids_for(self.named_params, segments)
        self.segments_rule = segments if isinstance(segments, str) else "callable"
        self.policy, self.tau, self.rescale, self.magnitude = policy, float(tau), rescale, magnitude
        self.backend, self.fill = backend, fill
        self.optimizer = optimizer = make_optimizer(optimizer, self.named_params, lr=lr, weight_decay=weight_decay,
                                                    betas=betas, eps=eps, backend=backend)
        self.fused = isinstance(optimizer, BalancedAdamW)
        self._bank_dtype = _bank_dtype(self.named_params, self.fused)
        # .grad the plan's flat buffer cannot be viewed as (FSDP2's DTensors, another dtype)
        self._flat_grads_needed = self._fsdp or any(p.dtype != self._bank_dtype for p in self.params)
        if self.fused:  # the plan's fused AdamW steps exactly the balanced parameters
            balanced = {id(p) for p in self.params}
            if any(id(p) not in balanced for p in optimizer.flat_params()):
                raise ValueError("the BalancedAdamW holds parameters ParetoLoRA does not balance")
            self._fused_groups = self._group_sizes()
        self.bank: GradBank | None = None
        self.step_count = 0
        self.skipped_steps = 0
        self._window = 0  # micro-batches accumulated in the bank since the last balance
        self._window_losses: torch.Tensor | None = None  # their losses, summed, on the device
        self._reach_of = ReachTracker([n for n, _ in self.named_params], self.segment_ids, self.num_segments)
        self._warned_nonfinite = False
        self._engine = self._engine_key = None
        self._ddp = None
        self._watch = None  # the parameters' TensorStamp (frozen-later check), once the extension loads
        if isinstance(model_or_params, torch.nn.Module):
            self.attach(model_or_params)  # last: every other check has passed

    def attach(self, model: torch.nn.Module) -> None:
        """Train through ``model``, a DistributedDataParallel wrapper of the balanced parameters
        (what ``accelerator.prepare`` or the Hugging Face Trainer return), also when it was
        wrapped after this ParetoLoRA was built. Call it before the forward pass. DDP's own
        gradient averaging is switched off (it would average only the first of the K backward
        passes); every step averages the bank's [K, N] buffer once over DDP's process group
        instead. A model without such a wrapper changes nothing. Building ParetoLoRA on the
        unwrapped model and then training through a DDP wrapper it was never given cannot be
        detected: pass the wrapper (here or to the constructor)."""
        _, ddp = _wrappers.unwrap(model)
        if ddp is None or ddp is self._ddp:
            return
        self.process_group = _wrappers.adopt_ddp(ddp, self.params, self.process_group, self.distributed)
        self._ddp = ddp

    def _check_unchanged(self) -> None:
        """What may have changed since construction, checked before a step writes anything."""
        self._check_params_trainable()
        if self.fused:
            self._check_fused_groups()

    def _check_params_trainable(self) -> None:
        """A balanced parameter frozen since construction (``requires_grad_(False)``) would still
        be written and stepped: refuse before anything is. One C++ loop over the parameters per
        call (``TensorStamp``) once the extension is loaded; a Python loop before."""
        if self._watch is None and _extension.loaded() is not None:
            self._watch = _extension.loaded().TensorStamp(self.params)  # new: check below, once
        elif self._watch is not None and not self._watch.changed():
            return
        frozen = [name for name, p in self.named_params if not p.requires_grad]
        if frozen:
            raise ValueError(f"{len(frozen)} balanced parameter(s) were frozen after ParetoLoRA was built "
                             f"({_wrappers.shown_names(frozen)}): they would still be written and stepped; "
                             "unfreeze them, or build a new ParetoLoRA (and optimizer) over the parameters that train")
        if self._watch is not None:
            self._watch.record()

    def _group_sizes(self) -> list[int]:
        return [len(group["params"]) for group in self.optimizer.param_groups]

    def _check_fused_groups(self) -> None:
        """The fused AdamW steps exactly the balanced parameters, in the order fixed at
        construction: a param group added since would never be stepped (and its ``.grad`` would
        grow without bound), so refuse before anything is written."""
        if self._group_sizes() != self._fused_groups:
            raise ValueError("the BalancedAdamW's param groups changed after ParetoLoRA was built "
                             f"({self._fused_groups} parameters per group then, {self._group_sizes()} now): "
                             "the fused step covers the parameters ParetoLoRA balances; build a new "
                             "BalancedAdamW and ParetoLoRA over all the parameters instead")

    # -- helpers ------------------------------------------------------------------------------
    @property
    def num_segments(self) -> int:
        return len(self.segment_names)

    @property
    def objectives(self) -> list[str] | None:
        """The objectives' names, in the order of every [.., K] tensor; None until the first
        losses arrive (unless given), then fixed."""
        return self._objectives.names

    @property
    def pending_micro_batches(self) -> int:
        """Micro-batches ``accumulate`` gathered since the last balance (0 between steps)."""
        return self._window

    @property
    def _plan(self):
        """The engine's BalancePlan (None before the first balance or step)."""
        return None if self._engine is None else self._engine.plan

    def _loss_list(self, losses: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The losses in objective order, every one checked before any state changes."""
        names = self._objectives.order(losses, self.magnitude)
        if self._ddp is not None:
            _wrappers.check_ddp_quiet(self._ddp)
        bank = self.bank if self.bank is not None else GradBank(self.params, len(names), mode=self.fill,
                                                                 dtype=self._bank_dtype)
        loss_list = bank.check_losses([losses[name] for name in names], names=names)
        if not any(loss.requires_grad for loss in loss_list):
            raise ValueError("no loss requires grad (computed under torch.no_grad(), or detached?): "
                             "there is nothing to balance")
        self._objectives.fix(names)
        self.bank = bank
        return loss_list

    def _record(self, losses, gram, norms, cosines, weights, branch, found_inf, took_step) -> dict | None:
        """Append this step's entry to the history when one is due; returns it, or None."""
        if not self._steps.due(self.step_count):
            return None
        entry = {"step": self.step_count, "losses": losses, "weights": weights.detach(),
                 "branch": branch.detach(), "found_inf": found_inf.detach(), "stepped": took_step}
        if norms is None:  # a plan result: statistics from its float64 Gram when the history is read
            entry["_gram"] = gram.detach()
        else:
            entry["norms"], entry["cosines"] = norms.detach(), cosines.detach()
        reach = self._reach()
        return self._steps.append(entry, reach.key, reach.dead)

    # -- tensors no objective reached ----------------------------------------------------------
    def _reach(self) -> Reach:
        """Which tensors and segments some objective reached in this window (cached). Ranks may
        reach different tensors but must step the same ones: under a process group every tensor
        counts as reached (zero gradients where none arrived)."""
        return self._reach_of(self.bank, self.process_group is not None)

    @property
    def dead_tensors(self) -> list[str]:
        """Names of the balanced tensors no objective reached in the last window: no optimizer
        step touches them (see the class docstring for their ``.grad``)."""
        return [] if self.bank is None else list(self._reach().dead)

    @property
    def live_segments(self) -> list[bool]:
        """Per segment: does it hold a tensor some objective reached? (All True before a step.)"""
        return [True] * self.num_segments if self.bank is None else list(self._reach().live_segments)

    # -- the step -----------------------------------------------------------------------------
    def accumulate(self, losses: Mapping[str, torch.Tensor]) -> None:
        """Add every objective's gradient of ``losses`` to the bank (one micro-batch); the next
        ``balance()`` / ``step()`` balances the sum, once. A NaN/Inf loss marks the bank so that
        the step is skipped (see GradBank.flag_nonfinite)."""
        self._check_unchanged()
        loss_list = self._loss_list(losses)
        try:
            self.bank.fill(loss_list, accumulate=self._window > 0)
        except BaseException:  # the bank holds a partial sum: nothing of this window is kept
            self._drop_window()
            raise
        if not self.bank.last_fill_reached_any and self.bank.numel > 0 and self.process_group is None:
            # Not one balanced tensor received a gradient: the losses come from another model (or
            # a detached graph). The bank gained nothing, so the window keeps the micro-batches
            # gathered before; say so before a step.
            raise ValueError(f"the losses {self.objectives} reached none of the {len(self.params)} balanced "
                             "parameters: are they computed from the forward of the model ParetoLoRA was "
                             "built on (and was it not wrapped by fully_shard since, which replaces the "
                             "parameters)?")
        values = torch.stack([loss.detach().reshape(()) for loss in loss_list]).float()
        self.bank.flag_nonfinite(values)
        self._window_losses = values if self._window == 0 else self._window_losses + values
        self._window += 1

    def balance(self, *, accumulate: bool = True):
        """Balance the gradients gathered by ``accumulate`` and write the combination into
        ``p.grad`` (added to existing gradients with ``accumulate``, like ``loss.backward()``).
        Returns the fb.ParetoResult; with ``found_inf`` nothing was written (``.grad`` stays as
        it was; this costs one host read of the flag when a ``.grad`` had to be created)."""
        self._require_window()
        try:
            res, took = self._engine_now().balance(accumulate)
        except BaseException:
            self._drop_window()
            raise
        self._finish(res, None, took)
        return res

    def backward(self, losses: Mapping[str, torch.Tensor], *, accumulate: bool = True):
        """``accumulate(losses)`` then ``balance(accumulate=accumulate)``: per-objective
        gradients -> balanced combination in ``p.grad``. Returns the fb.ParetoResult."""
        self.accumulate(losses)
        return self.balance(accumulate=accumulate)

    def step(self, losses: Mapping[str, torch.Tensor] | None = None) -> bool:
        """One balanced optimizer step on ``losses`` (plus whatever ``accumulate`` gathered
        before; ``step()`` without losses balances just that). Returns False when it was
        skipped (a NaN/Inf gradient or loss): parameters, ``.grad`` and optimizer state are
        then untouched. Tensors no objective reached are not stepped."""
        if self.optimizer is None:
            raise RuntimeError("ParetoLoRA was built without an optimizer: call backward() and step yourself")
        if losses is not None:
            self.accumulate(losses)  # checks the parameters and param groups
        else:
            self._check_unchanged()
        self._require_window()
        try:
            res, took = self._engine_now().step()
        except BaseException:  # an OOM in the optimizer, a KeyboardInterrupt: the next step
            self._drop_window()  # starts a fresh window instead of adding to this one
            raise
        self._finish(res, took, took)
        return took

    def _drop_window(self) -> None:
        """Forget the micro-batches gathered since the last balance (the next fill overwrites
        the bank)."""
        self._window, self._window_losses = 0, None

    def _engine_now(self) -> PlannedEngine:
        """The planned step over the current bank: built once per bank, policy settings and
        process group (load_state_dict, attach and free_buffers may change them)."""
        key = (self.bank, self.policy, self.tau, self.rescale, self.magnitude, self.process_group, self.distributed)
        if self._engine is None or self._engine_key != key:
            self._engine = PlannedEngine(
                self.bank, self.params, self.segment_ids, policy=self.policy, tau=self.tau, rescale=self.rescale,
                magnitude=magnitude_rule(self.magnitude, self.objectives), backend=self.backend,
                process_group=self.process_group, distributed=self.distributed, reach=self._reach_of,
                flat_grads_needed=self._flat_grads_needed, optimizer=self.optimizer, fused=self.fused)
            self._engine_key = key
        return self._engine

    def _require_window(self) -> None:
        if self._window == 0:
            raise RuntimeError("nothing to balance: call accumulate(losses) (or step(losses) / "
                               "backward(losses)) first")

    def _finish(self, res, stepped, took) -> None:
        """History entry, counters and the non-finite-loss report; closes the bank's window."""
        losses, self._window_losses, self._window = self._window_losses, None, 0
        entry = self._record(losses, res.gram, res.norms, res.cosines, res.weights, res.branch, res.found_inf,
                             stepped)
        if took is False:  # a skip the host already knows about: name the objectives at fault
            self.skipped_steps += 1
            bad, bad_grads = self._objectives.at_fault(losses, res.gram)
            if entry is not None:
                entry["nonfinite_losses"] = bad
                entry["nonfinite_gradients"] = bad_grads
            if (bad or bad_grads) and not self._warned_nonfinite:
                self._warned_nonfinite = True
                what = ([f"non-finite loss(es) {bad} (values {losses.tolist()})"] if bad else []) + \
                       ([f"non-finite gradient(s) of {bad_grads} under finite losses"] if bad_grads else [])
                warnings.warn(f"step {self.step_count} skipped: {'; '.join(what)}; such steps are skipped "
                              "and counted in skipped_steps, see the history", RuntimeWarning, stacklevel=3)
        self.step_count += 1

    def free_buffers(self) -> None:
        """Drop the [K, N] gradient bank and scratch space (allocated again by the next step),
        e.g. to give the memory back during evaluation."""
        self.bank = None
        self._engine = self._engine_key = None
        self._drop_window()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    # -- history ------------------------------------------------------------------------------
    @property
    def history(self) -> list[dict]:
        """Per recorded step: step, losses [K] (summed over the accumulated micro-batches),
        norms [S,K], cosines [S,K,K], weights [S,K], branch [S], found_inf, stepped (None after
        a bare ``backward``/``balance``), ``nonfinite_losses`` and ``nonfinite_gradients`` (names,
        on a skip ``step`` saw: a NaN/Inf loss, or a NaN/Inf gradient under a finite loss),
        and ``dead`` (names of the tensors no objective reached) when that set changed; the last
        ``history_limit`` of them. Tensors are moved to the CPU here, not during training."""
        return self._steps.read(functools.partial(in_list_dtype, bank_dtype=self._bank_dtype))

    def history_records(self) -> Iterable[dict]:
        """The history as JSON-ready dicts (one per step, one sub-dict per segment)."""
        return StepHistory.records(self.history, self.objectives or [], self.segment_names)

    def export_history(self, path) -> None:
        StepHistory.export(path, self.history, self.objectives or [], self.segment_names)

    # -- checkpoints --------------------------------------------------------------------------
    def _settings(self) -> dict:
        return {"policy": self.policy, "tau": self.tau, "rescale": self.rescale, "magnitude": self.magnitude,
                "segments": self.segments_rule, "segment_names": list(self.segment_names),
                "param_names": [n for n, _ in self.named_params], "fill": self.fill,
                "objectives": self.objectives, "fused": self.fused, "history_every": self._steps.every}

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
        if isinstance(saved.get("param_names"), list):  # states saved with a wrapper's prefix
            saved = {**saved, "param_names": _wrappers.canonical_names(saved["param_names"])}
        for key in ("segment_names", "param_names", "fused"):
            if saved.get(key) != mine[key]:
                raise ValueError(f"checkpoint {key} {saved.get(key)!r} differ from this ParetoLoRA's {mine[key]!r}")
        if mine["objectives"] is not None and saved["objectives"] not in (None, mine["objectives"]):
            raise ValueError(f"checkpoint objectives {saved['objectives']} differ from {mine['objectives']}")
        magnitude = saved.get("magnitude", "mean")  # states from before the option: the mean rule
        check_magnitude(saved["policy"], saved["tau"], saved["rescale"], magnitude,
                        saved["objectives"] if saved["objectives"] is not None else mine["objectives"])
        history = list(state["history"])
        if state.get("optimizer") is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.policy, self.tau, self.rescale = saved["policy"], saved["tau"], saved["rescale"]
        self.magnitude = magnitude
        self._objectives.names = saved["objectives"]
        self._steps.every = int(saved.get("history_every", self._steps.every))
        self.step_count = int(state["step"])
        self.skipped_steps = int(state["skipped_steps"])
        self._drop_window()
        self._steps.load(history)
