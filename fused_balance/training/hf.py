"""Hugging Face Trainer integration: ``BalancedTrainer``.

    trainer = BalancedTrainer(model=peft_model, args=TrainingArguments(...),
                              train_dataset=ds, objectives_fn=my_objectives)

``objectives_fn(model, inputs, outputs) -> {"text": loss, "image": loss}`` splits the batch loss
into objectives. ``training_step`` runs the forward pass, computes the objectives, and lets a
ParetoLoRA (no optimizer of its own) write the balanced gradient into ``p.grad``; the Trainer's
own optimizer, clipping, LR schedule and gradient accumulation then work unchanged. The gradient
is produced with plain autograd, so fp16 loss scaling (GradScaler) is not applied: train in fp32
or bf16. Per-layer norms, cosines and weights are kept in ``trainer.balancer.history`` and the
mean weight per objective is added to the Trainer's logs.
"""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from transformers import Trainer

from fused_balance.policies import BRANCH_CONFLICT
from fused_balance.training.pareto_lora import ParetoLoRA

__all__ = ["BalancedTrainer"]


class BalancedTrainer(Trainer):
    def __init__(self, *args, objectives_fn: Callable[..., Mapping[str, torch.Tensor]],
                 policy: str = "pareto_lora", segments="layer", tau: float = 5.0,
                 rescale: str | None = None, balance_backend: str | None = None,
                 fill: str = "backward", **kwargs):
        super().__init__(*args, **kwargs)
        self.objectives_fn = objectives_fn
        self.balancer = ParetoLoRA(self.model, optimizer=None, policy=policy, segments=segments,
                                   tau=tau, rescale=rescale, backend=balance_backend, fill=fill)

    def training_step(self, model, inputs, num_items_in_batch=None):
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            outputs = model(**inputs)
            objectives = dict(self.objectives_fn(model, inputs, outputs))
        accumulation = (getattr(self, "current_gradient_accumulation_steps", None)
                        or self.args.gradient_accumulation_steps)
        if accumulation > 1:  # the Trainer sums micro-batch gradients: average them
            objectives = {k: v / accumulation for k, v in objectives.items()}
        self.balancer.backward(objectives, accumulate=True)
        return sum(v.detach() for v in objectives.values())

    def log(self, logs: dict, *args, **kwargs):
        history = self.balancer.history
        if history and "loss" in logs:  # training logs only
            last = history[-1]
            for k, name in enumerate(self.balancer.objectives or []):
                logs[f"balance/weight_{name}"] = float(last["weights"][:, k].mean())
            logs["balance/conflict_fraction"] = float((last["branch"] == BRANCH_CONFLICT).float().mean())
        return super().log(logs, *args, **kwargs)
