"""Benchmark of time vs total parameters and vs tensor count (log-log plots).

Every contender on the same gradients, checked against ours before it is timed; results.json,
results.md and PNG plots in --out. A thin wrapper over `fused-balance bench --stages scaling`;
every option of that command works here (--quick, --problems, --objectives, --dtypes, ...).

    python benchmarks/bench_scaling.py --quick --out bench_out/scaling
"""
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
    from fused_balance.benchmarking import run_cli
    sys.exit(run_cli(defaults={"stages": ["scaling"], "out": "bench_out/scaling"}))
