"""Quick CPU benchmark of the `cpp` backend on the LoRA tensors of Llama-2-7B (r=16, all linears).

448 tensors, 40 M parameters, K=2 objectives, fp32. Reports, in one run:
- the machine's read bandwidth (best of torch.sum / torch.dot over a 160 MB fp32 buffer),
- the Gram: time, GB/s, % of that bandwidth, speed-up over torch._foreach_norm + per-tensor dots,
- combine (reads 2N, writes N) and balanced AdamW (reads g1, g2, p, m, v, writes p, m, v) in GB/s,
  next to their torch foreach equivalents.

Usage: python benchmarks/bench_gram_cpu_quick.py [--reps 15] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from fused_balance import _extension


def llama2_7b_lora_shapes(rank: int = 16, layers: int = 32) -> list[tuple[int, int]]:
    d, ff = 4096, 11008
    per_layer = []
    for fan_in, fan_out in [(d, d)] * 4 + [(d, ff)] * 2 + [(ff, d)]:  # q k v o, gate up, down
        per_layer += [(rank, fan_in), (fan_out, rank)]  # A [r, in], B [out, r]
    return per_layer * layers


def best_times(fns: dict, reps: int) -> dict:
    """Best wall time of each function, measured in interleaved rounds so that load from other
    processes on the machine hits every candidate alike."""
    for fn in fns.values():
        fn()  # warm-up (page faults, caches)
    best = {name: float("inf") for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--json", default=None)
    parser.add_argument("--isa", default="auto", help="CPU kernel path: auto, default, avx2, avx512")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    ext = _extension.load()
    ext.set_cpu_isa(args.isa)
    ops = torch.ops.fused_balance
    shapes = llama2_7b_lora_shapes()
    P = len(shapes)
    N = sum(a * b for a, b in shapes)
    gen = torch.Generator().manual_seed(0)
    g1 = [torch.randn(s, generator=gen) for s in shapes]
    g2 = [torch.randn(s, generator=gen) for s in shapes]
    flat = g1 + g2
    seg = [0] * P

    # Read bandwidth of this machine, measured now: 160 MB of fp32.
    buf = torch.randn(40_000_000, generator=gen)
    half_a, half_b = buf[: len(buf) // 2], buf[len(buf) // 2:]

    def foreach_gram():
        n1 = torch._foreach_norm(g1)
        n2 = torch._foreach_norm(g2)
        g12 = sum(torch.dot(a.reshape(-1), b.reshape(-1)) for a, b in zip(g1, g2))
        s11 = sum(x * x for x in n1)
        s22 = sum(x * x for x in n2)
        return torch.stack([torch.stack([s11, g12]), torch.stack([g12, s22])])

    G = ops.gram(flat, 2, seg, 1)[0]
    G_ref = foreach_gram()
    assert torch.allclose(G, G_ref, rtol=1e-4), (G, G_ref)

    weights = torch.tensor([[0.3, 0.7]])
    out = [torch.empty_like(g) for g in g1]
    params = [torch.randn(s, generator=gen) for s in shapes]
    exp_avgs = [torch.zeros(s) for s in shapes]
    exp_avg_sqs = [torch.zeros(s) for s in shapes]
    lrs, wds = [1e-4] * P, [0.01] * P
    step = [0]

    def fused_adamw():
        step[0] += 1
        ops.balanced_adamw_(flat, weights, seg, params, exp_avgs, exp_avg_sqs, lrs, wds, 0.9, 0.999, 1e-8,
                            step[0], None)

    torch_params = [p.clone().requires_grad_(True) for p in params]
    optimizer = torch.optim.AdamW(torch_params, lr=1e-4, weight_decay=0.01, foreach=True)

    def torch_combine_then_adamw():
        combined = torch._foreach_add(torch._foreach_mul(g1, 0.3), torch._foreach_mul(g2, 0.7))
        for p, d in zip(torch_params, combined):
            p.grad = d
        optimizer.step()

    t = best_times({
        "sum": lambda: torch.sum(buf),
        "dot": lambda: torch.dot(half_a, half_b),
        "gram": lambda: ops.gram(flat, 2, seg, 1),
        "foreach_gram": foreach_gram,
    }, args.reps)
    t.update(best_times({
        "combine": lambda: ops.combine_into(flat, weights, seg, out, None),
        "combine_foreach": lambda: torch._foreach_add(torch._foreach_mul(g1, 0.3), torch._foreach_mul(g2, 0.7)),
        "adamw": fused_adamw,
        "torch_combine_then_adamw": torch_combine_then_adamw,
    }, max(3, args.reps // 2)))
    bandwidth = buf.numel() * 4 / min(t["sum"], t["dot"]) / 1e9
    gram_bytes = 2 * N * 4
    t_gram, t_foreach = t["gram"], t["foreach_gram"]
    t_combine, t_adamw = t["combine"], t["adamw"]

    result = {
        "cpu_isa": ext.cpu_isa(),
        "threads": torch.get_num_threads(),
        "tensors": P,
        "params": N,
        "read_bandwidth_GBps": bandwidth,
        "bandwidth_probe_s": {"sum": t["sum"], "dot": t["dot"]},
        "gram_s": t_gram,
        "gram_GBps": gram_bytes / t_gram / 1e9,
        "gram_fraction_of_bandwidth": gram_bytes / t_gram / 1e9 / bandwidth,
        "foreach_gram_s": t_foreach,
        "gram_speedup_vs_foreach": t_foreach / t_gram,
        "combine_s": t_combine,
        "combine_GBps": 3 * N * 4 / t_combine / 1e9,
        "combine_foreach_s": t["combine_foreach"],
        "adamw_s": t_adamw,
        "adamw_GBps": 8 * N * 4 / t_adamw / 1e9,
        "torch_combine_then_adamw_s": t["torch_combine_then_adamw"],
    }
    for key, value in result.items():
        print(f"{key:30s} {value:.4g}" if isinstance(value, float) else f"{key:30s} {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
