"""Timing (interleaved repeats, medians, paired ratios), peak extra memory, machine description."""
from __future__ import annotations

import datetime
import os
import platform
import time
from typing import Callable

import torch

__all__ = ["median", "time_call", "interleaved_times", "paired_ratio", "peak_extra_memory",
           "machine_info", "plan_repeats"]


def median(samples) -> float:
    """The median (mean of the two middle values for an even count)."""
    xs = sorted(samples)
    if not xs:
        raise ValueError("median of no samples")
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device | str = "cpu") -> float:
    """Wall time of one call in seconds, with the device drained before and after."""
    device = torch.device(device)
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def plan_repeats(seconds_per_round: float, repeats: int, budget_s: float,
                 minimum: int = 3) -> int:
    """How many interleaved rounds fit in ``budget_s`` (at least ``minimum``, at most
    ``repeats``)."""
    if seconds_per_round <= 0:
        return repeats
    return max(min(minimum, repeats), min(repeats, int(budget_s / seconds_per_round)))


def interleaved_times(fns: dict[str, Callable[[], object]], repeats: int, *, warmup: int = 0,
                      device: torch.device | str = "cpu",
                      budget_s: float | None = None) -> dict[str, list[float]]:
    """Time every function ``repeats`` times, interleaved: each round runs all of them once, in
    an order rotated by one per round, so slow drifts of the machine (other processes, clock
    changes) hit every contender alike and ratios can be taken round by round.
    ``warmup`` untimed rounds come first (the suite's checked first call already warms up).
    With ``budget_s`` the first timed round sets how many rounds fit (at least 3)."""
    names = list(fns)
    device = torch.device(device)
    for _ in range(warmup):
        for name in names:
            time_call(fns[name], device)
    samples: dict[str, list[float]] = {name: [] for name in names}
    r = 0
    while r < repeats:
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            samples[name].append(time_call(fns[name], device))
        if r == 0 and budget_s is not None:
            repeats = plan_repeats(sum(s[0] for s in samples.values()), repeats, budget_s)
        r += 1
    return samples


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i] (samples from the same rounds)."""
    if len(numerator) != len(denominator) or not numerator:
        raise ValueError("paired_ratio needs two equally long, non-empty sample lists")
    return median([a / b for a, b in zip(numerator, denominator)])


def peak_extra_memory(fn: Callable[[], object],
                      device: torch.device | str = "cpu") -> tuple[int, str]:
    """Peak bytes allocated during one call of ``fn`` beyond what was allocated before it
    (outputs still alive at the peak count). Returns (bytes, method).

    CPU: the PyTorch profiler with profile_memory=True records every allocation and free of
    torch's CPU allocator (including scratch buffers inside C++ kernels and compiled code);
    the peak of their running sum is the answer. Memory that bypasses torch's allocator (NumPy
    inside TorchJD's QP solver, a K x K problem) is not seen; it is tiny here.
    CUDA: torch.cuda.max_memory_allocated() minus memory_allocated() before the call."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del result
        return max(0, peak), "torch.cuda.max_memory_allocated delta"
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda item: item[0])
    running = peak = 0
    for _, nbytes in events:
        running += nbytes
        peak = max(peak, running)
    return peak, "torch.profiler(profile_memory=True): peak running sum of CPU allocator events"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device | str = "cpu") -> dict:
    device = torch.device(device)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
    }
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info
