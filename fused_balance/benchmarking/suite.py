"""What a benchmark run covers: the options, the cases (problem x dtype x K) in priority order,
the stages per case, which of our backends run, and the scaling sweeps."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fused_balance.benchmarking import contenders as C
from fused_balance.benchmarking.problems import FULL_PROBLEMS, QUICK_PROBLEMS

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
HEADLINE = ("llama2-7b", 2, torch.float32)


@dataclass
class SuiteOptions:
    out: Path
    quick: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    problems: tuple = ()
    objectives: tuple = ()
    dtypes: tuple = ()
    stages: tuple = ()
    repeats: int = 15
    stage_budget_s: float = 3.0
    slow_call_s: float = 2.0     # a contender slower than this is timed once (its first call)
    compile_budget_s: float = 120.0
    memory: bool = True
    plots: bool = True
    seed: int = 0
    ours_backends: tuple = ()    # forced backend names (else: picked from what is available)
    progress: bool = True
    explicit_plan: bool = False  # problems/objectives/dtypes given: run their cross product
    threads: int = 0             # > 0: torch.set_num_threads for the run (default: all cores)
    time_budget_s: float = 0.0   # > 0: cases that would start later are skipped

    def resolved(self) -> "SuiteOptions":
        quick = self.quick
        return SuiteOptions(
            out=Path(self.out), quick=quick, device=torch.device(self.device),
            problems=tuple(self.problems) or (QUICK_PROBLEMS if quick else FULL_PROBLEMS),
            # (the default plan is QUICK_PLAN / FULL_PLAN; these fill an explicit plan's gaps)
            objectives=tuple(self.objectives) or ((2, 3) if quick else (2, 3, 4)),
            dtypes=tuple(self.dtypes) or (torch.float32, torch.bfloat16),
            stages=tuple(self.stages) or (C.STAGES + ("scaling", "overhead")),
            repeats=self.repeats, stage_budget_s=self.stage_budget_s,
            slow_call_s=self.slow_call_s,
            compile_budget_s=self.compile_budget_s, memory=self.memory, plots=self.plots,
            seed=self.seed, ours_backends=tuple(self.ours_backends), progress=self.progress,
            explicit_plan=self.explicit_plan, time_budget_s=self.time_budget_s,
            threads=self.threads)

# ----------------------------------------------------------------------------------------------
# Cases

def choose_ours(opts: SuiteOptions) -> list[tuple[str, str | None]]:
    """(backend, reason it cannot run or None), primary first. CPU: cpp (else the torch
    reference stands in); CUDA: triton then cpp."""
    from fused_balance.backends import availability
    device = opts.device
    if opts.ours_backends:
        wanted = list(opts.ours_backends)
    elif device.type == "cuda":
        wanted = ["triton", "cpp"]
    else:
        wanted = ["cpp", "triton"]
    out = []
    for name in wanted:
        ok, reason = availability(name, device)
        if ok and name == "triton" and device.type == "cpu":
            ok, reason = False, ("Triton on CPU runs only under its interpreter "
                                 "(TRITON_INTERPRET=1): a correctness path, not a timed one")
        out.append((name, None if ok else reason))
    if not any(r is None for _, r in out):
        ok, reason = availability("torch", device)
        out.insert(0, ("torch", None if ok else reason))
    else:  # the runnable one first
        out.sort(key=lambda item: item[1] is not None)
    return out


QUICK_PLAN = (("small", torch.float32, 2), ("llama2-7b-slice", torch.float32, 2),
              ("small", torch.bfloat16, 2), ("small", torch.float32, 3))
# Run order = priority (the run stops starting cases at its time budget): the target case,
# (then the scaling sweeps,) every model once, bf16, then more objectives.
FULL_PLAN = (("llama2-7b", torch.float32, 2), ("emu2-llm", torch.float32, 2),
             ("small", torch.float32, 2), ("llama2-7b", torch.bfloat16, 2),
             ("llama2-7b", torch.float32, 3), ("llama2-7b", torch.float32, 4),
             ("small", torch.bfloat16, 2), ("small", torch.float32, 3),
             ("small", torch.float32, 4), ("emu2-llm", torch.bfloat16, 2))
SCALING_AFTER_CASES = 1   # the scaling sweeps run after this many cases (the target one)
# Each AdamW contender holds its own parameters and optimizer state (4 N); for the 122 M
# parameter model that is ~2 GB per contender: leave that stage out there.
LARGE_PROBLEM_STAGES = {"emu2-llm": ("gram", "weights", "combine", "pareto_combine")}


def plan_cases(opts: SuiteOptions) -> list[tuple[str, torch.dtype, int]]:
    """(problem, dtype, K) in run order. With no --problems/--objectives/--dtypes: the default
    plan (the target case Llama-2-7B K=2 fp32 first; bf16 and K > 2 on a subset, Emu2 at K=2,
    to fit the time budget); otherwise every combination of what was asked for."""
    if not opts.explicit_plan:
        return list(QUICK_PLAN if opts.quick else FULL_PLAN)
    cases = [(name, dtype, K) for name in opts.problems for dtype in opts.dtypes
             for K in opts.objectives]
    headline = (HEADLINE[0], HEADLINE[2], HEADLINE[1])
    return sorted(cases, key=lambda c: c != headline)


def case_stages(opts: SuiteOptions) -> list[str]:
    return [s for s in C.STAGES if s in opts.stages]


# ----------------------------------------------------------------------------------------------
# Scaling sweeps

SCALING_CONTENDERS = ("loop", "flatcat", "foreach", "torchjd_mgda")


def scaling_plan(quick: bool) -> dict:
    if quick:
        return {"params": {"num_tensors": 56, "num_params": [1e5, 1e6]},
                "tensors": {"num_params": 1e6, "num_tensors": [10, 100, 300]}}
    return {"params": {"num_tensors": 448, "num_params": [1e5, 1e6, 1e7, 1e8]},
            "tensors": {"num_params": 1e7, "num_tensors": [10, 100, 1000, 5000]}}
