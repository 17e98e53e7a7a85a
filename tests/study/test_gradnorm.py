"""The study's GradNorm arm (Chen et al., 2018): its weight update, on which tensors it runs, and
what it does on a problem whose answer is known."""
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _two_task_problem(seed, scale, dtype=torch.float32):
    """A shared trunk (two tensors) with one head per task; task 2's loss is ``scale`` times a
    task of the same kind, so its gradient on the trunk is about ``scale`` times smaller."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(64, 6, generator=gen, dtype=dtype)
    teachers = [torch.randn(6, 1, generator=gen, dtype=dtype) for _ in range(2)]
    Y = [torch.tanh(X @ t) for t in teachers]
    trunk = [(0.5 * torch.randn(6, 8, generator=gen, dtype=dtype)).requires_grad_(),
             (0.5 * torch.randn(8, 8, generator=gen, dtype=dtype)).requires_grad_()]
    heads = [(0.5 * torch.randn(8, 1, generator=gen, dtype=dtype)).requires_grad_() for _ in range(2)]

    def losses():
        h = torch.tanh(torch.tanh(X @ trunk[0]) @ trunk[1])
        return [(h @ heads[0] - Y[0]).pow(2).mean(), scale * (h @ heads[1] - Y[1]).pow(2).mean()]
    return trunk + heads, losses


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("scale", [0.1, 0.01, 0.001])
def test_gradnorm_upweights_the_objective_with_the_smaller_gradient(seed, scale):
    """Trained with GradNorm, task 2 (whose trunk gradient is ``scale`` times smaller) ends with
    the larger weight, and the shared tensors are exactly the trunk's (each head is one task's)."""
    from fused_balance.study.arms import GradNorm, reached_by_all, shared_norms

    params, losses = _two_task_problem(seed, scale)
    gradnorm = GradNorm(2, alpha=1.5, lr=0.025)
    optimizer = torch.optim.Adam(params, lr=1e-2)
    ratios = []
    for _ in range(60):
        L = losses()
        grads = [torch.autograd.grad(L[i], params, retain_graph=True, allow_unused=True) for i in range(2)]
        shared = reached_by_all(grads)
        assert shared == [0, 1]
        norms = shared_norms(grads, shared)
        ratios.append(float(norms[0] / norms[1]))
        w = gradnorm.weights
        (w[0] * L[0] + w[1] * L[1]).backward()
        optimizer.step()
        optimizer.zero_grad()
        gradnorm.update(norms, torch.stack(L).detach())
    assert min(ratios) > 3  # the premise: task 2's shared gradient is much smaller throughout
    w = gradnorm.weights
    assert w[1] > 1.0 > w[0], w
    assert float(w.sum()) == pytest.approx(2.0)


@pytest.mark.parametrize("small", [0.5, 0.25, 0.1])
def test_gradnorm_weights_settle_where_the_weighted_norms_are_equal(small):
    """Losses held fixed (r_i = 1, so the target is the mean weighted norm): the weights settle
    at w_1 n_1 = w_2 n_2 with w_1 + w_2 = 2, i.e. w = 2 (n_2, n_1) / (n_1 + n_2)."""
    from fused_balance.study.arms import GradNorm

    norms = torch.tensor([1.0, small], dtype=torch.float64)
    losses = torch.tensor([0.7, 0.003], dtype=torch.float64)
    gradnorm = GradNorm(2, alpha=1.5, lr=0.025)
    for _ in range(500):
        gradnorm.update(norms, losses)
    expected = 2 * norms.flip(0) / norms.sum()
    torch.testing.assert_close(gradnorm.weights, expected, atol=0.03, rtol=0)


def test_gradnorm_weight_gradient_over_all_shared_tensors_matches_float64_autograd():
    """The update's gradient equals autograd (double backward, float64) of Σ_i |G_i − target_i|
    with G_i = ‖∇_W (w_i L_i)‖ over every shared tensor W together (the heads, each reached by
    one task, excluded) and the target Ḡ r_i^α held constant."""
    from fused_balance.study.arms import GradNorm, reached_by_all, shared_norms

    params, losses = _two_task_problem(3, 0.05, torch.float64)
    alpha = 1.2
    gradnorm = GradNorm(2, alpha=alpha, lr=0.1)
    L0 = losses()
    grads = [torch.autograd.grad(L0[i], params, retain_graph=True, allow_unused=True) for i in range(2)]
    L0 = torch.stack(L0).detach()
    gradnorm.update(shared_norms(grads, reached_by_all(grads)), L0)  # sets L(0), moves w off 1
    with torch.no_grad():  # another point, so that the loss ratios differ from 1
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(9), dtype=p.dtype))
    L = losses()
    grads = [torch.autograd.grad(L[i], params, retain_graph=True, allow_unused=True) for i in range(2)]
    assert reached_by_all(grads) == [0, 1]
    got = gradnorm.weight_grad(shared_norms(grads, reached_by_all(grads)), torch.stack(L).detach())

    w = gradnorm.weights.requires_grad_()
    trunk = params[:2]
    G = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(w[i] * L[i], trunk, create_graph=True)]).norm()
                     for i in range(2)])
    r = (torch.stack(L).detach() / L0) / (torch.stack(L).detach() / L0).mean()
    target = (G.mean() * r.pow(alpha)).detach()
    expected, = torch.autograd.grad((G - target).abs().sum(), w)
    assert (r - 1).abs().max() > 0.05 and (expected != 0).all()
    torch.testing.assert_close(got, expected)


def test_gradnorm_arm_balances_every_lora_tensor_both_objectives_reach():
    """In the study's GradNorm arm the shared tensors are all LoRA tensors of the decoder (every
    layer sees text and picture positions), and the first step's norms are those two
    objectives' gradient norms over all of them, computed here independently."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from fused_balance.study.arms import train_unified
    from fused_balance.study.data import TRAIN_SEED_BASE
    from fused_balance.study.run import CONFIGS
    from fused_balance.study.unified import build_lora_model, make_split, train_batch

    cfg = dict(CONFIGS["tiny"]["unified"], steps=1, eval_every=1, diag_every=1)
    result = train_unified("emu2", {"kind": "gradnorm"}, 0, cfg, make_split(5, 2, 1))

    model = build_lora_model("emu2", seed=0, hidden=cfg["hidden"], layers=cfg["layers"], rank=cfg["rank"],
                             visual_dim=cfg["visual_dim"], visual_scale=cfg["visual_scale"])
    lora = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 7 * cfg["layers"]  # A and B on the 7 linears of every layer
    assert result["gradnorm_shared"] == [n for n, _ in lora]
    batch = train_batch(torch.Generator().manual_seed(TRAIN_SEED_BASE), cfg["batch_size"],
                        cfg["generation_fraction"], cfg["max_objects"])
    losses = model.losses(batch)
    expected = [torch.cat([g.double().flatten() for g in torch.autograd.grad(
        losses[k], [p for _, p in lora], retain_graph=True)]).norm() for k in ("text", "image")]
    torch.testing.assert_close(torch.tensor(result["gradnorm_norms"][0], dtype=torch.float64),
                               torch.stack(expected), rtol=1e-5, atol=0)
