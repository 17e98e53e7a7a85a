"""The methods stage of the unified testbed (study/testbed_methods.py): chosen on validation,
judged on test by paired relative changes; run only on the check's regime tasks."""
import json
import math

import pytest
import torch

from fused_balance.study import testbed_methods as tm


def _run(seed, val_cell, val_text, test_cell, test_text):
    return {"seed": seed, "validation": {"cell_score": val_cell, "text_acc": val_text},
            "final": {"cell_score": test_cell, "text_acc": test_text}}


def _runs(overrides=None, seeds=4):
    """Every arm at vanilla's scores (0.5 cell, 0.8 text on both splits) but ``overrides``:
    {arm: (val_cell, val_text, [test_cell per seed], [test_text per seed])}."""
    runs = {}
    for arm in tm.METHODS:
        if overrides and arm in overrides:
            vc, vt, tc, tt = overrides[arm]
            runs[arm] = [_run(s, vc, vt, tc[s], tt[s]) for s in range(seeds)]
        else:
            runs[arm] = [_run(s, 0.5, 0.8, 0.5 + 0.01 * s, 0.8) for s in range(seeds)]
    return runs


def test_choice_is_made_on_validation_and_respects_the_text_condition():
    seeds = range(4)
    runs = _runs({
        # best on test, poor on validation: must not be chosen
        "pareto_mean_tau2": (0.55, 0.8, [0.9] * 4, [0.8] * 4),
        # best validation image, but its validation text is 3 % below vanilla's: not allowed
        "pareto_weaker_tau5": (0.9, 0.8 * 0.97, [0.6] * 4, [0.8] * 4),
        # the allowed best on validation
        "pareto_image_tau5": (0.7, 0.8 * 0.99, [0.6 + 0.01 * s for s in seeds], [0.79] * 4),
        "static_w10": (0.65, 0.8, [0.55] * 4, [0.8] * 4),
        "static_w100": (0.95, 0.5, [0.95] * 4, [0.5] * 4),  # text lost: not allowed
    })
    verdict = tm.judge_methods(runs)
    assert verdict["pareto"]["arm"] == "pareto_image_tau5" and verdict["pareto"]["text_condition_met"]
    assert "pareto_weaker_tau5" not in verdict["pareto"]["allowed"]
    assert verdict["static"]["arm"] == "static_w10" and verdict["static"]["interior"]
    gain = verdict["comparisons"]["pareto − vanilla"]
    expected = [(0.6 + 0.01 * s - (0.5 + 0.01 * s)) / (0.5 + 0.01 * s) for s in seeds]
    assert gain["image"]["changes"] == pytest.approx(expected, rel=1e-12)
    assert gain["image"]["mean"] == pytest.approx(sum(expected) / 4, rel=1e-12)
    assert gain["text"]["mean"] == pytest.approx(0.79 / 0.8 - 1, rel=1e-12)
    vs_static = verdict["comparisons"]["pareto − static"]
    assert vs_static["reference"] == "static_w10"
    assert vs_static["image"]["changes"] == pytest.approx([(0.6 + 0.01 * s) / 0.55 - 1 for s in seeds], rel=1e-12)
    # +19 % image at −1.25 % text, interval above zero: the target holds
    assert verdict["target_held"]


@pytest.mark.parametrize("test_text, test_cell, held", [
    ([0.79] * 4, [0.6, 0.61, 0.62, 0.63], True),
    ([0.76] * 4, [0.6, 0.61, 0.62, 0.63], False),     # text −5 %: over the 2 % cost
    ([0.8] * 4, [0.52, 0.53, 0.54, 0.55], False),      # image +4 %: under +10 %
    ([0.8] * 4, [1.0, 0.2, 1.0, 0.3], False),          # a mean gain with an interval across zero
])
def test_target(test_text, test_cell, held):
    runs = _runs({"pareto_mean_tau5": (0.8, 0.8, test_cell, test_text)})
    verdict = tm.judge_methods(runs)
    assert verdict["pareto"]["arm"] == "pareto_mean_tau5"
    assert verdict["target_held"] is held


def test_no_variant_within_the_text_condition_is_flagged():
    runs = _runs({arm: (0.5, 0.5, [0.5] * 4, [0.5] * 4) for arm in tm.PARETO_VARIANTS})
    runs["mmpareto"] = [_run(s, 0.6, 0.5, 0.5, 0.5) for s in range(4)]
    verdict = tm.judge_methods(runs)
    assert verdict["pareto"]["arm"] == "mmpareto" and not verdict["pareto"]["text_condition_met"]
    assert verdict["static"]["arm"] == "vanilla" and not verdict["static"]["interior"]


def _tiny():
    from fused_balance.study import testbed

    cfg = testbed.CONFIGS["tiny"]
    return cfg["model"], {**cfg["lora"], "max_objects": cfg["model"]["max_objects"]}


def test_a_pareto_method_trains_through_the_balancer(tmp_path):
    """policy "sum" through ParetoLoRA gives the static weight-1 run (the balancer writes the
    plain sum's gradient); another weight gives another run (the weight is used)."""
    from fused_balance.study import testbed
    from fused_balance.study.data import TASK_STYLES, TEST_SEED, VALIDATION_SEED

    mcfg, lcfg = _tiny()
    split = testbed._split(TEST_SEED, 4, mcfg, TASK_STYLES["long_text"])
    validation = testbed._split(VALIDATION_SEED, 4, mcfg, TASK_STYLES["long_text"])
    results = {}
    for name, method in {"sum": {"kind": "pareto", "policy": "sum"}, "w1": {"kind": "static", "image_weight": 1.0},
                         "w3": {"kind": "static", "image_weight": 3.0}}.items():
        model, _ = testbed.pretrained(tmp_path, 0, mcfg, 4)
        results[name] = testbed.train_task(model, "long_text", name, 0, lcfg, split, method=method,
                                           validation=validation)
    for k in ("text", "image"):
        assert results["sum"]["train_losses"][k] == pytest.approx(results["w1"]["train_losses"][k], rel=1e-4)
    assert results["w3"]["train_losses"]["image"][-1] != pytest.approx(results["w1"]["train_losses"]["image"][-1],
                                                                       rel=1e-4)
    assert set(results["w1"]["validation"]) == set(results["w1"]["final"])
    with pytest.raises(ValueError, match="unknown method kind"):
        testbed.train_task(testbed.pretrained(tmp_path, 0, mcfg, 4)[0], "long_text", "x", 0, lcfg, split,
                           method={"kind": "gradnorm"})


@pytest.mark.parametrize("regime", [[], ["long_text"]])
def test_methods_run_only_on_the_regime_tasks(tmp_path, monkeypatch, regime):
    """The methods follow the check's verdict, on its regime tasks only, with their table headed
    by the verdict."""
    from fused_balance.study import testbed

    real_judge = testbed.judge

    def judge(tasks, fg):
        verdict = real_judge(tasks, fg)
        return {**verdict, "regime_tasks": regime}
    monkeypatch.setattr(testbed, "judge", judge)
    result = tm.check_and_compare(tmp_path, "tiny", [0, 1], progress=False, workers=1)
    written = sorted(p.name for p in tmp_path.glob("testbed_methods_*.md"))
    assert written == [f"testbed_methods_{t}.md" for t in regime]
    assert sorted(result.get("methods", {})) == regime
    assert (tmp_path / "testbed_methods.png").exists() == bool(regime)
    for task in regime:
        jobs = list((tmp_path / "jobs" / "testbed_methods" / task).glob("*.json"))
        assert len(jobs) == 2 * len(tm.METHODS)
        stored = json.loads((tmp_path / f"testbed_methods_{task}.json").read_text())
        assert set(stored["scores"]) == set(tm.METHODS)
        assert all(len(v) == 2 and all(math.isfinite(s["validation"]["cell_score"]) for s in v)
                   for v in stored["scores"].values())
        table = (tmp_path / f"testbed_methods_{task}.md").read_text()
        status = "ACCEPTED" if result["verdict"]["accepted"] else "NOT ACCEPTED"
        assert f"Testbed check: **{status}" in table
        assert all(f"| {arm} |" in table for arm in tm.METHODS)
        assert "Target (issue 21" in table
