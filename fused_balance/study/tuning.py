"""Choosing a setting on the validation split: the best point of a grid, and whether the grid
brackets it (a best point at the grid's edge says the grid was too small, not where the optimum is)."""
from __future__ import annotations

import math


def grid_search(score, grid, *, prefer: float, factor: float = 3.0, max_extensions: int = 0) -> dict:
    """The best point of ``score`` over ``grid``; while it lies at the grid's edge, extend the grid
    geometrically past that edge (x·factor above, x/factor below), at most ``max_extensions`` new
    points. Ties go to the point nearest ``prefer``.

    ``score(x)``: a number to maximise (-inf: x is not allowed), or None when x has no result
    (report only: the search ends with the points that have one, without extending).

    Returns ``{"scores", "best", "status", "edge", "extensions", "factor", "max_extensions"}``:
    status "interior" (points on both sides of the best were evaluated), "edge" (still at the
    edge ``edge`` = "low" / "high" / "both" when the bound was hit) or "incomplete" (a result is
    missing); ``best`` is None only when no point has a result."""
    if not factor > 1:
        raise ValueError(f"factor must be > 1, got {factor}")
    scores: dict[float, float] = {}
    pending = sorted(set(float(x) for x in grid))
    extensions = 0
    while True:
        missing = False
        for x in pending:
            s = score(x)
            if s is None:
                missing = True
            else:
                scores[x] = float(s)
        if missing:
            return _result(scores, prefer, "incomplete", extensions, factor, max_extensions)
        result = _result(scores, prefer, None, extensions, factor, max_extensions)
        if result["status"] == "interior" or extensions >= max_extensions:
            return result
        low, high = min(scores), max(scores)
        pending = []
        if result["edge"] in ("high", "both"):
            pending.append(high * factor)
        if result["edge"] in ("low", "both") and extensions + len(pending) < max_extensions:
            pending.append(low / factor)
        extensions += len(pending)


def _result(scores, prefer, status, extensions, factor, max_extensions) -> dict:
    best = max(scores, key=lambda x: (scores[x], -abs(x - prefer))) if scores else None
    edge = None
    if best is not None and not min(scores) < best < max(scores):
        edge = "both" if len(scores) == 1 else ("low" if best == min(scores) else "high")
    if status is None:
        status = "edge" if edge else "interior"
    return {"scores": dict(sorted(scores.items())), "best": best, "status": status, "edge": edge,
            "extensions": extensions, "factor": factor, "max_extensions": max_extensions}


def constrained_score(final: dict, reference_text: float) -> float:
    """The tuning objective: the validation image cell score where text accuracy stays within 2 %
    (relative) of the reference run's, else -inf."""
    return final["cell_score"] if final["text_acc"] >= 0.98 * reference_text else -math.inf
