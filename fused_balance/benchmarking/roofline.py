"""The memory roofline: the machine's bandwidth, measured in the same run, and the minimal bytes
each stage must move (docs/design.md). Every stage here is memory bound (O(K*N) streaming, a K x K
problem on the side), so its roofline time is bytes / bandwidth."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from fused_balance.benchmarking.timing import median, time_call

__all__ = ["StageBytes", "stage_bytes", "roofline_seconds", "measure_bandwidth",
           "STAGES_WITH_BYTES"]

STAGES_WITH_BYTES = ("gram", "combine", "pareto_combine", "adamw")


@dataclass(frozen=True)
class StageBytes:
    read: int
    written: int

    @property
    def total(self) -> int:
        return self.read + self.written


def stage_bytes(stage: str, num_objectives: int, num_params: int, element_size: int,
                state_element_size: int | None = None) -> StageBytes | None:
    """Minimal DRAM traffic of one stage over N parameters and K objectives (the K x K outputs
    and the weights are negligible and not counted). None for stages with no O(N) traffic.

    gram: reads the K gradients. combine: reads them, writes the combined gradient.
    pareto_combine: a Gram pass then a combine pass (the gradients are read twice: they do not
    fit in cache). adamw (fused): reads g_1..g_K, p, m, v and writes p, m, v; parameters and
    optimizer states have ``state_element_size`` bytes (default: the gradients')."""
    K, N, e = num_objectives, num_params, element_size
    s = e if state_element_size is None else state_element_size
    if stage == "gram":
        return StageBytes(K * N * e, 0)
    if stage == "combine":
        return StageBytes(K * N * e, N * e)
    if stage == "pareto_combine":
        return StageBytes(2 * K * N * e, N * e)
    if stage == "adamw":
        return StageBytes(K * N * e + 3 * N * s, 3 * N * s)
    if stage == "weights":
        return None
    raise ValueError(f"unknown stage {stage!r}")


def roofline_seconds(traffic: StageBytes | None, bandwidth: dict) -> float | None:
    """Read-only stages run at the read bandwidth; stages that also write run at the triad
    (read+write mix) bandwidth, counted the same way (bytes read + bytes written)."""
    if traffic is None:
        return None
    if traffic.written == 0:
        return traffic.read / (bandwidth["read_GBps"] * 1e9)
    return traffic.total / (bandwidth["triad_GBps"] * 1e9)


def measure_bandwidth(device: str | torch.device = "cpu", size_mib: int = 512,
                      repeats: int = 7) -> dict:
    """Streaming bandwidth with every core (torch's intra-op threads) over buffers far larger
    than the caches. read: the better of torch.sum(x) and torch.dot(x, y) (bytes read / time);
    triad: a = b + s*c (3 streams: 2 read, 1 written, counted without write-allocate)."""
    device = torch.device(device)
    n = size_mib * 2 ** 20 // 4
    x = torch.ones(n, device=device)
    y = torch.full((n,), 0.5, device=device)
    a = torch.empty(n, device=device)
    tests = {
        "sum": (lambda: torch.sum(x), 4 * n),
        "dot": (lambda: torch.dot(x, y), 8 * n),
        "triad": (lambda: torch.add(x, y, alpha=0.5, out=a), 12 * n),
    }
    results = {}
    for name, (fn, nbytes) in tests.items():
        fn()  # first touch / page faults
        samples = [time_call(fn, device) for _ in range(repeats)]
        results[f"{name}_GBps"] = nbytes / median(samples) / 1e9
        results[f"{name}_best_GBps"] = nbytes / min(samples) / 1e9
    del x, y, a
    results["read_GBps"] = max(results["sum_GBps"], results["dot_GBps"])
    results["buffer_MiB"] = size_mib
    results["threads"] = torch.get_num_threads() if device.type == "cpu" else None
    results["method"] = (f"medians of {repeats} runs over {size_mib} MiB fp32 buffers, all "
                         f"intra-op threads; read = max(torch.sum, torch.dot) bytes read/s; "
                         f"triad = torch.add(b, c, alpha=s, out=a), 12 bytes/element")
    return results
