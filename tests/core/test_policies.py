"""Policies as objects: the properties every registered policy keeps, user callables and the
registry, MMPareto, and the native solve against the torch reference."""
import pytest
import torch

import fused_balance as fb
from fused_balance import ops
from fused_balance import policies as P
from fused_balance.solvers import clean_gram, rounding_of


def equal_weights_policy(G, active):
    """A user-style policy: every active objective 1/count; branch "sum"."""
    count = active.sum(-1, keepdim=True).clamp(min=1)
    return active.to(G.dtype) / count, torch.zeros(G.shape[0], dtype=torch.long, device=G.device)


fb.register_policy("test_equal_weights", equal_weights_policy)
EVERY_POLICY = list(fb.registered_policies())
NON_CONFLICTING = [name for name in P.POLICIES if P.resolve_policy(name).non_conflicting]


def gradients(S, K, N, seed, spread=2.0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(S, K, N, generator=gen, dtype=torch.float64)
    return g * torch.exp(spread * torch.randn(S, K, 1, generator=gen, dtype=torch.float64))


def gram_of(g):
    return g @ g.transpose(1, 2)


# ----------------------------------------------------------------------------- shared properties
@pytest.mark.parametrize("policy", EVERY_POLICY)
@pytest.mark.parametrize("K", [2, 3, 5, 12])
def test_weights_are_finite_and_of_the_documented_scale(policy, K):
    G = gram_of(gradients(8, K, 2 * K, K))
    w, branch = fb.policy_weights(G, policy)
    assert w.shape == (8, K) and branch.shape == (8,) and branch.dtype == torch.long
    assert torch.isfinite(w).all() and (w >= 0).all()
    if policy == "mgda":
        torch.testing.assert_close(w.sum(-1), torch.ones(8, dtype=torch.float64))


@pytest.mark.parametrize("policy", EVERY_POLICY)
@pytest.mark.parametrize("K", [2, 3, 6, 10])
def test_permutation_invariance(policy, K):
    G = gram_of(gradients(6, K, 3 * K, 100 + K))
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(K))
    w, branch = fb.policy_weights(G, policy)
    w_perm, branch_perm = fb.policy_weights(G[:, perm][:, :, perm], policy)
    torch.testing.assert_close(w_perm, w[:, perm], rtol=1e-9, atol=1e-12)
    assert torch.equal(branch_perm, branch)


@pytest.mark.parametrize("policy", NON_CONFLICTING)
@pytest.mark.parametrize("K", [2, 3, 5, 8, 16, 32])
def test_non_conflicting_policies_never_increase_an_objective(policy, K):
    g = gradients(6, K, 3 * K, 200 + K, spread=3.0)
    w, _ = fb.policy_weights(gram_of(g), policy)
    d = torch.einsum("sk,skn->sn", w, g)
    assert (torch.einsum("skn,sn->sk", g, d) >= -1e-9 * (d * d).sum(-1, keepdim=True)).all()


@pytest.mark.parametrize("policy", EVERY_POLICY)
@pytest.mark.parametrize("K", [2, 3, 6])
def test_zero_objectives_are_left_out(policy, K):
    """With a zero gradient added, the others' weights are those of the problem without it."""
    g = gradients(5, K, 2 * K, 300 + K)
    with_zero = torch.cat([g[:, :1], torch.zeros_like(g[:, :1]), g[:, 1:]], 1)
    w_without, b_without = fb.policy_weights(gram_of(g), policy)
    w_with, b_with = fb.policy_weights(gram_of(with_zero), policy)
    others = [0] + list(range(2, K + 1))
    torch.testing.assert_close(w_with[:, others], w_without, rtol=1e-9, atol=1e-12)
    assert torch.equal(b_with, b_without)
    if policy != "sum":  # "sum" keeps weight 1: a zero gradient adds nothing either way
        assert (w_with[:, 1] == 0).all()


def degenerate_grams(K):
    g = torch.randn(K, 4, generator=torch.Generator().manual_seed(K), dtype=torch.float64)
    cases = {"zero": torch.zeros_like(g), "identical": g[:1].expand(K, -1), "one_zero": g.clone(),
             "opposite": torch.cat([g[:1], -g[:1].expand(K - 1, -1)]), "rank_one": torch.arange(1.0, K + 1)[:, None] * g[:1],
             "tiny": g * 1e-150, "huge": g * 1e150}
    cases["one_zero"][0] = 0
    grams = {name: (x @ x.T)[None] for name, x in cases.items()}
    grams["non_finite"] = grams["identical"].clone()
    grams["non_finite"][0, 0, 1] = float("nan")
    grams["non_finite"][0, -1, -1] = float("inf")
    return grams


@pytest.mark.parametrize("policy", EVERY_POLICY)
@pytest.mark.parametrize("K", [2, 3, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_grams_give_finite_weights(policy, K, dtype):
    for name, G in degenerate_grams(K).items():
        w, branch = fb.policy_weights(G.to(dtype), policy)
        assert torch.isfinite(w).all(), (name, w)
        assert w.dtype == dtype and branch.dtype == torch.long


# ----------------------------------------------------------------------------- callables, registry
def test_a_callable_policy_runs_through_pareto_combine():
    grads = [[torch.tensor([1.0, 0.0]), torch.tensor([2.0])], [torch.tensor([0.0, 3.0]), torch.tensor([0.0])]]
    calls = []

    def first_only(G, active):
        calls.append((G.dtype, tuple(G.shape), active.clone()))
        w = torch.zeros(G.shape[:2], dtype=G.dtype)
        w[:, 0] = 1
        return w, torch.full((G.shape[0],), 7)

    res = fb.pareto_combine(grads, [0, 1], policy=first_only, backend="torch")
    assert calls[0][0] == torch.float64 and calls[0][1] == (2, 2, 2)
    assert torch.equal(calls[0][2], torch.tensor([[True, True], [True, False]]))
    torch.testing.assert_close(res.combined[0], torch.tensor([1.0, 0.0]))
    assert res.branch.tolist() == [7, 7]
    fb.register_policy("test_first_only", first_only)
    again = fb.pareto_combine(grads, [0, 1], policy="test_first_only", backend="torch")
    torch.testing.assert_close(again.weights, res.weights)


@pytest.mark.parametrize("bad, match", [
    (lambda G, a: torch.ones(G.shape[:2]), "must return"),
    (lambda G, a: (torch.ones(G.shape[0]), torch.zeros(G.shape[0], dtype=torch.long)), "weights"),
    (lambda G, a: (torch.ones(G.shape[:2]), torch.zeros(G.shape[0])), "branch"),
])
def test_a_callable_returning_the_wrong_thing_raises(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        fb.policy_weights(torch.eye(2)[None], bad)


def test_registry_rules():
    with pytest.raises(ValueError, match="built-in"):
        fb.register_policy("mgda", equal_weights_policy)
    with pytest.raises(TypeError, match="callable"):
        fb.register_policy("test_not_callable", 3)
    with pytest.raises(ValueError, match="unknown policy"):
        fb.policy_weights(torch.eye(2)[None], "no_such_policy")
    with pytest.raises(ValueError, match="rescale"):
        fb.policy_weights(torch.eye(2)[None], equal_weights_policy, rescale="sum")
    assert set(P.POLICIES) <= set(fb.registered_policies())
    assert "test_equal_weights" in fb.registered_policies()
    assert (fb.BRANCH_SUM, fb.BRANCH_RESCALE, fb.BRANCH_CONFLICT) == (0, 1, 2)


# ----------------------------------------------------------------------------- MMPareto
def test_mmpareto_equal_weights_when_gradients_agree_else_rescaled_min_norm():
    agree = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    conflict = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=torch.float64)
    G = torch.stack([agree @ agree.T, conflict @ conflict.T])
    w, branch = fb.policy_weights(G, "mmpareto")
    assert branch.tolist() == [fb.BRANCH_SUM, fb.BRANCH_CONFLICT]
    # agree: (1/2, 1/2) scaled up to the sum's norm is (1, 1)
    torch.testing.assert_close(w[0], torch.ones(2, dtype=torch.float64))
    # conflict: the min-norm direction with the plain sum's norm
    m = fb.min_norm_weights(G[1:])[0]
    d, d_minnorm, plain = w[1] @ conflict, m @ conflict, conflict.sum(0)
    torch.testing.assert_close(d.norm(), plain.norm())
    torch.testing.assert_close(d / d.norm(), d_minnorm / d_minnorm.norm())


# ----------------------------------------------------------------------------- conflict-branch strength
def conflicting_gradients(S, K, seed):
    """[S, K, N] gradients where every segment has a conflicting pair (g_1 against g_0)."""
    g = gradients(S, K, 4 * K, seed, spread=0.0)
    g[:, 1] = -0.6 * g[:, 0] + 0.2 * g[:, 1]
    return g


@pytest.mark.parametrize("name", ["mgda", "pareto_lora"])
@pytest.mark.parametrize("gamma", [0.25, 1.0, 3.0])
@pytest.mark.parametrize("K", [2, 3, 6])
def test_conflict_branch_has_gamma_times_the_plain_sums_norm(name, gamma, K):
    """rescale=γ: the conflict branch's update |Σ w_k g_k| is γ |Σ g_k| (measured on the
    gradients themselves, float64), in the min-norm direction, and still non-conflicting."""
    g = conflicting_gradients(16, K, 40 + K)
    G = gram_of(g)
    w, branch = fb.policy_weights(G, name, rescale=gamma)
    assert (branch == fb.BRANCH_CONFLICT).all()
    d = torch.einsum("sk,skn->sn", w, g)
    torch.testing.assert_close(d.norm(dim=-1), gamma * g.sum(1).norm(dim=-1), rtol=1e-9, atol=0)
    m = fb.min_norm_weights(G)
    d_minnorm = torch.einsum("sk,skn->sn", m, g)
    torch.testing.assert_close(d / d.norm(dim=-1, keepdim=True),
                               d_minnorm / d_minnorm.norm(dim=-1, keepdim=True), rtol=1e-7, atol=1e-9)
    assert (torch.einsum("skn,sn->sk", g, d) >= -1e-9 * d.norm(dim=-1, keepdim=True) * g.norm(dim=-1)).all()
    w_sum, _ = fb.policy_weights(G, name, rescale="sum")
    torch.testing.assert_close(w, gamma * w_sum, rtol=1e-9, atol=0)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 2.0])
def test_mmpareto_gamma_raises_the_combination_to_at_least_gamma_times_the_sum(gamma):
    g = conflicting_gradients(8, 3, 7)
    agree = gradients(8, 3, 12, 8).abs()  # positive entries: every pair agrees
    g = torch.cat([g, agree])
    G = gram_of(g)
    w, branch = fb.policy_weights(G, "mmpareto", rescale=gamma)
    w_plain, _ = fb.policy_weights(G, "mmpareto", rescale="none")
    assert (branch[:8] == fb.BRANCH_CONFLICT).all() and (branch[8:] == fb.BRANCH_SUM).all()
    torch.testing.assert_close(w_plain.sum(-1), torch.ones(16, dtype=torch.float64))  # on the simplex
    d, d_plain = torch.einsum("sk,skn->sn", w, g), torch.einsum("sk,skn->sn", w_plain, g)
    target = gamma * g.sum(1).norm(dim=-1)
    torch.testing.assert_close(d.norm(dim=-1), torch.maximum(target, d_plain.norm(dim=-1)), rtol=1e-9, atol=0)
    # only the length changes
    factor = d.norm(dim=-1) / d_plain.norm(dim=-1)
    torch.testing.assert_close(w, w_plain * factor[:, None], rtol=1e-9, atol=0)


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), (True, TypeError), ("double", ValueError),
                                        ([1.0], TypeError)])
def test_bad_rescale_is_refused(bad, error):
    with pytest.raises(error, match="rescale"):
        fb.policy_weights(torch.eye(2)[None], "pareto_lora", rescale=bad)


def test_rescale_factor_only_for_policies_that_have_a_conflict_branch():
    with pytest.raises(ValueError, match="no rescale option"):
        fb.policy_weights(torch.eye(2)[None], "sum", rescale=2.0)
    with pytest.raises(ValueError, match="rescale"):
        fb.policy_weights(torch.eye(2)[None], equal_weights_policy, rescale=2.0)


# ----------------------------------------------------------------------------- the native solve
@pytest.fixture(scope="module")
def native():
    ok, why = ops.availability(torch.device("cpu"))
    if not ok:
        pytest.skip(f"the C++ extension cannot be built here: {why}")
    ops._ops()
    assert ops.policy_op_available("cpu")
    return torch.ops.fused_balance.policy_weights


def reference_and_native(native, G, name, rescale=None, tau=3.0, magnitude=None):
    policy = P.resolve_policy(name, tau=tau, rescale=rescale, rounding=rounding_of(G.dtype), magnitude=magnitude)
    Gc = clean_gram(G)
    w_ref, b_ref = policy.reference(Gc, torch.diagonal(Gc, dim1=1, dim2=2) > 0)
    w_nat, b_nat = native(G, policy.code, policy.tau, policy.rescale_factor, policy.rounding, None,
                          policy.magnitude)
    return w_ref, b_ref, w_nat, b_nat, Gc


SETTINGS = [("sum", None), ("mgda", "none"), ("mgda", "sum"), ("mgda", 0.3), ("pareto_lora", "sum"),
            ("pareto_lora", "none"), ("pareto_lora", 2.5), ("mmpareto", None), ("mmpareto", "none"),
            ("mmpareto", 1.7)]


@pytest.mark.parametrize("name, rescale", SETTINGS)
@pytest.mark.parametrize("K, dtype", [(K, dtype) for K in (1, 2, 3, 5, 8, 16, 32)
                                      for dtype in (torch.float64, torch.float32)
                                      if K < 32 or dtype == torch.float64])  # K=32: the slow reference once
def test_native_solve_matches_the_torch_reference(native, name, rescale, K, dtype):
    g = gradients(12, K, 3 * K, 400 + K)
    g[1, 0] = 0  # a zero objective
    if K > 1:
        g[2, 1] = -g[2, 0]  # exact conflict
        g[3] = g[3, :1]     # identical
    G = gram_of(g).to(dtype)
    G[4, 0, 0] = float("nan")  # non-finite entries count as 0 in both
    w_ref, b_ref, w_nat, b_nat, _ = reference_and_native(native, G, name, rescale)
    assert w_nat.dtype == dtype and torch.equal(b_nat, b_ref)
    ulp = torch.finfo(dtype).eps
    # float64: agreement to ~1e-8 (the min-norm weights of K=32 scattered gradients are
    # conditioned ~1e6); float32: the cast of the same float64 value, within an ulp or two.
    torch.testing.assert_close(w_nat, w_ref.to(dtype), rtol=max(1e-8, 2 * ulp), atol=1e-12)


def positive_imbalanced_grams(S, K, seed):
    """Grams of gradients that pairwise agree (positive entries) with norms spread far apart."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.rand(S, K, 4 * K, generator=gen, dtype=torch.float64) + 0.1
    return gram_of(g * torch.exp(3.0 * torch.randn(S, K, 1, generator=gen, dtype=torch.float64)))


@pytest.mark.parametrize("K", [2, 3, 5, 8])
@pytest.mark.parametrize("magnitude", ["mean", "weaker", 0, "last"])
def test_magnitude_rules_of_the_rescale_branch(K, magnitude):
    """mean: every objective at the mean norm; weaker: those below it raised to it, the others
    weight 1; a protected index: only that one raised (when below the mean), the others 1."""
    G = positive_imbalanced_grams(64, K, 70 + K)
    rule = K - 1 if magnitude == "last" else magnitude
    w, branch = fb.policy_weights(G, "pareto_lora", tau=1.5, magnitude=rule)
    norms = torch.diagonal(G, dim1=1, dim2=2).sqrt()
    mean = norms.mean(-1, keepdim=True)
    rescaled = branch == fb.BRANCH_RESCALE
    assert rescaled.sum() >= 32  # most segments take the branch under test
    w, norms, mean = w[rescaled], norms[rescaled], mean[rescaled]
    below = norms < mean
    if rule == "mean":
        torch.testing.assert_close(w * norms, mean.expand_as(norms), rtol=1e-12, atol=0)
        return
    raised = torch.ones_like(below) if rule == "weaker" else torch.arange(K) == rule
    moved = below & raised
    torch.testing.assert_close((w * norms)[moved], mean.expand_as(norms)[moved], rtol=1e-12, atol=0)
    assert torch.equal(w[~moved], torch.ones_like(w[~moved]))  # everyone else keeps weight 1
    assert moved.any()


def test_the_magnitude_rule_only_changes_the_rescale_branch():
    g = gradients(40, 3, 9, 81)
    G = gram_of(g)
    w_mean, b_mean = fb.policy_weights(G, "pareto_lora", tau=2.0)
    for rule in ("weaker", 0, 2):
        w, b = fb.policy_weights(G, "pareto_lora", tau=2.0, magnitude=rule)
        assert torch.equal(b, b_mean)
        other = b != fb.BRANCH_RESCALE
        assert other.any() and torch.equal(w[other], w_mean[other])


@pytest.mark.parametrize("bad, match", [
    (dict(magnitude="loudest"), "magnitude must be one of"),
    (dict(magnitude=True), "magnitude must be one of"),
    (dict(magnitude=-3), "magnitude must be one of"),
    (dict(policy="mgda", magnitude="weaker"), "no magnitude option"),
    (dict(policy=equal_weights_policy, magnitude="weaker"), "built-in policies only"),
    (dict(magnitude=3), "K = 3"),  # a protected index beyond the objectives
])
def test_bad_magnitude_arguments_are_refused(bad, match):
    G = gram_of(gradients(2, 3, 6, 5))
    with pytest.raises(ValueError, match=match):
        fb.policy_weights(G, **{"policy": "pareto_lora", **bad})


@pytest.mark.parametrize("K", [2, 3, 5, 8])
@pytest.mark.parametrize("magnitude", ["weaker", 0, "last"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_magnitude_rules_match_the_torch_reference(native, K, magnitude, dtype):
    G = positive_imbalanced_grams(24, K, 90 + K).to(dtype)
    rule = K - 1 if magnitude == "last" else magnitude
    w_ref, b_ref, w_nat, b_nat, _ = reference_and_native(native, G, "pareto_lora", "sum", tau=1.5, magnitude=rule)
    assert torch.equal(b_nat, b_ref) and (b_ref == fb.BRANCH_RESCALE).any()
    torch.testing.assert_close(w_nat, w_ref.to(dtype), rtol=max(1e-12, 2 * torch.finfo(dtype).eps), atol=0)


def test_native_op_refuses_a_protected_index_beyond_the_objectives(native):
    G = gram_of(gradients(2, 3, 6, 5))
    with pytest.raises(ValueError, match="magnitude must be"):
        native(G, 2, 5.0, True, rounding_of(G.dtype), None, 3)


@pytest.mark.parametrize("name", ["mgda", "pareto_lora", "mmpareto"])
@pytest.mark.parametrize("K", [3, 10, 32])
def test_native_solve_reaches_the_same_optimum_on_adversarial_grams(native, name, K):
    """Where the weights are ill-determined (the min-norm point ~1e-3 of the gradients), the
    combination's squared norm still agrees."""
    g = gradients(8, K, 3 * K, 500 + K, spread=3.0)
    g[:4] = g[:4] - (1 - 1e-3) * g[:4].mean(1, keepdim=True)
    w_ref, b_ref, w_nat, b_nat, Gc = reference_and_native(native, gram_of(g), name)
    assert torch.equal(b_nat, b_ref)
    q = lambda w: torch.einsum("sk,skl,sl->s", w, Gc, w)  # noqa: E731
    scale = torch.einsum("sk,skl,sl->s", w_ref.abs(), Gc.abs(), w_ref.abs())
    assert ((q(w_nat) - q(w_ref)).abs() <= 1e-9 * scale).all()


def test_native_solve_is_bitwise_stable_across_thread_counts(native):
    G = gram_of(gradients(64, 32, 40, 7))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native(G, 2, 5.0, True, rounding_of(G.dtype), None)
        torch.set_num_threads(max(2, before))
        many = native(G, 2, 5.0, True, rounding_of(G.dtype), None)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_policy_weights_uses_the_native_solve_once_loaded(native):
    G = gram_of(gradients(4, 3, 5, 9)).float()
    w, branch = fb.policy_weights(G, "pareto_lora", tau=2.0)
    w_nat, b_nat = native(G, 2, 2.0, True, rounding_of(G.dtype), None)
    assert torch.equal(w, w_nat) and torch.equal(branch, b_nat)
    active = torch.tensor([[True, False, True]] * 4)
    w_mask, _ = P.resolve_policy("mgda")(clean_gram(G), active)
    assert (w_mask[:, 1] == 0).all()


def test_native_op_traces_under_torch_compile(native):
    G = gram_of(gradients(4, 2, 5, 11)).float()
    compiled = torch.compile(lambda G: fb.policy_weights(G, "mmpareto"), fullgraph=True, backend="eager")
    w, _ = compiled(G)
    torch.testing.assert_close(w, fb.policy_weights(G, "mmpareto")[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("K", [2, 3, 8, 32])
def test_cuda_policy_solve_matches_cpu_and_never_syncs(K):
    ok, why = ops.availability(torch.device("cuda"))
    if not ok:
        pytest.skip(f"no CUDA kernels: {why}")
    ops._ops()
    G = gram_of(gradients(16, K, 3 * K, 600 + K)).float()
    G_cuda = G.cuda()
    settings = [(name, None) for name in P.POLICIES] + [("pareto_lora", "weaker"), ("pareto_lora", K - 1)]
    for name, magnitude in settings:
        w_cpu, b_cpu = fb.policy_weights(G, name, magnitude=magnitude)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            w_gpu, b_gpu = fb.policy_weights(G_cuda, name, magnitude=magnitude)  # native op
            w_ref, _ = P.resolve_policy(name, magnitude=magnitude).reference(
                clean_gram(G_cuda), torch.diagonal(G_cuda, dim1=1, dim2=2) > 0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(w_ref.float().cpu(), w_cpu, rtol=1e-5, atol=1e-9)
        assert torch.equal(b_gpu.cpu(), b_cpu)


def test_pareto_lora_trainer_takes_a_callable_policy_and_records_its_branch():
    from tiny_unified import VOCAB, make_batch, build_lora_model, modality_losses
    from fused_balance.training import ParetoLoRA

    model = build_lora_model(VOCAB.size, hidden=32, layers=1, heads=2, rank=4, seed=0).to(torch.float64)
    balancer = ParetoLoRA(model, None, policy=equal_weights_policy, backend="torch",
                          objectives=["text", "image"])
    losses, _ = modality_losses(model, make_batch(2, torch.Generator().manual_seed(0)))
    result = balancer.backward(losses, accumulate=False)
    active = result.norms > 0
    torch.testing.assert_close(result.weights, active.to(result.weights.dtype) / active.sum(-1, keepdim=True))
    assert {r["branch"] for step in balancer.history_records() for r in step["segments"]} == {"sum"}


@pytest.mark.parametrize("K", [2, 5])
def test_policy_op_passes_opcheck(native, K):
    G = gram_of(gradients(3, K, 2 * K, 12 + K)).float()
    active = torch.ones(3, K, dtype=torch.bool)
    torch.library.opcheck(native.default, (G, 2, 5.0, True, rounding_of(G.dtype), None))
    torch.library.opcheck(native.default, (G.double(), 3, 5.0, False, rounding_of(torch.float64), active))
    torch.library.opcheck(native.default, (G, 2, 1.5, True, rounding_of(G.dtype), active, K - 1))


def test_more_objectives_than_the_native_solve_takes_use_the_reference(native):
    K = P.NATIVE_MAX_OBJECTIVES + 1
    g = gradients(1, K, 2 * K, 13, spread=0.5)
    w, branch = fb.policy_weights(gram_of(g), "mgda")
    assert w.shape == (1, K) and branch.tolist() == [fb.BRANCH_CONFLICT]
    torch.testing.assert_close(w.sum(-1), torch.ones(1, dtype=torch.float64))
