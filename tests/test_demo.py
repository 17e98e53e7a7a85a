"""`fused-balance train --steps 5 --seeds 1 --out DIR` runs and writes its report."""
import json

import pytest
import torch

from fused_balance.demo.data import VOCAB, make_batch


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.mark.parametrize("max_objects", [1, 2])
def test_data_is_consistent(max_objects):
    batch = make_batch(32, torch.Generator().manual_seed(0), generation_fraction=0.5,
                       max_objects=max_objects)
    text, image, fg = batch["text_mask"], batch["image_mask"], batch["image_fg_mask"]
    assert not (text & image).any() and (fg <= image).all()
    assert bool(VOCAB.is_image(batch["labels_next"][image]).all())
    assert not bool(VOCAB.is_image(batch["labels_next"][text]).any())
    # every picture has 16 patches and up to max_objects shapes of 2..4 coloured cells
    per_row = image.sum(1)
    assert set(per_row.tolist()) <= {0, 16} and (per_row == 16).any()
    fg_rows = fg.sum(1)[per_row == 16]
    assert fg_rows.min() >= 2 and fg_rows.max() <= 4 * max_objects


def test_train_command_writes_report(tmp_path):
    out = tmp_path / "demo"
    argv = ["train", "--steps", "5", "--seeds", "1", "--out", str(out), "--timing-repeats", "3",
            "--no-progress"]
    from fused_balance.cli import main as cli_main

    assert cli_main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == {"vanilla", "pareto"}
    for run in results["runs"]:
        assert len(run["train_losses"]["text"]) == 5
        assert 0.0 <= run["final"]["image_acc"] <= 1.0
    assert results["aggregate"]["step_time_ms"]["pareto"] > 0
    assert len(results["runs"][1]["history"]) == 5  # Pareto-LoRA logs every step
    summary = (out / "summary.md").read_text()
    assert "Pareto-LoRA" in summary and "Imbalance" in summary
    for name in ("grad_ratio_heatmap.png", "weights.png", "loss_curves.png"):
        assert (out / name).stat().st_size > 1000
