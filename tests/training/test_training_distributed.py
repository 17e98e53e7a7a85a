"""ParetoLoRA with a process group, real processes (gloo on 127.0.0.1, 2 ranks, forkserver as
in tests/core/test_distributed.py), every available backend, torch AdamW and the fused path:

- ``distributed="data"``: each rank trains on its own micro-batch; the bank's [K, N] buffer is
  averaged in one all-reduce (its padding, between the parameters, stays zero). After 3 steps
  the parameters equal one process trained on the concatenated batch (to fp32 tolerance), and
  are bitwise identical on every rank.
- ``distributed="sharded"``: a tensor-parallel MLP (column-parallel first layer, row-parallel
  second layer, the output bias held by rank 0 only, an empty shard elsewhere); only the Gram
  partials travel. After 3 steps the gathered shards equal the unsharded model's parameters.
"""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import fused_balance as fb
from fused_balance.backends import bank_backends
from fused_balance.training import ParetoLoRA
from shared import (D_IN, REGRESSION_LR, dispatched_fused_balance_ops, needs_gloo, regression_batch,
                    regression_net, regression_objectives, regression_optimizer, run_ranks, train_regression)

WORLD = 2
STEPS = 3
BATCH = 8  # global batch, split over the ranks in data mode
LR = REGRESSION_LR
TIMEOUT_S = 120
pytestmark = needs_gloo


# ----------------------------------------------------------------------------- shared problem
Net, make_optimizer, objectives = regression_net, regression_optimizer, regression_objectives


def batch(step):
    return regression_batch(step, BATCH, D_IN, seed=100)


def train_single(fused, backend):
    """One process, the whole batch: the reference for both modes."""
    return train_regression(STEPS, batch, fused=fused, backend=backend)


# ----------------------------------------------------------------------------- rank scenarios
def _data_parallel(rank, fused, backend):
    model = Net()
    balancer = ParetoLoRA(model, make_optimizer(fused), backend=backend, lr=LR, weight_decay=0.01,
                          process_group=dist.group.WORLD, distributed="data")
    reduced = []  # numel of every all-reduce the steps issue
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        reduced.append(tensor.numel())
        return original(tensor, *args, **kwargs)

    dist.all_reduce = counting
    try:
        for step in range(STEPS):
            x, t = batch(step)
            xs, ts = x.chunk(WORLD)[rank], t.chunk(WORLD)[rank]
            balancer.step(objectives(model(xs), ts))
            balancer.zero_grad()
    finally:
        dist.all_reduce = original
    bank = balancer.bank
    inside = torch.zeros(bank.numel, dtype=torch.bool)
    for a, n in zip(bank.offsets, bank.numels):
        inside[a:a + n] = True
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "weights": [h["weights"] for h in balancer.history], "segments": balancer.segment_names,
            "reduced": reduced, "bank_numel": bank.buffer.numel(), "padding": bank.buffer[:, ~inside].clone()}


def _tensor_parallel(rank, fused, backend):
    """Megatron-style MLP: rank r holds rows r of W1/b1 and columns r of W2; the output bias
    lives on rank 0 (an empty shard elsewhere). The loss is divided by the world size because
    the backward of the differentiable all-reduce sums the (identical) output gradients."""
    from torch.distributed.nn.functional import all_reduce

    full = Net()
    rows = lambda t: t.detach().tensor_split(WORLD, dim=0)[rank].clone()  # noqa: E731
    w1 = torch.nn.Parameter(rows(full.layers[0].weight))
    b1 = torch.nn.Parameter(rows(full.layers[0].bias))
    w2 = torch.nn.Parameter(full.layers[1].weight.detach().tensor_split(WORLD, dim=1)[rank].clone())
    b2 = torch.nn.Parameter(full.layers[1].bias.detach().clone() if rank == 0 else torch.zeros(0))
    named = [("layers.0.weight", w1), ("layers.0.bias", b1), ("layers.1.weight", w2), ("layers.1.bias", b2)]
    balancer = ParetoLoRA(named, make_optimizer(fused), backend=backend, lr=LR, weight_decay=0.01,
                          process_group=dist.group.WORLD, distributed="sharded")
    ops, reduced = [], []  # the ops and the all-reduces (dtype, numel) of the balanced steps
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        reduced.append((str(tensor.dtype), tensor.numel()))
        return original(tensor, *args, **kwargs)
    for step in range(STEPS):
        x, t = batch(step)
        partial = torch.tanh(x @ w1.T + b1) @ w2.T
        if rank == 0:
            partial = partial + b2
        y = all_reduce(partial, group=dist.group.WORLD)
        losses = objectives(y, t, scale=1.0 / WORLD)
        balancer.accumulate(losses)  # the model's own all-reduces (its backward) happen here
        dist.all_reduce = counting
        try:
            ops += dispatched_fused_balance_ops(balancer.step)
        finally:
            dist.all_reduce = original
        balancer.zero_grad()
    return {"params": {n: p.detach().clone() for n, p in named},
            "weights": [h["weights"] for h in balancer.history], "ops": ops, "reduced": reduced,
            "segments": balancer.num_segments}


def _scenarios(rank, world, backends) -> dict:
    results = {}
    for backend in backends:
        for fused in (False, True):
            results["data", backend, fused] = _data_parallel(rank, fused, backend)
            results["sharded", backend, fused] = _tensor_parallel(rank, fused, backend)
    return results


# ----------------------------------------------------------------------------- spawning
BACKENDS = bank_backends("cpu")  # ParetoLoRA runs a BalancePlan: the backends with bank ops
_RESULTS: dict = {}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Start WORLD ranks once (forkserver, like tests/core/test_distributed.py) and load their results."""
    if "ranks" not in _RESULTS:
        outdir = tmp_path_factory.mktemp("pareto_ranks")
        started = time.monotonic()
        _RESULTS["ranks"] = run_ranks(_scenarios, WORLD, outdir, __name__, TIMEOUT_S, BACKENDS)
        _RESULTS["seconds"] = time.monotonic() - started
    return _RESULTS["ranks"]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- checks
@pytest.mark.parametrize("fused", [False, True], ids=["torch-adamw", "fused"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_data_parallel_pareto_lora_equals_one_process_on_the_whole_batch(ranks, backend, fused):
    want, history = train_single(fused, backend)
    got = [r["data", backend, fused] for r in ranks]
    assert got[0]["segments"] == ["layers.0", "layers.1"]  # per-layer segments
    # fp32 parameters of 48, 8, 24 and 3 elements: each padded to 16 bytes in the bank
    padded = sum(-(-p.numel() // 4) * 4 for p in Net().parameters())
    for g in got:  # one collective per step: the whole [K, N] bank, its padding still zero
        assert g["reduced"] == [g["bank_numel"]] * STEPS
        assert g["bank_numel"] == 2 * padded > 2 * sum(p.numel() for p in Net().parameters())
        assert g["padding"].numel() > 0 and not g["padding"].any()
    moved = False
    for g in got:
        for name, value in want.items():
            close(g["params"][name], value)
        for w_got, h in zip(g["weights"], history):
            close(w_got, h["weights"])
        moved |= any(not torch.equal(g["params"][n], v) for n, v in Net().named_parameters())
    assert moved
    for name in want:  # the ranks never diverge: the same bits everywhere
        assert torch.equal(got[0]["params"][name], got[1]["params"][name]), name


@pytest.mark.parametrize("fused", [False, True], ids=["torch-adamw", "fused"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_pareto_lora_equals_the_unsharded_model(ranks, backend, fused):
    want, history = train_single(fused, backend)
    got = [r["sharded", backend, fused] for r in ranks]
    assert got[1]["params"]["layers.1.bias"].numel() == 0  # an empty shard took part
    close(torch.cat([g["params"]["layers.0.weight"] for g in got]), want["layers.0.weight"])
    close(torch.cat([g["params"]["layers.0.bias"] for g in got]), want["layers.0.bias"])
    close(torch.cat([g["params"]["layers.1.weight"] for g in got], dim=1), want["layers.1.weight"])
    close(got[0]["params"]["layers.1.bias"], want["layers.1.bias"])
    for g in got:
        for w_got, h in zip(g["weights"], history):
            close(w_got, h["weights"])
        assert all(torch.equal(a, b) for a, b in zip(g["weights"], got[0]["weights"]))
        if backend == "cpp":  # the plan, with one collective per step: the Gram partials and the flag
            assert set(g["ops"]) <= {"bank_gram", "bank_combine_into", "bank_adamw_", "policy_weights"}, g["ops"]
            S = g["segments"]
            assert g["reduced"] == [("torch.float64", S * 2 * 2 + 1)] * STEPS
