"""The unified testbed (issue 21, 1a): held-out scene attributes, the causal pretrained encoder,
the pretraining cache, the check's acceptance logic on hand-made numbers, and a tiny end-to-end
run of ``fused-balance study --testbed-check``."""
import json
import math

import pytest
import torch

pytest.importorskip("transformers", reason="the study needs transformers (extra [demo])")
pytest.importorskip("peft", reason="the study needs peft (extra [demo])")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_task_attributes_are_disjoint_from_pretraining():
    from fused_balance.study.data import (HELD_OUT_SHAPES, PRETRAINING, SHAPES, TASK_STYLES, TESTBED_WORDS, WORDS,
                                          sample_scenes)

    assert not set(HELD_OUT_SHAPES) & set(SHAPES)
    assert not set(HELD_OUT_SHAPES.values()) & set(SHAPES.values())
    assert TESTBED_WORDS[:len(WORDS)] == WORDS and len(set(TESTBED_WORDS)) == len(TESTBED_WORDS)
    new_words = set(TESTBED_WORDS) - set(WORDS)
    pretraining = sample_scenes(400, torch.Generator().manual_seed(0), 2, PRETRAINING)
    seen_words = {w for s in pretraining for w in s.caption}
    assert not seen_words & new_words and not {o[1] for s in pretraining for o in s.objects} & set(HELD_OUT_SHAPES)
    tasks = {name: sample_scenes(200, torch.Generator().manual_seed(1), 2, style)
             for name, style in TASK_STYLES.items()}
    assert {o[1] for s in tasks["new_shapes"] for o in s.objects} == set(HELD_OUT_SHAPES)
    assert {len(s.objects) for s in pretraining} == {1, 2} and {len(s.objects) for s in tasks["new_layout"]} == {3, 4}
    long_captions = tasks["long_text"]
    mean_length = lambda scenes: sum(len(s.caption) for s in scenes) / len(scenes)  # noqa: E731
    assert mean_length(long_captions) > 1.5 * mean_length(pretraining)
    assert {w for s in long_captions for w in s.caption} & new_words  # a new phrasing, not just more of it
    for scene in tasks["new_shapes"]:  # the picture shows the held-out shapes the caption names
        assert sum(c > 0 for c in scene.grid) == sum(HELD_OUT_SHAPES[o[1]].count("1") for o in scene.objects)


def test_encoder_is_causal_and_unit_rms():
    """Cell j's embedding depends on cells 0..j only: the unified model reads the embeddings of
    the patches drawn so far without seeing the one it has to predict."""
    from fused_balance.study.encoder import VisualEncoder

    encoder = VisualEncoder(dim=8, width=16, seed=3).eval()
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 7, (5, 16), generator=g)
    b = a.clone()
    b[:, 9:] = torch.randint(0, 7, (5, 7), generator=g)
    ea, eb = encoder(a), encoder(b)
    assert torch.allclose(ea[:, :9], eb[:, :9], atol=1e-6)
    assert not torch.allclose(ea[:, 9:], eb[:, 9:])
    assert torch.allclose(ea.pow(2).mean(-1), torch.ones(5, 16), atol=1e-3)


def test_layer_ratios_against_float64():
    from fused_balance.study.testbed import layer_ratios

    g = torch.Generator().manual_seed(0)
    names = ["llm.layers.0.self_attn.q_proj.lora_A.default.weight", "llm.layers.0.mlp.up_proj.lora_B.default.weight",
             "llm.layers.1.self_attn.v_proj.lora_A.default.weight", "llm.embed_tokens.weight"]
    named = [(n, None) for n in names]
    text = [torch.randn(4, 3, generator=g) for _ in names]
    image = [0.1 * torch.randn(4, 3, generator=g) for _ in names[:3]] + [None]  # not reached: no layer
    got = layer_ratios(named, {"text": text, "image": image})
    norm = lambda gs: math.sqrt(sum(float((x.double() ** 2).sum()) for x in gs))  # noqa: E731
    assert set(got) == {"llm.layers.0", "llm.layers.1"}
    assert got["llm.layers.0"] == pytest.approx(norm(text[:2]) / norm(image[:2]), rel=1e-12)
    assert got["llm.layers.1"] == pytest.approx(norm(text[2:3]) / norm(image[2:3]), rel=1e-12)


def _task(image_drop, text_drop, ratios, runs=None):
    """One task's numbers; ``runs``: each run's per-layer ratios (default: three runs with the
    pooled ratios)."""
    layers = lambda rs: {f"llm.layers.{i}": r for i, r in enumerate(rs)}  # noqa: E731
    return {"image_drop": image_drop, "text_drop": text_drop, "layer_ratio": layers(ratios),
            "run_layer_ratio": [layers(r) for r in (runs or [ratios] * 3)]}


GOOD = {"a": _task([0.20, 0.25, 0.22], [0.01, 0.00, 0.02], [8.0, 12.0, 20.0, 30.0]),
        "b": _task([0.03, 0.05, 0.04], [0.00, 0.01, 0.00], [3.0, 4.0, 4.5, 5.0])}


def test_judge_accepts_the_papers_regime():
    from fused_balance.study.testbed import judge

    verdict = judge(GOOD, [0.9, 0.85, 0.8])
    assert verdict["accepted"] and verdict["failing"] == []
    assert verdict["regime_tasks"] == ["a"]
    row = verdict["tasks"]["a"]
    assert row["ratio_median"] == 16.0 and row["layer_spread"] == 30.0 / 8.0
    assert verdict["task_spread"] == pytest.approx(16.0 / 4.25)


def test_spreads_are_taken_within_a_run_and_the_median_run_decides():
    """Each run's layers differ ×2.5, but a different layer leads in each run: pooled per layer
    index they look like one scale (×1.1); judged within runs they differ. The reverse: one
    outlier run with a ×4 spread does not make the typical run differ."""
    from fused_balance.study.testbed import judge

    rotating = [[10.0, 25.0, 12.0, 13.0], [25.0, 10.0, 13.0, 12.0], [12.0, 13.0, 25.0, 10.0]]
    pooled = [12.0, 13.0, 13.0, 12.0]
    tasks = {"a": _task(GOOD["a"]["image_drop"], GOOD["a"]["text_drop"], pooled, rotating),
             "b": _task(GOOD["b"]["image_drop"], GOOD["b"]["text_drop"], [3.0, 4.0, 4.5, 5.0])}
    verdict = judge(tasks, [0.9, 0.85, 0.8])
    row = verdict["tasks"]["a"]
    assert row["pooled_layer_spread"] == pytest.approx(13.0 / 12.0)
    assert row["run_layer_spreads"] == [2.5, 2.5, 2.5] and row["layer_spread"] == 2.5
    assert verdict["accepted"]
    # run by run across tasks: run i's median over layers in a (12.5 in each run) over b's (4.25)
    assert verdict["run_task_spreads"] == pytest.approx([12.5 / 4.25] * 3)
    one_outlier = [[15.0, 16.0, 17.0, 18.0], [15.0, 16.0, 17.0, 18.0], [8.0, 16.0, 17.0, 32.0]]
    flat = {"a": _task(GOOD["a"]["image_drop"], GOOD["a"]["text_drop"], [15.0, 16.0, 17.0, 18.0], one_outlier),
            "b": _task(GOOD["b"]["image_drop"], GOOD["b"]["text_drop"], [4.0, 4.2, 4.4, 4.5])}
    verdict = judge(flat, [0.9, 0.85, 0.8])
    assert verdict["tasks"]["a"]["run_layer_spreads"][2] == 4.0
    assert verdict["failing"] == ["ratio differs across layers"]


@pytest.mark.parametrize("change, failing", [
    # the pretrained model does not draw
    (lambda t, fg: (t, [0.5, 0.6, 0.55]), "pretrained model draws"),
    # image drops more than text, but by less than the margin
    (lambda t, fg: ({**t, "a": {**t["a"], "image_drop": [0.05, 0.06, 0.055]}}, fg),
     "image drops clearly more than text"),
    # a large mean gap whose paired interval reaches below the margin (one seed disagrees)
    (lambda t, fg: ({**t, "a": {**t["a"], "image_drop": [0.40, 0.30, 0.0]}}, fg), "image drops clearly more than text"),
    # every task's median ratio below 10
    (lambda t, fg: ({k: _task(v["image_drop"], v["text_drop"], [r / 4 for r in v["layer_ratio"].values()])
                     for k, v in t.items()}, fg), "per-layer ratio >= 10x"),
    # one constant scale over layers (every task)
    (lambda t, fg: ({"a": _task(t["a"]["image_drop"], t["a"]["text_drop"], [15.0, 16.0, 17.0, 18.0]),
                     "b": _task(t["b"]["image_drop"], t["b"]["text_drop"], [4.0, 4.2, 4.4, 4.5])}, fg),
     "ratio differs across layers"),
    # the same ratios in every task
    (lambda t, fg: ({"a": t["a"], "b": {**t["b"], "layer_ratio": t["a"]["layer_ratio"],
                                        "run_layer_ratio": t["a"]["run_layer_ratio"]}}, fg),
     "ratio differs across tasks"),
])
def test_judge_rejects_each_criterion(change, failing):
    from fused_balance.study.testbed import judge

    tasks, fg = change(GOOD, [0.9, 0.85, 0.8])
    verdict = judge(tasks, fg)
    assert not verdict["accepted"] and verdict["failing"] == [failing]


def test_pretraining_is_cached_per_seed(tmp_path, monkeypatch):
    from fused_balance.study import testbed

    cfg = testbed.CONFIGS["tiny"]["model"]
    first, info = testbed.pretrained(tmp_path, 0, cfg, 4)
    assert not info["cached"] and (tmp_path / "cache" / "testbed" / "seed0" / "pretrained.pt").exists()

    def no_training(*args, **kwargs):
        raise AssertionError("pretrained again although the cache holds this seed")

    monkeypatch.setattr(testbed, "pretrain", no_training)
    second, info2 = testbed.pretrained(tmp_path, 0, cfg, 4)
    assert info2["cached"] and info2["unified"] == info["unified"]
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(AssertionError, match="pretrained again"):  # another seed or other settings: not reused
        testbed.pretrained(tmp_path, 1, cfg, 4)
    with pytest.raises(AssertionError, match="pretrained again"):
        testbed.pretrained(tmp_path, 0, {**cfg, "pretrain_steps": cfg["pretrain_steps"] + 1}, 4)


def test_tiny_testbed_check_end_to_end(tmp_path):
    """Two worker processes write the check; a rerun in one process reads everything back, and
    a job run again in this process gives what the worker gave (no dependence on workers)."""
    from fused_balance.cli import main as cli_main
    from fused_balance.study.testbed import ARMS, CONFIGS

    out = tmp_path / "check"
    args = ["study", "--testbed-check", "unified", "--tiny", "--out", str(out), "--no-progress"]
    assert cli_main(args + ["--workers", "2"]) == 0
    config = CONFIGS["tiny"]
    jobs = sorted((out / "jobs" / "testbed").rglob("*.json"))
    assert len(jobs) == config["seeds"] * len(config["tasks"]) * len(ARMS)
    from fused_balance.study.data import TASK_STYLES
    for job in jobs:  # a job is read back only for the same task (test_a_changed_task_is_a_new_job)
        settings = json.loads(job.read_text())["settings"]
        assert settings["style"] == json.loads(json.dumps(TASK_STYLES[settings["task"]].fingerprint()))
    result = json.loads((out / "testbed_check.json").read_text())
    verdict = result["verdict"]
    assert set(verdict["tasks"]) == set(config["tasks"])
    assert verdict["accepted"] == (verdict["failing"] == [])
    for task in config["tasks"]:
        summary = result["tasks"][task]
        assert summary["seeds"] == [0, 1] and len(summary["image_drop"]) == 2
        assert len(summary["layer_ratio"]) == config["model"]["layers"]
        assert all(r > 0 for r in summary["layer_ratio"].values())
    # the CLI runs the methods after the check, on its regime tasks only
    assert sorted(p.name for p in out.glob("testbed_methods_*.md")) == sorted(
        f"testbed_methods_{t}.md" for t in verdict["regime_tasks"])
    table = (out / "testbed_check.md").read_text()
    assert ("**NOT ACCEPTED**" in table) == (not verdict["accepted"])
    assert all(f"FAIL: {c}" in table for c in verdict["failing"])
    assert all(f"| {task} |" in table for task in config["tasks"])
    # a rerun reads everything back: pretraining from the cache, every job from its file
    redo = out / "jobs" / "testbed" / config["tasks"][0] / "vanilla__seed1.json"
    by_worker = json.loads(redo.read_text())
    redo.unlink()
    before = {p: p.stat().st_mtime_ns for folder in ("jobs", "cache") for p in (out / folder).rglob("*") if p.is_file()}
    assert cli_main(args + ["--workers", "1"]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in before}
    assert all(p["cached"] for p in json.loads((out / "testbed_check.json").read_text())["pretraining"])
    again = json.loads(redo.read_text())
    assert again.pop("wall_s") and by_worker.pop("wall_s") and again == by_worker


def test_a_changed_task_is_a_new_job():
    """The task jobs' cache settings hold the task's style, so editing a task's phrasing reruns
    its jobs instead of reading back results of the old task."""
    import dataclasses

    from fused_balance.study.data import TASK_STYLES

    prints = {name: json.dumps(style.fingerprint()) for name, style in TASK_STYLES.items()}
    assert len(set(prints.values())) == len(prints)
    long = TASK_STYLES["long_text"]
    assert dataclasses.replace(long, tail=". the rest of the picture is empty").fingerprint() != long.fingerprint()
    assert long.fingerprint()["templates"][0].startswith("looking at the top left")
