"""BalancePlan: the planned step equals the list API, keeps its range and NaN/Inf guarantees,
notices storage changes, traces under torch.compile and (on a GPU) captures in a CUDA graph."""
from __future__ import annotations

import types

import pytest
import torch

import fused_balance as fb
from fused_balance.backends import available_backends
from fused_balance.plan import PLAN_CHUNK_ELEMS
from fused_balance.training.bank import GradBank
from fused_balance.training.optim import BalancedAdamW

pytestmark = pytest.mark.skipif("cpp" not in available_backends("cpu"), reason="no C++ compiler for the extension")

SHAPES = [(5, 3), (PLAN_CHUNK_ELEMS + 7,), (0,), (7,), (3, 3)]
LIST_BACKENDS = ["torch", "cpp"]


def make_bank(K, dtype=torch.float32, shapes=SHAPES, seed=0, scales=None, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype=dtype, device=device)) for s in shapes]
    bank = GradBank(params, K)
    with torch.no_grad():
        values = torch.randn(bank.buffer.shape, generator=gen, dtype=torch.float64)
        for k in range(K):
            values[k] *= (scales[k] if scales else 1.0)
        # objective 1 points partly against objective 0, so pareto_lora takes every branch
        if K > 1:
            values[1] -= 0.5 * values[0]
        bank.buffer.copy_(values.to(dtype))
        bank.zero_padding_()
    return params, bank


def float64_gram(bank, segments):
    exact = [[g.detach().double() for g in row] for row in bank.grads]
    return fb.gram(exact, segments, backend="torch")


# ------------------------------------------------------------------------------------ Gram
@pytest.mark.parametrize("K", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_gram_is_the_float64_gram(K, dtype):
    params, bank = make_bank(K, dtype)
    segments = [0, 1, 1, 2, 0]
    G, found_inf = fb.BalancePlan(bank, segments).gram()
    assert G.dtype == torch.float64 and G.shape == (3, K, K)
    assert not bool(found_inf)
    torch.testing.assert_close(G, float64_gram(bank, segments), rtol=1e-13, atol=1e-9)


def outside_params(flat, offsets, numels):
    """The elements of a flat bank-row-like buffer outside every parameter (the padding)."""
    inside = torch.zeros(flat.shape[-1], dtype=torch.bool)
    for a, n in zip(offsets, numels):
        inside[a:a + n] = True
    return flat[..., ~inside]


@pytest.mark.parametrize("K", [2, 3, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_a_padded_bank_plans_like_its_packed_layout(K, dtype):
    """A GradBank pads each parameter to 16 bytes: every chunk starts aligned (the kernels'
    128-bit accesses), the Gram is the float64 one, and the combination and AdamW step equal
    those of the same gradients laid end to end (element-wise ops: bitwise), padding left zero."""
    params, bank = make_bank(K, dtype)
    segments = [0, 1, 1, 0, 1]
    align = 16 // bank.buffer.element_size()
    assert bank.numel > sum(bank.numels)  # SHAPES need padding in every dtype
    packed = torch.cat([bank.buffer[:, a:a + n] for a, n in zip(bank.offsets, bank.numels)], 1)
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    plan = fb.BalancePlan(bank, segments)
    explicit = fb.BalancePlan(bank.buffer, segments, numels=bank.numels, offsets=bank.offsets, params=params)
    packed_plan = fb.BalancePlan(packed, segments, numels=bank.numels, params=twins)
    assert plan.offsets == explicit.offsets == bank.offsets
    for table in (plan._ranges, plan._chunks):
        assert bool((table[:, 0] % align == 0).all())
    G, found_inf = plan.gram()
    assert not bool(found_inf)
    torch.testing.assert_close(G, float64_gram(bank, segments), rtol=1e-13, atol=1e-9)
    assert torch.equal(explicit.gram()[0], G)  # the same table
    torch.testing.assert_close(packed_plan.gram()[0], G, rtol=1e-13, atol=1e-9)
    weights = packed_plan.weights().weights
    out, out_packed = torch.full((bank.numel,), 7.0, dtype=dtype), torch.zeros(packed.shape[1], dtype=dtype)
    plan.combine_into(out, weights)
    packed_plan.combine_into(out_packed, weights)
    assert not outside_params(out, bank.offsets, bank.numels).any()  # the padding combines to zeros
    assert torch.equal(torch.cat([v.flatten() for v in plan.views(out)]), out_packed)
    hyper = plan.hyper_table([(1e-2, 0.1, 0.9, 0.999, 1e-8)], "cpu")
    states = [explicit.new_adamw_state(), packed_plan.new_adamw_state()]
    assert states[0][0].numel() == bank.numel and states[1][0].numel() == packed.shape[1]
    for _ in range(2):
        explicit.adamw_step(weights, *states[0][:2], hyper, states[0][2])
        packed_plan.adamw_step(weights, *states[1][:2], hyper, states[1][2])
    for p, twin in zip(params, twins):
        assert torch.equal(p, twin)
    for moment, twin in zip(states[0][:2], states[1][:2]):
        assert not outside_params(moment, bank.offsets, bank.numels).any()
        assert torch.equal(torch.cat([v.flatten() for v in explicit.views(moment)]), twin)


def test_offsets_are_checked():
    buffer = torch.zeros(2, 16)
    for offsets, match in [([0, 4], "P \\+ 1"), ([0, 2, 8], "numels elements"), ([0, 8, 20], "elements per row"),
                           ([-1, 8, 12], "numels elements")]:
        with pytest.raises(ValueError, match=match):
            fb.BalancePlan(buffer, numels=[3, 4], offsets=offsets)


@pytest.mark.parametrize("K", [9, 32])
def test_many_objectives_gram_and_combine(K):
    params, bank = make_bank(K, shapes=[(300,), (0,), (77,)])
    plan = fb.BalancePlan(bank, [0, 0, 1])
    G, found_inf = plan.gram()
    torch.testing.assert_close(G, float64_gram(bank, [0, 0, 1]), rtol=1e-13, atol=1e-9)
    weights = torch.rand(2, K, dtype=torch.float64, generator=torch.Generator().manual_seed(K))
    plan.combine_into_grads(fb.PlanResult(G, weights, torch.zeros(2, dtype=torch.long), found_inf))
    expected = fb.combine(bank.grads, weights.float(), [0, 0, 1], backend="cpp")
    for p, e in zip(params, expected):
        assert torch.equal(p.grad, e)


@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1e18, 1e20])
@pytest.mark.parametrize("policy", ["mgda", "pareto_lora", "sum"])
def test_extreme_ranges_give_the_float64_weights(scale, policy):
    """fp32 gradients of 1e-30 .. 1e20 (products far outside fp32's range): the plan's weights
    are the policy's float64 weights, and found_inf stays false."""
    params, bank = make_bank(2, scales=[scale, 1e-3 * scale])
    res = fb.BalancePlan(bank, "tensor", policy=policy).weights()
    G64 = float64_gram(bank, "tensor")
    w64, branch64 = fb.policy_weights(G64, policy)
    assert not bool(res.found_inf)
    torch.testing.assert_close(res.gram, G64, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.weights, w64, rtol=1e-7, atol=0)  # rescale amplifies G rounding
    assert torch.equal(res.branch, branch64)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_sets_found_inf_and_writes_nothing(bad):
    params, bank = make_bank(2)
    bank.buffer[1, 40] = bad
    plan = fb.BalancePlan(bank, [0, 0, 0, 1, 1])
    res = plan.weights()
    assert bool(res.found_inf)
    grads_before = plan.attach_grads().clone()
    plan.combine_into_grads(res)
    assert torch.equal(plan.attach_grads(), grads_before)
    m, v, step = plan.new_adamw_state()
    before = [p.detach().clone() for p in params]
    plan.adamw_step(res.weights, m, v, plan.hyper_table([(1e-2, 0.1, 0.9, 0.999, 1e-8)], "cpu"), step,
                    res.found_inf)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert not m.any() and not v.any() and not step.any()


# ------------------------------------------------------------------------ equals list API
@pytest.mark.parametrize("policy", ["sum", "mgda", "pareto_lora"])
@pytest.mark.parametrize("backend", LIST_BACKENDS)
@pytest.mark.parametrize("K", [2, 3])
def test_plan_step_equals_the_list_api(policy, backend, K):
    params, bank = make_bank(K, scales=[1.0, 0.05, 3.0][:K])
    segments = [0, 1, 1, 0, 1]
    plan = fb.BalancePlan(bank, segments, policy=policy)
    res = plan.combine_into_grads()
    ref = fb.pareto_weights(bank.grads, segments, policy=policy, backend=backend)
    exact, _ = fb.policy_weights(float64_gram(bank, segments), policy)
    torch.testing.assert_close(res.weights, exact, rtol=1e-9, atol=1e-12)
    # the list API solves on an fp32 Gram (rescale amplifies its rounding)
    torch.testing.assert_close(res.weights, ref.weights.double(), rtol=1e-3, atol=1e-5)
    assert torch.equal(res.branch, ref.branch)
    # Given the same (fp32-rounded) weights, the combination is the list API's, bit for bit.
    expected = fb.combine(bank.grads, res.weights.float(), segments, backend=backend)
    for p, e in zip(params, expected):
        assert p.grad.shape == p.shape
        torch.testing.assert_close(p.grad, e, rtol=0, atol=0)


@pytest.mark.parametrize("grad_dtype,param_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.float64, torch.float64)])
def test_adamw_step_equals_the_list_api(grad_dtype, param_dtype):
    params, bank = make_bank(2, grad_dtype)
    segments = [0, 1, 1, 0, 1]
    groups = [0, 0, 1, 1, 0]
    hyper = [(1e-2, 0.1, 0.9, 0.999, 1e-8), (3e-3, 0.0, 0.8, 0.99, 1e-6)]
    plan = fb.BalancePlan(bank, segments, groups=groups)
    weights = torch.tensor([[0.7, 1.3], [1.1, 0.4]], dtype=torch.float64)
    m, v, step = plan.new_adamw_state()
    table = plan.hyper_table(hyper, "cpu")
    ref = [[p.detach().clone() for p in params] for _ in range(3)]
    ref[1] = [torch.zeros_like(p) for p in ref[0]]
    ref[2] = [torch.zeros_like(p) for p in ref[0]]
    acc = torch.float64 if grad_dtype == torch.float64 else torch.float32
    for t in (1, 2, 3):
        plan.adamw_step(weights, m, v, table, step)
        for g in (0, 1):
            idx = [i for i, x in enumerate(groups) if x == g]
            used = sorted({segments[i] for i in idx})
            lr, wd, b1, b2, eps = hyper[g]
            fb.balanced_adamw_step([[row[i] for i in idx] for row in bank.grads], weights[used].to(acc),
                                   [used.index(segments[i]) for i in idx], [ref[0][i] for i in idx],
                                   [ref[1][i] for i in idx], [ref[2][i] for i in idx], lrs=lr, weight_decays=wd,
                                   beta1=b1, beta2=b2, eps=eps, step=t, backend="cpp")
        assert torch.all(step == t)
        for p, a, b, c, mv, vv in zip(params, *ref, plan.views(m), plan.views(v)):
            torch.testing.assert_close(p.detach(), a, rtol=0, atol=0)
            torch.testing.assert_close(mv, b, rtol=0, atol=0)
            torch.testing.assert_close(vv, c, rtol=0, atol=0)


def test_adamw_step_steps_only_live_parameters_each_with_its_own_count():
    """The live mask changes from step to step (an expert routed to or not): each step equals
    torch.optim.AdamW (float64) on the combination where the dead parameters' ``.grad`` is None,
    so they keep values, moments and step counts and later steps use per-parameter counts."""
    params, bank = make_bank(2, torch.float64)
    segments, weights = [0, 1, 1, 0, 1], torch.tensor([[0.7, 1.3], [1.1, 0.4]], dtype=torch.float64)
    plan = fb.BalancePlan(bank, segments)
    m, v, step = plan.new_adamw_state()
    table = plan.hyper_table([(1e-2, 0.1, 0.9, 0.999, 1e-8)], "cpu")
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    reference = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    combined = [sum(weights[segments[i], k] * bank.grads[k][i] for k in range(2)) for i in range(len(params))]
    masks = [[True] * 5, [True, False, True, True, False], [True, False, True, True, False], [False, True, True, True, True]]
    for live in masks:
        plan.set_live(live)
        plan.adamw_step(weights, m, v, table, step)
        for twin, g, alive in zip(twins, combined, live):
            twin.grad = g.clone() if alive else None
        reference.step()
        for i, (p, twin) in enumerate(zip(params, twins)):
            # float64 both, formulas rearranged: a few ulps (1e-12 relative, 1e-16 near zero)
            torch.testing.assert_close(p.detach(), twin.detach(), rtol=1e-12, atol=1e-16)
            state = reference.state[twin]
            torch.testing.assert_close(plan.views(m)[i], state["exp_avg"], rtol=1e-12, atol=1e-16)
            torch.testing.assert_close(plan.views(v)[i], state["exp_avg_sq"], rtol=1e-12, atol=1e-16)
            assert float(step[i]) == float(state["step"])
    assert step.tolist() == [3.0, 2.0, 4.0, 4.0, 2.0]


@pytest.mark.parametrize("backend", ["cpp", "plan"])
def test_bf16_adamw_rounds_the_combination_like_the_reference(backend):
    """One rounding rule: a bf16 combination is rounded to bf16 before the moment updates (as
    combining into a bf16 .grad, then AdamW). m and v equal the reference bit for bit."""
    params, bank = make_bank(3, torch.bfloat16, shapes=[(4099,), (64,)], seed=3)
    weights = torch.tensor([[0.3137, 1.7071, 0.5813]], dtype=torch.float32)
    ref = [[p.detach().clone() for p in params], [torch.zeros_like(p) for p in params],
           [torch.zeros_like(p) for p in params]]
    fb.balanced_adamw_step(bank.grads, weights, None, *ref, lrs=1e-2, weight_decays=0.1, step=1, backend="torch")
    if backend == "cpp":
        out = [[p.detach().clone() for p in params], [torch.zeros_like(p) for p in params],
               [torch.zeros_like(p) for p in params]]
        fb.balanced_adamw_step(bank.grads, weights, None, *out, lrs=1e-2, weight_decays=0.1, step=1, backend="cpp")
        m, v = out[1], out[2]
    else:
        plan = fb.BalancePlan(bank)
        mf, vf, step = plan.new_adamw_state()
        plan.adamw_step(weights.double(), mf, vf, plan.hyper_table([(1e-2, 0.1, 0.9, 0.999, 1e-8)], "cpu"), step)
        m, v = plan.views(mf), plan.views(vf)
    for a, b in zip(m, ref[1]):
        assert torch.equal(a, b)
    for a, b in zip(v, ref[2]):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------- storage changes
def test_bank_reallocation_is_followed_and_a_new_shape_raises():
    params, bank = make_bank(2)
    plan = fb.BalancePlan(bank)
    before = float64_gram(bank, None)
    bank.buffer = bank.buffer.clone() * 2  # a reallocated bank of the same layout
    G, _ = plan.gram()
    torch.testing.assert_close(G, 4 * before, rtol=1e-13, atol=1e-9)
    with pytest.raises(ValueError, match="GradBank buffer must be"):  # the bank refuses it
        bank.buffer = torch.zeros(3, bank.buffer.shape[1])
    # a bank-like holder that does not check: the plan does
    holder = types.SimpleNamespace(buffer=bank.buffer, numels=bank.numels, params=bank.params)
    plan = fb.BalancePlan(holder)
    holder.buffer = torch.zeros(3, bank.buffer.shape[1])
    with pytest.raises(RuntimeError, match="changed shape"):
        plan.gram()


def test_weights_and_hyper_tables_of_the_wrong_size_are_refused_for_every_device():
    """The kernels index weights[segment] and hyper[group] through the table: the plan checks
    the row counts on the host (O(1), the same for CPU and CUDA), before any op runs."""
    params, bank = make_bank(2)
    plan = fb.BalancePlan(bank, "tensor", groups=[i % 2 for i in range(len(params))])
    S = plan.num_segments
    out = torch.zeros(bank.numel)
    for bad in (torch.ones(1, 2, dtype=torch.float64), torch.ones(S, 3, dtype=torch.float64)):
        with pytest.raises(ValueError, match=rf"weights must be \[{S}, 2\]"):
            plan.combine_into(out, bad)
    assert not out.any()
    m, v, step = plan.new_adamw_state()
    before = [p.detach().clone() for p in params]
    one_row = plan.hyper_table([(1e-1, 0.0, 0.9, 0.999, 1e-8)], "cpu")
    with pytest.raises(ValueError, match="hyper must hold a row for each of the plan's 2"):
        plan.adamw_step(torch.ones(S, 2, dtype=torch.float64), m, v, one_row, step)
    assert all(torch.equal(p, b) for p, b in zip(params, before)) and not step.any()


def test_groups_set_later_step_like_groups_set_at_construction_and_keep_the_table():
    """set_groups rewrites the AdamW table's group column in place (a captured step keeps
    reading the same table) and steps exactly as a plan built with those groups."""
    groups = [i % 2 for i in range(len(SHAPES))]
    table = [(1e-1, 0.0, 0.9, 0.999, 1e-8), (1e-2, 0.1, 0.8, 0.99, 1e-6)]
    results = []
    for late in (False, True):
        params, bank = make_bank(2)
        plan = fb.BalancePlan(bank, "tensor", groups=None if late else groups)
        chunks = plan._chunks
        if late:
            plan.set_groups(groups)
            assert plan._chunks is chunks and plan.num_groups == 2  # in place
        m, v, step = plan.new_adamw_state()
        plan.adamw_step(torch.ones(plan.num_segments, 2, dtype=torch.float64), m, v,
                        plan.hyper_table(table, "cpu"), step)
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_moved_parameters_get_a_new_pointer_table():
    params, bank = make_bank(2)
    plan = fb.BalancePlan(bank)
    m, v, step = plan.new_adamw_state()
    table = plan.hyper_table([(1e-1, 0.0, 0.9, 0.999, 1e-8)], "cpu")
    weights = torch.ones(1, 2, dtype=torch.float64)
    plan.adamw_step(weights, m, v, table, step)
    old = [p.data for p in params]
    for p in params:  # what module.to(...) does: every parameter gets new storage
        p.data = p.data.clone()
    snapshot = [p.detach().clone() for p in params]
    plan.adamw_step(weights, m, v, table, step)
    for p, s, o in zip(params, snapshot, old):
        if p.numel():
            assert not torch.equal(p.detach(), s)  # the new storage was stepped
            assert torch.equal(o, s)               # the old one was not


def test_parameters_converted_to_another_dtype_raise():
    params, bank = make_bank(2)
    plan = fb.BalancePlan(bank)
    m, v, step = plan.new_adamw_state()
    for p in params:
        p.data = p.data.double()
    with pytest.raises(TypeError, match="moments"):
        plan.adamw_step(torch.ones(1, 2, dtype=torch.float64), m, v,
                        plan.hyper_table([(1e-3, 0.0, 0.9, 0.999, 1e-8)], "cpu"), step)


def test_a_parameter_converted_after_its_grad_view_was_attached_raises_before_writing():
    """``p.data = p.data.double()`` keeps the float ``.grad`` view: combine_into_grads must notice
    (the stamp) and refuse, not write a float combination next to a double parameter."""
    params, bank = make_bank(2)
    plan = fb.BalancePlan(bank)
    plan.combine_into_grads()
    held = [p.grad.clone() for p in params]
    bank.buffer.mul_(3.0)
    params[1].data = params[1].data.double()
    with pytest.raises(TypeError, match="bank's dtype"):
        plan.combine_into_grads()
    for p, h in zip(params, held):
        assert torch.equal(p.grad, h)  # nothing was written


def test_zero_grad_set_to_none_reattaches_the_views():
    params, bank = make_bank(2)
    plan = fb.BalancePlan(bank, policy="sum")
    plan.combine_into_grads()
    for p in params:
        p.grad = None
    plan.combine_into_grads()
    expected = fb.combine(bank.grads, torch.ones(1, 2), None, backend="cpp")
    for p, e in zip(params, expected):
        assert torch.equal(p.grad, e)


# ----------------------------------------------------------------------- ops and tracing
def test_opcheck_plan_ops():
    params, bank = make_bank(2, shapes=[(3, 4), (5,), (1,)])
    plan = fb.BalancePlan(bank, [0, 1, 1])
    ns = torch.ops.fused_balance
    torch.library.opcheck(ns.bank_gram.default, (bank.buffer, plan._ranges, plan._seg_offsets, 2))
    weights = torch.rand(2, 2, dtype=torch.float64)
    out = torch.zeros(bank.numel)
    torch.library.opcheck(ns.bank_combine_into.default, (bank.buffer, weights, plan._ranges, out, None))
    m, v, step = plan.new_adamw_state()
    # params are written through the pointer table: give opcheck throwaway copies' addresses
    copies = [p.detach().clone() for p in params]
    ptrs = torch.tensor([c.data_ptr() for c in copies], dtype=torch.long)
    hyper = plan.hyper_table([(1e-3, 0.0, 0.9, 0.999, 1e-8)], "cpu")
    torch.library.opcheck(ns.bank_adamw_.default, (bank.buffer, weights, plan._chunks, ptrs, m, v, hyper, step, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_tables_raise_clear_errors():
    params, bank = make_bank(2, shapes=[(3, 4), (5,)])
    plan = fb.BalancePlan(bank)
    bad = plan._ranges.clone()
    bad[0, 1] = 10 ** 6
    with pytest.raises(ValueError, match="out of range"):
        torch.ops.fused_balance.bank_gram(bank.buffer, bad, plan._seg_offsets, 1)
    with pytest.raises(ValueError, match="weights must be"):
        torch.ops.fused_balance.bank_combine_into(bank.buffer, torch.ones(1, 3), plan._chunks, torch.zeros(17), None)
    with pytest.raises(ValueError, match="at least"):
        torch.ops.fused_balance.bank_combine_into(bank.buffer, torch.ones(1, 2), plan._chunks, torch.zeros(3), None)


def test_torch_compile_fullgraph_planned_step():
    params, bank = make_bank(2, shapes=[(8, 3), (40,), (1,)])
    plan = fb.BalancePlan(bank, [0, 1, 1], policy="pareto_lora")
    out_e, out_c = torch.zeros(bank.numel), torch.zeros(bank.numel)

    def step(out):
        res = plan.weights()
        plan.combine_into(out, res.weights, res.found_inf)
        return res.gram, res.weights

    G_e, w_e = step(out_e)
    G_c, w_c = torch.compile(step, fullgraph=True, backend="aot_eager")(out_c)
    assert torch.equal(G_c, G_e) and torch.equal(w_c, w_e) and torch.equal(out_c, out_e)


def test_torch_compile_fullgraph_planned_fused_adamw_step():
    runs = []
    for compiled in (False, True):
        params, bank = make_bank(2, shapes=[(8, 3), (40,), (1,)])
        plan = fb.BalancePlan(bank, [0, 1, 1], policy="pareto_lora")
        m, v, step = plan.new_adamw_state()
        hyper = plan.hyper_table([(1e-2, 0.1, 0.9, 0.999, 1e-8)], "cpu")
        plan.param_pointers()

        def fused_step():
            res = plan.weights()
            plan.adamw_step(res.weights, m, v, hyper, step, res.found_inf)

        fn = torch.compile(fused_step, fullgraph=True, backend="aot_eager") if compiled else fused_step
        for _ in range(2):
            fn()
        runs.append((params, m, v, step))
    (p_e, m_e, v_e, s_e), (p_c, m_c, v_c, s_c) = runs
    assert torch.all(s_e == 2) and torch.all(s_c == 2)
    assert torch.equal(m_c, m_e) and torch.equal(v_c, v_e)
    for a, b in zip(p_c, p_e):
        assert torch.equal(a.detach(), b.detach())


# ----------------------------------------------------------------------- training layer
def test_balanced_adamw_planned_step_equals_balanced_step():
    """Two param groups with different lr; moments adopted from a list-API step first."""
    params, bank = make_bank(2, shapes=[(6, 2), (9,), (4,)])
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]

    def optimizer(ps):
        return BalancedAdamW([{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0}])

    opt_plan, opt_list = optimizer(params), optimizer(twins)
    weights = torch.tensor([[0.6, 1.4]])
    for opt in (opt_plan, opt_list):  # a first step through the list API
        opt.balanced_step(bank.grads, weights)
    plan = fb.BalancePlan(bank)
    for _ in range(2):
        opt_plan.planned_step(plan, weights.double())
        opt_list.balanced_step(bank.grads, weights)
    for p, q in zip(params, twins):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)
        torch.testing.assert_close(opt_plan.state[p]["exp_avg"], opt_list.state[q]["exp_avg"], rtol=0, atol=0)
        assert float(opt_plan.state[p]["step"]) == float(opt_list.state[q]["step"]) == 3
    opt_plan.param_groups[0]["lr"] = 0.5  # a scheduler's change reaches the device table
    snapshot = params[0].detach().clone()
    opt_plan.planned_step(plan, weights.double())
    opt_list.param_groups[0]["lr"] = 0.5
    opt_list.balanced_step(bank.grads, weights)
    assert not torch.equal(params[0].detach(), snapshot)
    torch.testing.assert_close(params[0].detach(), twins[0].detach(), rtol=0, atol=0)


@pytest.mark.parametrize("optimizer", ["fused_adamw", "sgd"])
def test_pareto_lora_step_takes_its_backends_plan_and_the_backends_agree(optimizer):
    from fused_balance.training.pareto_lora import ParetoLoRA

    def run(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        opt = "fused_adamw" if optimizer == "fused_adamw" else (lambda ps: torch.optim.SGD(ps, lr=0.1))
        trainer = ParetoLoRA(model, opt, segments="tensor", backend=backend, lr=1e-2)
        x = torch.randn(16, 6)
        for _ in range(3):
            out = model(x)
            trainer.step({"a": out[:, 0].pow(2).mean(), "b": (out[:, 1] - 1).pow(2).mean()})
        return model, trainer

    model_plan, trainer_plan = run("cpp")
    model_list, trainer_list = run("torch")
    assert trainer_plan._plan.backend.name == "cpp" and trainer_list._plan.backend.name == "torch"
    for p, q in zip(model_plan.parameters(), model_list.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert trainer_plan.step_count == 3 and len(trainer_plan.history) == 3


# ---------------------------------------------------------------------------------- GPU
cuda = pytest.mark.skipif(not torch.cuda.is_available() or "cpp" not in available_backends("cuda"),
                          reason="needs a CUDA GPU and the CUDA kernels")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_plan_equals_cpu_plan(dtype):
    params, bank = make_bank(3, dtype)
    _, bank_gpu = make_bank(3, dtype, device="cuda")
    cpu, gpu = fb.BalancePlan(bank, [0, 1, 1, 0, 1]), fb.BalancePlan(bank_gpu, [0, 1, 1, 0, 1])
    r_cpu, r_gpu = cpu.weights(), gpu.weights()
    torch.testing.assert_close(r_gpu.gram.cpu(), r_cpu.gram, rtol=1e-13, atol=1e-9)
    out_c, out_g = torch.zeros(bank.numel, dtype=dtype), torch.zeros(bank.numel, dtype=dtype, device="cuda")
    cpu.combine_into(out_c, r_cpu.weights)
    gpu.combine_into(out_g, r_cpu.weights.cuda())
    assert torch.equal(out_g.cpu(), out_c)


@cuda
@pytest.mark.parametrize("K", [2, 3, 32])
def test_cuda_planned_step_has_no_host_sync(K):
    """The whole planned step (Gram, policy, combine, fused AdamW) for any K: no host sync."""
    params, bank = make_bank(K, device="cuda")
    plan = fb.BalancePlan(bank, [0, 1, 1, 0, 1])
    m, v, step = plan.new_adamw_state()
    hyper = plan.hyper_table([(1e-3, 0.0, 0.9, 0.999, 1e-8)], "cuda")
    plan.combine_into_grads()
    plan.param_pointers()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        res = plan.combine_into_grads()
        plan.adamw_step(res.weights, m, v, hyper, step, res.found_inf)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@cuda
def test_cuda_graph_capture_replays_the_planned_step():
    params, bank = make_bank(2, device="cuda")
    twins = [p.detach().clone() for p in params]
    plan = fb.BalancePlan(bank, [0, 1, 1, 0, 1])
    m, v, step = plan.new_adamw_state()
    m2, v2, step2 = plan.new_adamw_state()
    hyper = plan.hyper_table([(1e-3, 0.01, 0.9, 0.999, 1e-8)], "cuda")
    plan.param_pointers()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up (allocator, first launches) off the capture
        res = plan.weights()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = plan.weights()
        plan.adamw_step(res.weights, m, v, hyper, step, res.found_inf)
    for _ in range(3):
        graph.replay()
    # eager on the twin parameters
    for p, t in zip(params, twins):
        p.data, t.data = t.data, p.data  # twins now hold the stepped values
    plan.check_all()
    for _ in range(3):
        r = plan.weights()
        plan.adamw_step(r.weights, m2, v2, hyper, step2, r.found_inf)
    torch.cuda.synchronize()
    assert torch.all(step == 3) and torch.all(step2 == 3)
    for p, t in zip(params, twins):
        torch.testing.assert_close(p.detach(), t, rtol=0, atol=0)
    torch.testing.assert_close(m, m2, rtol=0, atol=0)


def test_pareto_lora_rebuilds_its_plan_when_the_policy_changes():
    from fused_balance.training.pareto_lora import ParetoLoRA
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    trainer = ParetoLoRA(model, lambda ps: torch.optim.SGD(ps, lr=0.1), policy="sum", segments="global")
    x = torch.randn(8, 4)

    def losses():
        out = model(x)
        return {"a": out[:, 0].pow(2).mean(), "b": (out[:, 1] - 1).pow(2).mean()}

    trainer.step(losses())
    state = trainer.state_dict()
    state["settings"]["policy"] = "mgda"
    trainer.load_state_dict(state)
    trainer.step(losses())
    assert trainer._plan.policy == "mgda"
    assert trainer.history[-1]["branch"].tolist() == [2]  # min-norm, not the sum
