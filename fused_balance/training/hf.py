"""Hugging Face Trainer integration: ``BalancedTrainer``.

    trainer = BalancedTrainer(model=peft_model, args=TrainingArguments(...),
                              train_dataset=ds, objectives_fn=my_objectives)

``objectives_fn(model, inputs, outputs) -> {"text": loss, "image": loss}`` splits the batch loss
into objectives. ``training_step`` runs the forward pass, computes the objectives and adds their
per-objective gradients to a ParetoLoRA's bank (no optimizer of its own); on the last
micro-batch of an optimizer step (gradient accumulation) the sum is balanced once and written
into ``p.grad``, so the Trainer's own optimizer, clipping and LR schedule work unchanged.
Tensors no objective reached keep ``.grad = None`` (the optimizer skips them); a NaN/Inf loss
or gradient leaves ``.grad`` untouched (the optimizer step does nothing). The gradient is
produced with plain autograd, so fp16 loss scaling (GradScaler) is not applied: train in fp32 or
bf16. Per-layer norms, cosines and weights are kept in ``trainer.balancer.history``; the mean
weight per objective and the conflict fraction over the segments some objective reached go to
the Trainer's logs. The balancer's state (history, step and skip counts) is saved in every
Trainer checkpoint (``fused_balance_state.pt``) and restored on resume.

Multi-process (torchrun / accelerate launch): the Trainer's DDP wrapper is handed to the balancer
at the first training step; DDP's own reduction is switched off and each step averages the K
objectives' gradients in one all-reduce over the world group, so every rank balances the same
averaged gradients and logs the same (global) statistics. Under FSDP2 (accelerate's
``fsdp_version: 2``), which shards the model when training starts, the balancer is built again
over the sharded parameters at the first training step (same settings and state) and balances
the local shards as ParetoLoRA does for any ``fully_shard`` model.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

import torch
from transformers import Trainer

from fused_balance.policies import BRANCH_CONFLICT
from fused_balance.training._wrappers import switch_off_sync, unwrap
from fused_balance.training.pareto_lora import ParetoLoRA

__all__ = ["BalancedTrainer", "BALANCER_STATE_NAME"]

BALANCER_STATE_NAME = "fused_balance_state.pt"


class BalancedTrainer(Trainer):
    def __init__(self, *args, objectives_fn: Callable[..., Mapping[str, torch.Tensor]],
                 policy: str = "pareto_lora", segments="layer", tau: float = 5.0,
                 rescale: str | float | None = None, balance_backend: str | None = None,
                 fill: str = "backward", magnitude: str = "mean", **kwargs):
        super().__init__(*args, **kwargs)
        self.objectives_fn = objectives_fn
        self._balancer_settings = dict(policy=policy, segments=segments, tau=tau, rescale=rescale,
                                       backend=balance_backend, fill=fill, magnitude=magnitude)
        self.balancer = ParetoLoRA(self.model, optimizer=None, **self._balancer_settings)
        self._balanced_wrapper = None
        self._balanced_ddp = None  # the DDP wrapper inside it, if any

    def _attach_wrapper(self, model) -> None:
        """The Trainer wraps the model (DDP under torchrun / accelerate launch) when training
        starts: hand the wrapper to the balancer before its first forward, so DDP's own
        reduction is off and the bank is averaged once over the world group; a model FSDP2
        sharded is balanced over its shards. Several processes with neither (DeepSpeed, ...)
        are refused rather than trained per rank."""
        if model is self._balanced_wrapper:
            if self._balanced_ddp is not None:
                # With gradient accumulation the Trainer runs the other micro-batches inside DDP's
                # no_sync(), whose exit restores the sync flag it found: on, when the balancer
                # attached inside it. The balancer averages the bank itself, so DDP stays quiet
                # (before the forward, so the reducer is never armed).
                switch_off_sync(self._balanced_ddp)
            return
        self._rebind_if_sharded(model)
        self.balancer.attach(model)  # FSDP1 / DeepSpeed raise here, naming the supported recipe
        self._balanced_ddp = unwrap(model)[1]
        if self.args.world_size > 1 and self.balancer.process_group is None:
            raise RuntimeError(f"BalancedTrainer runs on {self.args.world_size} processes but the "
                               f"Trainer's model is a {type(model).__name__}, neither a "
                               "DistributedDataParallel nor an FSDP2 (fully_shard) model: only DDP and "
                               "FSDP2 are supported")
        self._balanced_wrapper = model

    def _rebind_if_sharded(self, model) -> None:
        """FSDP2 (accelerate's ``fsdp_version: 2``) shards the model when training starts, after
        the balancer was built: ``fully_shard`` replaces its parameters by DTensors. The balancer
        is then built again over the model's current parameters, with the same settings and
        state (history and counts, e.g. just restored from a checkpoint); nothing is lost, as no
        gradient was gathered yet."""
        current = {id(p) for p in unwrap(model)[0].parameters()}
        if all(id(p) in current for p in self.balancer.params):
            return
        if self.balancer.pending_micro_batches:
            raise RuntimeError("the model's parameters were replaced while the balancer held gathered "
                               "gradients: shard the model (fully_shard) before the first training step")
        rebuilt = ParetoLoRA(model, optimizer=None, **self._balancer_settings)
        rebuilt.load_state_dict(self.balancer.state_dict())
        self.balancer = rebuilt

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        self._attach_wrapper(model)
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
            objectives = dict(self.objectives_fn(model, inputs, outputs))
        accumulation = (getattr(self, "current_gradient_accumulation_steps", None)
                        or self.args.gradient_accumulation_steps)
        if accumulation > 1:  # the Trainer's step is the mean over its micro-batches
            objectives = {k: v / accumulation for k, v in objectives.items()}
        self.balancer.accumulate(objectives)
        if self.accelerator.sync_gradients:  # the last micro-batch: balance once, before clipping
            self.balancer.balance(accumulate=True)
        return sum(v.detach() for v in objectives.values())

    def log(self, logs: dict, *args, **kwargs):
        history = self.balancer.history
        if history and "loss" in logs:  # training logs only
            last = history[-1]
            live = torch.tensor(self.balancer.live_segments)  # dead segments would dilute the means
            if live.any():
                for k, name in enumerate(self.balancer.objectives or []):
                    logs[f"balance/weight_{name}"] = float(last["weights"][live, k].mean())
                logs["balance/conflict_fraction"] = float((last["branch"][live] == BRANCH_CONFLICT).float().mean())
        return super().log(logs, *args, **kwargs)

    # -- the balancer's state travels with the Trainer's checkpoints ----------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            torch.save(self.balancer.state_dict(), os.path.join(output_dir, BALANCER_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, BALANCER_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing: the checkpoint was not written by a "
                                    "BalancedTrainer, so the balancer's history cannot be resumed")
        self.balancer.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
