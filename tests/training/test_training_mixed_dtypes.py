"""Parameters of several dtypes under one balancer (e.g. fp32 LoRA adapters, PEFT's default,
beside bf16 modules_to_save): the bank holds every gradient in the widest dtype, the plan
balances it as usual and each ``.grad`` receives the combination in its parameter's dtype.
References: per-objective gradients from ``torch.autograd.grad`` in float64, the K = 2 policy by
hand (test_training_pareto_lora.hand_combination)."""
from __future__ import annotations

import pytest
import torch

from fused_balance.training import GradBank, ParetoLoRA
from test_training_pareto_lora import hand_combination

LOW = torch.bfloat16


class MixedNet(torch.nn.Module):
    """layers.0 fp32, layers.1 and layers.2 bf16 (a segment each); ``use_last`` off: no objective
    reaches layers.2. (No fp16: torch's AdamW on fp16 parameters divides by an eps that rounds
    to zero.)"""

    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(6, 8), torch.nn.Linear(8, 8).to(LOW),
                                           torch.nn.Linear(8, 3).to(LOW)])
        self.use_last = True

    def forward(self, x):
        h = torch.tanh(self.layers[0](x))
        h = torch.tanh(self.layers[1](h.to(LOW)).float())
        if self.use_last:
            return self.layers[2](h.to(LOW)).float()
        return h[:, :3]


def objectives(net, step=0):
    gen = torch.Generator().manual_seed(40 + step)
    x, t = torch.randn(8, 6, generator=gen), torch.randn(8, 3, generator=gen)
    y = net(x)
    text = ((y[:, 0] - t[:, 0]) ** 2).mean()
    return {"text": text, "image": 4.0 * ((y[:, 2] - t[:, 2]) ** 2).mean() - 0.5 * text}


def expected_grads(net, losses):
    """The balanced combination per parameter in float64 (hand policy, per layer)."""
    named = [(n, p) for n, p in net.named_parameters()]
    params = [p for _, p in named]
    per = [[(g.double() if g is not None else torch.zeros_like(p, dtype=torch.float64))
            for g, p in zip(torch.autograd.grad(losses[k], params, retain_graph=True, allow_unused=True), params)]
           for k in ("text", "image")]
    return hand_combination(per, named, "pareto_lora", 5.0)[0]


@pytest.mark.parametrize("fill", ["backward", "batched"])
def test_the_bank_holds_every_dtypes_gradient_cast_to_its_own(fill):
    net = MixedNet()
    params = list(net.parameters())
    bank = GradBank(params, 2, dtype=torch.float32, mode=fill)
    losses = objectives(net)
    want = [torch.autograd.grad(losses[k], params, retain_graph=True) for k in ("text", "image")]
    sentinel = torch.full_like(params[2], 3.0)
    params[2].grad = sentinel
    bank.fill([losses["text"], losses["image"]])
    for k in range(2):
        for i, g in enumerate(want[k]):
            # backward: autograd's own gradient, cast (exact); batched: a vmapped backward
            exact = fill == "backward"
            torch.testing.assert_close(bank.grads[k][i], g.float(), rtol=0 if exact else 1e-5,
                                       atol=0 if exact else 1e-7, msg=f"{k} {i}")
    assert params[2].grad is sentinel and all(p.grad is None for p in params if p is not params[2])


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_each_grad_gets_the_balanced_combination_in_its_own_dtype(backend):
    net = MixedNet()
    balancer = ParetoLoRA(net, None, segments="layer", backend=backend)
    assert balancer.num_segments == 3
    losses = objectives(net)
    want = expected_grads(net, losses)
    balancer.backward(losses, accumulate=False)
    for (name, p), ref in zip(net.named_parameters(), want):
        assert p.grad.dtype == p.dtype, name
        # the combination in float32 (fp32 bank, float64 Gram), rounded once to the parameter's dtype
        tol = {torch.float32: dict(rtol=1e-5, atol=1e-7)}.get(p.dtype, dict(rtol=1e-2, atol=1e-4))
        torch.testing.assert_close(p.grad.double(), ref.to(p.dtype).double(), **tol, msg=name)


def test_training_steps_like_torch_adamw_on_the_reference_combination():
    net, ref_net = MixedNet(), MixedNet()
    balancer = ParetoLoRA(net, torch.optim.AdamW(net.parameters(), lr=1e-2), segments="layer")
    ref_opt = torch.optim.AdamW(ref_net.parameters(), lr=1e-2)
    for step in range(3):
        assert balancer.step(objectives(net, step))
        balancer.zero_grad()
        for p, g in zip(ref_net.parameters(), expected_grads(ref_net, objectives(ref_net, step))):
            p.grad = g.to(p.dtype)
        ref_opt.step()
        ref_opt.zero_grad()
    for (name, p), q in zip(net.named_parameters(), ref_net.parameters()):
        tol = {torch.float32: dict(rtol=1e-4, atol=1e-6)}.get(p.dtype, dict(rtol=1e-2, atol=1e-3))
        torch.testing.assert_close(p, q, **tol, msg=name)


def test_a_tensor_that_leaves_the_live_set_is_not_stepped_and_a_skip_writes_nothing():
    net = MixedNet()
    balancer = ParetoLoRA(net, torch.optim.AdamW(net.parameters(), lr=1e-2), segments="layer")
    assert balancer.step(objectives(net, 0))  # every layer reached
    net.use_last = False  # from now on no objective reaches layers.2
    last = [p.detach().clone() for p in net.layers[2].parameters()]
    assert balancer.step(objectives(net, 1))  # no zero_grad: its .grad must not be stepped again
    assert balancer.dead_tensors == ["layers.2.weight", "layers.2.bias"]
    assert all(p.grad is None for p in net.layers[2].parameters())
    assert all(torch.equal(p, q) for p, q in zip(net.layers[2].parameters(), last))
    # a skipped balance leaves .grad as they were (zeros here), in every dtype
    balancer.zero_grad(set_to_none=False)
    bad = objectives(net, 2)
    bad["image"] = bad["image"] * float("nan")
    with pytest.warns(RuntimeWarning, match="skipped"):
        balancer.step(bad)
    for name, p in net.named_parameters():
        assert p.grad is None if name.startswith("layers.2") else torch.count_nonzero(p.grad) == 0, name


def test_several_dtypes_under_the_fused_adamw_are_refused_naming_the_fix():
    with pytest.raises(TypeError, match="several dtypes.*fused AdamW steps one dtype"):
        ParetoLoRA(MixedNet(), "fused_adamw")
