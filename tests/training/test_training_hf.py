"""BalancedTrainer: the Hugging Face Trainer steps on the balanced gradient."""
import warnings

import pytest
import torch

import fused_balance as fb
from tiny_unified import VOCAB, build_lora_model
from fused_balance.backends import bank_backends
from fused_balance.training import lora_parameters, segment_ids_for
from shared import DemoRows

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=FutureWarning)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def objectives(model, inputs, outputs):
    logits = outputs.logits[:, :-1]
    labels = inputs["input_ids"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            reduction="none").view_as(labels)
    is_image = labels >= VOCAB.image_offset
    valid = inputs["attention_mask"][:, 1:].bool()
    text, image = valid & ~is_image, valid & is_image
    return {"text": (nll * text).sum() / valid.sum(), "image": (nll * image).sum() / valid.sum()}


def test_balanced_trainer_step_and_train(tmp_path):
    from fused_balance.training.hf import BalancedTrainer

    model = build_lora_model(VOCAB.size, hidden=32, layers=2, heads=2, rank=4, seed=0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          learning_rate=1e-2, logging_steps=1, save_strategy="no",
                                          report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    data = DemoRows(12)
    trainer = BalancedTrainer(model=model, args=args, train_dataset=data, objectives_fn=objectives,
                              balance_backend="torch")
    named = lora_parameters(model)
    params = [p for _, p in named]
    # One training step by hand: .grad must be the per-layer pareto_lora combination.
    inputs = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask")}
    model.zero_grad()
    loss = trainer.training_step(model, dict(inputs))
    got = [p.grad.clone() for p in params]
    outputs = model(**inputs)
    obj = objectives(model, inputs, outputs)
    grads = [torch.autograd.grad(obj[k], params, retain_graph=True) for k in ("text", "image")]
    ids, _ = segment_ids_for(named, "layer")
    expected = fb.pareto_combine(grads, ids, policy="pareto_lora", backend="torch").combined
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    assert torch.isclose(loss, obj["text"] + obj["image"])
    model.zero_grad()

    before = [p.detach().clone() for p in params]
    result = trainer.train()
    assert result.global_step == 3
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    assert len(trainer.balancer.history) == 4  # the hand-made step plus three Trainer steps
    logged = [entry for entry in trainer.state.log_history if "balance/weight_image" in entry]
    assert logged and all(entry["balance/weight_image"] > 0 for entry in logged)


@pytest.mark.parametrize("backend", bank_backends("cpu"))
def test_balanced_trainer_steps_through_the_plan(tmp_path, backend):
    """BalancedTrainer is one more entry point of the one engine: its training step dispatches the
    backend's bank ops (and the policy solve), never a list op."""
    from fused_balance.training.hf import BalancedTrainer
    from shared import dispatched_fused_balance_ops

    model = build_lora_model(VOCAB.size, hidden=32, layers=2, heads=2, rank=4, seed=0)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4,
                                          learning_rate=1e-2, save_strategy="no", report_to=[], use_cpu=True,
                                          disable_tqdm=True, seed=0)
    data = DemoRows(8)
    trainer = BalancedTrainer(model=model, args=args, train_dataset=data, objectives_fn=objectives,
                              balance_backend=backend)
    inputs = {k: torch.stack([data[i][k] for i in range(4)]) for k in ("input_ids", "attention_mask")}
    ops = dispatched_fused_balance_ops(lambda: trainer.training_step(model, dict(inputs)))
    prefix = {"cpp": "", "torch": "torch_", "triton": "triton_"}[backend]
    assert prefix + "bank_gram" in ops and prefix + "bank_combine_into" in ops, ops
    assert set(ops) <= {prefix + "bank_gram", prefix + "bank_combine_into", "policy_weights"}, ops
