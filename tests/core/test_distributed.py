"""Distributed balancing with real processes (torch.multiprocessing + gloo on 127.0.0.1).

One spawn per world size (2 and 4 ranks) runs every scenario for every available backend and
saves each rank's results; the tests then compare them with a single process on the whole
batch / the unsharded gradients. Modes: "data" (gradients averaged over ranks, both the direct
buffer path and the bucket path), "sharded" (shards, only the Gram partials reduced; uneven and
empty shards), the range rescue and zero objectives under sharding, NaN on one rank, and FSDP2
(fully_shard) local gradient shards.
"""
from __future__ import annotations

import traceback

import pytest
import torch
import torch.distributed as dist

import fused_balance as fb
from fused_balance import reference
from fused_balance.distributed import contiguous_span
from shared import needs_gloo, run_ranks

BACKENDS = fb.available_backends("cpu")
POLICIES = ("mgda", "pareto_lora")
SEGMENTS = [0, 0, 1, 1]  # per layer: (weight, bias) of each Linear
GLOBAL_BATCH = 8
LR = 0.1
LAYOUT = {2: "bank", 3: "separate"}  # data mode: the direct-buffer path and the bucket path
WORLD_TIMEOUT_S = 150  # a hang fails the test instead of blocking the run
pytestmark = needs_gloo


def _fsdp2_missing() -> str | None:
    """Why this torch has no FSDP2, or None."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        return str(exc)
    return None


_FSDP2_MISSING = _fsdp2_missing()


# ----------------------------------------------------------------------------- shared problem
def make_model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def make_data(K):
    gen = torch.Generator().manual_seed(99)
    x = torch.randn(GLOBAL_BATCH, 6, generator=gen)
    t = torch.randn(GLOBAL_BATCH, K, generator=gen)
    mix = torch.randn(K, 3, generator=gen)  # objective k reads a mixture of the outputs
    return x, t, mix


def losses(model, x, t, mix):
    y = model(x)
    return [((y @ mix[k] - t[:, k]) ** 2).mean() for k in range(mix.shape[0])]


def objective_grads(model, x, t, mix):
    params = list(model.parameters())
    out = []
    for loss in losses(model, x, t, mix):
        out.append([g.detach().clone() for g in torch.autograd.grad(loss, params, retain_graph=True)])
    return out


def sgd_update(params, grads):
    params = [p.detach().clone().requires_grad_(True) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.detach().clone()
    torch.optim.SGD(params, lr=LR).step()
    return [p.detach() for p in params]


def into_bank(grads):
    """Copy K x P gradients into one [K, N] buffer and return its views (a GradBank layout)."""
    sizes = [g.numel() for g in grads[0]]
    bank = torch.zeros(len(grads), sum(sizes), dtype=grads[0][0].dtype)
    views = []
    for k, row in enumerate(grads):
        offset, vrow = 0, []
        for g in row:
            v = bank[k, offset:offset + g.numel()].view(g.shape)
            v.copy_(g)
            vrow.append(v)
            offset += g.numel()
        views.append(vrow)
    return views


def shard(t, world, rank):
    return t.tensor_split(world, dim=0)[rank].clone()


# ----------------------------------------------------------------------------- rank scenarios
def _data_parallel(rank, world, backend, K, policy, layout):
    model = make_model()
    x, t, mix = make_data(K)
    grads = objective_grads(model, x.chunk(world)[rank], t.chunk(world)[rank], mix)
    if layout == "bank":
        grads = into_bank(grads)
    res = fb.pareto_combine(grads, SEGMENTS, policy=policy, backend=backend,
                            process_group=dist.group.WORLD, distributed="data")
    return {"averaged": [[g.clone() for g in row] for row in grads], "weights": res.weights,
            "combined": res.combined, "params": sgd_update(model.parameters(), res.combined),
            "found_inf": bool(res.found_inf)}


def _sharded(rank, world, backend, K, policy, scale=None, zero=None):
    model = make_model()
    x, t, mix = make_data(K)
    full = objective_grads(model, x, t, mix)
    if scale is not None:  # objective k multiplied by scale[k] (range rescue)
        full = [[g * s for g in row] for row, s in zip(full, scale)]
    if zero is not None:  # (k, segment): objective k has no gradient in that segment
        k0, s0 = zero
        full[k0] = [torch.zeros_like(g) if SEGMENTS[p] == s0 else g for p, g in enumerate(full[k0])]
    shards = [[shard(g, world, rank) for g in row] for row in full]
    out = [torch.full_like(g, 5.0) for g in shards[0]]
    res = fb.pareto_combine(shards, SEGMENTS, policy=policy, backend=backend, out=out,
                            process_group=dist.group.WORLD, distributed="sharded")
    param_shards = [shard(p.detach(), world, rank) for p in model.parameters()]
    return {"weights": res.weights, "gram": res.gram, "combined": out, "found_inf": bool(res.found_inf),
            "params": sgd_update(param_shards, out), "shapes": [tuple(s.shape) for s in shards[0]]}


def _nonfinite(rank, world, backend, distributed):
    model = make_model()
    x, t, mix = make_data(2)
    if distributed == "data":
        grads = objective_grads(model, x.chunk(world)[rank], t.chunk(world)[rank], mix)
    else:
        grads = [[shard(g, world, rank) for g in row] for row in objective_grads(model, x, t, mix)]
    if rank == world - 1:  # only one rank sees the NaN
        grads[1][0].view(-1)[0] = float("nan")  # W1: 5 rows, never an empty shard
    out = [torch.full_like(g, 5.0) for g in grads[0]]
    res = fb.pareto_combine(grads, SEGMENTS, policy="pareto_lora", backend=backend, out=out,
                            process_group=dist.group.WORLD, distributed=distributed)
    return {"found_inf": bool(res.found_inf), "untouched": all(bool((o == 5.0).all()) for o in out),
            "weights_finite": bool(torch.isfinite(res.weights).all())}


def _bad_arguments(rank, world):
    """A bad argument in data mode must fail before the in-place all-reduce: each rank's
    gradients (different per rank) stay as they were."""
    grads = [[torch.full((4,), float(rank + 1)), torch.full((2, 2), -float(rank))] for _ in range(2)]
    before = [[g.clone() for g in row] for row in grads]
    errors = []
    for kwargs in (dict(policy="nash"), dict(tau=0.5), dict(rescale="max"),
                   dict(out=[grads[1][0], torch.zeros(2, 2)])):
        try:
            fb.pareto_combine(grads, process_group=dist.group.WORLD, distributed="data", **kwargs)
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
    unchanged = all(torch.equal(a, b) for ra, rb in zip(before, grads) for a, b in zip(ra, rb))
    return {"errors": errors, "unchanged": unchanged}


def _fsdp(rank, world, backend, K, policy):
    """FSDP2: per-objective backward passes leave DTensor gradient shards (already averaged
    over the ranks by FSDP's reduce-scatter); balance their local shards, step, gather."""
    from torch.distributed.fsdp import fully_shard
    model = make_model()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    x, t, mix = make_data(K)
    xs, ts = x.chunk(world)[rank], t.chunk(world)[rank]
    params = list(model.parameters())
    per_objective = []
    for k in range(K):
        losses(model, xs, ts, mix)[k].backward()
        per_objective.append([p.grad.to_local().detach().clone() for p in params])
        model.zero_grad(set_to_none=False)
    out = [p.grad.to_local() for p in params]  # the local storage of the DTensor gradients
    res = fb.pareto_combine(per_objective, SEGMENTS, policy=policy, backend=backend, out=out,
                            process_group=dist.group.WORLD, distributed="sharded")
    torch.optim.SGD(params, lr=LR).step()
    return {"weights": res.weights, "combined": [p.grad.to_local().clone() for p in params],
            "params": [p.full_tensor().detach().clone() for p in params]}


def _scenarios(rank, world, backends) -> dict:
    results = {}
    for backend in backends:
        for K in (2, 3):
            for policy in POLICIES:
                results["data", backend, K, policy] = _data_parallel(
                    rank, world, backend, K, policy, LAYOUT[K])
                results["sharded", backend, K, policy] = _sharded(rank, world, backend, K, policy)
        for policy in POLICIES:
            results["tiny", backend, policy] = _sharded(rank, world, backend, 2, policy,
                                                        scale=(1e-30, 1e3))
            results["zero", backend, policy] = _sharded(rank, world, backend, 3, policy, zero=(1, 1))
        for mode in ("data", "sharded"):
            results["nan", backend, mode] = _nonfinite(rank, world, backend, mode)
    results["bad"] = _bad_arguments(rank, world)
    for K, policy in ((2, "mgda"), (3, "pareto_lora")):
        if _FSDP2_MISSING:
            continue
        try:
            results["fsdp", K, policy] = _fsdp(rank, world, "torch", K, policy)
        except Exception:  # recorded so the other tests still run; the FSDP test fails with it
            results["fsdp", K, policy] = traceback.format_exc()
    return results


def _run_world(world, outdir):
    return run_ranks(_scenarios, world, outdir, __name__, WORLD_TIMEOUT_S, BACKENDS)


_RESULTS: dict = {}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def world(request, tmp_path_factory):
    size = request.param
    if size not in _RESULTS:
        _RESULTS[size] = _run_world(size, tmp_path_factory.mktemp(f"world{size}"))
    return size, _RESULTS[size]


# ----------------------------------------------------------------------------- checks
def close(a, b, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol * (1.0 + float(b.abs().max()) if b.numel() else 1.0))


def single_process(K, policy, grads=None, backend="torch"):
    model = make_model()
    x, t, mix = make_data(K)
    grads = objective_grads(model, x, t, mix) if grads is None else grads
    res = fb.pareto_combine(grads, SEGMENTS, policy=policy, backend=backend)
    return grads, res, sgd_update(model.parameters(), res.combined)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_data_parallel_equals_one_process_on_the_whole_batch(world, backend, K, policy):
    """K=2 gradients sit in one [K, N] buffer (all-reduced in place, no bucket copy); K=3 are
    separate tensors (one flattened bucket, copied back)."""
    size, ranks = world
    grads, res, params = single_process(K, policy)
    for r in ranks:
        got = r["data", backend, K, policy]
        assert not got["found_inf"]
        for row_got, row_want in zip(got["averaged"], grads):
            for a, b in zip(row_got, row_want):
                close(a, b)
        close(got["weights"], res.weights, rtol=1e-4)
        for a, b in zip(got["combined"], res.combined):
            close(a, b, rtol=1e-4)
        for a, b in zip(got["params"], params):
            close(a, b, rtol=1e-4)
        # every rank took exactly the same decision
        assert torch.equal(got["weights"], ranks[0]["data", backend, K, policy]["weights"])


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("K", [2, 3])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_equals_one_process_on_unsharded_gradients(world, backend, K, policy):
    size, ranks = world
    grads, res, params = single_process(K, policy)
    got = [r["sharded", backend, K, policy] for r in ranks]
    if size == 4:  # tensor_split of 3 rows over 4 ranks: the last rank holds an empty shard
        assert got[3]["shapes"][3] == (0,)
    for g in got:
        assert torch.equal(g["weights"], got[0]["weights"]) and torch.equal(g["gram"], got[0]["gram"])
        close(g["gram"], res.gram)
        close(g["weights"], res.weights, rtol=1e-4)
    for p in range(len(SEGMENTS)):
        close(torch.cat([g["combined"][p] for g in got]), res.combined[p], rtol=1e-4)
        close(torch.cat([g["params"][p] for g in got]), params[p], rtol=1e-4)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_range_rescue_and_zero_objective(world, backend, policy):
    size, ranks = world
    model = make_model()
    x, t, mix = make_data(2)
    full = [[g * s for g in row] for row, s in zip(objective_grads(model, x, t, mix), (1e-30, 1e3))]
    flat64 = [g.double() for row in full for g in row]
    G64 = reference.gram(flat64, 2, SEGMENTS, 2)
    w64, _ = fb.policy_weights(G64, policy)
    for r in ranks:
        got = r["tiny", backend, policy]
        assert not got["found_inf"]
        # fp32 weights of the float64 problem (saturating where they exceed fp32, see api)
        want = w64.clamp(max=torch.finfo(torch.float32).max).float()
        torch.testing.assert_close(got["weights"], want, rtol=1e-4, atol=0)
    # a zero objective in one segment: left out there, the others balanced, on every rank
    x3, t3, mix3 = make_data(3)
    full3 = objective_grads(model, x3, t3, mix3)
    full3[1] = [torch.zeros_like(g) if SEGMENTS[p] == 1 else g for p, g in enumerate(full3[1])]
    _, res, params = single_process(3, policy, grads=full3)
    for r in ranks:
        got = r["zero", backend, policy]
        assert got["weights"][1, 1] == 0 and got["weights"][1].sum() > 0
        close(got["weights"], res.weights, rtol=1e-4)
    for p in range(len(SEGMENTS)):
        close(torch.cat([r["zero", backend, policy]["combined"][p] for r in ranks]), res.combined[p], rtol=1e-4)


@pytest.mark.parametrize("mode", ["data", "sharded"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_on_one_rank_skips_every_rank(world, backend, mode):
    size, ranks = world
    for r in ranks:
        got = r["nan", backend, mode]
        assert got["found_inf"] and got["untouched"] and got["weights_finite"]


def test_bad_arguments_fail_before_the_in_place_all_reduce(world):
    size, ranks = world
    for r in ranks:
        assert len(r["bad"]["errors"]) == 4 and r["bad"]["unchanged"]
        assert "shares memory" in r["bad"]["errors"][3]


@pytest.mark.parametrize("K, policy", [(2, "mgda"), (3, "pareto_lora")])
def test_fsdp2_local_shards(world, K, policy):
    size, ranks = world
    if _FSDP2_MISSING:
        pytest.skip(f"this torch has no FSDP2 (torch.distributed.fsdp.fully_shard): {_FSDP2_MISSING}")
    got = [r["fsdp", K, policy] for r in ranks]
    for rank, g in enumerate(got):
        if isinstance(g, str):
            pytest.fail(f"FSDP2 raised on rank {rank}:\n{g}")
    grads, res, params = single_process(K, policy)
    for g in got:
        close(g["weights"], res.weights, rtol=1e-4)
        assert torch.equal(g["weights"], got[0]["weights"])
        for a, b in zip(g["params"], params):  # gathered parameters after the SGD step
            close(a, b, rtol=1e-4)
    for p in range(len(SEGMENTS)):  # FSDP2 shards dim 0 in torch.chunk pieces (last may be empty)
        close(torch.cat([g["combined"][p] for g in got]), res.combined[p], rtol=1e-4)


# ----------------------------------------------------------------------------- single process
def test_contiguous_span_detects_a_bank_and_nothing_else():
    grads = [[torch.randn(3, 2), torch.randn(4)] for _ in range(2)]
    views = into_bank(grads)
    flat = [t for row in views for t in row]
    span = contiguous_span(flat)
    assert span is not None and span.numel() == 20 and span.data_ptr() == flat[0].data_ptr()
    span.mul_(2)  # the span aliases the views: reducing it in place updates every gradient
    torch.testing.assert_close(views[1][1], 2 * grads[1][1])
    assert contiguous_span([t for row in grads for t in row]) is None  # separate tensors
    assert contiguous_span([flat[1], flat[0]]) is None  # out of order
    assert contiguous_span([flat[0], flat[2]]) is None  # a gap


def test_process_group_arguments_are_checked_before_any_work():
    g = [[torch.randn(3)], [torch.randn(3)]]
    with pytest.raises(ValueError, match="distributed='model'"):
        fb.pareto_combine(g, distributed="model")
    if not dist.is_initialized():
        with pytest.raises(RuntimeError, match="not initialised"):
            fb.pareto_combine(g, process_group=object())
