"""BalancedAdamW == torch.optim.AdamW stepping on the combined gradient."""
import pytest
import torch

from fused_balance.training import BalancedAdamW


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _problem(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (4, 4), (2, 6)]
    return [torch.randn(s, generator=g, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_matches_torch_adamw_on_combined_gradient(dtype, tol):
    init = _problem(dtype)
    ours = [p.clone().requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    groups = lambda ps: [{"params": ps[:2], "lr": 1e-2, "weight_decay": 0.1},  # noqa: E731
                         {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0}]
    opt = BalancedAdamW(groups(ours), betas=(0.8, 0.95), eps=1e-7, backend="torch")
    torch_opt = torch.optim.AdamW(groups(ref), betas=(0.8, 0.95), eps=1e-7, foreach=False)
    segments = [0, 1, 1, 2]
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        grads = [[torch.randn(p.shape, generator=gen, dtype=dtype) for p in init] for _ in range(3)]
        weights = torch.rand(3, 3, generator=gen, dtype=torch.float64) * 2
        assert opt.balanced_step(grads, weights.to(dtype), segments)
        for i, p in enumerate(ref):  # the combined gradient, in float64, then AdamW
            w = weights[segments[i]]
            p.grad = sum(w[k] * grads[k][i].double() for k in range(3)).to(dtype)
        torch_opt.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    for a, b in zip(ours, ref):
        sa, sb = opt.state[a], torch_opt.state[b]
        torch.testing.assert_close(sa["exp_avg"], sb["exp_avg"], rtol=tol, atol=tol)
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=tol, atol=tol)
        assert float(sa["step"]) == float(sb["step"]) == 5


def test_plain_step_is_adamw_and_skip_touches_nothing():
    init = _problem(torch.float64, seed=3)
    ours = [p.clone().requires_grad_() for p in init]
    ref = [p.clone().requires_grad_() for p in init]
    opt = BalancedAdamW(ours, lr=1e-2, backend="torch")
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(ours, ref):
            a.grad = torch.randn(a.shape, generator=gen, dtype=a.dtype)
            b.grad = a.grad.clone()
        opt.step()
        torch_opt.step()
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    before = [p.detach().clone() for p in ours]
    moments = [opt.state[p]["exp_avg"].clone() for p in ours]
    grads = [[torch.full_like(p, float("nan")) for p in ours]]
    assert not opt.balanced_step(grads, torch.ones(1, 1, dtype=torch.float64), skip=torch.tensor([True]))
    assert opt.skipped_steps == 1
    for b, p, m in zip(before, ours, moments):
        assert torch.equal(b, p) and torch.equal(m, opt.state[p]["exp_avg"])
        assert float(opt.state[p]["step"]) == 3


def test_wrong_number_of_gradients_raises():
    ps = [p.requires_grad_() for p in _problem(torch.float32)]
    opt = BalancedAdamW(ps, backend="torch")
    with pytest.raises(ValueError):
        opt.balanced_step([ps[:2]], torch.ones(1, 1))
