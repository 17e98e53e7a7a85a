"""Bad input to the training layer (GradBank, ParetoLoRA, BalancedAdamW, BalanceScheduler):
a clear error naming the problem, and NO partial update: parameters, gradients, optimizer
state, bank, history and counters are exactly as before the failing call.

Mismatched devices are exercised with the "meta" device (no GPU needed): a meta loss is a real
tensor on another device as far as the checks are concerned; a meta parameter is refused as not
materialised.
"""
from __future__ import annotations

import copy

import pytest
import torch

from fused_balance.training import BalancedAdamW, BalanceScheduler, GradBank, ParetoLoRA


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- helpers
class Tiny(torch.nn.Module):
    """Two "layers" (so segments="layer" gives two segments) and two objectives."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)])
        self.x = torch.randn(6, 4)

    def losses(self):
        h = torch.tanh(self.layers[0](self.x))
        y = self.layers[1](h)
        return {"text": (y[:, 0] - 1).pow(2).mean(), "image": (y[:, 1:] + h[:, :2]).pow(2).mean()}


def clone_state(obj):
    """A deep copy of nested dicts/lists/tensors (tensors cloned)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: clone_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(clone_state(v) for v in obj)
    return obj


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def snapshot_balancer(b: ParetoLoRA) -> dict:
    return {"params": [p.detach().clone() for p in b.params],
            "grads": [None if p.grad is None else p.grad.clone() for p in b.params],
            "optimizer": None if b.optimizer is None else clone_state(b.optimizer.state_dict()),
            "history": clone_state(b.history), "step": b.step_count, "skipped": b.skipped_steps,
            "objectives": b.objectives, "bank": None if b.bank is None else b.bank.buffer.clone()}


def trained_balancer(fused: bool) -> tuple[Tiny, ParetoLoRA]:
    """A balancer after one good step, so every kind of state exists."""
    model = Tiny()
    opt = "fused_adamw" if fused else (lambda ps: torch.optim.AdamW(ps, lr=1e-2))
    balancer = ParetoLoRA(model, opt, backend="torch", lr=1e-2)
    assert balancer.step(model.losses())
    return model, balancer


# ============================================================================ GradBank
def toy_params():
    torch.manual_seed(0)
    return [torch.randn(3, 2, requires_grad=True), torch.randn(4, requires_grad=True)]


def toy_losses(params, K=2):
    a, b = params
    return [(a.sum() * b.sum()) ** 2, (a.pow(3).sum() - b.mean())][:K] + [b.sin().sum()] * max(0, K - 2)


@pytest.mark.parametrize("bad, kwargs, exc, match", [
    (lambda ps: ps[0], {}, TypeError, "single Tensor"),
    (lambda ps: ps + [3.0], {}, TypeError, "parameter 2 is a float"),
    (lambda ps: 7, {}, TypeError, "sequence of parameters"),
    (lambda ps: ps, {"num_objectives": "2"}, TypeError, "num_objectives must be an int"),
    (lambda ps: ps, {"num_objectives": 2.0}, TypeError, "num_objectives must be an int"),
    (lambda ps: ps, {"dtype": "float32"}, TypeError, "dtype"),
    (lambda ps: ps, {"mode": "vmap"}, ValueError, "unknown fill mode"),
    (lambda ps: [torch.zeros(2, dtype=torch.long)], {}, TypeError, "floating point"),
], ids=["single-tensor", "non-tensor", "not-a-sequence", "K-str", "K-float", "dtype", "mode", "int-param"])
def test_bank_wrong_types(bad, kwargs, exc, match):
    args = {"num_objectives": 2, **kwargs}
    with pytest.raises(exc, match=match):
        GradBank(bad(toy_params()), args.pop("num_objectives"), **args)


def test_bank_frozen_nonleaf_duplicate_and_device_parameters():
    a, b = toy_params()
    with pytest.raises(ValueError, match="parameter 1 does not require grad"):
        GradBank([a, b.detach()], 2)
    with pytest.raises(ValueError, match="parameter 0 is not a leaf"):
        GradBank([a * 2, b], 2)
    with pytest.raises(ValueError, match="parameter 2 is the same tensor as parameter 0"):
        GradBank([a, b, a], 2)
    meta = torch.zeros(3, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match="parameter 2 is on the meta device"):
        GradBank([a, b, meta], 2)


@pytest.mark.parametrize("case", ["missing", "extra", "non-scalar", "not-a-tensor", "int-loss",
                                  "other-device", "a-tensor", "mode"])
def test_bank_fill_bad_losses_leave_the_bank_untouched(case):
    params = toy_params()
    bank = GradBank(params, 2).fill(toy_losses(params))
    before = bank.buffer.clone()
    grads_before = [p.grad for p in params]
    losses = toy_losses(params)
    kwargs = {}
    if case == "missing":
        losses, exc, match = losses[:1], ValueError, "expected 2 losses, got 1"
    elif case == "extra":
        losses, exc, match = toy_losses(params, 3), ValueError, "expected 2 losses, got 3"
    elif case == "non-scalar":
        losses[1] = params[1] * 2
        exc, match = ValueError, r"loss 1 has shape \(4,\): it must be a scalar"
    elif case == "not-a-tensor":
        losses[0] = 1.5
        exc, match = TypeError, "loss 0 is a float"
    elif case == "int-loss":
        losses[0] = torch.tensor(3)
        exc, match = TypeError, "loss 0 has dtype torch.int64"
    elif case == "other-device":
        losses[1] = torch.zeros((), device="meta", requires_grad=True)
        exc, match = ValueError, "loss 1 is on meta"
    elif case == "a-tensor":
        losses, exc, match = torch.stack(losses), TypeError, "sequence of 2 scalar tensors"
    else:
        kwargs, exc, match = {"mode": "vmap"}, ValueError, "unknown fill mode"
    with pytest.raises(exc, match=match):
        bank.fill(losses, **kwargs)
    assert torch.equal(bank.buffer, before)
    assert all(p.grad is g for p, g in zip(params, grads_before))


def test_bank_load_state_dict_mismatch_changes_nothing():
    params = toy_params()
    bank = GradBank(params, 2).fill(toy_losses(params))
    before = bank.buffer.clone()
    # [1, N] would broadcast silently into [2, N] with a plain copy_
    with pytest.raises(ValueError, match="does not match"):
        bank.load_state_dict({"buffer": torch.zeros(1, bank.numel)})
    with pytest.raises(TypeError):
        bank.load_state_dict({"buf": before})
    assert torch.equal(bank.buffer, before)


# ============================================================================ ParetoLoRA
@pytest.mark.parametrize("fused", [False, True], ids=["torch-adamw", "fused"])
@pytest.mark.parametrize("case", ["not-a-dict", "float-loss", "int-loss", "missing", "unknown",
                                  "missing-and-unknown", "non-scalar", "no-grad", "other-device",
                                  "empty", "name-not-str"])
def test_pareto_step_bad_losses_change_nothing(fused, case):
    model, balancer = trained_balancer(fused)
    losses = model.losses()
    expected = {
        "not-a-dict": (list(losses.values()), TypeError, "losses must be a dict"),
        "float-loss": ({**losses, "image": 0.5}, TypeError, "loss 'image' is a float"),
        "int-loss": ({**losses, "text": torch.tensor(1)}, TypeError, "loss 'text' has dtype torch.int64"),
        "missing": ({"text": losses["text"]}, ValueError, r"missing objective\(s\) \['image'\]"),
        "unknown": ({**losses, "audio": losses["text"] * 2}, ValueError,
                    r"unknown objective\(s\) \['audio'\]"),
        "missing-and-unknown": ({"text": losses["text"], "img": losses["image"]}, ValueError,
                                r"missing objective\(s\) \['image'\]; unknown objective\(s\) \['img'\]"),
        "non-scalar": ({**losses, "image": torch.stack([losses["image"]] * 3)}, ValueError,
                       r"loss 'image' has shape \(3,\): it must be a scalar"),
        "no-grad": ({k: v.detach() for k, v in losses.items()}, ValueError, "no loss requires grad"),
        "other-device": ({**losses, "text": torch.zeros((), device="meta", requires_grad=True)},
                         ValueError, "loss 'text' is on meta but the parameters are on cpu"),
        "empty": ({}, ValueError, "losses is empty"),
        "name-not-str": ({0: losses["text"], 1: losses["image"]}, TypeError, "objective names must be str"),
    }[case]
    bad, exc, match = expected
    before = snapshot_balancer(balancer)
    with pytest.raises(exc, match=match):
        balancer.step(bad)
    assert same(before, snapshot_balancer(balancer))
    with pytest.raises(exc, match=match):  # backward(): same checks, same guarantee
        balancer.backward(bad)
    assert same(before, snapshot_balancer(balancer))
    assert balancer.step(model.losses())  # and the balancer still works


def test_pareto_first_call_with_bad_losses_does_not_fix_the_objectives():
    model = Tiny()
    balancer = ParetoLoRA(model, None, backend="torch")
    losses = model.losses()
    with pytest.raises(ValueError, match="scalar"):
        balancer.backward({"text": losses["text"], "image": torch.stack([losses["image"]] * 2)})
    assert balancer.objectives is None and balancer.bank is None and balancer.step_count == 0
    assert all(p.grad is None for p in balancer.params)
    balancer.backward({"a": losses["text"], "b": losses["image"], "c": losses["text"] * 2})
    assert balancer.objectives == ["a", "b", "c"] and balancer.bank.num_objectives == 3


def test_pareto_wrong_types_in_the_constructor():
    model = Tiny()
    with pytest.raises(TypeError, match="nn.Module or a sequence"):
        ParetoLoRA(torch.zeros(3, requires_grad=True), None)
    with pytest.raises(TypeError, match="nn.Module or a sequence"):
        ParetoLoRA("model", None)
    with pytest.raises(TypeError, match="parameter 'param.1' is a int"):
        ParetoLoRA([model.layers[0].weight, 3], None)
    with pytest.raises(TypeError, match="optimizer must be"):
        ParetoLoRA(model, 42)
    with pytest.raises(TypeError, match="returned a list"):
        ParetoLoRA(model, lambda ps: list(ps))
    with pytest.raises(ValueError, match="unknown policy"):
        ParetoLoRA(model, None, policy="nash")
    with pytest.raises(ValueError, match="tau"):
        ParetoLoRA(model, None, tau=0.5)
    with pytest.raises(TypeError, match="tau"):
        ParetoLoRA(model, None, tau="5")
    with pytest.raises(ValueError, match="segments"):
        ParetoLoRA(model, None, segments="rows")
    with pytest.raises(ValueError, match="fill"):
        ParetoLoRA(model, None, fill="vmap")
    with pytest.raises(TypeError, match="objectives"):
        ParetoLoRA(model, None, objectives="text")
    with pytest.raises(ValueError, match="distinct"):
        ParetoLoRA(model, None, objectives=["a", "a"])
    with pytest.raises(ValueError, match="history_limit"):
        ParetoLoRA(model, None, history_limit=0)
    with pytest.raises(ValueError, match="distributed="):
        ParetoLoRA(model, None, distributed="model")
    with pytest.raises(RuntimeError, match="not initialised"):
        ParetoLoRA(model, None, process_group=object())


def test_pareto_frozen_nonleaf_duplicate_and_device_parameters():
    model = Tiny()
    w, b = model.layers[0].weight, model.layers[0].bias
    b.requires_grad_(False)
    with pytest.raises(ValueError, match="parameter 'bias' does not require grad"):
        ParetoLoRA([("weight", w), ("bias", b)], None)
    b.requires_grad_(True)
    with pytest.raises(ValueError, match="not a leaf"):
        ParetoLoRA([w, b * 1], None)
    with pytest.raises(ValueError, match="parameter 'again' is the same tensor as parameter 'w'"):
        ParetoLoRA([("w", w), ("b", b), ("again", w)], None)
    meta = torch.nn.Parameter(torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="'param.2' is on the meta device"):
        ParetoLoRA([w, b, meta], None)
    frozen = Tiny()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        ParetoLoRA(frozen, None)


def test_pareto_optimizer_must_hold_every_balanced_parameter():
    model = Tiny()
    params = list(model.parameters())
    with pytest.raises(ValueError, match=r"does not hold 2 balanced parameter\(s\)"):
        ParetoLoRA(model, torch.optim.SGD(params[:2], lr=0.1))
    with pytest.raises(ValueError, match=r"does not hold 2 balanced parameter\(s\)"):
        ParetoLoRA(model, BalancedAdamW(params[:2]))
    with pytest.raises(ValueError, match="ParetoLoRA does not balance"):  # the other way round
        ParetoLoRA(params[:2], BalancedAdamW(params))


@pytest.mark.parametrize("fused", [False, True], ids=["torch-adamw", "fused"])
def test_pareto_load_state_dict_mismatch_changes_nothing(fused):
    model, balancer = trained_balancer(fused)
    other_model, other = trained_balancer(fused)
    other.step(other_model.losses())
    good = other.state_dict()
    before = snapshot_balancer(balancer)
    for corrupt, match in [
        (lambda s: s["settings"].update(segment_names=["x"]), "segment_names"),
        (lambda s: s["settings"].update(objectives=["a", "b"]), "objectives"),
        (lambda s: s["settings"].update(tau=0.1), "tau"),
        (lambda s: s.pop("history"), "not a ParetoLoRA state"),
        (lambda s: s["optimizer"]["param_groups"].append(dict(s["optimizer"]["param_groups"][0])),
         "parameter groups"),
    ]:
        state = clone_state(good)
        corrupt(state)
        with pytest.raises(ValueError, match=match):
            balancer.load_state_dict(state)
        assert same(before, snapshot_balancer(balancer))
    balancer.load_state_dict(good)  # and a good state loads
    assert balancer.step_count == 2


# ============================================================================ BalancedAdamW
def adam_params(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(2 + i, generator=gen).requires_grad_() for i in range(n)]


def snapshot_adam(opt):
    return [p.detach().clone() for p in opt.flat_params()], clone_state(opt.state_dict())


def assert_adam_unchanged(opt, before):
    params, state = snapshot_adam(opt)
    assert same(before[0], params) and same(before[1], state)


@pytest.mark.parametrize("make, exc, match", [
    (lambda ps: BalancedAdamW(ps, lr="0.1"), TypeError, "lr must be a real number"),
    (lambda ps: BalancedAdamW(ps, lr=-1.0), ValueError, "invalid learning rate"),
    (lambda ps: BalancedAdamW(ps, betas=0.9), TypeError, "betas must be a pair"),
    (lambda ps: BalancedAdamW(ps, betas=(0.9, 1.0)), ValueError, "invalid betas"),
    (lambda ps: BalancedAdamW(ps, eps=0.0), ValueError, "invalid eps"),
    (lambda ps: BalancedAdamW(ps, weight_decay=float("nan")), ValueError, "weight_decay must be finite"),
    (lambda ps: BalancedAdamW(ps, backend=3), TypeError, "backend"),
    (lambda ps: BalancedAdamW(ps[0]), TypeError, "single Tensor"),
    (lambda ps: BalancedAdamW([{"params": ps[:1]}, {"params": ps[1:], "lr": "x"}]), TypeError,
     "param group 1: lr must be a real number"),
    (lambda ps: BalancedAdamW([ps[0], "p"]), TypeError, "parameter 1 is a str"),
    (lambda ps: BalancedAdamW(ps, amsgrad=True) if False else BalancedAdamW([{"params": ps, "amsgrad": True}]),
     ValueError, "amsgrad"),
], ids=["lr-str", "lr-neg", "betas-float", "beta-1", "eps", "decay-nan", "backend", "single-tensor",
        "group-lr", "non-tensor", "amsgrad"])
def test_adamw_wrong_types_and_values(make, exc, match):
    with pytest.raises(exc, match=match):
        make(adam_params())


def test_adamw_frozen_duplicate_and_device_parameters():
    ps = adam_params()
    ps[1].requires_grad_(False)
    with pytest.raises(ValueError, match="param group 0: parameter 1 does not require grad"):
        BalancedAdamW(ps)
    ps = adam_params()
    with pytest.raises(ValueError, match="parameter 3 appears twice"):
        BalancedAdamW(ps + [ps[0]])
    with pytest.raises(ValueError, match=r"param group 1: parameter 0 appears twice \(already parameter 2"):
        BalancedAdamW([{"params": ps}, {"params": [ps[2]]}])
    meta = torch.zeros(2, device="meta", requires_grad=True)
    with pytest.raises(ValueError, match="parameter 3 is on meta"):
        BalancedAdamW(ps + [meta])


def stepped_adam(groups=None):
    ps = adam_params()
    opt = BalancedAdamW(groups(ps) if groups else ps, lr=1e-2, backend="torch")
    gen = torch.Generator().manual_seed(1)
    assert opt.balanced_step([[torch.randn(p.shape, generator=gen) for p in ps] for _ in range(2)],
                             torch.tensor([[0.5, 1.5]]))
    return ps, opt


@pytest.mark.parametrize("two_hyper_groups", [False, True])
@pytest.mark.parametrize("case", ["weights-list", "weights-shape", "weights-device", "grads-tensor",
                                  "grads-count", "grad-shape", "grad-dtype", "grad-device",
                                  "grad-aliases-param", "segments"])
def test_adamw_balanced_step_bad_input_changes_nothing(case, two_hyper_groups):
    # Two param groups with different betas take two fused calls: the error in the LAST
    # tensor must still be found before the first call writes anything.
    groups = (lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "betas": (0.5, 0.9)}]) if two_hyper_groups else None
    ps, opt = stepped_adam(groups)
    grads = [[torch.ones_like(p) for p in ps] for _ in range(2)]
    weights = torch.tensor([[1.0, 2.0]])
    segments = None
    exc = ValueError
    if case == "weights-list":
        weights, exc, match = [[1.0, 2.0]], TypeError, "weights must be a Tensor"
    elif case == "weights-shape":
        weights, match = torch.ones(1, 3), "weights"
    elif case == "weights-device":
        weights, match = torch.ones(1, 2, device="meta"), "meta"
    elif case == "grads-tensor":
        grads, exc, match = torch.ones(2, 3), TypeError, "grads must be K sequences"
    elif case == "grads-count":
        grads[1] = grads[1][:2]
        match = "grads\\[1\\] has 2 tensors, the optimizer holds 3"
    elif case == "grad-shape":
        grads[1][2] = torch.ones(7)
        match = "shape"
    elif case == "grad-dtype":
        grads[1][2] = grads[1][2].double()
        exc, match = TypeError, "dtype"
    elif case == "grad-device":
        grads[1][2] = torch.ones_like(ps[2], device="meta")
        match = "meta"
    elif case == "grad-aliases-param":
        grads[1][2] = ps[2].detach()
        match = "shares memory"
    else:
        segments, match = [0, 1, 5], "segment"
    before = snapshot_adam(opt)
    with pytest.raises(exc, match=match):
        opt.balanced_step(grads, weights, segments)
    assert_adam_unchanged(opt, before)


def test_adamw_failed_first_step_leaves_no_state():
    ps = adam_params()
    opt = BalancedAdamW(ps, backend="torch")
    with pytest.raises(ValueError):
        opt.balanced_step([[torch.ones(9) for _ in ps]], torch.ones(1, 1))
    assert len(opt.state) == 0
    assert opt.balanced_step([[torch.ones_like(p) for p in ps]], torch.ones(1, 1))
    assert all(float(opt.state[p]["step"]) == 1 for p in ps)


def test_adamw_step_skips_parameters_without_gradient_like_torch():
    """A parameter whose .grad is None (no objective reached it) keeps its value, moments and
    step count; the others step exactly as torch.optim.AdamW steps them."""
    ps, opt = stepped_adam()
    reference = [p.detach().clone().requires_grad_() for p in ps]
    torch_opt = torch.optim.AdamW(reference, lr=1e-2, weight_decay=1e-2)
    torch_opt.load_state_dict(copy.deepcopy(opt.state_dict()) |  # a copy: load shares the tensors
                              {"param_groups": torch_opt.state_dict()["param_groups"]})
    for p, r in zip(ps, reference):
        p.grad = None if p is ps[1] else torch.ones_like(p)
        r.grad = None if p is ps[1] else torch.ones_like(p)
    before = snapshot_adam(opt)
    opt.step()
    torch_opt.step()
    for p, r in zip(ps, reference):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(ps[1].detach(), before[0][1])
    assert float(opt.state[ps[1]]["step"]) == 1 and float(opt.state[ps[0]]["step"]) == 2
    opt.step()  # different step counts: one call per count, still like torch
    torch_opt.step()
    for p, r in zip(ps, reference):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
    ps[1].grad, reference[1].grad = torch.ones_like(ps[1]), torch.ones_like(ps[1])
    opt.step()
    torch_opt.step()
    for p, r in zip(ps, reference):
        torch.testing.assert_close(p.detach(), r.detach(), rtol=1e-6, atol=1e-7)
    before = snapshot_adam(opt)
    for p in ps:  # no gradient at all: nothing to do, like torch
        p.grad = None
    opt.step()
    assert_adam_unchanged(opt, before)


def test_adamw_bad_lr_written_into_a_group_later_changes_nothing():
    ps, opt = stepped_adam()
    opt.param_groups[0]["lr"] = float("inf")  # e.g. a broken LR schedule
    before = snapshot_adam(opt)
    with pytest.raises(ValueError, match="lr must be finite"):
        opt.balanced_step([[torch.ones_like(p) for p in ps]], torch.ones(1, 1))
    assert_adam_unchanged(opt, before)


# ============================================================================ BalanceScheduler
def scheduler_setup():
    torch.manual_seed(0)
    enc, llm = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
    comps = {"encoder": enc, "llm": llm}
    opt = torch.optim.SGD(BalanceScheduler.param_groups(comps, model=torch.nn.Sequential(enc, llm), lr=0.1))
    return enc, llm, comps, opt


def test_scheduler_wrong_types():
    enc, llm, comps, opt = scheduler_setup()
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        BalanceScheduler("sgd", comps)
    with pytest.raises(TypeError, match="components must be a dict"):
        BalanceScheduler(opt, [enc, llm])
    with pytest.raises(TypeError, match="component 'llm' must be an nn.Module or a sequence"):
        BalanceScheduler(opt, {"encoder": enc, "llm": llm.weight})
    with pytest.raises(TypeError, match="component 'llm' parameter 1 is a str"):
        BalanceScheduler(opt, {"encoder": enc, "llm": [llm.weight, "bias"]})
    for kwargs, match in [({"beta": "0.9"}, "beta"), ({"eta": None}, "eta"), ({"m_max": float("inf")}, "m_max"),
                          ({"exact_every": 1.5}, "exact_every"), ({"history_limit": -1}, "history_limit")]:
        with pytest.raises((TypeError, ValueError), match=match):
            BalanceScheduler(opt, comps, **kwargs)


def test_scheduler_frozen_duplicate_and_device_parameters():
    enc, llm, comps, opt = scheduler_setup()
    llm.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="component 'llm' parameter 1 does not require grad"):
        BalanceScheduler(opt, {"encoder": enc, "llm": [llm.weight, llm.bias]})
    llm.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="component 'llm' parameter 1 appears twice"):
        BalanceScheduler(opt, {"encoder": enc, "llm": [llm.weight, llm.weight]})
    with pytest.raises(ValueError, match="belongs to both 'encoder' and 'llm'"):
        BalanceScheduler(opt, {"encoder": enc, "llm": [llm.weight, enc.bias]})
    meta = torch.nn.Linear(4, 2, device="meta")
    opt = torch.optim.SGD(BalanceScheduler.param_groups({"encoder": enc, "llm": meta},
                                                        model=torch.nn.Sequential(enc, meta), lr=0.1))
    with pytest.raises(ValueError, match="component 'llm' parameter 0 is on meta"):
        BalanceScheduler(opt, {"encoder": enc, "llm": meta})


def test_scheduler_target_names_missing_and_unknown():
    _, _, comps, opt = scheduler_setup()
    with pytest.raises(ValueError, match=r"missing \['llm'\], unknown \['vision'\]"):
        BalanceScheduler(opt, comps, target={"encoder": 0.5, "vision": 0.5})
    with pytest.raises(ValueError, match="must be > 0"):
        BalanceScheduler(opt, comps, target={"encoder": 1.0, "llm": 0.0})


def test_scheduler_auxiliary_loss_bad_mask():
    _, _, comps, opt = scheduler_setup()
    sched = BalanceScheduler(opt, comps, aux_weight=0.5)
    logits = torch.randn(2, 5, 7)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 4\)"):
        sched.auxiliary_loss(logits, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        sched.auxiliary_loss(logits, torch.ones(2, 5))
    with pytest.raises(TypeError, match="logits"):
        sched.auxiliary_loss(logits.tolist())


def test_scheduler_aux_form_and_previous_logits():
    _, _, comps, opt = scheduler_setup()
    hooks = len(opt._optimizer_step_pre_hooks)
    for bad in ("kl", 1, None):
        with pytest.raises(ValueError, match=r"aux must be one of \('entropy', 'distribution_change'\)"):
            BalanceScheduler(opt, comps, aux=bad)
    assert len(opt._optimizer_step_pre_hooks) == hooks  # refused before the optimizer hook is set
    logits = torch.randn(2, 5, 7)
    entropy = BalanceScheduler(opt, comps, aux_weight=0.5)
    with pytest.raises(ValueError, match='previous_logits belongs to aux="distribution_change"'):
        entropy.auxiliary_loss(logits, previous_logits=logits)
    change = BalanceScheduler(opt, comps, aux_weight=0.5, aux="distribution_change")
    with pytest.raises(ValueError, match=r"needs previous_logits.*scheduler.previous_outputs\(lambda"):
        change.auxiliary_loss(logits)
    with pytest.raises(ValueError, match=r"previous_logits has shape \(2, 5, 6\) on cpu, expected \(2, 5, 7\)"):
        change.auxiliary_loss(logits, previous_logits=logits[..., :6])
    with pytest.raises(ValueError, match="previous_logits has shape .* on meta"):
        change.auxiliary_loss(logits, previous_logits=logits.to("meta"))
    with pytest.raises(TypeError, match="previous_logits must be a floating tensor"):
        change.auxiliary_loss(logits, previous_logits=logits.long())
    with pytest.raises(TypeError, match="fn must be callable"):
        change.previous_outputs(logits)


def test_scheduler_load_state_dict_mismatch_changes_nothing():
    enc, llm, comps, opt = scheduler_setup()
    sched = BalanceScheduler(opt, comps)
    x = torch.randn(8, 3)
    for _ in range(3):
        opt.zero_grad()
        llm(torch.tanh(enc(x))).pow(2).mean().backward()
        opt.step()
        sched.step()
    good = sched.state_dict()

    def view(s):
        return (list(s.log_multipliers), s.scores_ema, s.step_count, list(s.history),
                [g["lr"] for g in opt.param_groups], s.beta, s.aux, s._delta_ready)

    before = clone_state(view(sched))
    for corrupt, match in [(lambda s: s.update(names=["a", "b"]), "components"),
                           (lambda s: s.pop("peak_total"), "missing"),
                           (lambda s: s.update(base_lrs=[0.1]), "param groups"),
                           (lambda s: s.update(log_multipliers=[0.0]), "log_multipliers"),
                           (lambda s: s.update(exact_every=2), "probe_fn"),
                           (lambda s: s.update(aux="kl"), "checkpoint aux 'kl'")]:
        state = clone_state(good)
        state["beta"] = 0.5  # would be written first by a careless loader
        corrupt(state)
        with pytest.raises(ValueError, match=match):
            sched.load_state_dict(state)
        assert same(before, view(sched))


def test_unknown_or_unavailable_backend_fails_at_construction():
    model = Tiny()
    with pytest.raises(ValueError, match="backend 'cuda-magic' cannot run on cpu"):
        ParetoLoRA(model, None, backend="cuda-magic")
    with pytest.raises(ValueError, match="backend 'cuda-magic' cannot run on cpu"):
        BalancedAdamW(model.parameters(), backend="cuda-magic")
    assert all(p.grad is None for p in model.parameters())
