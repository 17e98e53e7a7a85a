"""The thin training layer: GradBank, ParetoLoRA, BalancedAdamW, BalanceScheduler, HF Trainer.

Everything here uses only the public API of fused_balance (fb.gram, fb.pareto_combine,
fb.pareto_weights, fb.balanced_adamw_step, ...); the kernels are never called directly.
``checkpoint.save`` / ``checkpoint.load`` write and restore a whole run (exact resume).
"""
from fused_balance.training import checkpoint
from fused_balance.training.bank import FILL_MODES, GradBank
from fused_balance.training.optim import BalancedAdamW
from fused_balance.training.pareto_lora import ParetoLoRA
from fused_balance.training.scheduler import BalanceScheduler
from fused_balance.training.segments import describe_segments, layer_key, lora_parameters, segment_ids_for

__all__ = ["checkpoint", "GradBank", "FILL_MODES", "ParetoLoRA", "BalancedAdamW", "BalanceScheduler",
           "lora_parameters", "layer_key", "segment_ids_for", "describe_segments", "BalancedTrainer"]


def __getattr__(name):  # transformers is heavy: import the Trainer integration on first use
    if name == "BalancedTrainer":
        from fused_balance.training.hf import BalancedTrainer
        return BalancedTrainer
    raise AttributeError(name)
