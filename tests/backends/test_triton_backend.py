"""The triton backend against fused_balance.reference (the oracle).

Without a GPU this runs the Triton interpreter on CPU tensors; TRITON_INTERPRET must be set before
the kernels are decorated, i.e. before fused_balance.kernels is imported. Sizes stay small: every
interpreted program is Python.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import random  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from fused_balance import reference  # noqa: E402
from fused_balance.kernels import backend as tb  # noqa: E402
from fused_balance.kernels import common, pointer_table  # noqa: E402
from shared import TOLERANCE, random_grads, run_process  # noqa: E402

DEVICE = "cpu" if common.INTERPRETED else "cuda"
_ok, _why = tb.availability(torch.device(DEVICE))
pytestmark = pytest.mark.skipif(not _ok, reason=f"triton backend unavailable: {_why}")

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Odd sizes: single elements, a ragged block, a tensor spanning two chunks (CHUNK = 16384).
SHAPES = [(1,), (3,), (127,), (10, 100), (3, 7, 5), (16400,)]


def make_grads(K, shapes, dtype, seed=0):
    """The shared generator's gradients, objective-major in one flat list (the backend's input)."""
    return [t for row in random_grads(K, shapes, dtype, seed, device=DEVICE) for t in row]


def segments_for(mode, P, seed=0):
    if mode == "one":
        return [0] * P, 1
    if mode == "tensor":
        return list(range(P)), P
    rng = random.Random(seed)
    ids = [rng.randrange(3) for _ in range(P)]
    return ids, 3


def assert_gram_close(G, G_ref, dtype):
    rtol, atol = TOLERANCE[dtype]["gram"]
    assert G.dtype == G_ref.dtype and G.shape == G_ref.shape
    # Entries are sums of n products: scale the tolerance by sqrt(G_kk G_ll).
    d = torch.diagonal(G_ref, dim1=1, dim2=2).abs()
    scale = torch.sqrt(d[:, :, None] * d[:, None, :]) + 1.0
    assert torch.all((G - G_ref).abs() <= rtol * scale + atol), (G - G_ref).abs().max()


def assert_outputs_close(outs, refs, dtype):
    rtol, atol = TOLERANCE[dtype]["output"]
    assert len(outs) == len(refs)
    for o, r in zip(outs, refs):
        assert o.dtype == r.dtype and o.shape == r.shape
        torch.testing.assert_close(o.double(), r.double(), rtol=rtol, atol=atol)


def test_availability_and_describe():
    ok, reason = tb.availability(torch.device(DEVICE))
    assert ok, reason
    if common.INTERPRETED:
        assert reason == "Triton interpreter (slow, for tests)"
        ok_cuda, why = tb.availability(torch.device("cuda"))
        assert not ok_cuda and "TRITON_INTERPRET" in why
    assert "triton" in tb.describe()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_availability_without_interpreter_on_cpu():
    code = ("import torch; from fused_balance.kernels import backend as tb; "
            "print(tb.availability(torch.device('cpu'))[1]); print(tb.describe())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = run_process([sys.executable, "-c", code], "the Triton backend's availability without the interpreter",
                       env=env)
    assert proc.returncode == 0, proc.stderr
    reason, description = proc.stdout.strip().splitlines()[-2:]
    assert reason == "Triton needs a GPU; set TRITON_INTERPRET=1 to run the interpreter on CPU"
    assert "no GPU" in description


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 2, 3, 5, 9, 17])  # 9, 17: the [8, 8] objective-block path
def test_gram_matches_reference(K, dtype):
    flat = make_grads(K, SHAPES, dtype, seed=K)
    seg, S = segments_for("random", len(SHAPES), seed=K)
    assert_gram_close(tb.gram(flat, K, seg, S), reference.gram(flat, K, seg, S), dtype)


@pytest.mark.parametrize("mode", ["one", "tensor", "random"])
def test_gram_segment_modes(mode):
    K, shapes = 2, [(5,), (1,), (33,), (2, 9), (7,), (300,), (4, 4)]
    flat = make_grads(K, shapes, torch.float64)
    seg, S = segments_for(mode, len(shapes), seed=3)
    assert_gram_close(tb.gram(flat, K, seg, S), reference.gram(flat, K, seg, S), torch.float64)


def test_gram_empty_segment_and_empty_tensor():
    K, shapes = 2, [(4,), (0,), (6,)]
    flat = make_grads(K, shapes, torch.float32)
    seg, S = [0, 2, 0], 3  # segment 1 has no tensor, segment 2 only an empty one
    G = tb.gram(flat, K, seg, S)
    assert torch.equal(G[1:], torch.zeros_like(G[1:]))
    assert_gram_close(G, reference.gram(flat, K, seg, S), torch.float32)


def test_views_of_one_bank_buffer():
    # GradBank layout: objective k's gradients are views into row k of one [K, N] buffer, at odd
    # offsets (so not 16-byte aligned: the kernels must take the unvectorised path).
    K, shapes = 3, [(5,), (2, 3), (1,), (130,)]
    sizes = [torch.Size(s).numel() for s in shapes]
    bank = torch.randn(K, sum(sizes) + 1, dtype=torch.float64, device=DEVICE)
    starts = [1 + sum(sizes[:i]) for i in range(len(sizes))]
    flat = [bank[k, a:a + n].view(s) for k in range(K) for a, n, s in zip(starts, sizes, shapes)]
    assert not pointer_table.pointer_table(flat, bank.device).aligned
    seg = [0, 1, 1, 0]
    weights = torch.rand(2, K, dtype=torch.float64, device=DEVICE)
    assert_gram_close(tb.gram(flat, K, seg, 2), reference.gram(flat, K, seg, 2), torch.float64)
    assert_outputs_close(tb.combine(flat, K, weights, seg),
                         reference.combine(flat, K, weights, seg), torch.float64)


def test_gram_is_deterministic():
    K, shapes = 3, [(40000,), (17,), (5000,)]
    flat = make_grads(K, shapes, torch.float32)
    seg = [0, 0, 0]
    assert torch.equal(tb.gram(flat, K, seg, 1), tb.gram(flat, K, seg, 1))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K", [1, 2, 3, 5])
def test_combine_matches_reference(K, dtype):
    flat = make_grads(K, SHAPES, dtype, seed=10 + K)
    seg, S = segments_for("random", len(SHAPES), seed=K)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.rand(S, K, dtype=acc, generator=torch.Generator().manual_seed(K)).to(DEVICE)
    assert_outputs_close(tb.combine(flat, K, weights, seg),
                         reference.combine(flat, K, weights, seg), dtype)


@pytest.mark.parametrize("mode", ["one", "tensor", "random"])
def test_combine_segment_modes_and_noncontiguous(mode):
    K, shapes = 3, [(6, 5), (1,), (40,), (9, 3)]
    base = make_grads(K, [(s[::-1] if len(s) == 2 else s) for s in shapes], torch.float32)
    # transposed (non-contiguous) inputs: the backend must read them in logical order
    flat = [t.t() if t.dim() == 2 else t for t in base]
    seg, S = segments_for(mode, len(shapes), seed=5)
    weights = torch.randn(S, K, device=DEVICE)
    assert_outputs_close(tb.combine(flat, K, weights, seg),
                         reference.combine(flat, K, weights, seg), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("skip", [None, False, True])
def test_combine_into(dtype, skip):
    K, shapes = 2, [(3,), (127,), (8, 8), (16400,)]
    P = len(shapes)
    flat = make_grads(K, shapes, dtype, seed=7)
    seg = [0, 1, 1, 0]
    weights = torch.tensor([[0.25, 0.75], [1.5, -0.5]], device=DEVICE)
    out = [torch.full(s, 7.0, dtype=dtype, device=DEVICE) for s in shapes]
    out[2] = torch.full((8, 8), 7.0, dtype=dtype, device=DEVICE).t()  # non-contiguous output
    before = [o.clone() for o in out]
    skip_t = None if skip is None else torch.tensor([skip], device=DEVICE)
    tb.combine_into(flat, K, weights, seg, out, skip_t)
    if skip:
        for o, b in zip(out, before):
            assert torch.equal(o, b)
    else:
        assert_outputs_close(out, reference.combine(flat, K, weights, seg), dtype)
    assert len(out) == P


def test_combine_into_may_overwrite_an_input():
    K, shapes = 2, [(5,), (300,)]
    flat = make_grads(K, shapes, torch.float32, seed=8)
    weights = torch.tensor([[2.0, -1.0]], device=DEVICE)
    expected = reference.combine(flat, K, weights, [0, 0])
    tb.combine_into(flat, K, weights, [0, 0], flat[:2], None)  # out is objective 0 itself
    assert_outputs_close(flat[:2], expected, torch.float32)


def _adamw_state(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen).to(dtype).to(DEVICE) for s in shapes]
    m = [(0.1 * torch.randn(s, generator=gen)).to(dtype).to(DEVICE) for s in shapes]
    v = [(0.01 * torch.rand(s, generator=gen)).to(dtype).to(DEVICE) for s in shapes]
    return params, m, v


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_tensor", [False, True])
def test_balanced_adamw_matches_reference(dtype, per_tensor):
    K, shapes = 3, [(1,), (127,), (10, 30), (16400,)]
    P = len(shapes)
    flat = make_grads(K, shapes, dtype, seed=11)
    seg, S = [0, 1, 0, 1], 2
    weights = torch.rand(S, K, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                         generator=torch.Generator().manual_seed(2)).to(DEVICE)
    lrs = [1e-3 * (p + 1) for p in range(P)] if per_tensor else [1e-3] * P
    wds = [0.01 * p for p in range(P)] if per_tensor else [0.01] * P
    mine = _adamw_state(shapes, dtype, 4)
    ref = _adamw_state(shapes, dtype, 4)
    for step in (1, 2, 3):
        args = (0.9, 0.999, 1e-8, step, None)
        tb.balanced_adamw_(flat, K, weights, seg, *mine, lrs, wds, *args)
        reference.balanced_adamw_(flat, K, weights, seg, *ref, lrs, wds, *args)
    for got, want in zip(mine, ref):
        assert_outputs_close(got, want, dtype)


def test_balanced_adamw_skip_and_mixed_state_dtypes():
    K, shapes = 2, [(7,), (300,), (2, 5)]
    flat = make_grads(K, shapes, torch.float32, seed=12)
    weights = torch.tensor([[0.3, 0.7]], device=DEVICE)
    mine = _adamw_state(shapes, torch.float32, 5)
    mine[0][1] = mine[0][1].double()  # a second dtype triple: a second launch, same results
    mine[1][1] = mine[1][1].double()
    mine[2][1] = mine[2][1].double()
    ref = [[t.clone() for t in group] for group in mine]
    saved = [[t.clone() for t in group] for group in mine]
    args = ([1e-2] * 3, [0.1] * 3, 0.9, 0.99, 1e-6, 4)
    skip = torch.tensor([True], device=DEVICE)
    tb.balanced_adamw_(flat, K, weights, [0, 0, 0], *mine, *args, skip)
    for group, before in zip(mine, saved):
        for t, b in zip(group, before):
            assert torch.equal(t, b)
    tb.balanced_adamw_(flat, K, weights, [0, 0, 0], *mine, *args, ~skip)
    reference.balanced_adamw_(flat, K, weights, [0, 0, 0], *ref, *args, None)
    for got, want in zip(mine, ref):
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_gradcheck_gram_and_combine():
    K, shapes, seg, S = 2, [(3,), (2, 2)], [0, 1], 2
    flat = [t.requires_grad_() for t in make_grads(K, shapes, torch.float64, seed=13)]
    weights = torch.rand(S, K, dtype=torch.float64, device=DEVICE, requires_grad=True)
    P = len(shapes)

    def gram(*ts):
        return tb.gram(list(ts), K, seg, S)

    def combine(w, *ts):
        return tuple(tb.combine(list(ts), K, w, seg))

    assert torch.autograd.gradcheck(gram, tuple(flat), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(combine, (weights, *flat), eps=1e-6, atol=1e-7)
    # K=3 outputs through the gram backward's multi-output combine, checked against autograd of
    # the reference.
    flat3 = [t.detach().requires_grad_() for t in make_grads(3, shapes, torch.float64, seed=14)]
    upstream = torch.randn(S, 3, 3, dtype=torch.float64, device=DEVICE)
    mine = torch.autograd.grad((tb.gram(flat3, 3, seg, S) * upstream).sum(), flat3)
    want = torch.autograd.grad((reference.gram(flat3, 3, seg, S) * upstream).sum(), flat3)
    for a, b in zip(mine, want):
        torch.testing.assert_close(a, b)
    assert len(mine) == 3 * P


def test_stale_pointer_table_follows_new_storage():
    K, shapes, seg = 2, [(5,), (40,)], [0, 0]
    flat = make_grads(K, shapes, torch.float32, seed=15)
    G1 = tb.gram(flat, K, seg, 1)
    misses = pointer_table.POINTER_TABLES.misses
    # same storage, new values: the cached table is reused and reads the new values
    for t in flat:
        t.mul_(2.0)
    G2 = tb.gram(flat, K, seg, 1)
    assert pointer_table.POINTER_TABLES.misses == misses
    torch.testing.assert_close(G2, 4.0 * G1)
    # new storage (as zero_grad(set_to_none=True) then backward gives): a new table
    old = flat
    flat = make_grads(K, shapes, torch.float32, seed=16)
    G3 = tb.gram(flat, K, seg, 1)
    assert pointer_table.POINTER_TABLES.misses == misses + 1
    assert_gram_close(G3, reference.gram(flat, K, seg, 1), torch.float32)
    del old
    # same tensor objects, storage swapped underneath (param.data = ...): follows the new storage
    for t in flat:
        t.data = torch.full_like(t, 0.5)
    assert_gram_close(tb.gram(flat, K, seg, 1), reference.gram(flat, K, seg, 1), torch.float32)
    out = [torch.empty(s, device=DEVICE) for s in shapes]
    w = torch.tensor([[1.0, 1.0]], device=DEVICE)
    tb.combine_into(flat, K, w, seg, out, None)
    out = [torch.zeros(s, device=DEVICE) for s in shapes]  # reallocated outputs
    tb.combine_into(flat, K, w, seg, out, None)
    assert_outputs_close(out, reference.combine(flat, K, w, seg), torch.float32)
    assert len(pointer_table.POINTER_TABLES) <= pointer_table.CACHE_ENTRIES


def test_one_launch_per_stage_for_many_tensors(monkeypatch):
    K, P = 2, 64
    shapes = [((p * 37) % 50 + 1,) for p in range(P)]
    flat = make_grads(K, shapes, torch.float32, seed=17)
    seg = [p % 7 for p in range(P)]
    weights = torch.rand(7, K, device=DEVICE)
    before = dict(common.LAUNCHES)
    G = tb.gram(flat, K, seg, 7)
    d = tb.combine(flat, K, weights, seg)
    delta = {k: n - before.get(k, 0) for k, n in common.LAUNCHES.items() if n != before.get(k, 0)}
    assert delta == {"gram_partials": 1, "gram_reduce": 1, "combine": 1}
    assert_gram_close(G, reference.gram(flat, K, seg, 7), torch.float32)
    assert_outputs_close(d, reference.combine(flat, K, weights, seg), torch.float32)
    # A grid limit of 16 programs forces several launches; results must not change.
    monkeypatch.setattr(common, "MAX_GRID_X", 16)
    before = common.LAUNCHES["gram_partials"]
    assert torch.equal(tb.gram(flat, K, seg, 7), G)
    assert common.LAUNCHES["gram_partials"] - before == 4  # ceil(64 chunks / 16)
    for a, b in zip(tb.combine(flat, K, weights, seg), d):
        assert torch.equal(a, b)


def test_torch_compile_fullgraph():
    K, shapes, seg, S = 2, [(4,), (3, 5)], [0, 1], 2
    flat = [t.requires_grad_() for t in make_grads(K, shapes, torch.float32, seed=18)]
    weights = torch.tensor([[0.5, 0.5], [0.2, 0.8]], device=DEVICE)
    out = [torch.zeros(s, device=DEVICE) for s in shapes]

    def step(flat, weights, out):
        G = tb.gram(flat, K, seg, S)
        d = tb.combine(flat, K, weights * G.diagonal(dim1=1, dim2=2).rsqrt(), seg)
        tb.combine_into([t.detach() for t in flat], K, weights, seg, out, None)
        return G, d

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    G, d = compiled(flat, weights, out)
    G_ref, d_ref = step(flat, weights, [torch.zeros_like(o) for o in out])
    torch.testing.assert_close(G, G_ref)
    for a, b in zip(d, d_ref):
        torch.testing.assert_close(a, b)
    assert_outputs_close(out, reference.combine([t.detach() for t in flat], K, weights, seg),
                         torch.float32)
    loss = sum(x.sum() for x in d)
    grads = torch.autograd.grad(loss, flat)
    loss_ref = sum(x.sum() for x in step(flat, weights, [torch.zeros_like(o) for o in out])[1])
    for a, b in zip(grads, torch.autograd.grad(loss_ref, flat)):
        torch.testing.assert_close(a, b)


def test_fresh_combine_outputs_do_not_churn_the_table_cache():
    """The inputs' table is cached; the outputs a combine allocates are new every call, so
    their table is built for the call only (caching it would evict tables that do repeat)."""
    K, shapes, seg = 2, [(5,), (40,)], [0, 0]
    flat = make_grads(K, shapes, torch.float32, seed=17)
    w = torch.tensor([[1.0, 0.5]], device=DEVICE)
    first = tb.combine(flat, K, w, seg)
    misses, entries = pointer_table.POINTER_TABLES.misses, len(pointer_table.POINTER_TABLES)
    for _ in range(3):
        again = tb.combine(flat, K, w, seg)
        assert_outputs_close(again, first, torch.float32)
    assert pointer_table.POINTER_TABLES.misses == misses
    assert len(pointer_table.POINTER_TABLES) == entries
