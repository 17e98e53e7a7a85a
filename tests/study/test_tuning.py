"""Tuning on the validation split: the grid search reports whether its choice is interior and
extends the grid geometrically past an edge, within a bound."""
import math

import pytest


def _peak_at(optimum):
    """A unimodal score in log-space with its maximum at ``optimum``; counts its calls."""
    calls = []

    def score(x):
        calls.append(x)
        return -(math.log(x) - math.log(optimum)) ** 2
    return score, calls


def _lattice_best(score_fn, grid, factor, max_extensions):
    """Independent reference: the best point of the grid plus every geometric extension that the
    bound allows on either side (the search may stop earlier, never with a better point left)."""
    low, high = min(grid), max(grid)
    points = set(grid) | {high * factor ** k for k in range(1, max_extensions + 1)} \
        | {low / factor ** k for k in range(1, max_extensions + 1)}
    return max(points, key=score_fn)


@pytest.mark.parametrize("optimum", [0.02, 0.3, 2.0, 7.0, 50.0, 150.0, 600.0])
def test_grid_search_extends_until_the_best_point_is_interior(optimum):
    from fused_balance.study.tuning import grid_search

    grid = [1.0, 3.0, 10.0, 30.0]
    score, calls = _peak_at(optimum)
    found = grid_search(score, grid, prefer=1.0, factor=3.0, max_extensions=5)
    assert found["status"] == "interior" and found["edge"] is None
    points = sorted(found["scores"])
    assert points[0] < found["best"] < points[-1]
    assert len(calls) == len(set(calls)) == len(points)  # each point is trained once
    assert found["extensions"] == len(points) - len(grid)
    assert set(grid) <= set(points)
    reference_score, _ = _peak_at(optimum)
    assert found["best"] == pytest.approx(_lattice_best(reference_score, grid, 3.0, 5))
    # the best is within one grid step of the true optimum (the search brackets it)
    assert abs(math.log(found["best"] / optimum)) <= math.log(3.0)


@pytest.mark.parametrize("direction", ["high", "low"])
def test_grid_search_reports_the_edge_when_the_bound_is_hit(direction):
    from fused_balance.study.tuning import grid_search

    def score(x):  # monotone: the best point is always at one edge
        return math.log(x) if direction == "high" else -math.log(x)

    found = grid_search(score, [1.0, 3.0, 10.0], prefer=1.0, factor=2.0, max_extensions=3)
    assert found["status"] == "edge" and found["edge"] == direction and found["extensions"] == 3
    expected = 10.0 * 2 ** 3 if direction == "high" else 1.0 / 2 ** 3
    assert found["best"] == pytest.approx(expected)
    assert found["best"] == (max if direction == "high" else min)(found["scores"])

    no_extension = grid_search(score, [1.0, 3.0, 10.0], prefer=1.0, max_extensions=0)
    assert no_extension["status"] == "edge" and no_extension["extensions"] == 0
    assert sorted(no_extension["scores"]) == [1.0, 3.0, 10.0]


def test_grid_search_disallowed_points_ties_and_missing_results():
    from fused_balance.study.tuning import grid_search

    # better and better, but not allowed beyond 40: the allowed best (30) becomes interior once
    # the first extension (90) turns out not allowed
    found = grid_search(lambda x: x if x <= 40 else -math.inf, [1.0, 3.0, 10.0, 30.0], prefer=1.0, max_extensions=3)
    assert found["best"] == 30.0 and found["status"] == "interior" and found["extensions"] == 1
    # a flat score: ties go to the preferred point; at the low edge, one step down makes it interior
    flat = grid_search(lambda x: 0.5, [1.0, 4.0], prefer=1.0, factor=3.0, max_extensions=1)
    assert flat["best"] == 1.0 and flat["status"] == "interior" and min(flat["scores"]) == pytest.approx(1 / 3)
    # a missing result (report only) ends the search with the points that have one
    missing = grid_search(lambda x: None if x > 5 else x, [1.0, 3.0, 10.0], prefer=1.0, max_extensions=2)
    assert missing["status"] == "incomplete" and missing["best"] == 3.0 and missing["extensions"] == 0
    first_missing = grid_search(lambda x: None if x < 1 else -x, [0.5, 1.0, 2.0], prefer=1.0, max_extensions=2)
    assert first_missing["status"] == "incomplete" and first_missing["best"] == 1.0
    with pytest.raises(ValueError):
        grid_search(lambda x: x, [1.0], prefer=1.0, factor=1.0)


class _Bar:
    total = 0

    def update(self, n):
        pass


def test_tune_static_records_the_extended_grid_and_whether_the_choice_is_interior(monkeypatch, tmp_path):
    """tune_static on a synthetic training function (no model trained): the cell score grows with
    the weight up to 200, text accuracy falls off beyond 150; the search must go past the grid's
    edge (30) and stop with an interior choice, recording the extension."""
    import fused_balance.study.arms as arms
    from fused_balance.study.run import tune_static

    trained = []

    def fake_train(family, arm, seed, cfg, split):
        w = arm["image_weight"]
        trained.append(w)
        cell = 0.5 + 0.4 * min(w, 200.0) / 200.0
        text = 0.85 if w <= 150 else 0.70
        return {"final": {"text_acc": text, "cell_score": cell}}

    monkeypatch.setattr(arms, "train_unified", fake_train)
    validation = {"generation": {"grid": [0] * 4}}
    cfg = {"steps": 1}
    tuned = tune_static(tmp_path, "emu2", cfg, [3.0, 10.0, 30.0], validation, _Bar(),
                        search={"factor": 3.0, "max_extensions": 3})
    # 90 is better than 30 and allowed; 270 is better still but costs text: 90 is interior
    assert tuned["chosen"] == 90.0
    assert tuned["search"]["status"] == "interior" and tuned["search"]["extensions"] == 2
    assert set(tuned["grid"]) == {"1", "3", "10", "30", "90", "270"}
    assert sorted(trained) == [1.0, 3.0, 10.0, 30.0, 90.0, 270.0]

    bounded = tune_static(tmp_path / "b", "emu2", cfg, [3.0, 10.0, 30.0], validation, _Bar(),
                          search={"factor": 3.0, "max_extensions": 0})
    assert bounded["chosen"] == 30.0
    assert bounded["search"]["status"] == "edge" and bounded["search"]["edge"] == "high"
