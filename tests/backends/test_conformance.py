"""The backend conformance suite: every (backend, device) pair this machine can run, through the
``backend_device`` fixture (conftest.py), on one input generator (shared.random_grads) and one
tolerance table (shared.TOLERANCE), against a float64 reference computed from the same inputs.

What every backend promises (fused_balance.backends): gram, combine, combine_into (with and
without skip), the public pareto_combine for every built-in policy, balanced AdamW (with the one
rounding rule: the combined gradient rounded to the gradients' dtype, then AdamW in the
parameters' accumulate dtype, so m and v are bitwise those of the torch backend on the same
device), and opcheck on every custom op the backend exposes.
"""
from __future__ import annotations

import pytest
import torch

import fused_balance as fb
from fused_balance import reference
from fused_balance.backends import Backend, get_backend
from shared import TOLERANCE, backend_device_pairs, random_grads

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
K = 3
# A scalar, a matrix, a 1-D tensor, and one tensor longer than every backend's chunk (16384 and
# 32768 elements): chunk boundaries inside a tensor.
SHAPES = [(1,), (3, 5), 7, (130, 260)]
SEGMENTS, S = [0, 1, 0, 1], 2


def flat_inputs(dtype, device, *, seed=0, noncontiguous=False):
    grads = random_grads(K, SHAPES, dtype, seed, noncontiguous=noncontiguous, device=device)
    return [t for row in grads for t in row]


def weights_for(dtype, device, seed=1):
    wdtype = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.rand(S, K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(wdtype).to(device)


def as64(tensors):
    return [t.detach().to("cpu", torch.float64) for t in tensors]


def assert_gram_close(G, flat, dtype):
    """Entry (k, l) of a long fp32 sum: atol relative to sqrt(G_kk G_ll)."""
    G64 = reference.gram(as64(flat), K, SEGMENTS, S)
    assert G.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    rtol, atol = TOLERANCE[dtype]["gram"]
    diag = torch.diagonal(G64, dim1=1, dim2=2).clamp_min(0).sqrt()
    bound = rtol * G64.abs() + atol * diag[:, :, None] * diag[:, None, :]
    err = (G.detach().cpu().double() - G64).abs()
    assert bool((err <= bound).all()), f"max error {float((err - bound).max())} over the bound"


def assert_combined_close(outs, flat, weights, dtype):
    """Each output within rtol of the float64 combination plus atol times sum_k |w g|."""
    P = len(SHAPES)
    rtol, atol = TOLERANCE[dtype]["output"]
    w64 = weights.detach().cpu().double()
    g64 = as64(flat)
    assert len(outs) == P
    for p, out in enumerate(outs):
        assert out.dtype == dtype and out.shape == flat[p].shape
        s = SEGMENTS[p]
        exact = sum(w64[s, k] * g64[k * P + p] for k in range(K))
        reach = sum((w64[s, k] * g64[k * P + p]).abs() for k in range(K))
        err = (out.detach().cpu().double() - exact).abs()
        assert bool((err <= rtol * exact.abs() + atol * reach).all()), f"tensor {p}: max error {float(err.max())}"


# ------------------------------------------------------------------------------------ contract
def test_every_backend_satisfies_the_protocol_and_keeps_its_name(backend_device):
    name, device = backend_device
    impl = fb.backends.resolve_backend(name, torch.device(device))
    assert isinstance(impl, Backend)
    assert impl.name == name and impl is get_backend(name)
    ok, reason = impl.availability(torch.device(device))
    assert ok and isinstance(reason, str) and reason


def test_the_cpu_pairs_are_all_here():
    """A backend that fails its check would silently drop out of the suite: the torch backend is
    always there, and every backend missing on CPU says why."""
    pairs = backend_device_pairs()
    assert ("torch", "cpu") in pairs
    for name in fb.backends.BACKEND_NAMES:
        ok, reason = fb.backends.availability(name, "cpu")
        assert ok == ((name, "cpu") in pairs) and reason


# ---------------------------------------------------------------------------------- gram/combine
@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gram_matches_float64(backend_device, dtype, noncontiguous):
    name, device = backend_device
    flat = flat_inputs(dtype, device, noncontiguous=noncontiguous)
    G = get_backend(name).gram(flat, K, SEGMENTS, S)
    assert G.shape == (S, K, K) and G.device.type == device
    assert_gram_close(G, flat, dtype)


@pytest.mark.parametrize("noncontiguous", [False, True], ids=["contiguous", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_combine_matches_float64(backend_device, dtype, noncontiguous):
    name, device = backend_device
    flat = flat_inputs(dtype, device, noncontiguous=noncontiguous)
    weights = weights_for(dtype, device)
    outs = get_backend(name).combine(flat, K, weights, SEGMENTS)
    assert all(o.device.type == device for o in outs)
    assert_combined_close(outs, flat, weights, dtype)


@pytest.mark.parametrize("skip", [None, False, True], ids=["no-skip", "skip-false", "skip-true"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_combine_into(backend_device, dtype, skip):
    name, device = backend_device
    flat = flat_inputs(dtype, device, seed=2)
    weights = weights_for(dtype, device, seed=3)
    # every other element of a buffer: a non-contiguous destination
    out = [torch.full((2 * t.numel(),), 7.0, dtype=dtype, device=device)[::2].view(t.shape) for t in flat[:len(SHAPES)]]
    before = [o.clone() for o in out]
    skip_t = None if skip is None else torch.tensor([skip], device=device)
    with torch.no_grad():
        get_backend(name).combine_into(flat, K, weights, SEGMENTS, out, skip_t)
    if skip:
        assert all(torch.equal(o, b) for o, b in zip(out, before))
    else:
        assert_combined_close(out, flat, weights, dtype)
        # the same numbers as the backend's own combine
        for o, c in zip(out, get_backend(name).combine(flat, K, weights, SEGMENTS)):
            assert torch.equal(o, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("policy", fb.POLICIES)
def test_pareto_combine_every_policy(backend_device, policy, dtype):
    """The public API end to end: the Gram and the combination against float64, the weights and
    branches against the torch backend's on the same device."""
    name, device = backend_device
    grads = random_grads(K, SHAPES, dtype, 4, device=device, scales=[1.0, 3.0, 0.5])
    flat = [t for row in grads for t in row]
    res = fb.pareto_combine(grads, SEGMENTS, policy=policy, backend=name)
    assert_gram_close(res.gram, flat, dtype)
    assert_combined_close(res.combined, flat, res.weights.float(), dtype)
    want = fb.pareto_combine(grads, SEGMENTS, policy=policy, backend="torch")
    torch.testing.assert_close(res.weights, want.weights, rtol=1e-3, atol=1e-5)
    assert torch.equal(res.branch, want.branch)
    assert not bool(res.found_inf)


# ------------------------------------------------------------------------------------- AdamW
def adamw_state(dtype, device, seed=5):
    gen = torch.Generator().manual_seed(seed)
    make = [lambda s: torch.randn(s, generator=gen, dtype=torch.float64),
            lambda s: 0.1 * torch.randn(s, generator=gen, dtype=torch.float64),
            lambda s: 0.01 * torch.rand(s, generator=gen, dtype=torch.float64)]
    shapes = [(s,) if isinstance(s, int) else s for s in SHAPES]
    return [[f(s).to(dtype).to(device) for s in shapes] for f in make]


HYPER = dict(lrs=[1e-2, 3e-3, 1e-3, 2e-2], weight_decays=[0.0, 0.1, 0.01, 0.05], beta1=0.9, beta2=0.99,
             eps=1e-8)


def run_adamw(impl, flat, weights, state, steps, skip=None):
    h = HYPER
    with torch.no_grad():
        for step in steps:
            impl.balanced_adamw_(flat, K, weights, SEGMENTS, *state, h["lrs"], h["weight_decays"], h["beta1"],
                                 h["beta2"], h["eps"], step, skip)


def adamw64(flat, weights, state, steps, dtype):
    """The rounding rule in float64: d rounded to the gradients' dtype, then AdamW exactly."""
    P, h = len(SHAPES), HYPER
    params, m, v = ([t.detach().cpu().double() for t in group] for group in state)
    w64, g64 = weights.cpu().double(), as64(flat)
    for step in steps:
        bc1, bc2 = 1 - h["beta1"] ** step, 1 - h["beta2"] ** step
        for p in range(P):
            s = SEGMENTS[p]
            d = sum(w64[s, k] * g64[k * P + p] for k in range(K)).to(dtype).double()
            params[p] = params[p] * (1 - h["lrs"][p] * h["weight_decays"][p])
            m[p] = h["beta1"] * m[p] + (1 - h["beta1"]) * d
            v[p] = h["beta2"] * v[p] + (1 - h["beta2"]) * d * d
            params[p] = params[p] - (h["lrs"][p] / bc1) * m[p] / ((v[p] / bc2).sqrt() + h["eps"])
    return params, m, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_balanced_adamw(backend_device, dtype):
    name, device = backend_device
    flat = flat_inputs(dtype, device, seed=6)
    weights = weights_for(dtype, device, seed=7)
    mine = adamw_state(dtype, device)
    start = [[t.clone() for t in group] for group in mine]
    steps = (1, 2, 3)
    run_adamw(get_backend(name), flat, weights, mine, steps)
    # against float64, one rounding of the state per step: about `steps` ulps of the state dtype
    rtol, atol = TOLERANCE[dtype]["output"]
    for got, want in zip(mine, adamw64(flat, weights, start, steps, dtype)):
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu().double(), w, rtol=len(steps) * rtol, atol=len(steps) * atol)
    # the rounding rule: m and v bitwise those of the torch backend on the same device
    ref = [[t.clone() for t in group] for group in start]
    run_adamw(get_backend("torch"), flat, weights, ref, steps)
    for got, want in zip(mine[1:], ref[1:]):
        for g, w in zip(got, want):
            assert torch.equal(g, w), f"{name} differs from torch in {int((g != w).sum())} of {g.numel()} entries"


def test_balanced_adamw_skip_leaves_everything_untouched(backend_device):
    name, device = backend_device
    flat = flat_inputs(torch.float32, device, seed=8)
    state = adamw_state(torch.float32, device)
    before = [[t.clone() for t in group] for group in state]
    run_adamw(get_backend(name), flat, weights_for(torch.float32, device), state, (1,),
              skip=torch.tensor([True], device=device))
    for group, saved in zip(state, before):
        assert all(torch.equal(t, b) for t, b in zip(group, saved))


# ----------------------------------------------------------------------------------- opcheck
def _op_cases(device):
    """(op name, args builder, opcheck test_utils or None for all) per backend."""
    def flat_args(requires_grad=False):  # K objectives' gradients for three small tensors
        grads = random_grads(K, SHAPES[:3], torch.float32, 9, device=device)
        return [t.clone().requires_grad_(requires_grad) for row in grads for t in row]

    segs, w = [0, 1, 0], weights_for(torch.float32, device, seed=10)

    def outs():
        return [torch.zeros_like(t) for t in flat_args()[:3]]

    def state():
        return [[t.clone().abs() for t in flat_args()[:3]] for _ in range(3)]

    def plan():
        params = [torch.zeros(s, device=device) for s in ((3, 4), (5,), (1,))]
        buffer = torch.randn(2, 18, generator=torch.Generator().manual_seed(11)).to(device)
        return fb.BalancePlan(buffer, [0, 1, 1], numels=[12, 5, 1], params=params), buffer

    alive = []  # the op writes through raw pointers: keep their tensors alive as long as the cases

    def bank_adamw():
        p, buffer = plan()
        m, v, step = p.new_adamw_state()
        copies = [q.detach().clone() for q in p.params]  # written through pointers: throwaway copies
        alive.append(copies)
        ptrs = torch.tensor([c.data_ptr() for c in copies], dtype=torch.long).to(device)
        hyper = p.hyper_table([(1e-3, 0.0, 0.9, 0.999, 1e-8)], device)
        return (buffer, torch.rand(2, 2, dtype=torch.float64).to(device), p._chunks, ptrs, m, v, hyper, step, None)

    def policy_args():
        from fused_balance.solvers import rounding_of
        G = fb.gram(random_grads(2, [6], torch.float32, 12, device=device), backend="torch")
        return (G, 2, 5.0, True, rounding_of(G.dtype), None)

    adamw_hyper = ([1e-3] * 3, [0.01] * 3, 0.9, 0.999, 1e-8)
    list_ops = {  # one schema, two families: the C++ ops and the Triton ones (prefix triton_)
        "gram": (lambda: (flat_args(True), K, segs, S), None),
        "combine": (lambda: (flat_args(True), w.clone().requires_grad_(True), segs), None),
        "combine_into": (lambda: (flat_args(), w, segs, outs(), torch.tensor([False], device=device)), None),
        "balanced_adamw_": (lambda: (flat_args(), w, segs, *state(), *adamw_hyper, 1, None), None),
    }
    bank_cases = {
        "bank_gram": (lambda: (lambda p, b: (b, p._ranges, p._seg_offsets, 2))(*plan()), None),
        "bank_combine_into": (lambda: (lambda p, b: (b, torch.rand(2, 2, dtype=torch.float64).to(device),
                                                     p._ranges, torch.zeros(18, device=device), None))(*plan()),
                              None),
    }
    return {
        "cpp": {
            **list_ops,
            **bank_cases,
            "bank_adamw_": (bank_adamw, ("test_schema", "test_faketensor")),
            "policy_weights": (policy_args, None),
        },
        "triton": {**{"triton_" + op: case for op, case in list_ops.items()},
                   **{"triton_" + op: case for op, case in bank_cases.items()},
                   "triton_bank_adamw_": (bank_adamw, ("test_schema", "test_faketensor"))},
        "torch": {  # the list ops are plain PyTorch; the bank ops are custom ops (fused_balance.reference_bank)
            "torch_bank_gram": bank_cases["bank_gram"],
            "torch_bank_combine_into": bank_cases["bank_combine_into"],
            "torch_bank_adamw_": (lambda: (*bank_adamw(), None, alive[-1]), None),
        },
    }


def _opcheck_params():
    return [pytest.param(name, device, op, id=f"{name}-{device}-{op}")
            for name, device in backend_device_pairs() for op in _op_cases(device)[name]]


@pytest.mark.parametrize("name, device, op", _opcheck_params())
def test_opcheck_every_custom_op(name, device, op):
    get_backend(name).gram([torch.ones(2, device=device)], 1, [0], 1)  # builds/loads the ops
    cases = _op_cases(device)
    build, test_utils = cases[name][op]
    args = build()
    kwargs = {} if test_utils is None else {"test_utils": test_utils}
    torch.library.opcheck(getattr(torch.ops.fused_balance, op).default, args, **kwargs)


def test_every_custom_op_is_opchecked():
    """The op table above covers every op in the namespace."""
    for name, device in backend_device_pairs():
        get_backend(name).gram([torch.ones(2, device=device)], 1, [0], 1)
    covered = {op for cases in _op_cases("cpu").values() for op in cases}
    loaded = {n.split("::", 1)[1].split(".", 1)[0] for n in torch._C._dispatch_get_all_op_names()
              if n.startswith("fused_balance::")}
    assert loaded, "no fused_balance op registered"
    assert loaded <= covered, f"ops without an opcheck: {sorted(loaded - covered)}"


def test_triton_ops_have_the_cpp_schemas():
    """One contract: the Triton family's ops take and return exactly what the C++ ops do."""
    from fused_balance.ops import LIST_OP_SCHEMAS

    devices = {name: device for name, device in backend_device_pairs() if name in ("cpp", "triton")}
    if set(devices) != {"cpp", "triton"}:
        pytest.skip(f"needs both the cpp and triton backends here, has {sorted(devices)}")
    for name, device in devices.items():
        get_backend(name).gram([torch.ones(2, device=device)], 1, [0], 1)  # builds/loads the ops
    for op in LIST_OP_SCHEMAS:
        cpp = getattr(torch.ops.fused_balance, op).default._schema
        triton = getattr(torch.ops.fused_balance, "triton_" + op).default._schema
        assert str(triton).replace("triton_" + op, op, 1) == str(cpp), (str(triton), str(cpp))


# ------------------------------------------------------------------------- public API on CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the API's GPU branches need one")
@pytest.mark.parametrize("backend", [None] + [b for b, d in backend_device_pairs() if d == "cuda"])
def test_public_api_on_cuda(backend):
    """The GPU branches of api.py: the device-side found_inf and out untouched, the range rescue
    read (tiny gradients), the fused step; against the torch backend on CPU."""
    grads = random_grads(K, SHAPES, torch.float32, 12, device="cuda", scales=[1.0, 1e-25, 2.0])
    cpu = [[t.cpu() for t in row] for row in grads]
    res = fb.pareto_combine(grads, SEGMENTS, policy="pareto_lora", backend=backend)
    want = fb.pareto_combine(cpu, SEGMENTS, policy="pareto_lora", backend="torch")
    torch.testing.assert_close(res.weights.cpu(), want.weights, rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(res.norms.cpu(), want.norms, rtol=1e-4, atol=0.0)
    assert torch.equal(res.branch.cpu(), want.branch)
    out = [torch.full_like(t, 3.0) for t in grads[0]]
    grads[1][2][0] = float("nan")
    bad = fb.pareto_combine(grads, SEGMENTS, out=out, backend=backend)
    assert bool(bad.found_inf) and all(bool((o == 3.0).all()) for o in out)
    state = adamw_state(torch.float32, "cuda")
    ref = [[t.cpu() for t in group] for group in state]
    grads[1][2][0] = 0.5
    cpu[1][2][0] = 0.5
    fb.balanced_adamw_step(grads, want.weights.cuda(), SEGMENTS, *state, lrs=1e-3, step=1, backend=backend)
    fb.balanced_adamw_step(cpu, want.weights, SEGMENTS, *ref, lrs=1e-3, step=1, backend="torch")
    for got, exp in zip(state, ref):
        for g, e in zip(got, exp):
            torch.testing.assert_close(g.cpu(), e, rtol=1e-5, atol=1e-6)
