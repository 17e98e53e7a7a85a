"""The encoder+LLM testbed (issue 21, 1b): questions and their answers, the sequence masks, the
accuracy, the judge from numbers alone, the pretraining cache and a tiny run of
``fused-balance study --testbed-check encoder_llm``."""
import json

import pytest
import torch

from fused_balance.study.data import PLACES, Scene


def _scene(*objects):
    return Scene(tuple(objects), (0,) * 16, ("one",))


@pytest.mark.parametrize("kind", ["colour", "shape", "what", "tint", "tint_and_shape"])
def test_questions_name_what_is_at_their_place(kind):
    from fused_balance.study.testbed_llava import ask

    rng = torch.Generator().manual_seed(0)
    scene = _scene(("red", "square", "top left"), ("blue", "slash", "bottom right"))
    truth = {"top left": ("red", "square", "warm"), "bottom right": ("blue", "slash", "cool")}
    tints = {"top left": "warm", "top right": "warm", "bottom left": "cool", "bottom right": "cool"}
    asked = set()
    for _ in range(200):
        question, answer = ask(scene, rng, kind, tints)
        place = " ".join(question[-3:-1])
        assert place in PLACES
        asked.add(place)
        expected = truth.get(place)
        if expected is None:
            assert answer == ["nothing"]
        else:
            assert answer == {"colour": [expected[0]], "shape": [expected[1]], "what": list(expected[:2]),
                              "tint": [expected[2]], "tint_and_shape": [expected[2], expected[1]]}[kind]
    assert asked == set(PLACES)  # empty places are asked about too


def test_count_question():
    from fused_balance.study.testbed_llava import ask

    scene = _scene(("red", "square", "top left"), ("blue", "slash", "top right"), ("green", "stripe", "bottom left"))
    assert ask(scene, torch.Generator(), "count") == (["how", "many", "shapes", "?"], ["three"])


def test_a_quadrant_tint_moves_exactly_its_coloured_cells():
    from fused_balance.study.data import render
    from fused_balance.study.llava import pixel_values
    from fused_balance.study.testbed_llava import TINTS, cell_tint

    grid = (1, 0, 2, 2, 0, 3, 2, 0, 4, 4, 0, 5, 4, 0, 0, 6)  # some background in every quadrant
    scene = Scene((), grid, ())
    warm = torch.tensor([[True, False, False, True]])  # top left and bottom right
    tinted = pixel_values([scene], torch.Generator().manual_seed(0), 0.0, cell_tint([scene], warm))
    plain = pixel_values([scene], torch.Generator().manual_seed(0), 0.0)
    assert torch.equal(plain, (render(torch.tensor([grid])) - 0.5) / 0.5)  # no tint: the picture as rendered
    tinted, plain = (tinted[0] + 1) / 2, (plain[0] + 1) / 2  # back to [0, 1]
    for cell, colour in enumerate(grid):
        r, c = divmod(cell, 4)
        quadrant = (r // 2) * 2 + c // 2
        offset = torch.tensor(TINTS["warm" if warm[0, quadrant] else "cool"]) if colour else torch.zeros(3)
        pixels = (slice(None), slice(8 * r, 8 * r + 8), slice(8 * c, 8 * c + 8))
        expected = (plain[pixels] + offset[:, None, None]).clamp(0, 1)
        assert torch.allclose(tinted[pixels], expected, atol=1e-6), (cell, colour)


def test_sequences_train_the_answer_and_score_its_words():
    from fused_balance.study.testbed_llava import IMAGE_TOKENS, encode, tok

    rows = [(["what", "is", "in", "the", "top", "left", "?"], ["red", "square"]), ([], ["one", "shape"]),
            (["how", "many", "shapes", "?"], ["two"])]
    batch = encode(rows, torch.zeros(3, 3, 32, 32))
    ids, target, scored = batch["input_ids"], batch["target"], batch["scored"]
    for b, (prompt, answer) in enumerate(rows):
        length = 1 + IMAGE_TOKENS + len(prompt) + len(answer) + 1
        assert batch["attention_mask"][b].sum() == length and (ids[b, length:] == tok("<pad>")).all()
        # the next token at every trained position: the answer's words, then <eos>
        assert ids[b, 1:][target[b]].tolist() == [tok(w) for w in answer] + [tok("<eos>")]
        assert ids[b, 1:][scored[b]].tolist() == [tok(w) for w in answer]
    assert (ids[:, 1:1 + IMAGE_TOKENS] == tok("<image>")).all()
    text = encode(rows[:1], None)
    assert "pixel_values" not in text and (text["input_ids"] != tok("<image>")).all()


class _Oracle(torch.nn.Module):
    """Logits putting the argmax on the true next token, except where ``wrong`` is True."""

    def __init__(self, wrong=None):
        super().__init__()
        self.wrong = wrong

    def forward(self, input_ids, attention_mask, pixel_values=None):
        from fused_balance.study.testbed_llava import VOCAB

        nxt = torch.cat([input_ids[:, 1:], input_ids[:, :1]], 1)
        if self.wrong is not None:
            nxt = torch.where(self.wrong, (nxt + 1) % len(VOCAB), nxt)
        return type("Out", (), {"logits": torch.nn.functional.one_hot(nxt, len(VOCAB)).float()})()


def test_an_answer_counts_only_when_every_word_is_right():
    from fused_balance.study.testbed_llava import answer_accuracy, encode

    rows = [(["what", "is", "in", "the", "top", "left", "?"], ["red", "square"])] * 4
    batch = encode(rows, None)
    assert answer_accuracy(_Oracle(), batch) == 1.0
    wrong = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    scored = torch.nonzero(batch["scored"][0]).flatten().tolist()
    wrong[0, scored[1]] = True            # second answer word wrong: example 0 fails
    wrong[1, scored[-1] + 1] = True       # the <eos> prediction is not scored
    wrong[2, 0] = True                    # a prompt position is not scored
    assert answer_accuracy(_Oracle(wrong), batch) == 0.75


def _accs(both, llm, enc):
    return {"s": {"both": both, "llm_only": llm, "encoder_only": enc}}


def test_judge_accepts_only_when_all_three_arms_differ():
    from fused_balance.study.testbed_llava import judge

    seeds = [0.0, 0.01, -0.01, 0.02, -0.02]
    good = _accs([0.9 + s for s in seeds], [0.7 + s for s in seeds], [0.5 + s / 2 for s in seeds])
    verdict = judge(good, [0.95] * 5)
    assert verdict["accepted"] and verdict["shifts"]["s"]["separates"]
    # LLM-only as good as both (the encoder side adds nothing): not separated
    same = _accs([0.9 + s for s in seeds], [0.9 + s for s in seeds], [0.5 + s for s in seeds])
    verdict = judge(same, [0.95] * 5)
    assert not verdict["accepted"] and verdict["failing"] == ["LLM-only, encoder-only and both differ (some shift)"]
    assert verdict["shifts"]["s"]["diffs"]["both - llm_only"]["mean"] == pytest.approx(0.0)
    # a base model that does not answer its own questions
    verdict = judge(good, [0.5] * 5)
    assert verdict["failing"] == ["the instruction-tuned model answers its questions"]
    # one seed cannot separate anything
    one = _accs([0.9], [0.7], [0.5])
    assert not judge(one, [0.95])["shifts"]["s"]["separates"]


def test_pretraining_is_cached_per_seed(tmp_path, monkeypatch):
    from fused_balance.study import testbed_llava

    cfg = testbed_llava.CONFIGS["tiny"]["model"]
    first, info = testbed_llava.pretrained(tmp_path, 0, cfg, 8)
    assert not info["cached"] and (tmp_path / "cache" / "testbed_llava" / "seed0" / "pretrained.pt").exists()
    assert not any(p.requires_grad for p in first.parameters())

    def no_training(*args, **kwargs):
        raise AssertionError("pretrained again although the cache holds this seed")

    monkeypatch.setattr(testbed_llava, "pretrain", no_training)
    second, info2 = testbed_llava.pretrained(tmp_path, 0, cfg, 8)
    assert info2["cached"] and info2["base_acc"] == info["base_acc"]
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(AssertionError, match="pretrained again"):
        testbed_llava.pretrained(tmp_path, 0, {**cfg, "stage_steps": [5, 5, 5, 6]}, 8)


@pytest.mark.parametrize("projector_side", ["encoder", "bridge"])
def test_one_sided_arms_train_only_their_side(tmp_path, projector_side):
    """llm_only leaves the vision tower as pretrained (and the projector with
    ``projector_side="encoder"``), encoder_only the language model's layers; both change both;
    embeddings and head train in each."""
    import copy

    from fused_balance.study import testbed_llava as tb

    cfg = tb.CONFIGS["tiny"]
    model, _ = tb.pretrained(tmp_path, 0, cfg["model"], 8)
    scfg = {**cfg["shift"], "max_objects": 2, "noise": 0.05, "projector_side": projector_side}
    test = tb.test_split("new_shapes", scfg, 8)

    def moved(arm):
        m = copy.deepcopy(model)
        before = {n: p.detach().clone() for n, p in m.named_parameters()}
        tb.train_shift(m, "new_shapes", arm, 0, scfg, test)
        merged = {n.replace("base_layer.", ""): p for n, p in m.named_parameters()}
        changed = {n for n, p in before.items() if not torch.equal(p, merged[n])}
        lora = {n for n, p in m.named_parameters() if "lora_" in n and p.abs().sum() > 0 and "lora_B" in n}
        return changed, lora

    for arm, vision_lora, llm_lora in (("both", True, True), ("llm_only", False, True), ("encoder_only", True, False)):
        changed, lora_b = moved(arm)
        projector_trains = projector_side == "bridge" or arm != "llm_only"
        assert any("multi_modal_projector" in n for n in changed) == projector_trains
        assert any("lm_head" in n for n in changed)
        assert any("vision_tower" in n for n in lora_b) == vision_lora  # lora_B starts at zero: moved iff trained
        assert any("language_model" in n for n in lora_b) == llm_lora
        assert not any("vision_tower" in n for n in changed)  # base weights stay; LoRA carries the change
    with pytest.raises(ValueError, match="projector_side"):
        tb.train_shift(copy.deepcopy(model), "new_shapes", "both", 0, {**scfg, "projector_side": "llm"}, test)


def test_tiny_check_end_to_end(tmp_path):
    from fused_balance.cli import main as cli_main
    from fused_balance.study.testbed_llava import ARMS, CONFIGS, SHIFTS

    out = tmp_path / "check"
    args = ["study", "--testbed-check", "encoder_llm", "--tiny", "--out", str(out), "--no-progress"]
    assert cli_main(args + ["--workers", "2"]) == 0
    config = CONFIGS["tiny"]
    jobs = sorted((out / "jobs" / "testbed_llava").rglob("*.json"))
    assert len(jobs) == config["seeds"] * len(SHIFTS) * len(ARMS)
    assert not (out / "testbed_check.json").exists()  # only the chosen testbed ran
    result = json.loads((out / "testbed_llava_check.json").read_text())
    verdict = result["verdict"]
    assert set(verdict["shifts"]) == set(SHIFTS) and verdict["accepted"] == (verdict["failing"] == [])
    for shift in SHIFTS:
        assert all(len(result["accuracies"][shift][arm]) == config["seeds"] for arm in ARMS)
        for key in ("kappa", "kappa_per_parameter"):
            kappa = result["diagnostics"][shift][key]
            assert len(kappa) == 3 and all(k is None or 0.0 <= k <= 1.0 for k in kappa)
    table = (out / "testbed_llava_check.md").read_text()
    assert ("**NOT ACCEPTED**" in table) == (not verdict["accepted"])
    separating = [shift for shift, row in verdict["shifts"].items() if row["separates"]]
    assert sorted(p.name for p in out.glob("testbed_llava_scheduler_*.md")) == (  # the method only when accepted
        sorted(f"testbed_llava_scheduler_{shift}.md" for shift in separating) if verdict["accepted"] else [])
    assert all(f"| {shift} |" in table for shift in SHIFTS)
    assert (out / "testbed_llava.png").stat().st_size > 0
    before = {p: p.stat().st_mtime_ns for folder in ("jobs", "cache") for p in (out / folder).rglob("*") if p.is_file()}
    assert cli_main(args + ["--workers", "1"]) == 0  # read back, nothing run again
    assert before == {p: p.stat().st_mtime_ns for p in before}
    assert json.loads((out / "testbed_llava_check.json").read_text())["accuracies"] == result["accuracies"]


def test_testbed_check_runs_every_testbed_by_default():
    import argparse

    from fused_balance.study.run import TESTBEDS, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--testbed-check"]).testbed_check == "all"
    assert parser.parse_args(["--testbed-check", "--tiny"]).testbed_check == "all"
    assert parser.parse_args(["--testbed-check", "encoder_llm"]).testbed_check == "encoder_llm"
    assert set(TESTBEDS) == {"unified", "encoder_llm"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--testbed-check", "chameleon"])


def _run(valid, test, steps=(30, 60, 90)):
    """A run whose curve reaches the given validation / test accuracies at ``steps``."""
    return {"acc": test[-1], "curve": [{"step": s, "acc": a, "valid_acc": v} for s, a, v in zip(steps, test, valid)]}


def test_reach_fraction_counts_the_first_step_at_the_goal_or_the_whole_budget():
    from fused_balance.study.testbed_llava import reach_fraction

    run = _run([0.2, 0.6, 0.5], [0.1, 0.4, 0.7])
    assert reach_fraction(run, 0.6, "valid_acc") == pytest.approx(60 / 90)
    assert reach_fraction(run, 0.4, "acc") == pytest.approx(60 / 90)
    assert reach_fraction(run, 0.1, "acc") == pytest.approx(30 / 90)
    assert reach_fraction(run, 0.8, "acc") == 1.0  # never reached: the whole budget


def test_scheduler_variant_is_chosen_on_validation_and_judged_on_test():
    """sched_first is faster on validation, sched_per_parameter on test: the choice follows
    validation; the target then holds or not from sched_first's test numbers alone."""
    from fused_balance.study.testbed_llava import judge_scheduler

    constant = [_run([0.3, 0.5, 0.6], [0.3, 0.5, 0.6 + 0.01 * k]) for k in range(4)]
    fast_valid = [_run([0.6, 0.6, 0.6], [0.3, 0.6 + 0.01 * k, 0.62 + 0.01 * k]) for k in range(4)]
    fast_test = [_run([0.3, 0.6, 0.6], [0.61 + 0.01 * k, 0.61 + 0.01 * k, 0.61 + 0.01 * k]) for k in range(4)]
    verdict = judge_scheduler({"both": constant, "sched_first": fast_valid, "sched_per_parameter": fast_test})
    assert verdict["chosen"] == "sched_first"
    row = verdict["variants"]["sched_first"]
    assert row["valid_fraction"]["mean"] == pytest.approx(1 / 3)
    assert row["test_fraction"]["mean"] == pytest.approx(2 / 3)  # 60 of 90 steps on every seed
    assert row["test_acc_minus_constant"]["mean"] == pytest.approx(0.02)
    assert verdict["held"] == {"fraction": True, "final accuracy not lower": True} and verdict["target_held"]
    slower = [_run([0.6, 0.6, 0.6], [0.3, 0.5, 0.62 + 0.01 * k]) for k in range(4)]  # reached only at the end
    verdict = judge_scheduler({"both": constant, "sched_first": slower, "sched_per_parameter": fast_test})
    assert verdict["chosen"] == "sched_first" and not verdict["held"]["fraction"] and not verdict["target_held"]
    lower = [_run([0.6, 0.6, 0.6], [0.3, 0.61 + 0.01 * k, 0.5 + 0.001 * k]) for k in range(4)]
    verdict = judge_scheduler({"both": constant, "sched_first": lower, "sched_per_parameter": fast_test})
    assert verdict["held"] == {"fraction": True, "final accuracy not lower": False}


@pytest.mark.parametrize("arm", ["sched_first", "sched_kl_window"])
def test_scheduled_arm_acts_and_records_validation(tmp_path, arm):
    """An acting scheduler arm trains both sides, records κ and the multipliers per step and the
    validation accuracy beside the test one; the KL arm probes the training batch and moves its
    rates only at the end of a 10-step window."""
    import copy

    from fused_balance.study import testbed_llava as tb

    cfg = tb.CONFIGS["tiny"]
    model, _ = tb.pretrained(tmp_path, 0, cfg["model"], 8)
    scfg = {**cfg["shift"], "max_objects": 2, "noise": 0.05, "steps": 12, "eval_every": 4}
    test, valid = tb.test_split("tint", scfg, 8), tb.test_split("tint", scfg, 8, tb.VALIDATION_SEED)
    assert not torch.equal(test["input_ids"], valid["input_ids"])
    run = tb.train_shift(copy.deepcopy(model), "tint", arm, 0, scfg, test, valid)
    assert len(run["kappa"]) == len(run["multipliers"]) == scfg["steps"]
    if arm == "sched_kl_window":
        assert run["kappa"][:9] == [None] * 9 and all(m == [1.0, 1.0] for m in run["multipliers"][:9])
        assert run["kappa"][9] is not None and run["multipliers"][10] == run["multipliers"][9]
    assert all(set(e) == {"step", "acc", "valid_acc"} for e in run["curve"])
    assert "grad_norms" not in run
    with pytest.raises(ValueError, match="unknown arm"):
        tb.train_shift(copy.deepcopy(model), "tint", "sched_exact", 0, scfg, test)


def test_aux_change_arm_adds_the_distribution_change_term(tmp_path):
    """The aux arm is sched_first plus the distribution-change loss: the same first step (no
    measured step yet: the term is zero), then another run (the term acts)."""
    import copy

    from fused_balance.study import testbed_llava as tb

    cfg = tb.CONFIGS["tiny"]
    model, _ = tb.pretrained(tmp_path, 0, cfg["model"], 8)
    scfg = {**cfg["shift"], "max_objects": 2, "noise": 0.05, "steps": 8, "eval_every": 4}
    test = tb.test_split("tint", scfg, 8)
    first = tb.train_shift(copy.deepcopy(model), "tint", "sched_first", 0, scfg, test)
    aux = tb.train_shift(copy.deepcopy(model), "tint", "sched_aux_change", 0, scfg, test)
    assert aux["kappa"][0] == first["kappa"][0]
    assert aux["kappa"][1:] != first["kappa"][1:]


def test_an_accepted_testbed_runs_the_scheduler_check_on_its_separating_shifts(tmp_path, monkeypatch):
    from fused_balance.study import testbed_llava as tb

    def accept_tint(accuracies, base_acc):
        verdict = judge(accuracies, base_acc)
        for shift, row in verdict["shifts"].items():
            row["separates"] = shift in ("tint", "new_format")
        return {**verdict, "accepted": True, "failing": []}
    judge = tb.judge
    monkeypatch.setattr(tb, "judge", accept_tint)
    result = tb.testbed_check(tmp_path, "tiny", [0, 1], progress=False)
    assert set(result["scheduler"]) == {"tint", "new_format"}
    for shift, verdict in result["scheduler"].items():
        assert verdict["chosen"] in tb.SCHEDULED
        stored = json.loads((tmp_path / f"testbed_llava_scheduler_{shift}.json").read_text())
        assert stored["meta"]["shift"] == shift and stored["verdict"] == verdict
        assert set(stored["curves"]) == {f"{arm}/seed{s}" for arm in ("both", *tb.SCHEDULED) for s in (0, 1)}
        assert f"shift `{shift}`" in (tmp_path / f"testbed_llava_scheduler_{shift}.md").read_text()
        assert (tmp_path / f"testbed_llava_scheduler_{shift}.png").stat().st_size > 0
