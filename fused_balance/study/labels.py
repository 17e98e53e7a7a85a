"""Display names of the study's arms (shared by the report and the plots, which must not import
each other both ways)."""
from __future__ import annotations

ARM_LABELS = {"vanilla": "vanilla LoRA", "static": "static reweighting", "gradnorm": "GradNorm",
              "mgda": "MGDA", "pareto": "Pareto-LoRA (τ 5, per layer)",
              "pareto_tau2": "Pareto-LoRA τ 2", "pareto_tau20": "Pareto-LoRA τ 20",
              "pareto_tau100": "Pareto-LoRA τ 100", "pareto_group": "Pareto-LoRA per layer group",
              "pareto_tensor": "Pareto-LoRA per tensor", "pareto_global": "Pareto-LoRA global",
              "pareto_weaker": "Pareto-LoRA, weaker raised", "pareto_protect_image": "Pareto-LoRA, image protected",
              "constant": "constant LR", "llm_only": "LLM-only LoRA", "encoder_only": "encoder-only LoRA",
              "sched_first": "BalanceScheduler first-order", "sched_exact": "BalanceScheduler exact (KL probe)",
              "sched_aux": "BalanceScheduler + auxiliary loss (entropy form)",
              # our reading of CoMMIT's one-sided baselines (the paper's exact definitions are not available to us)
              "feature_cd": "Feature-CD (our reading: alternating, encoder first)",
              "language_cd": "Language-CD (our reading: alternating, LLM first)"}


def arm_label(arm: str) -> str:
    return ARM_LABELS.get(arm, arm)
