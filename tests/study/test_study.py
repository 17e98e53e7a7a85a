"""The study: a tiny configuration runs end to end (twice, identical results at one thread),
and the pieces it rests on are right (statistics, the Chameleon image-logit mask, GradNorm)."""
import json
import math

import pytest
import torch

pytest.importorskip("transformers", reason="the study needs transformers (extra [demo])")
pytest.importorskip("peft", reason="the study needs peft (extra [demo])")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _jobs(out):
    """Every job's result, without its wall time."""
    results = {}
    for path in sorted((out / "jobs").rglob("*.json")):
        data = json.loads(path.read_text())
        data.pop("wall_s")
        results[str(path.relative_to(out))] = data
    return results


def test_tiny_study_runs_twice_identically(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (extra [demo])")
    from fused_balance.cli import main as cli_main

    first, second = tmp_path / "a", tmp_path / "b"
    assert cli_main(["study", "--tiny", "--out", str(first), "--no-progress", "--threads", "1"]) == 0
    assert cli_main(["study", "--tiny", "--out", str(second), "--no-progress", "--threads", "1",
                     "--no-plots"]) == 0
    jobs = _jobs(first)
    tables = json.loads((first / "tables.json").read_text())
    static = tables["tuning"]["emu2"]["static"]
    assert static["search"]["status"] in ("interior", "edge") and static["search"]["extensions"] <= 1
    # 2 seeds x (4 emu2 + 2 chameleon + 2 llava arms) + tuning (emu2: w 1, 4 and the grid's
    # extensions, GradNorm α 1.5; chameleon: w 1)
    assert len(jobs) == 2 * (4 + 2 + 2) + 3 + static["search"]["extensions"] + 1
    assert jobs == _jobs(second)
    gradnorm = tables["tuning"]["emu2"]["gradnorm"]
    assert set(gradnorm["grid"]) == {"1.5"} and gradnorm["chosen"] == 1.5
    assert all(j["arm"]["alpha"] == 1.5 for k, j in jobs.items() if k.startswith("jobs/emu2/gradnorm"))
    assert {(c["a"], c["b"]) for c in tables["contrasts"]["emu2"]} == {("pareto", "static"), ("pareto", "gradnorm")}
    assert set(tables["unified"]) == {"emu2", "chameleon"}
    assert set(tables["unified"]["emu2"]) == {"vanilla", "static", "gradnorm", "pareto"}
    for row in tables["unified"]["emu2"].values():
        assert 0.0 <= row["cell_score"][0] <= 1.0 and 0.0 <= row["text_acc"][0] <= 1.0
    assert tables["gradient_ratio"]["emu2"]["median"] > 0
    assert set(tables["llava"]) == {"constant", "sched_exact"}
    summary = (first / "summary.md").read_text()
    assert "Pareto-LoRA" in summary and "BalanceScheduler" in summary and "excl. 0" in summary
    for name in ("pictures_emu2.png", "pictures_chameleon.png", "curves_emu2.png", "grad_ratio_emu2.png",
                 "llava_curves.png", "llava_kappa.png"):
        assert (first / name).stat().st_size > 1000, name
    # a rerun into the same folder resumes: every job is read back, nothing changes
    before = {p: p.stat().st_mtime_ns for p in (first / "jobs").rglob("*.json")}
    assert cli_main(["study", "--tiny", "--out", str(first), "--no-progress", "--no-plots"]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in (first / "jobs").rglob("*.json")}


def test_paired_interval_matches_t_distribution():
    from fused_balance.study.stats import paired

    p = paired([3.0, 5.0, 7.0], [2.0, 3.0, 4.0])  # differences 1, 2, 3: mean 2, std 1
    half = 4.302652729911275 / math.sqrt(3)  # t_{0.975, 2}
    assert p["mean"] == pytest.approx(2.0) and p["std"] == pytest.approx(1.0)
    assert p["low"] == pytest.approx(2.0 - half, abs=1e-3) and p["high"] == pytest.approx(2.0 + half, abs=1e-3)
    assert p["excludes_zero"] is False
    assert paired([1.0, 1.1, 0.9, 1.0], [0.0, 0.0, 0.0, 0.0])["excludes_zero"] is True


def test_chameleon_image_loss_uses_unmasked_logits():
    """ChameleonForConditionalGeneration's own logits at image tokens are the dtype minimum
    (so no image loss can come from them); the study's image loss comes from the hidden states
    and lm_head and equals the cross-entropy of the unmasked logits, computed independently."""
    import torch.nn.functional as F

    from fused_balance.study.unified import IMAGE_OFFSET, NUM_CODES, build_lora_model, train_batch

    model = build_lora_model("chameleon", seed=0, hidden=16, layers=2)
    batch = train_batch(torch.Generator().manual_seed(0), 4, 0.5, 1)
    ids = torch.where(batch["is_patch"], IMAGE_OFFSET + batch["colours"], batch["raw"])
    with torch.no_grad():
        stock = model.net(input_ids=ids, attention_mask=batch["attention_mask"]).logits
        assert (stock[..., IMAGE_OFFSET:IMAGE_OFFSET + NUM_CODES] == torch.finfo(stock.dtype).min).all()
        hidden = model.net.model(input_ids=ids, attention_mask=batch["attention_mask"]).last_hidden_state
        logits = model.net.lm_head(hidden).double()[:, :-1]
        mask = batch["image_target"]
        expected = F.cross_entropy(logits[mask], ids[:, 1:][mask])
        assert float(model.losses(batch)["image"]) == pytest.approx(float(expected), rel=1e-5)
        assert math.isfinite(float(expected)) and float(expected) < 20


def test_emu2_generation_is_causal_and_decodes_to_the_codebook():
    """Greedy generation reads only the prefix: a picture generated from the captions does not
    depend on the (teacher) patches stored in the batch."""
    from fused_balance.study.unified import build_lora_model, make_split

    model = build_lora_model("emu2", seed=0, hidden=16, layers=2)
    split = make_split(3, 4, 1)["generation"]
    pictures = model.generate_pictures(split)
    scrambled = dict(split, colours=torch.where(split["is_patch"], (split["colours"] + 3) % 7, split["colours"]))
    assert torch.equal(pictures, model.generate_pictures(scrambled))
    assert pictures.shape == (4, 16) and pictures.min() >= 0 and pictures.max() < 7


def test_gradnorm_weight_gradient_matches_autograd():
    """The closed form equals autograd through |∇_W (w_i L_i)| (double backward, float64) with
    the target detached, as GradNorm prescribes."""
    from fused_balance.study.arms import gradnorm_weight_grad

    gen = torch.Generator().manual_seed(0)
    W = torch.randn(5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    x = torch.randn(4, 5, dtype=torch.float64, generator=gen)
    losses = torch.stack([(x @ W).pow(2).mean(), 0.01 * (x @ W).sin().sum()])
    initial = losses.detach() * torch.tensor([1.7, 0.4], dtype=torch.float64)
    w = torch.tensor([0.6, 1.4], dtype=torch.float64, requires_grad=True)
    G = torch.stack([torch.autograd.grad(w[i] * losses[i], W, create_graph=True)[0].norm() for i in range(2)])
    ratio = (losses.detach() / initial) / (losses.detach() / initial).mean()
    target = (G.mean() * ratio.pow(1.5)).detach()
    expected, = torch.autograd.grad((G - target).abs().sum(), w)
    norms = torch.stack([torch.autograd.grad(losses[i], W, retain_graph=True)[0].norm() for i in range(2)])
    got = gradnorm_weight_grad(w.detach(), norms, losses.detach(), initial, 1.5)
    torch.testing.assert_close(got, expected)


def test_layer_group_segments_group_decoder_layers_and_keep_other_modules_apart():
    from fused_balance.study.arms import layer_group_segments

    key = layer_group_segments(layers=4, groups=2)
    lora = "base_model.model.model.layers.{}.self_attn.q_proj.lora_A.default.weight"
    assert [key(lora.format(i), None) for i in range(4)] == ["layers 0..1", "layers 0..1",
                                                              "layers 2..3", "layers 2..3"]
    assert key("base_model.model.lm_head.weight", None) == "lm_head"
    assert key("base_model.model.model.embed_tokens.weight", None) == "model.embed_tokens"


def test_an_unknown_arm_is_refused_before_anything_runs(tmp_path):
    from fused_balance.cli import main as cli_main

    out = tmp_path / "study"
    with pytest.raises(SystemExit, match=r"\['pareto_tau3'\], not arms of the tiny study; its arms: vanilla"):
        cli_main(["study", "--tiny", "--out", str(out), "--no-progress", "--arms", "vanilla,pareto_tau3"])
    assert not out.exists()
