"""Feature-CD / Language-CD (our reading of CoMMIT's one-sided baselines) on the tiny LLaVA:
alternating phases of ``cd_phase`` steps in which only one side's LoRA steps, the bridge
(projector, embeddings, head) in every phase; the schedule; the equivalence with the one-sided
arms while a run stays in its first phase; the arms in the study's configs and report."""
import pytest
import torch

pytest.importorskip("transformers", reason="the study needs transformers (extra [demo])")
pytest.importorskip("peft", reason="the study needs peft (extra [demo])")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

E, L = "encoder", "llm"
# written out by hand (not from cd_side): phases of 2 steps, the encoder first for feature_cd
EXPECTED = {"feature_cd": [E, E, L, L, E], "language_cd": [L, L, E, E, L]}


def _cfg(**kw):
    from fused_balance.study.run import CONFIGS

    return {**CONFIGS["tiny"]["llava"], **kw}


def _test_batch(cfg):
    from fused_balance.study.llava import make_batch

    return make_batch(16, torch.Generator().manual_seed(7), cfg["max_objects"])


def _side(name: str) -> str:
    if any(k in name for k in ("multi_modal_projector", "embed_tokens", "lm_head")):
        return "bridge"
    if "lora_" not in name:
        return "base"
    return E if "vision_tower" in name else L


def _snapshot(model, optimizer) -> dict:
    """Every parameter and its AdamW state (absent: {}), cloned, by name."""
    out = {}
    for n, p in model.named_parameters():
        state = {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in optimizer.state.get(p, {}).items()}
        out[n] = (p.detach().clone(), state)
    return out


def _same(a, b) -> bool:
    (pa, sa), (pb, sb) = a, b
    return torch.equal(pa, pb) and sa.keys() == sb.keys() and all(torch.equal(torch.as_tensor(sa[k]),
                                                                              torch.as_tensor(sb[k])) for k in sa)


def test_cd_side_alternates_from_the_arms_first_side():
    from fused_balance.study.llava import cd_side

    assert [cd_side("feature_cd", s, 3) for s in range(8)] == [E, E, E, L, L, L, E, E]
    assert [cd_side("language_cd", s, 3) for s in range(8)] == [L, L, L, E, E, E, L, L]
    assert [cd_side("feature_cd", s, 1) for s in range(4)] == [E, L, E, L]
    assert {cd_side("language_cd", s, 50) for s in range(50)} == {L}
    with pytest.raises(ValueError):
        cd_side("feature_cd", 0, 0)


@pytest.mark.parametrize("arm", ["feature_cd", "language_cd"])
def test_one_side_steps_per_phase_and_the_bridge_in_every_phase(arm, monkeypatch):
    """At every step the inactive side's LoRA tensors and their AdamW state are bitwise as
    before the step (a side not stepped yet has no state at all); some LoRA tensor of the
    active side moves; every bridge tensor moves; base weights never move."""
    from fused_balance.study import llava

    cfg = _cfg(steps=5, eval_every=5, cd_phase=2)
    snaps = []
    initial = {}

    def build(*args, **kw):
        model = real_build(*args, **kw)
        initial.update({n: (p.detach().clone(), {}) for n, p in model.named_parameters()})
        return model

    real_build = llava.build_model
    monkeypatch.setattr(llava, "build_model", build)
    result = llava.train_llava(arm, 0, cfg, _test_batch(cfg), on_step=lambda s, m, opt: snaps.append(_snapshot(m, opt)))
    assert result["phases"] == EXPECTED[arm]
    assert {"final", "curve", "train_loss", "wall_s"} <= set(result) and len(result["train_loss"]) == 5
    before = initial
    stepped = set()
    for step, (side, after) in enumerate(zip(EXPECTED[arm], snaps)):
        other = L if side == E else E
        moved = {n for n in after if not _same(before[n], after[n])}
        names = {k: {n for n in after if _side(n) == k} for k in (E, L, "bridge", "base")}
        assert names[E] and names[L] and names["bridge"]
        assert not moved & names[other], f"step {step}: the {other} side changed in a {side} phase"
        if other not in stepped:
            assert all(after[n][1] == {} for n in names[other]), f"step {step}: {other} has AdamW state"
        assert moved & names[side], f"step {step}: nothing on the {side} side moved"
        assert names["bridge"] <= moved, f"step {step}: a bridge tensor did not move"
        assert not moved & names["base"]
        stepped.add(side)
        before = after


@pytest.mark.parametrize("arm, one_sided", [("feature_cd", "encoder_only"), ("language_cd", "llm_only")])
def test_a_single_phase_equals_the_one_sided_arm(arm, one_sided):
    """With cd_phase beyond the run's steps the alternating arm never leaves its first side: it
    is then the one-sided arm (the other side's LoRA frozen), bitwise, in every tensor and loss."""
    from fused_balance.study import llava

    cfg = _cfg(steps=4, eval_every=2, cd_phase=100)
    test = _test_batch(cfg)
    finals = {}
    runs = {a: llava.train_llava(a, 0, cfg, test, on_step=lambda s, m, opt, a=a: finals.__setitem__(
        a, {n: p.detach().clone() for n, p in m.named_parameters()})) for a in (arm, one_sided)}
    assert runs[arm]["phases"] == [llava.CD_FIRST[arm]] * 4
    assert runs[arm]["train_loss"] == runs[one_sided]["train_loss"]
    assert runs[arm]["curve"] == runs[one_sided]["curve"]
    assert finals[arm].keys() == finals[one_sided].keys()
    assert all(torch.equal(finals[arm][n], finals[one_sided][n]) for n in finals[arm])
    # and it is not the both-sided arm (the other side's LoRA would have moved there)
    constant = llava.train_llava("constant", 0, cfg, test)
    assert constant["train_loss"] != runs[arm]["train_loss"]


def test_the_arms_are_in_the_quick_and_full_studies_and_their_report():
    from fused_balance.study.labels import ARM_LABELS
    from fused_balance.study.report import llava_tables, summary_markdown
    from fused_balance.study.run import CONFIGS, _llava_settings

    for size in ("quick", "full"):
        assert {"feature_cd", "language_cd"} <= set(CONFIGS[size]["llava_arms"])
        assert CONFIGS[size]["llava"]["cd_phase"] == 10
    assert not {"feature_cd", "language_cd"} & set(CONFIGS["tiny"]["llava_arms"])  # tiny stays fast
    lcfg = CONFIGS["quick"]["llava"]
    assert _llava_settings(lcfg, "feature_cd", 64)["cd_phase"] == 10
    assert "cd_phase" not in _llava_settings(lcfg, "constant", 64)  # jobs finished before it still resume
    assert "our reading" in ARM_LABELS["feature_cd"] and "our reading" in ARM_LABELS["language_cd"]

    accs = {"constant": [0.5, 0.6, 0.7], "feature_cd": [0.4, 0.6, 0.5], "language_cd": [0.6, 0.7, 0.9]}
    runs = {arm: [{"arm": arm, "seed": s, "final": {"acc": a}, "curve": [{"step": 10, "acc": a}]}
                  for s, a in enumerate(values)] for arm, values in accs.items()}
    table = llava_tables(runs, 10)
    for arm in ("feature_cd", "language_cd"):
        diffs = [a - c for a, c in zip(accs[arm], accs["constant"])]
        assert table[arm]["delta_acc"]["mean"] == pytest.approx(sum(diffs) / 3)
    meta = {"configuration": "quick", "seeds": [0, 1, 2], "threads": 1, "machine": "cpu", "torch": "x",
            "date_utc": "now", "command": "test", "job_wall_s_total": 1.0}
    summary = summary_markdown({"meta": meta, "unified": {}, "tuning": {}, "llava": table}, CONFIGS["quick"])
    assert f"| {ARM_LABELS['feature_cd']} |" in summary and f"| {ARM_LABELS['language_cd']} |" in summary
    assert "phases of 10 steps" in summary and "our reading" in summary
