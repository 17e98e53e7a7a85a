"""`fused-balance bench`: throughput, roofline, memory and scaling benchmarks of the fused passes
against the ways people compute them today (per-tensor loops, flatten+concatenate, foreach,
torch.compile, TorchJD), on LoRA adapter shapes of real models.

The CLI calls ``add_arguments(parser)`` and ``main(args)``. Modules: suite (what runs),
running (runs it), results (checks, roofline, targets), report and plots (formatting).
"""
from __future__ import annotations

import argparse
import sys

__all__ = ["add_arguments", "main"]

_STAGE_CHOICES = ("gram", "weights", "combine", "pareto_combine", "adamw", "scaling", "overhead")
_DTYPE_CHOICES = ("fp32", "bf16", "fp16", "fp64")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from fused_balance.benchmarking.problems import PROBLEMS
    parser.add_argument("--out", default="bench_out",
                        help="output folder for results.json, results.md and the plots")
    parser.add_argument("--quick", action="store_true",
                        help="small model and a 4-layer Llama slice, few repeats (< 60 s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: cuda when a GPU is present, else cpu")
    parser.add_argument("--problems", nargs="+", choices=sorted(PROBLEMS), default=None,
                        help="default: small llama2-7b emu2-llm (quick: small llama2-7b-slice)")
    parser.add_argument("--objectives", nargs="+", type=int, default=None, metavar="K",
                        help="numbers of objectives (default 2 3 4; quick: 2 3)")
    parser.add_argument("--dtypes", nargs="+", choices=_DTYPE_CHOICES, default=None,
                        help="gradient dtypes (default fp32 bf16)")
    parser.add_argument("--stages", nargs="+", choices=_STAGE_CHOICES, default=None,
                        help="stages to run (default: all, plus the scaling sweeps)")
    parser.add_argument("--repeats", type=int, default=None, metavar="N",
                        help="timed rounds per stage at most (default 15, quick 5); fewer when a "
                             "round is slow (--stage-budget)")
    parser.add_argument("--stage-budget", type=float, default=None, metavar="S",
                        help="seconds of timed rounds per stage (default 1.5, quick 0.5)")
    parser.add_argument("--time-budget", type=float, default=None, metavar="S",
                        help="cases (and scaling points) that would start after S seconds are "
                             "skipped and listed (default 390, quick 45; 0: no limit)")
    parser.add_argument("--compile-budget", type=float, default=120.0, metavar="S",
                        help="seconds the whole run may spend in torch.compile (0: skip it)")
    parser.add_argument("--backend", nargs="+", default=None, metavar="NAME",
                        help="our backends to time (default: cpp on CPU, triton and cpp on CUDA; "
                             "the torch reference when none is available)")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--threads", type=int, default=None, metavar="T",
                        help="torch intra-op threads for the run (default: all cores; --quick: 1, "
                             "so that a smoke run on a busy shared machine stays near a minute)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _options(args):
    import torch

    from fused_balance.benchmarking.suite import DTYPES, SuiteOptions
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench: --device cuda, but torch sees no GPU here")
    quick = bool(args.quick)
    return SuiteOptions(
        out=args.out, quick=quick, device=torch.device(device),
        problems=tuple(args.problems or ()), objectives=tuple(args.objectives or ()),
        dtypes=tuple(DTYPES[d] for d in (args.dtypes or ())),
        stages=tuple(args.stages or ()),
        repeats=args.repeats or (5 if quick else 15),
        stage_budget_s=(args.stage_budget if args.stage_budget is not None
                        else (0.5 if quick else 1.5)),
        compile_budget_s=args.compile_budget, memory=not args.no_memory, plots=not args.no_plots,
        seed=args.seed, ours_backends=tuple(args.backend or ()),
        progress=not args.no_progress,
        explicit_plan=bool(args.problems or args.objectives or args.dtypes),
        threads=args.threads if args.threads is not None else (1 if quick else 0),
        slow_call_s=1.0 if quick else 2.0,
        time_budget_s=(args.time_budget if args.time_budget is not None
                       else (45.0 if quick else 390.0)))


def main(args: argparse.Namespace) -> int:
    """Run the suite. 0: done and ours agreed with the float64 reference everywhere;
    1: ours disagreed somewhere (see results.md); 2: bad arguments."""
    try:
        opts = _options(args)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        return 2
    if any(k < 2 for k in opts.objectives):
        print("bench: --objectives must be >= 2", file=sys.stderr)
        return 2
    from fused_balance.benchmarking.running import run_suite
    results = run_suite(opts)
    return 0 if results.get("self_check_passed") else 1

