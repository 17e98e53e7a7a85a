"""The generated report's paired differences between variants, checked against a hand
computation in float64 on synthetic job records (no model trained)."""
import json
import math
import random
import statistics

import pytest

# two-sided 95 % quantiles of Student's t, the distribution's values (df: quantile)
T975 = {1: 12.706204736174698, 2: 4.302652729911275, 3: 3.182446305284263, 4: 2.7764451051977987}

SPECS = {"vanilla": {"kind": "vanilla"}, "static": {"kind": "static", "image_weight": 30.0},
         "gradnorm": {"kind": "gradnorm", "alpha": 1.5}, "mgda": {"kind": "mgda"},
         "pareto": {"kind": "pareto", "tau": 5.0, "segments": "layer"},
         "pareto_tau2": {"kind": "pareto", "tau": 2.0, "segments": "layer"},
         "pareto_tau20": {"kind": "pareto", "tau": 20.0, "segments": "layer"},
         "pareto_group": {"kind": "pareto", "tau": 5.0, "segments": "group"}}


def _unified_runs(seed=0):
    """Records of every arm; each arm has a seed the others lack or misses one, in shuffled order,
    so a contrast must pair by seed."""
    rng = random.Random(seed)
    runs = {}
    for arm, spec in SPECS.items():
        seeds = [0, 1, 2, 3] + ([4] if arm in ("pareto", "static") else [])
        if arm == "pareto_group":
            seeds.remove(2)
        rng.shuffle(seeds)
        runs[arm] = [{"arm": spec, "seed": s, "grad_ratios": [{"step": 0, "segment": "model.layers.0", "ratio": 2.0}],
                      "final": {"text_acc": rng.uniform(0.6, 0.9), "cell_score": rng.uniform(0.5, 0.8),
                                "psnr": rng.uniform(11, 15), "fg_acc": 0.1, "exact": 0.0, "image_loss": 0.01},
                      "curve": []} for s in seeds]
    return runs


def _by_hand(runs, a, b, key):
    """Mean, std and 95 % t-interval of A − B over the common seeds, in float64, step by step."""
    left = {r["seed"]: r["final"][key] for r in runs[a]}
    right = {r["seed"]: r["final"][key] for r in runs[b]}
    seeds = sorted(set(left) & set(right))
    diffs = [left[s] - right[s] for s in seeds]
    n = len(diffs)
    mean = math.fsum(diffs) / n
    std = math.sqrt(math.fsum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = T975[n - 1] * std / math.sqrt(n)
    return seeds, mean, std, mean - half, mean + half


def _check(row_stats, seeds, expected):
    exp_seeds, mean, std, low, high = expected
    assert seeds == exp_seeds
    assert row_stats["n"] == len(exp_seeds)
    assert row_stats["mean"] == pytest.approx(mean, rel=1e-12, abs=1e-15)
    assert row_stats["std"] == pytest.approx(std, rel=1e-12)
    # stats.py tabulates t to 3 decimals
    assert row_stats["low"] == pytest.approx(low, abs=2e-3 * std)
    assert row_stats["high"] == pytest.approx(high, abs=2e-3 * std)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unified_contrasts_match_a_hand_computation(seed):
    from fused_balance.study.report import unified_contrasts

    runs = _unified_runs(seed)
    rows = unified_contrasts(runs)
    # the method pairs, then every two arms of one kind that differ in one setting: τ reads
    # smaller − larger, segments the later arm − the earlier
    assert [(r["a"], r["b"], r["setting"]) for r in rows] == [
        ("pareto", "static", None), ("pareto", "gradnorm", None), ("pareto", "mgda", None),
        ("pareto_tau2", "pareto", "tau"), ("pareto", "pareto_tau20", "tau"), ("pareto_group", "pareto", "segments"),
        ("pareto_tau2", "pareto_tau20", "tau")]
    for row in rows:
        for key in ("text_acc", "cell_score", "psnr"):
            _check(row[key], row["seeds"], _by_hand(runs, row["a"], row["b"], key))
    tau = next(r for r in rows if (r["a"], r["b"]) == ("pareto_tau2", "pareto"))
    assert tau["values"] == [2.0, 5.0]
    group = next(r for r in rows if r["a"] == "pareto_group")
    assert group["seeds"] == [0, 1, 3]  # seed 2 is missing from that arm


def test_llava_contrasts_report_final_accuracy_and_steps_to_threshold_apart():
    from fused_balance.study.report import llava_contrasts

    budget, every = 100, 10
    rng = random.Random(5)
    runs = {}
    for arm in ("constant", "sched_first", "sched_exact", "sched_aux"):
        runs[arm] = []
        for s in range(5):
            accs = sorted(rng.uniform(0.2, 0.7) for _ in range(budget // every))
            runs[arm].append({"arm": arm, "seed": s, "final": {"acc": accs[-1]},
                              "curve": [{"step": every * (i + 1), "acc": a} for i, a in enumerate(accs)]})
    rows = llava_contrasts(runs, budget)
    assert [(r["a"], r["b"]) for r in rows] == [("sched_exact", "sched_first"), ("sched_aux", "sched_first")]
    goal = {r["seed"]: r["final"]["acc"] for r in runs["constant"]}

    def steps(arm, s):  # first evaluated step at or above the goal, else the whole budget
        record = next(r for r in runs[arm] if r["seed"] == s)
        return min([e["step"] for e in record["curve"] if e["acc"] >= goal[s]], default=budget)

    for row in rows:
        _check(row["acc"], row["seeds"], _by_hand(runs, row["a"], row["b"], "acc"))
        diffs = [steps(row["a"], s) - steps(row["b"], s) for s in range(5)]
        mean, std = statistics.fmean(diffs), statistics.stdev(diffs)
        half = T975[4] * std / math.sqrt(5)
        _check(row["steps_to_constant_final"], row["steps_seeds"],
               (list(range(5)), mean, std, mean - half, mean + half))
        for arm in (row["a"], row["b"]):
            never = sum(not any(e["acc"] >= goal[s] for e in runs[arm][s]["curve"]) for s in range(5))
            assert row["censored"][arm] == never


def test_written_report_carries_the_contrasts_and_lists_each_in_the_summary(tmp_path):
    from fused_balance.study.labels import ARM_LABELS
    from fused_balance.study.report import write_report
    from fused_balance.study.run import CONFIGS

    runs = _unified_runs(0)
    results = {"unified": {"emu2": runs}, "llava": {}, "tuning": {"emu2": {
        "static": {"grid": {"1": {"text_acc": 0.8, "cell_score": 0.5}, "30": {"text_acc": 0.8, "cell_score": 0.6}},
                   "chosen": 30.0, "search": {"status": "edge", "edge": "high", "extensions": 2, "factor": 3.0,
                                              "max_extensions": 2}}}}}
    meta = {"configuration": "tiny", "config": CONFIGS["tiny"], "seeds": [0, 1, 2, 3], "threads": 1, "machine": "cpu",
            "torch": "x", "date_utc": "now", "command": "test", "job_wall_s_total": 1.0}
    tables = write_report(tmp_path, results, meta, plots=False)
    stored = json.loads((tmp_path / "tables.json").read_text())
    assert stored["contrasts"]["emu2"] == json.loads(json.dumps(tables["contrasts"]["emu2"]))
    summary = (tmp_path / "summary.md").read_text()
    for row in tables["contrasts"]["emu2"]:
        assert f"{ARM_LABELS[row['a']]} − {ARM_LABELS[row['b']]}" in summary
    assert "upper edge" in summary  # the static weight's search status is reported
