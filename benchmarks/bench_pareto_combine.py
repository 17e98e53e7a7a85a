"""Benchmark of the whole pareto_combine (Gram, min-norm weights, combine) and the K x K weights solve.

Every contender on the same gradients, checked against ours before it is timed; results.json,
results.md and PNG plots in --out. A thin wrapper over `fused-balance bench --stages pareto_combine weights`;
every option of that command works here (--quick, --problems, --objectives, --dtypes, ...).

    python benchmarks/bench_pareto_combine.py --quick --out bench_out/pareto_combine
"""
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout too
    from fused_balance.benchmarking import run_cli
    sys.exit(run_cli(defaults={"stages": ["pareto_combine", "weights"], "out": "bench_out/pareto_combine"}))
