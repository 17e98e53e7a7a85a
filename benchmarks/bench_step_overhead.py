"""ParetoLoRA.step's balancing overhead: the step minus the same two backward passes and the
optimizer step done by hand, on P tiny LoRA-like tensors (default 448) (4 elements each, 14 per layer), CPU,
1 thread, interleaved rounds, medians.

    python benchmarks/bench_step_overhead.py [P]   (P tensors, default 448)
"""
import statistics
import sys
import time

import torch

from fused_balance.training import ParetoLoRA
torch.set_num_threads(1)
P = int(sys.argv[1]) if len(sys.argv) > 1 else 448
params = [torch.nn.Parameter(torch.randn(4)) for _ in range(P)]
a = [torch.randn(4) for _ in range(P)]; b = [torch.randn(4) * 0.01 for _ in range(P)]
named = [(f"model.layers.{i // 14}.q_proj.lora_{'A' if i % 2 else 'B'}.{i}", p) for i, p in enumerate(params)]
def losses():
    x = torch.cat([p for p in params])
    return {"text": (x * torch.cat(a)).sum(), "image": (x * torch.cat(b)).sum()}
opt = torch.optim.AdamW(params, lr=1e-4)
bal = ParetoLoRA(named, opt, policy="pareto_lora", segments="layer")
def by_hand():
    l = losses()
    l["text"].backward(retain_graph=True); l["image"].backward(); opt.step(); opt.zero_grad()
def balanced():
    bal.step(losses())
for f in (by_hand, balanced):
    for _ in range(20): f()
t = {"hand": [], "bal": []}
for r in range(15):
    for name, f in (("hand", by_hand), ("bal", balanced)):
        s = time.perf_counter()
        for _ in range(20): f()
        t[name].append((time.perf_counter() - s) / 20)
h, bl = statistics.median(t["hand"]), statistics.median(t["bal"])
print(f"P={P}: two backward + AdamW.step by hand {h*1e6:.0f} us; ParetoLoRA.step {bl*1e6:.0f} us; overhead {(bl-h)*1e6:.0f} us; planned={bal._plan is not None}")
