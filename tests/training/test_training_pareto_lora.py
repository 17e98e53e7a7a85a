"""ParetoLoRA on a tiny PEFT Llama: .grad equals per-layer combinations computed by hand in
float64 from per-objective autograd gradients; segments, history, NaN skips."""
import json
import math
import warnings

import pytest
import torch

import fused_balance as fb

from tiny_unified import VOCAB, make_batch, build_lora_model, modality_losses
from fused_balance.training import BalancedAdamW, ParetoLoRA, layer_key, lora_parameters, segment_ids_for
from shared import dispatched_fused_balance_ops

warnings.filterwarnings("ignore", category=FutureWarning)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_model(seed=0, dtype=torch.float64):
    model = build_lora_model(VOCAB.size, hidden=32, layers=2, heads=2, rank=4, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # LoRA B starts at zero: give it values so every tensor has a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=gen)
    return model.to(dtype)


def hand_weights(G, policy, tau, strength=1.0):
    """Independent float64 implementation of the K=2 policies on one segment's Gram; pareto_lora's
    conflict branch at ``strength`` times the plain sum's magnitude (rescale=strength)."""
    g11, g12, g22 = float(G[0, 0]), float(G[0, 1]), float(G[1, 1])
    n1, n2 = math.sqrt(g11), math.sqrt(g22)
    gamma = min(max((g22 - g12) / (g11 + g22 - 2 * g12), 0.0), 1.0)
    minnorm = (gamma, 1 - gamma)
    if policy == "mgda":
        return minnorm, "conflict"
    if policy == "sum":
        return (1.0, 1.0), "sum"
    if g12 / (n1 * n2) < 0:
        w1, w2 = minnorm
        short = w1 * w1 * g11 + 2 * w1 * w2 * g12 + w2 * w2 * g22
        factor = strength * math.sqrt((g11 + 2 * g12 + g22) / short)  # x the plain sum's magnitude
        return (w1 * factor, w2 * factor), "conflict"
    if max(n1, n2) > tau * min(n1, n2):
        mean = (n1 + n2) / 2
        return (mean / n1, mean / n2), "rescale"
    return (1.0, 1.0), "sum"


def test_layer_segments_from_peft_names():
    model = tiny_model()
    named = lora_parameters(model)
    assert len(named) == 2 * 7 * 2 + 2  # A and B of 7 linears in 2 layers + embed + head copies
    ids, names = segment_ids_for(named, "layer")
    # Tensors outside a layer by their module, never one catch-all segment.
    assert names == ["model.embed_tokens", "model.layers.0", "model.layers.1", "lm_head"]
    for (name, _), s in zip(named, ids):
        assert (".layers.1." in name) == (s == 2) and (".layers.0." in name) == (s == 1)
        assert ("embed_tokens" in name) == (s == 0) and ("lm_head" in name) == (s == 3)
    assert layer_key("base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight") == "model.layers.3"
    assert layer_key("vision.encoder.layers.3.mlp.fc1.lora_B.w") != layer_key("llm.layers.3.mlp.fc1.lora_B.w")
    for name, key in [  # the module structure, never one catch-all
            ("base_model.model.model.aligner.fc1.lora_A.default.weight", "model.aligner"),
            ("base_model.model.model.aligner.hidden_layers.0.lora_B.default.weight", "model.aligner"),
            ("base_model.model.model.generation_aligner.fc1.lora_A.default.weight", "model.generation_aligner"),
            ("base_model.model.model.multi_modal_projector.linear_2.lora_B.default.weight",
             "model.multi_modal_projector"),
            ("base_model.model.model.visual.merger.mlp.0.lora_A.default.weight", "model.visual.merger"),
            ("base_model.model.lm_head.modules_to_save.default.weight", "lm_head"),
            ("base_model.model.model.embed_tokens.lora_embedding_A.default", "model.embed_tokens"),
            ("base_model.model.model.vqmodel.encoder.down_block.down.1.attn.0.q_proj.lora_A.default.weight",
             "model.vqmodel.encoder.down_block.down.1"),
            ("model.vision_tower.embeddings.class_embedding", "model.vision_tower.embeddings"),
            ("layers.0.weight", "layers.0"), ("h.2.attn.c_attn.weight", "h.2")]:
        assert layer_key(name) == key, name
    assert segment_ids_for(named, "tensor")[0] == list(range(len(named)))
    assert segment_ids_for(named, "global")[0] == [0] * len(named)
    ids, names = segment_ids_for(named, lambda n, p: "attn" if "self_attn" in n else "rest")
    assert set(names) == {"attn", "rest"}


def hand_combination(per_objective, named, policy, tau, strength=1.0):
    """Per parameter, the combination of its two objectives' gradients with the weights
    ``hand_weights`` gives its layer's Gram (float64 sums); and the branch per layer."""
    ids, names = segment_ids_for(named, "layer")
    expected, branches = [None] * len(named), []
    for s in range(len(names)):
        members = [i for i, sid in enumerate(ids) if sid == s]
        G = torch.zeros(2, 2, dtype=torch.float64)
        for i in members:
            g = torch.stack([per_objective[0][i].reshape(-1), per_objective[1][i].reshape(-1)]).double()
            G += g @ g.T
        (w1, w2), branch = hand_weights(G, policy, tau, strength)
        branches.append(branch)
        for i in members:
            expected[i] = w1 * per_objective[0][i] + w2 * per_objective[1][i]
    return expected, branches


@pytest.mark.parametrize("policy,tau,gamma", [("mgda", 5.0, None), ("pareto_lora", 5.0, None),
                                              ("pareto_lora", 1.05, None), ("pareto_lora", 5.0, 0.4),
                                              ("sum", 5.0, None)])
def test_grad_equals_hand_computed_per_layer_combination(policy, tau, gamma):
    model = tiny_model()
    named = lora_parameters(model)
    params = [p for _, p in named]
    batch = make_batch(6, torch.Generator().manual_seed(0))

    def objectives():  # partly aligned (0.1 text in the second): layers differ in cosine sign
        losses, _ = modality_losses(model, batch)
        return {"text": losses["text"], "image": 0.1 * losses["text"] + losses["image"]}

    losses = objectives()
    per_objective = [torch.autograd.grad(losses[k], params, retain_graph=True) for k in ("text", "image")]
    expected, branches = hand_combination(per_objective, named, policy, tau, 1.0 if gamma is None else gamma)

    balancer = ParetoLoRA(model, None, policy=policy, tau=tau, backend="torch", rescale=gamma,
                          objectives=["text", "image"])
    result = balancer.backward(objectives(), accumulate=False)
    for i, (name, p) in enumerate(named):
        torch.testing.assert_close(p.grad, expected[i], rtol=1e-9, atol=1e-12, msg=name)
    got = [("sum", "rescale", "conflict")[int(b)] for b in result.branch]
    assert got == branches
    if policy == "pareto_lora":  # the data exercise the conflict branch and one other
        assert branches.count("conflict") == 2, branches
        assert branches[2] == ("rescale" if tau < 2 else "sum"), branches


@pytest.mark.parametrize("selection", [dict(layers=["model.layers.1"]), dict(layers=lambda key: key.endswith(".1")),
                                       dict(modules_to_save=False)])
def test_selected_tensors_are_balanced_and_the_rest_get_the_plain_sum(selection):
    """lora_parameters(model, layers=... / modules_to_save=False) into ParetoLoRA: the chosen
    tensors get their layers' balanced combination, every other trainable tensor the plain sum."""
    model = tiny_model()
    every = lora_parameters(model)
    chosen = lora_parameters(model, **selection)
    assert 0 < len(chosen) < len(every)
    batch = make_batch(6, torch.Generator().manual_seed(0))

    def objectives():
        losses, _ = modality_losses(model, batch)
        return {"text": losses["text"], "image": 0.1 * losses["text"] + losses["image"]}

    losses = objectives()
    per = [torch.autograd.grad(losses[k], [p for _, p in every], retain_graph=True) for k in ("text", "image")]
    at = {name: i for i, (name, _) in enumerate(every)}
    picked = [at[name] for name, _ in chosen]
    balanced, _ = hand_combination([[g[i] for i in picked] for g in per], chosen, "pareto_lora", 1.05)
    expected = [per[0][i] + per[1][i] for i in range(len(every))]
    for j, i in enumerate(picked):
        expected[i] = balanced[j]
    assert any(not torch.allclose(balanced[j], per[0][i] + per[1][i]) for j, i in enumerate(picked))

    balancer = ParetoLoRA(chosen, None, policy="pareto_lora", tau=1.05, backend="torch",
                          objectives=["text", "image"])
    balancer.backward(objectives(), accumulate=False)
    for i, (name, p) in enumerate(every):
        torch.testing.assert_close(p.grad, expected[i], rtol=1e-9, atol=1e-12, msg=name)


def test_lora_parameters_refuses_a_selection_that_picks_nothing():
    model = tiny_model()
    with pytest.raises(ValueError, match="describe_segments"):
        lora_parameters(model, layers=["model.layers.7"])
    with pytest.raises(TypeError, match="layer keys"):
        lora_parameters(model, layers="model.layers.1")


def test_accumulate_adds_like_backward():
    model = tiny_model()
    balancer = ParetoLoRA(model, None, policy="sum", backend="torch")
    batch = make_batch(4, torch.Generator().manual_seed(1))
    for _ in range(2):
        losses, _ = modality_losses(model, batch)
        balancer.backward(losses)
    twice = [p.grad.clone() for p in balancer.params]
    balancer.zero_grad()
    losses, _ = modality_losses(model, batch)
    (2 * (losses["text"] + losses["image"])).backward()
    for t, p in zip(twice, balancer.params):
        # Llama's RMSNorm/rotary run in fp32 even in a fp64 model: one joint backward and two
        # separate ones differ by fp32 rounding.
        torch.testing.assert_close(t, p.grad, rtol=1e-5, atol=1e-6 * float(p.grad.abs().max()))


@pytest.mark.parametrize("fused", [False, True])
def test_nan_loss_skips_the_step_and_touches_nothing(fused, tmp_path):
    model = tiny_model(dtype=torch.float32)
    opt = "fused_adamw" if fused else (lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    balancer = ParetoLoRA(model, opt, backend="torch", lr=1e-2)
    batch = make_batch(4, torch.Generator().manual_seed(1))
    losses, _ = modality_losses(model, batch)
    assert balancer.step(losses)
    before = [p.detach().clone() for p in balancer.params]
    state = [{k: v.clone() for k, v in balancer.optimizer.state[p].items()} for p in balancer.params]
    losses, _ = modality_losses(model, batch)
    assert not balancer.step({"text": losses["text"] * float("nan"), "image": losses["image"]})
    assert balancer.skipped_steps == 1
    for b, p, st in zip(before, balancer.params, state):
        assert torch.equal(b, p)
        for k, v in st.items():
            assert torch.equal(v, balancer.optimizer.state[p][k])
    losses, _ = modality_losses(model, batch)
    assert balancer.step(losses)
    history = balancer.history
    assert [h["stepped"] for h in history] == [True, False, True]
    path = tmp_path / "history.jsonl"
    balancer.export_history(path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) == 3 and records[1]["found_inf"] and not records[1]["stepped"]
    seg = records[0]["segments"][1]
    assert seg["segment"] == "model.layers.0" and set(seg["weights"]) == {"text", "image"}
    assert seg["branch"] in ("sum", "rescale", "conflict") and -1 <= seg["cosine"] <= 1


def test_fused_adamw_path_matches_torch_adamw_on_combined_gradient():
    models = [tiny_model(seed=2), tiny_model(seed=2)]
    balancers = [
        ParetoLoRA(models[0], lambda ps: torch.optim.AdamW(ps, lr=3e-3, weight_decay=0.1, foreach=False),
                   backend="torch"),
        ParetoLoRA(models[1], "fused_adamw", lr=3e-3, weight_decay=0.1, backend="torch"),
    ]
    rng = torch.Generator().manual_seed(5)
    for _ in range(3):
        batch = make_batch(4, rng)
        for m, b in zip(models, balancers):
            losses, _ = modality_losses(m, batch)
            b.step(losses)
            b.zero_grad()
    for p, q in zip(balancers[0].params, balancers[1].params):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)
    h0, h1 = balancers[0].history[-1], balancers[1].history[-1]
    torch.testing.assert_close(h0["weights"], h1["weights"])


def test_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError):
        ParetoLoRA(model, None, policy="nope")
    with pytest.raises(ValueError):
        ParetoLoRA(model, None, segments="rows")
    balancer = ParetoLoRA(model, None, objectives=["text", "image"])
    with pytest.raises(ValueError):
        balancer.backward({"text": torch.zeros((), requires_grad=True)})
    with pytest.raises(RuntimeError):
        balancer.step({"text": torch.zeros(()), "image": torch.zeros(())})


@pytest.mark.parametrize("scale", [1e-30, 1e25], ids=["tiny", "huge"])
def test_fused_path_gets_the_range_rescue(scale):
    """fp32 gradients whose squares leave fp32's range (tiny: the Gram underflows to 0; huge:
    it overflows to inf). The fused path goes through fb.pareto_weights, so, like the
    pareto_combine path, it takes the step (found_inf only for real NaN/Inf) with the weights
    of the float64 problem; gram + policy_weights + isfinite(G) would skip (huge) or treat
    the objective as absent (tiny). The min-norm policy keeps the combined gradient near the
    small objective's magnitude: pareto_lora's rescale/restore branches would make it ~1e20
    here, whose square overflows fp32 inside torch's AdamW (but not in ours), an AdamW matter."""
    import fused_balance as fb

    models = [tiny_model(seed=4, dtype=torch.float32) for _ in range(2)]
    balancers = [ParetoLoRA(models[0], lambda ps: torch.optim.AdamW(ps, lr=1e-3), policy="mgda",
                            backend="torch"),
                 ParetoLoRA(models[1], "fused_adamw", policy="mgda", lr=1e-3, backend="torch")]
    batch = make_batch(4, torch.Generator().manual_seed(2))
    for model, balancer in zip(models, balancers):
        losses, _ = modality_losses(model, batch)
        assert balancer.step({"text": losses["text"] * scale, "image": losses["image"]})
        entry = balancer.history[-1]
        assert not bool(entry["found_inf"]) and entry["stepped"]
        G32 = fb.gram(balancer.bank.grads, balancer.segment_ids, backend="torch")
        assert bool((G32[:, 0, 0] == 0).any() if scale < 1 else (~torch.isfinite(G32)).any())
        G64 = fb.gram([[g.double() for g in row] for row in balancer.bank.grads], balancer.segment_ids,
                      backend="torch")
        want, _ = fb.policy_weights(G64, "mgda")
        big = torch.finfo(torch.float32).max
        torch.testing.assert_close(entry["weights"], want.clamp(-big, big).float(), rtol=1e-4, atol=0)
    for p, q in zip(balancers[0].params, balancers[1].params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optimizer", ["torch-adamw", "fused"])
def test_an_unreached_tensor_keeps_the_planned_step(optimizer):
    """A module no objective runs through (Emu3's VQ adapters): the step still takes the plan
    (bank ops only), the unreached tensor keeps .grad None and its values, and the result
    equals the list engine's."""
    results = []
    for backend in ("cpp", "torch"):  # the plan, and the list engine as the reference
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        unused = torch.nn.Linear(8, 8)
        named = list(model.named_parameters()) + [(f"unused.{n}", p) for n, p in unused.named_parameters()]
        opt = (torch.optim.AdamW([p for _, p in named], lr=1e-2) if optimizer == "torch-adamw"
               else BalancedAdamW([p for _, p in named], lr=1e-2, backend=backend))
        balancer = ParetoLoRA(named, opt, backend=backend)
        before = [p.detach().clone() for p in unused.parameters()]
        ops = []
        for step in range(3):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
            out = model(x)
            batch = {"text": out[:, 0].pow(2).mean(), "image": (out[:, 1] - 1).pow(2).mean()}
            ops += dispatched_fused_balance_ops(lambda: balancer.step(batch))
            balancer.zero_grad()
        assert balancer.dead_tensors == ["unused.weight", "unused.bias"]
        assert all(p.grad is None and torch.equal(p, b) for p, b in zip(unused.parameters(), before))
        if backend == "cpp":
            assert set(ops) <= {"bank_gram", "bank_combine_into", "bank_adamw_", "policy_weights"} \
                and "bank_gram" in ops, ops
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("before", ["none", "views", "user"])
@pytest.mark.parametrize("accumulate", [True, False])
def test_balance_and_backward_take_the_plan_and_equal_the_list_engine(before, accumulate):
    """``backward`` (accumulate + balance, the Trainer's path) dispatches bank ops only and
    writes what the list engine writes, starting from ``.grad`` None (after zero_grad), from the
    previous balance's ``.grad`` (no zero_grad between: added to with accumulate) or from the
    user's own ``.grad`` tensors; an unreached module keeps its ``.grad``; a NaN loss leaves
    every ``.grad`` as it was."""
    grads, ops = {}, []
    for backend in ("cpp", "torch"):  # the plan, and the list engine as the reference
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        unused = torch.nn.Linear(8, 8)
        named = list(model.named_parameters()) + [(f"unused.{n}", p) for n, p in unused.named_parameters()]
        balancer = ParetoLoRA(named, None, backend=backend)
        if before == "user":
            for i, (_, p) in enumerate(named):
                p.grad = torch.full_like(p, 0.1 * (i + 1))
        for step in range(3):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
            out = model(x)
            batch = {"text": out[:, 0].pow(2).mean(), "image": (out[:, 1] - 1).pow(2).mean()}
            recorded = dispatched_fused_balance_ops(lambda: balancer.backward(batch, accumulate=accumulate))
            if backend == "cpp":
                ops += recorded
            if before == "none":
                balancer.zero_grad()
        held = [None if p.grad is None else p.grad.clone() for _, p in named]
        out = model(torch.randn(4, 8))
        res = balancer.backward({"text": out[:, 0].sum() * float("nan"), "image": out[:, 1].sum()},
                                accumulate=accumulate)
        assert bool(res.found_inf)
        for (_, p), h in zip(named, held):
            assert (p.grad is None) == (h is None) and (h is None or torch.equal(p.grad, h))
        grads[backend] = held
    assert set(ops) <= {"bank_gram", "bank_combine_into", "policy_weights"} and "bank_combine_into" in ops, ops
    for a, b in zip(grads["cpp"], grads["torch"]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if before != "user":
        assert grads["cpp"][-1] is None and grads["cpp"][-2] is None  # the unreached module


LIST_OPS = {"gram", "combine", "combine_into", "balanced_adamw_"}


def _bank_backends():
    from fused_balance.backends import bank_ops_missing, get_backend
    return [b for b in fb_available("cpu") if bank_ops_missing(get_backend(b)) is None]


def fb_available(device):
    import fused_balance as fb
    return fb.available_backends(device)


@pytest.mark.parametrize("backend", _bank_backends())
@pytest.mark.parametrize("entry", ["step-torch-optimizer", "step-fused", "backward", "balance"])
@pytest.mark.parametrize("case", ["all-reached", "unreached-linear", "accumulation", "mixed-dtypes"])
def test_every_entry_point_takes_the_plan_on_every_backend(backend, entry, case):
    """One engine: whatever the backend, entry point and case, a balanced step dispatches that
    backend's bank ops (and the policy solve), never a list op (C++ or Triton). Several dtypes
    under the fused AdamW are refused at construction instead."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    if case == "mixed-dtypes":  # fp32 then bf16
        model[1].to(torch.bfloat16)

    def run(x):
        return model[1](model[0](x).to(model[1].weight.dtype)).float()
    named = list(model.named_parameters())
    if case == "unreached-linear":
        named += [(f"unused.{n}", p) for n, p in torch.nn.Linear(8, 8).named_parameters()]
    params = [p for _, p in named]
    opt = {"step-torch-optimizer": torch.optim.AdamW(params, lr=1e-2), "step-fused": "fused_adamw"}.get(entry)
    if case == "mixed-dtypes" and entry == "step-fused":
        with pytest.raises(TypeError, match="several dtypes"):
            ParetoLoRA(named, opt, backend=backend)
        return
    balancer = ParetoLoRA(named, opt, backend=backend)
    ops = []
    for step in range(2):
        micro = 2 if case == "accumulation" else 1
        batches = []
        for i in range(micro):
            out = run(torch.randn(4, 8, generator=torch.Generator().manual_seed(10 * step + i)))
            batches.append({"text": out[:, 0].pow(2).mean(), "image": (out[:, 1] - 1).pow(2).mean()})
        for batch in batches[:-1]:
            balancer.accumulate(batch)
        if entry.startswith("step"):
            ops += dispatched_fused_balance_ops(lambda: balancer.step(batches[-1]))
        elif entry == "backward":
            ops += dispatched_fused_balance_ops(lambda: balancer.backward(batches[-1]))
        else:
            balancer.accumulate(batches[-1])
            ops += dispatched_fused_balance_ops(balancer.balance)
        balancer.zero_grad()
    prefix = {"cpp": "", "torch": "torch_", "triton": "triton_"}[backend]
    bank = {prefix + op for op in ("bank_gram", "bank_combine_into", "bank_adamw_")}
    listed = LIST_OPS | {"triton_" + op for op in LIST_OPS}
    assert not set(ops) & listed, ops
    assert set(ops) <= bank | {"policy_weights"} and prefix + "bank_gram" in ops, ops
    assert (prefix + "bank_adamw_" in ops) == (entry == "step-fused"), ops
    assert balancer._plan.backend.name == backend


@pytest.mark.parametrize("backend", _bank_backends())
def test_odd_sized_parameters_balance_to_the_float64_combination(backend):
    """fp32 parameters of 48, 8, 24 and 3 elements: the bank pads each to 16 bytes (the kernels'
    128-bit accesses), and the planned step still is the float64 per-layer Gram and combination
    of the per-objective gradients; the padding stays zero."""
    from shared import regression_batch, regression_net, regression_objectives
    model = regression_net()
    params = list(model.parameters())
    x, t = regression_batch(0, 8, 6, seed=3)
    balancer = ParetoLoRA(model, None, backend=backend)
    losses = regression_objectives(model(x), t)
    per_objective = [torch.autograd.grad(losses[k], params, retain_graph=True) for k in ("text", "image")]
    result = balancer.backward(losses, accumulate=False)
    bank = balancer.bank
    assert bank.numel == 84 > sum(bank.numels) and all(a % 4 == 0 for a in bank.offsets)
    inside = torch.zeros(bank.numel, dtype=torch.bool)
    for a, n in zip(bank.offsets, bank.numels):
        inside[a:a + n] = True
    assert not bank.buffer[:, ~inside].any()
    for s, members in enumerate(([0, 1], [2, 3])):  # layers.0, layers.1
        g = torch.stack([torch.cat([per_objective[k][i].double().flatten() for i in members]) for k in (0, 1)])
        torch.testing.assert_close(result.gram[s].double(), g @ g.T, rtol=1e-6, atol=0)
        for i in members:
            want = sum(result.weights[s, k].double() * per_objective[k][i].double() for k in (0, 1))
            torch.testing.assert_close(params[i].grad.double(), want, rtol=1e-6, atol=1e-7)


def _imbalanced_regression(balancer_kwargs, steps=3):
    """The regression with the image objective scaled far down (agreeing gradients, the rescale
    branch): ParetoLoRA's weights per step."""
    from shared import regression_batch, regression_net, regression_objectives
    model = regression_net()
    balancer = ParetoLoRA(model, torch.optim.SGD(model.parameters(), lr=1e-3), segments="layer", tau=2.0,
                          **balancer_kwargs)
    for step in range(steps):
        x, t = regression_batch(step, 8, 6, seed=11)
        losses = regression_objectives(model(x), t)
        balancer.step({"text": losses["text"] + losses["image"], "image": 1e-3 * losses["image"]})
        balancer.zero_grad()
    return balancer


@pytest.mark.parametrize("magnitude", ["mean", "weaker", "image", "text"])
def test_magnitude_rule_by_objective_name(magnitude):
    """magnitude="image" protects the image objective (only it is raised to the mean norm, text
    keeps weight 1); "text" protects text, which here is the stronger: the plain sum."""
    balancer = _imbalanced_regression({"magnitude": magnitude})
    for entry in balancer.history:
        rescale = entry["branch"] == fb.BRANCH_RESCALE
        assert rescale.any()
        text, image = entry["weights"][rescale, 0], entry["weights"][rescale, 1]
        norms = entry["norms"][rescale]
        assert (norms[:, 0] > norms[:, 1]).all()  # text is the stronger gradient here
        if magnitude == "mean":
            assert (text < 1).all() and (image > 1).all()
        elif magnitude in ("weaker", "image"):
            assert (text == 1).all() and (image > 1).all()
        else:
            assert (text == 1).all() and (image == 1).all()
    assert balancer.state_dict()["settings"]["magnitude"] == magnitude


def test_magnitude_naming_an_unknown_objective_is_refused_before_anything_changes():
    from shared import regression_net
    with pytest.raises(ValueError, match="name of an objective to protect"):
        ParetoLoRA(regression_net(), None, objectives=["text", "image"], magnitude="audio")
    with pytest.raises(ValueError, match="no magnitude option"):
        ParetoLoRA(regression_net(), None, policy="mgda", magnitude="weaker")
    model = regression_net()
    balancer = ParetoLoRA(model, None, magnitude="audio")  # objectives known at the first step
    before = [p.detach().clone() for p in model.parameters()]
    y = model(torch.randn(4, 6))
    with pytest.raises(ValueError, match="name of an objective to protect"):
        balancer.backward({"text": y[:, 0].pow(2).mean(), "image": y[:, 2].pow(2).mean()})
    assert balancer.step_count == 0 and balancer.bank is None
    assert all(p.grad is None and torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_the_magnitude_rule_travels_with_the_state():
    saved = _imbalanced_regression({"magnitude": "image"}, steps=1).state_dict()
    restored = _imbalanced_regression({}, steps=0)
    restored.load_state_dict(saved)
    assert restored.magnitude == "image"
    old = dict(saved, settings={k: v for k, v in saved["settings"].items() if k != "magnitude"})
    restored.load_state_dict(old)  # a state from before the option: the mean rule
    assert restored.magnitude == "mean"
