"""The demo model's synthetic data (the training-layer tests use it as their real model)."""
import pytest
import torch

from tiny_unified import VOCAB, make_batch


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
