"""Checkpoints: save at step t, restore into fresh objects, continue -> bitwise the same
parameters as an uninterrupted run (CPU)."""
import io
import warnings

import pytest
import torch

from tiny_unified import VOCAB, make_batch, build_lora_model, modality_losses
from fused_balance.training import BalanceScheduler, ParetoLoRA, lora_parameters

warnings.filterwarnings("ignore", category=FutureWarning)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _build(fused: bool):
    model = build_lora_model(VOCAB.size, hidden=32, layers=2, heads=2, rank=4, seed=0)
    named = lora_parameters(model)
    if fused:
        balancer = ParetoLoRA(named, "fused_adamw", lr=5e-3, weight_decay=0.01, backend="torch")
        return model, balancer, None
    comps = {"encoder": [p for n, p in named if "layers.0." in n or "embed_tokens" in n],
             "llm": [p for n, p in named if "layers.1." in n or "lm_head" in n]}
    opt = torch.optim.AdamW(BalanceScheduler.param_groups(comps, lr=5e-3), weight_decay=0.01)
    balancer = ParetoLoRA(named, opt, backend="torch")
    return model, balancer, BalanceScheduler(opt, comps, backend="torch")


def _train(model, balancer, scheduler, steps):
    for step in steps:
        batch = make_batch(4, torch.Generator().manual_seed(100 + step))
        losses, _ = modality_losses(model, batch)
        balancer.step(losses)
        if scheduler is not None:
            scheduler.step()
        balancer.zero_grad()


@pytest.mark.parametrize("fused", [False, True])
def test_resume_is_bitwise(fused):
    model, balancer, scheduler = _build(fused)
    _train(model, balancer, scheduler, range(3))
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in balancer.params],
                "balancer": balancer.state_dict(),
                "scheduler": None if scheduler is None else scheduler.state_dict()}, buffer)
    _train(model, balancer, scheduler, range(3, 6))
    expected = [p.detach().clone() for p in balancer.params]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    model2, balancer2, scheduler2 = _build(fused)
    with torch.no_grad():
        for p, q in zip(balancer2.params, saved["params"]):
            p.copy_(q)
    balancer2.load_state_dict(saved["balancer"])
    if scheduler2 is not None:
        scheduler2.load_state_dict(saved["scheduler"])
    assert balancer2.step_count == 3 and len(balancer2.history) == 3
    _train(model2, balancer2, scheduler2, range(3, 6))
    for a, b in zip(expected, balancer2.params):
        assert torch.equal(a, b)
    assert len(balancer2.history) == 6
    for h1, h2 in zip(balancer.history, balancer2.history):
        assert torch.equal(h1["weights"], h2["weights"])
    if scheduler is not None:
        assert scheduler.multipliers == scheduler2.multipliers
        assert [g["lr"] for g in balancer.optimizer.param_groups] == \
               [g["lr"] for g in balancer2.optimizer.param_groups]


def test_mismatched_checkpoint_is_rejected():
    _, balancer, _ = _build(False)
    state = balancer.state_dict()
    _, other, _ = _build(False)
    state["settings"]["segment_names"] = ["x"]
    with pytest.raises(ValueError):
        other.load_state_dict(state)
