"""Seed statistics: mean ± std and paired per-seed differences with a 95 % t-interval."""
from __future__ import annotations

import math
import statistics

# two-sided 95 % quantiles of Student's t (df 1..30); beyond: the normal 1.96 is within 2 %
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042]


def t975(df: int) -> float:
    return _T975[df - 1] if 1 <= df <= len(_T975) else 1.96


def mean_std(values) -> tuple[float, float]:
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def interval(values) -> dict:
    """Mean, std and 95 % t-interval over seeds (infinite with one value)."""
    values = list(values)
    m, s = mean_std(values)
    half = t975(len(values) - 1) * s / math.sqrt(len(values)) if len(values) > 1 else math.inf
    return {"mean": m, "std": s, "low": m - half, "high": m + half, "n": len(values)}


def paired(a, b) -> dict:
    """Per-seed differences a − b: mean, std, 95 % t-interval, whether it excludes zero."""
    diffs = [x - y for x, y in zip(a, b)]
    found = interval(diffs)
    return {**found, "excludes_zero": bool(found["low"] > 0 or found["high"] < 0), "diffs": diffs}
