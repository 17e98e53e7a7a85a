"""Real multimodal classes as clients: tiny random ChameleonForConditionalGeneration,
Emu3ForConditionalGeneration, JanusForConditionalGeneration, LlavaForConditionalGeneration and
Qwen2VLForConditionalGeneration with PEFT LoRA, on the CPU (models and per-modality losses in
tests/real_models.py).

Checked on each: segments follow the module structure; one balanced step equals a float64
reference (per-objective gradients from torch.autograd.grad, the pareto_lora weights computed
here by hand, torch.optim.AdamW) with every reached tensor balanced and the unreached ones left
alone; bf16 adapters. On Chameleon, the forward's masked image logits (an inf loss) skip the step.
On Emu3 (dead VQ tensors), the Trainer with gradient accumulation equals manual accumulation,
logs average over live segments, and a resumed Trainer continues the balancer's history.
"""
import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from fused_balance.training import ParetoLoRA, describe_segments, lora_parameters  # noqa: E402
from fused_balance.training.segments import layer_key  # noqa: E402
from real_models import FAMILIES, early_fusion_batch, early_fusion_losses, inner, lora_model  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
OBJECTIVES = ("text", "image")
PEFT_PREFIX = "base_model.model."


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one intra-op thread is fastest, and immune to busy neighbours."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def available(family):
    if getattr(transformers, family.class_name, None) is None:
        pytest.skip(f"transformers {transformers.__version__} has no {family.class_name}")
    return family


@pytest.fixture(scope="module", params=FAMILIES, ids=[f.name for f in FAMILIES])
def family(request):
    return available(request.param)


def by_name(name):
    return available(next(f for f in FAMILIES if f.name == name))


# ---------------------------------------------------------------- segments
def test_segments_follow_the_module_structure(family):
    model = lora_model(family)
    groups = describe_segments(model, file=False)
    base = inner(model)
    for segment, names in groups.items():
        base.get_submodule(segment)  # every segment is a module of the model, no catch-all
        for name in names:
            assert name[len(PEFT_PREFIX):].startswith(segment + "."), (segment, name)
    for expected in family.expect_segments:
        assert expected in groups, (expected, list(groups))
    # Every tensor lies under its segment's module (checked above), so a segment never joins
    # two sub-models: vision and language layers with the same index stay apart.
    layer_segments = [s for s in groups if any(part.isdigit() for part in s.split("."))]
    assert len({s.split(".")[-1] for s in layer_segments}) < len(layer_segments)  # same indices, apart


# ---------------------------------------------------------------- one step vs float64 reference
def reference_weights(G):
    """pareto_lora (tau 5, min-norm rescaled to the plain sum's length) on one segment's 2x2
    float64 Gram, written from the policy's definition; zero-norm objectives get weight 0."""
    g11, g12, g22 = float(G[0, 0]), float(G[0, 1]), float(G[1, 1])
    n1, n2 = math.sqrt(g11), math.sqrt(g22)
    if n1 == 0 or n2 == 0:
        return (1.0 if n1 > 0 else 0.0, 1.0 if n2 > 0 else 0.0)
    if g12 / (n1 * n2) < 0:  # conflict: min-norm point, stretched to the plain sum's length
        gamma = min(max((g22 - g12) / (g11 + g22 - 2 * g12), 0.0), 1.0)
        w1, w2 = gamma, 1 - gamma
        stretch = math.sqrt((g11 + 2 * g12 + g22) / (w1 * w1 * g11 + 2 * w1 * w2 * g12 + w2 * w2 * g22))
        return (w1 * stretch, w2 * stretch)
    if max(n1, n2) > 5.0 * min(n1, n2):
        mean = (n1 + n2) / 2
        return (mean / n1, mean / n2)
    return (1.0, 1.0)


def reference_step(model, family, batch, lr, weight_decay):
    """Parameters after one balanced AdamW step, computed independently in float64; and the
    names of the tensors no objective reached."""
    named = lora_parameters(model)
    params = [p for _, p in named]
    losses = family.losses(model, batch)
    grads = [torch.autograd.grad(losses[k], params, retain_graph=True, allow_unused=True) for k in OBJECTIVES]
    members = {}
    for i, (name, _) in enumerate(named):
        members.setdefault(layer_key(name), []).append(i)
    combined = [None] * len(params)
    for idx in members.values():
        G = torch.zeros(2, 2, dtype=torch.float64)
        for i in idx:
            flat = torch.stack([(g[i] if g[i] is not None else torch.zeros_like(params[i])).reshape(-1).double()
                                for g in grads])
            G += flat @ flat.T
        w = reference_weights(G)
        for i in idx:
            parts = [wk * g[i].double() for wk, g in zip(w, grads) if g[i] is not None]
            combined[i] = sum(parts) if parts else None
    copies = [p.detach().clone().requires_grad_() for p in params]
    for c, d in zip(copies, combined):
        c.grad = None if d is None else d.to(c.dtype)
    torch.optim.AdamW(copies, lr=lr, weight_decay=weight_decay).step()
    dead = [i for i, d in enumerate(combined) if d is None]  # indices: names depend on wrappers
    return [c.detach() for c in copies], combined, dead


@pytest.mark.parametrize("optimizer", ["torch", "fused_adamw"])
def test_one_balanced_step_equals_float64_reference(family, optimizer):
    model = lora_model(family, dtype=torch.float64)
    batch = family.batch(torch.Generator().manual_seed(3))
    lr, decay = 1e-2, 0.1
    expected, combined, dead = reference_step(model, family, batch, lr, decay)
    named = lora_parameters(model)
    params = [p for _, p in named]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=decay) if optimizer == "torch" else "fused_adamw"
    balancer = ParetoLoRA(model, opt, lr=lr, weight_decay=decay, backend="torch")
    assert balancer.step(family.losses(model, batch))
    for (name, p), e, d, b in zip(named, expected, combined, before):
        torch.testing.assert_close(p.detach(), e, rtol=1e-9, atol=1e-12, msg=name)
        if d is None:  # no objective reached it: untouched, like a plain backward + AdamW
            assert p.grad is None and torch.equal(p.detach(), b), name
            state = balancer.optimizer.state.get(p)
            assert not state, name
        elif optimizer == "torch":  # every reached tensor holds its balanced gradient
            torch.testing.assert_close(p.grad, d, rtol=1e-9, atol=1e-14, msg=name)
    dead = [balancer.named_params[i][0] for i in dead]  # the balancer's (wrapper-free) names
    assert balancer.dead_tensors == dead
    entry = balancer.history[0]
    assert entry.get("dead", []) == dead
    if family.name in ("chameleon", "emu3"):
        assert dead, "the VQ model's LoRA tensors are reached by no objective"
    assert all(torch.isfinite(entry["losses"]))


# ---------------------------------------------------------------- Chameleon's masked logits
@pytest.mark.parametrize("optimizer", ["torch", "fused_adamw"])
def test_chameleon_forward_logits_give_an_inf_loss_and_the_step_is_skipped(optimizer):
    family = by_name("chameleon")
    model = lora_model(family)
    params = [p for _, p in lora_parameters(model)]
    opt = torch.optim.AdamW(params, lr=1e-2) if optimizer == "torch" else "fused_adamw"
    balancer = ParetoLoRA(model, opt, backend="torch")
    before = [p.detach().clone() for p in params]
    losses = early_fusion_losses(model, early_fusion_batch(torch.Generator().manual_seed(0)))
    assert math.isinf(float(losses["image"])) and math.isfinite(float(losses["text"]))
    with pytest.warns(RuntimeWarning, match=r"non-finite loss\(es\) \['image'\]"):
        assert not balancer.step(losses)
    assert all(torch.equal(b, p) for b, p in zip(before, params))
    assert all(p.grad is None for p in params)
    assert not balancer.optimizer.state or all(not s for s in balancer.optimizer.state.values())
    assert balancer.skipped_steps == 1
    record = next(iter(balancer.history_records()))
    assert record["nonfinite_losses"] == ["image"] and record["stepped"] is False


# ---------------------------------------------------------------- bf16 adapters
def test_bf16_adapters(family):
    model = lora_model(family, dtype=torch.bfloat16)
    named = lora_parameters(model)
    batch = family.batch(torch.Generator().manual_seed(4))
    for opt in ("fused_adamw", torch.optim.AdamW([p for _, p in named], lr=1e-2)):
        balancer = ParetoLoRA(model, opt, lr=1e-2, backend="torch")
        dead = set(balancer.dead_tensors)
        before = [p.detach().clone() for _, p in named]
        losses = family.losses(model, batch)
        assert all(math.isfinite(float(v.detach())) for v in losses.values())
        assert balancer.step(losses)
        dead = set(balancer.dead_tensors)
        assert [p for _, p in balancer.named_params] == [p for _, p in named]
        for (name, _), p, b in zip(balancer.named_params, (p for _, p in named), before):
            assert p.dtype == torch.bfloat16 and torch.isfinite(p).all()
            assert torch.equal(p.detach(), b) == (name in dead), name
        balancer.zero_grad()


# ---------------------------------------------------------------- Hugging Face Trainer
class Rows(torch.utils.data.Dataset):
    def __init__(self, n):
        self.ids = early_fusion_batch(torch.Generator().manual_seed(5), n)["input_ids"]

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def trainer_objectives(model, inputs, outputs):
    return early_fusion_losses(model, inputs, logits_fn=lambda m, ids: outputs.logits)


def make_trainer(tmp_path, model, max_steps):
    from fused_balance.training.hf import BalancedTrainer

    class InOrder(BalancedTrainer):  # micro-batches in dataset order, to replay them by hand
        def _get_train_sampler(self, train_dataset=None):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=max_steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="constant",
        max_grad_norm=0.0, optim="adamw_torch", logging_steps=1, save_strategy="steps", save_steps=1,
        report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    return InOrder(model=model, args=args, train_dataset=Rows(8), objectives_fn=trainer_objectives,
                   balance_backend="torch")


def test_trainer_with_accumulation_equals_manual_accumulation_and_resumes(tmp_path):
    family = by_name("emu3")
    data = Rows(8)
    # By hand: each optimizer step accumulates two micro-batches (losses / 2), balances once.
    manual = lora_model(family)
    named = lora_parameters(manual)
    balancer = ParetoLoRA(manual, torch.optim.AdamW([p for _, p in named], lr=1e-2, weight_decay=0.1),
                          backend="torch")
    for step in range(2):
        for micro in range(2):
            rows = [data[4 * step + 2 * micro + j]["input_ids"] for j in range(2)]
            losses = early_fusion_losses(manual, {"input_ids": torch.stack(rows)})
            balancer.accumulate({k: v / 2 for k, v in losses.items()})
        assert balancer.step()
        balancer.zero_grad()

    trained = lora_model(family)
    trainer = make_trainer(tmp_path, trained, max_steps=2)
    trainer.train()
    for (name, p), (_, q) in zip(lora_parameters(trained), named):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7, msg=name)
    assert trainer.balancer.step_count == 2  # one balance per optimizer step, not per micro-batch
    assert trainer.balancer.dead_tensors == balancer.dead_tensors != []
    live = torch.tensor(trainer.balancer.live_segments)
    assert not live.all()  # the VQ model's segments are dead
    logged = [e for e in trainer.state.log_history if "balance/weight_image" in e]
    last = trainer.balancer.history[-1]
    assert logged[-1]["balance/weight_image"] == pytest.approx(float(last["weights"][live, 1].mean()))
    assert logged[-1]["balance/conflict_fraction"] == pytest.approx(float((last["branch"][live] == 2).float().mean()))

    # Resume from the first checkpoint: the balancer continues its history and step count.
    resumed = make_trainer(tmp_path / "resumed", lora_model(family), max_steps=2)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    assert resumed.balancer.step_count == 2
    assert [e["step"] for e in resumed.balancer.history] == [0, 1]
    torch.testing.assert_close(resumed.balancer.history[0]["weights"], trainer.balancer.history[0]["weights"])
