"""fused_balance: fused multi-objective gradient balancing for LoRA fine-tuning.

    import fused_balance as fb
    G = fb.gram(grads)                  # grads: K sequences of P tensors -> [S, K, K]
    w = fb.min_norm_weights(G)          # [S, K] on the simplex
    d = fb.combine(grads, w)            # P tensors
    r = fb.pareto_combine(grads, policy="pareto_lora", out=[p.grad for p in params])
"""
from fused_balance.api import (ParetoResult, balanced_adamw_step, combine, gram, min_norm_weights,
                               pareto_combine, pareto_weights, policy_weights, set_range_check)
from fused_balance.plan import BalancePlan, PlanResult
from fused_balance.backends import available_backends, current_backend, use_backend
from fused_balance.policies import (BRANCH_CONFLICT, BRANCH_NAMES, BRANCH_RESCALE, BRANCH_SUM, POLICIES,
                                    gram_statistics, register_policy, registered_policies)

__version__ = "0.1.0"

__all__ = ["gram", "min_norm_weights", "combine", "pareto_combine", "policy_weights",
           "balanced_adamw_step", "ParetoResult", "BalancePlan", "PlanResult", "pareto_weights",
           "set_range_check", "available_backends", "use_backend", "current_backend", "gram_statistics",
           "POLICIES", "BRANCH_NAMES", "BRANCH_SUM", "BRANCH_RESCALE", "BRANCH_CONFLICT",
           "register_policy", "registered_policies", "__version__"]
