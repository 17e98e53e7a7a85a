"""Per-step overhead of balancing on real multimodal classes (tiny random configs, CPU).

For each family of tests/real_models.py (Chameleon, Emu3, Janus, LLaVA, Qwen2-VL with LoRA):
a plain step (sum of the objectives, one backward, torch.optim.AdamW) against a balanced step
(ParetoLoRA: per-objective backward into the bank, pareto_combine, the same AdamW; and the fused
BalancedAdamW). Both include the forward pass. Fastest of --steps steps (the three kinds in turn) after --warmup, one
thread by default. Tiny models make the fixed costs (Python, launches) look large; on a real
model the backward dominates and the balancing cost is the extra backward pass per objective
for single-forward families (Chameleon, Emu3).

    python benchmarks/bench_real_models.py [--steps 30] [--threads 1]
"""
import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def fastest_ms(steps, count, warmup):
    """The fastest of ``count`` runs of each step, run in turn (plain, balanced, ...) so that
    load from other processes hits them alike; the fastest is the least disturbed."""
    for _ in range(warmup):
        for step in steps:
            step()
    best = [float("inf")] * len(steps)
    for _ in range(count):
        for i, step in enumerate(steps):
            start = time.perf_counter()
            step()
            best[i] = min(best[i], time.perf_counter() - start)
    return [1e3 * t for t in best]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from real_models import FAMILIES, lora_model

    from fused_balance.training import ParetoLoRA, lora_parameters

    print(f"{'family':<10} {'plain ms':>9} {'balanced ms':>12} {'overhead':>9} {'fused ms':>9} {'overhead':>9}")
    for family in FAMILIES:
        model = lora_model(family)
        params = [p for _, p in lora_parameters(model)]
        batch = family.batch(torch.Generator().manual_seed(0))
        plain_opt = torch.optim.AdamW(params, lr=1e-4)

        def plain():
            losses = family.losses(model, batch)
            sum(losses.values()).backward()
            plain_opt.step()
            plain_opt.zero_grad()

        balancer = ParetoLoRA(model, torch.optim.AdamW(params, lr=1e-4))

        def balanced():
            balancer.step(family.losses(model, batch))
            balancer.zero_grad()

        fused = ParetoLoRA(model, "fused_adamw", lr=1e-4)

        def fused_step():
            fused.step(family.losses(model, batch))

        t_plain, t_bal, t_fused = fastest_ms([plain, balanced, fused_step], args.steps, args.warmup)
        print(f"{family.name:<10} {t_plain:9.2f} {t_bal:12.2f} {100 * (t_bal / t_plain - 1):8.0f}% "
              f"{t_fused:9.2f} {100 * (t_fused / t_plain - 1):8.0f}%")


if __name__ == "__main__":
    main()
