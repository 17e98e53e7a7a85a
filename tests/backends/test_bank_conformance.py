"""The bank ops (BalancePlan's engine) of every backend that has them, against an independent
float64 reference on random plans: several segments, K = 1, 2, 3, 9, fp32 / bf16 / fp64, skip,
live masks, per-parameter step counts and two hyper-parameter groups; the AdamW moments and
step counts bitwise those of the cpp backend on the same device (the contract's promise)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fused_balance as fb
from fused_balance.backends import bank_ops_missing, get_backend
from fused_balance.plan import PLAN_CHUNK_ELEMS
from shared import TOLERANCE, backend_device_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

SHAPES = [(5, 3), (PLAN_CHUNK_ELEMS + 7,), (0,), (7,), (3, 3), (11,)]
SEGMENTS = [0, 1, 1, 2, 0, 2]  # a segment's parameters are not adjacent in the bank
GROUPS = [0, 1, 0, 1, 1, 0]
HYPER = [(1e-2, 0.1, 0.9, 0.999, 1e-8), (3e-3, 0.0, 0.8, 0.99, 1e-6)]


def bank_pairs():
    return [(b, d) for b, d in backend_device_pairs() if bank_ops_missing(get_backend(b)) is None]


pairs = pytest.mark.parametrize("backend, device", bank_pairs(), ids=[f"{b}-{d}" for b, d in bank_pairs()])


def make_plan(backend, device, K, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    numels = [torch.Size(s).numel() for s in SHAPES]
    buffer = (torch.randn(K, sum(numels), generator=gen, dtype=torch.float64) * 3).to(dtype).to(device)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).to(device) for s in SHAPES]
    plan = fb.BalancePlan(buffer, SEGMENTS, numels=numels, params=params, groups=GROUPS, backend=backend)
    weights = (torch.rand(3, K, generator=gen, dtype=torch.float64) * 2 - 0.5).to(device)
    return plan, buffer, params, weights


def rows(plan, buffer):
    """Per parameter, the [K, n] float64 slice of the bank."""
    b64 = buffer.detach().cpu().double()
    return [b64[:, a:e] for a, e in zip(plan.offsets, plan.offsets[1:])]


def rounded_weights(weights, dtype):
    """The contract: weights rounded once to the accumulate dtype (saturating beyond fp32)."""
    if dtype == torch.float64:
        return weights.cpu().double()
    big = torch.finfo(torch.float32).max
    return weights.cpu().double().clamp(-big, big).float().double()


@pairs
@pytest.mark.parametrize("K", [1, 2, 3, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_bank_gram_is_the_float64_gram(backend, device, K, dtype):
    plan, buffer, _, _ = make_plan(backend, device, K, dtype)
    G, found_inf = plan.gram()
    want = torch.zeros(3, K, K, dtype=torch.float64)
    for s, g in zip(SEGMENTS, rows(plan, buffer)):
        want[s] += g @ g.T
    assert G.dtype == torch.float64 and found_inf.dtype == torch.bool and not bool(found_inf)
    torch.testing.assert_close(G.cpu(), want, rtol=1e-12, atol=1e-9)
    buffer[K - 1, plan.offsets[1] + 3] = float("nan")  # inside the long parameter
    assert bool(plan.gram()[1])


@pairs
@pytest.mark.parametrize("K", [1, 2, 3, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("skip", [False, True])
def test_bank_combine_into_is_the_float64_combination(backend, device, K, dtype, skip):
    plan, buffer, _, weights = make_plan(backend, device, K, dtype)
    out = torch.full((buffer.shape[1],), 7.0, dtype=dtype, device=device)
    plan.combine_into(out, weights, torch.tensor(skip, device=device))
    if skip:
        assert bool((out == 7).all())
        return
    w = rounded_weights(weights, dtype)
    rtol, atol = TOLERANCE[dtype]["output"]
    for p, (s, g) in enumerate(zip(SEGMENTS, rows(plan, buffer))):
        want = (w[s][:, None] * g).sum(0)
        got = out[plan.offsets[p]:plan.offsets[p + 1]].cpu().double()
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * float(g.abs().max() if g.numel() else 0) * K)
    if backend != "cpp" and ("cpp", device) in bank_pairs():  # the same roundings: bitwise the C++ op
        cpp_plan, cpp_buffer, _, _ = make_plan("cpp", device, K, dtype)
        cpp_out = torch.full_like(out, 7.0)
        cpp_plan.combine_into(cpp_out, weights, None)
        assert torch.equal(out, cpp_out)


def reference_adamw(plan, buffer, params, weights, state, live, dtype):
    """float64 AdamW on the combination (rounded to the gradients' dtype when 16-bit), per
    parameter with its own step count and group: the expected params, m, v and counts."""
    m, v, steps = (t.detach().cpu().double() for t in state)
    w = rounded_weights(weights, dtype)
    out_p, out_m, out_v, out_steps = [], m.clone(), v.clone(), steps.clone()
    for p, (s, g, param) in enumerate(zip(SEGMENTS, rows(plan, buffer), params)):
        a, e = plan.offsets[p], plan.offsets[p + 1]
        x = param.detach().cpu().double().reshape(-1)
        if not live[p]:
            out_p.append(x)
            continue
        d = (w[s][:, None] * g).sum(0)
        if dtype in (torch.bfloat16, torch.float16):
            d = d.to(dtype).double()
        lr, decay, beta1, beta2, eps = HYPER[GROUPS[p]]
        t = int(steps[p]) + 1
        mm = beta1 * m[a:e] + (1 - beta1) * d
        vv = beta2 * v[a:e] + (1 - beta2) * d * d
        x = x * (1 - lr * decay) - lr / (1 - beta1 ** t) * mm / ((vv / (1 - beta2 ** t)).sqrt() + eps)
        out_p.append(x)
        out_m[a:e], out_v[a:e], out_steps[p] = mm, vv, t
    return out_p, out_m, out_v, out_steps


def adamw_state(plan, device, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    n = plan.offsets[-1]
    m = (torch.randn(n, generator=gen, dtype=torch.float64) * 0.1).to(dtype).to(device)
    v = torch.rand(n, generator=gen, dtype=torch.float64).mul(0.01).to(dtype).to(device)
    steps = torch.randint(0, 6, (len(SHAPES),), generator=gen).float().to(device)
    return m, v, steps


@pairs
@pytest.mark.parametrize("K", [1, 2, 3, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("skip", [False, True])
def test_bank_adamw_is_the_float64_adamw(backend, device, K, dtype, skip):
    plan, buffer, params, weights = make_plan(backend, device, K, dtype)
    live = [True, True, False, True, False, True]
    plan.set_live(live)
    state = adamw_state(plan, device, dtype, seed=K)
    before = [t.clone() for t in (*params, *state)]
    hyper = plan.hyper_table(HYPER, device)
    want = reference_adamw(plan, buffer, params, weights, state, live, dtype)
    with torch.no_grad():
        plan.adamw_step(weights, state[0], state[1], hyper, state[2], torch.tensor(skip, device=device))
    if skip:
        assert all(torch.equal(a, b) for a, b in zip((*params, *state), before))
        return
    rtol, atol = TOLERANCE[dtype]["output"]
    for p, (got, exp) in enumerate(zip(params, want[0])):
        torch.testing.assert_close(got.cpu().double().reshape(-1), exp, rtol=rtol, atol=atol, msg=f"parameter {p}")
    torch.testing.assert_close(state[0].cpu().double(), want[1], rtol=rtol, atol=atol)
    torch.testing.assert_close(state[1].cpu().double(), want[2], rtol=rtol, atol=atol)
    assert torch.equal(state[2].cpu().double(), want[3])
    if backend != "cpp" and ("cpp", device) in bank_pairs():  # the moments bitwise the C++ op's
        cpp_plan, _, cpp_params, _ = make_plan("cpp", device, K, dtype)
        cpp_plan.set_live(live)
        cpp_state = adamw_state(cpp_plan, device, dtype, seed=K)
        with torch.no_grad():
            m, v, steps = cpp_state
            cpp_plan.adamw_step(weights, m, v, cpp_plan.hyper_table(HYPER, device), steps, None)
        for ours, theirs in zip(state, cpp_state):
            assert torch.equal(ours, theirs)
        for ours, theirs in zip(params, cpp_params):
            torch.testing.assert_close(ours, theirs, rtol=2 * rtol if dtype != torch.float64 else 1e-15, atol=0)


@pairs
def test_bank_adamw_follows_moved_parameters_and_regrouping(backend, device):
    """The tables the backend caches (chunk table, parameter layout) follow a parameter moved by
    ``p.data = ...`` and a ``set_groups`` that rewrites the table in place."""
    plan, buffer, params, weights = make_plan(backend, device, 2, torch.float32)
    state = adamw_state(plan, device, torch.float32, seed=3)
    with torch.no_grad():
        plan.adamw_step(weights, state[0], state[1], plan.hyper_table(HYPER, device), state[2])
        params[3].data = params[3].data.clone()  # a new address
        plan.set_groups([1 - g for g in GROUPS])
        expected = reference_adamw(plan, buffer, params, weights, state, [True] * len(SHAPES), torch.float32)
        plan.adamw_step(weights, state[0], state[1], plan.hyper_table(HYPER[::-1], device), state[2])
    for got, exp in zip(params, expected[0]):  # the swapped hyper table on the swapped groups: the same steps
        torch.testing.assert_close(got.cpu().double().reshape(-1), exp, rtol=1e-5, atol=1e-6)


def test_a_plan_on_a_backend_without_bank_ops_names_what_is_missing(monkeypatch):
    """A backend whose bank kernels failed to import (here: triton's, removed by hand) is refused by
    a plan and by ParetoLoRA with the reason, before anything runs."""
    if ("triton", "cpu") not in backend_device_pairs():
        pytest.skip("the triton backend does not run here")
    module = get_backend("triton")
    for name in ("bank_gram", "bank_combine_into", "bank_adamw_"):
        monkeypatch.delattr(module, name, raising=False)
    monkeypatch.setattr(module, "BANK_OPS_MISSING", "the Triton bank kernels cannot be imported: (test)")
    assert bank_ops_missing(module) == "the Triton bank kernels cannot be imported: (test)"
    params = [torch.zeros(4)]
    with pytest.raises(RuntimeError, match="cannot be imported: \\(test\\)"):
        fb.BalancePlan(torch.zeros(2, 4), numels=[4], params=params, backend="triton")
    from fused_balance.training import ParetoLoRA
    with pytest.raises(ValueError, match="cannot run a BalancePlan"):
        ParetoLoRA([("w", torch.nn.Parameter(torch.zeros(4)))], None, backend="triton")


def test_a_torch_plan_and_pareto_lora_never_load_the_extension(tmp_path):
    """backend="torch": the plan's bank ops, storage checks and ParetoLoRA's steps (torch and
    fused AdamW) run without the C++ extension (an empty build folder: loading it would build)."""
    script = textwrap.dedent("""
        import torch
        from fused_balance import _extension
        from fused_balance.training import ParetoLoRA
        for opt in ("fused_adamw", lambda ps: torch.optim.AdamW(ps, lr=1e-2)):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
            balancer = ParetoLoRA(model, opt, backend="torch")
            for _ in range(2):
                out = model(torch.randn(8, 4))
                assert balancer.step({"a": out[:, 0].pow(2).mean(), "b": out[:, 1].mean()})
            assert balancer._plan.backend.name == "torch"
        print("loaded:", _extension.loaded())
    """)
    env = {**os.environ, "FUSED_BALANCE_BUILD_DIR": str(tmp_path / "build")}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "loaded: None"
