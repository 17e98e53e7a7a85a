"""ParetoLoRA under the engines users launch it with, real processes (gloo on 127.0.0.1, the
shared ``run_ranks`` helper of tests/shared.py):

- torchrun + ``DistributedDataParallel`` (2 and 4 ranks): ``ParetoLoRA(ddp_model, ...)`` without
  a process group, torch AdamW and the fused AdamW, ``mgda`` and ``pareto_lora``, per-layer
  segments; names without DDP's ``module.``; an armed DDP reducer and set-ups that cannot be
  made correct (unbalanced trainable parameters, "sharded" mode, static_graph) are refused.
- ``accelerate`` (``Accelerator(cpu=True)``, MULTI_CPU): ``ParetoLoRA(accelerator.prepare(model))``.
- ``BalancedTrainer`` with the Trainer's own DDP (the env vars torchrun sets, ``use_cpu=True``,
  ``ddp_backend="gloo"``) on the tiny PEFT demo model.
- FSDP2 (``fully_shard``) models are trained in test_training_fsdp2.py.

After 5 steps every rank holds the same bits, equal to one process on the whole (concatenated)
batch within rtol 1e-5 (the Trainer runs: in float64, normwise, see TRAINER_NORMWISE); the
collectives (counted with the profiler's ``gloo:*`` events, which see DDP's C++ reducer too) are
one all-reduce of the K·N bank per step and nothing else.
"""
from __future__ import annotations

import importlib.util
import math
import os
import tempfile
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from fused_balance.training import ParetoLoRA
from shared import (D_IN, REGRESSION_LR, DemoRows, needs_gloo, regression_batch, regression_net,
                    regression_objectives, regression_optimizer, run_ranks, train_regression)

STEPS = 5
BATCH = 8  # global batch, split over the ranks
LR = REGRESSION_LR
POLICIES = ("mgda", "pareto_lora")
TIMEOUT_S = 480  # a hang fails; a loaded 2-core machine took 175 s for the 2-rank set
TRAINER_BATCH = 4  # global batch of the Trainer runs
HAVE_ACCELERATE = importlib.util.find_spec("accelerate") is not None
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
pytestmark = needs_gloo


# ----------------------------------------------------------------------------- shared problem
Net, make_optimizer, objectives = regression_net, regression_optimizer, regression_objectives


def batch(step):
    return regression_batch(step, BATCH, D_IN, seed=200)


def train_single(policy, fused):
    """One process on the whole batch: the reference."""
    return train_regression(STEPS, batch, fused=fused, policy=policy)[0]


def collectives(run):
    """Run ``run()`` under the profiler; the gloo collectives it issued as (name, numel) —
    DDP's reducer calls the process group from C++, so patching dist.all_reduce would miss it."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        run()
    return [(e.name, sum(math.prod(s) for s in e.input_shapes if s))
            for e in prof.events() if e.name.startswith("gloo:")]


def params_of(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- rank scenarios
def _ddp(rank, world, policy, fused):
    from torch.nn.parallel import DistributedDataParallel as DDP
    net = Net()
    model = DDP(net)
    balancer = ParetoLoRA(model, make_optimizer(fused), policy=policy, segments="layer",
                          lr=LR, weight_decay=0.01)
    traffic = []
    for step in range(STEPS):
        x, t = batch(step)
        xs, ts = x.chunk(world)[rank], t.chunk(world)[rank]

        def one_step():
            balancer.step(objectives(model(xs), ts))
            balancer.zero_grad()
        traffic.append(collectives(one_step))
    return {"params": params_of(net), "traffic": traffic, "bank_numel": balancer.bank.buffer.numel(),
            "planned": balancer._plan is not None,
            "segments": balancer.segment_names, "state": balancer.state_dict(),
            "weights": [h["weights"] for h in balancer.history]}


def _armed_reducer(rank, world):
    """A forward with DDP's sync on before ParetoLoRA took over arms the reducer: refused before
    anything is written; the next forward (sync now off) trains."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    net = Net()
    model = DDP(net)
    x, t = batch(0)
    xs, ts = x.chunk(world)[rank], t.chunk(world)[rank]
    armed = objectives(model(xs), ts)
    balancer = ParetoLoRA(model, make_optimizer(False))
    before = params_of(net)
    try:
        balancer.step(armed)
        error = None
    except RuntimeError as exc:
        error = str(exc)
    unchanged = all(torch.equal(before[n], p) for n, p in net.named_parameters())
    untouched = all(p.grad is None for p in net.parameters()) and balancer.step_count == 0
    took = balancer.step(objectives(model(xs), ts))
    return {"error": error, "unchanged": unchanged and untouched, "then_took": took}


def _attached_after_steps(rank, world):
    """Built and stepped on the bare model, where rank 1 never uses the second layer (a dead
    tensor there, a live one on rank 0), then wrapped in DDP and attached: under the group every
    tensor counts as reached, so both ranks must step the same tensors and stay equal."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    balancer = ParetoLoRA(net, torch.optim.SGD(net.parameters(), lr=0.1))
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(rank))

    def losses():
        h = net[0](x)
        out = net[1](h) if rank == 0 else h
        return {"a": out.pow(2).mean(), "b": (out - 1).pow(2).mean()}
    balancer.step(losses())
    dead_before = balancer.dead_tensors
    balancer.zero_grad()
    with torch.no_grad():  # the ranks' bare steps differ: start the group's steps from one state
        for p in net.parameters():
            dist.broadcast(p, 0)
    balancer.attach(DDP(net))
    for _ in range(2):
        balancer.step(losses())
        balancer.zero_grad()
    return {"dead_before": dead_before, "dead_after": balancer.dead_tensors, "params": params_of(net)}


def _ddp_refusals(rank, world):
    """Set-ups ParetoLoRA cannot make correct raise ValueError and leave DDP's sync as it was."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    net = Net()
    model = DDP(net)
    layer0 = [(n, p) for n, p in net.named_parameters() if n.startswith("layers.0")]
    attempts = {
        "unbalanced": lambda: ParetoLoRA(layer0, make_optimizer(False)).attach(model),
        "sharded": lambda: ParetoLoRA(model, make_optimizer(False), distributed="sharded"),
        "static_graph": lambda: ParetoLoRA(DDP(Net(), static_graph=True), make_optimizer(False)),
    }
    errors = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            errors[name] = None
        except ValueError as exc:
            errors[name] = str(exc)
    return {"errors": errors, "sync_untouched": model.require_backward_grad_sync}


def _accelerate(rank, world):
    from accelerate import Accelerator
    accelerator = Accelerator(cpu=True)
    net = Net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.01)
    model, optimizer = accelerator.prepare(net, optimizer)
    balancer = ParetoLoRA(model, optimizer, policy="pareto_lora", segments="layer")
    traffic = []
    for step in range(STEPS):
        x, t = batch(step)
        xs, ts = x.chunk(world)[rank], t.chunk(world)[rank]

        def one_step():
            with accelerator.accumulate(model):
                balancer.step(objectives(model(xs), ts))
                optimizer.zero_grad()
        traffic.append(collectives(one_step))
    return {"params": params_of(net), "traffic": traffic, "bank_numel": balancer.bank.buffer.numel(),
            "planned": balancer._plan is not None,
            "distributed_type": str(accelerator.distributed_type), "wrapper": type(model).__name__}


def _trainer(rank, world, outdir, accumulation=1, dtype=torch.float64):
    return run_trainer(world, TRAINER_BATCH // world // accumulation,
                       os.path.join(outdir, f"trainer{rank}-{accumulation}-{dtype}"), accumulation, dtype)


def _scenarios(rank, world, backends):
    """One rank's runs (the gloo group is already joined by shared.run_ranks). The Trainer
    reads the torchrun variables, so they are set as torchrun would."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world))
    results = {}
    for policy in POLICIES:
        for fused in (False, True):
            results["ddp", policy, fused] = _ddp(rank, world, policy, fused)
    if world == 2:
        results["armed"] = _armed_reducer(rank, world)
        results["refusals"] = _ddp_refusals(rank, world)
        results["attached_after_steps"] = _attached_after_steps(rank, world)
        if HAVE_ACCELERATE:
            results["accelerate"] = _accelerate(rank, world)
        if HAVE_TRANSFORMERS:
            outdir = tempfile.mkdtemp(prefix=f"trainer{rank}-")
            results["trainer"] = _trainer(rank, world, outdir)
            results["trainer_accumulating"] = _trainer(rank, world, outdir, accumulation=2)
    return results


# ----------------------------------------------------------------------------- the Trainer
def trainer_objectives(model, inputs, outputs):
    """Token sums over a constant count (every row has the same length): the mean of the
    ranks' losses is the loss of the whole batch."""
    from tiny_unified import VOCAB
    logits = outputs.logits[:, :-1]
    labels = inputs["input_ids"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                            reduction="none").view_as(labels)
    valid = inputs["attention_mask"][:, 1:].bool()
    is_image = labels >= VOCAB.image_offset
    count = labels.numel()
    return {"text": (nll * (valid & ~is_image)).sum() / count,
            "image": (nll * (valid & is_image)).sum() / count}


# The Trainer runs compare DDP with one process in float64, per tensor and normwise, against how far
# training moved the tensor: ||θ_ddp − θ_one|| ≤ 1e-6 ||θ_one − θ_0||. Why: in float32 the two runs
# round differently (rank batches of 2 vs one of 4, gloo's sum vs in-process accumulation) and
# AdamW turns that into parameter differences of up to 1e-5 of the displacement (measured on
# 2026-12-04: 5.9e-6 and 1.0e-5; elementwise 9.8e-7, and 6.2e-6 on another CPU), so an elementwise
# float32 tolerance passes or fails with the CPU's GEMM blocking, not with the code. In float64
# what is left is the float32 arithmetic transformers keeps inside Llama (RMSNorm and the attention
# softmax upcast to float32 and back): a few roundings of u32 = 6e-8 per layer, measured 9.3e-8 of
# the displacement; 1e-6 (16 u32) bounds that, while a real mistake (a micro-batch lost, a loss
# scaled by the accumulation or the world size twice) is of the order of the displacement itself.
TRAINER_NORMWISE = 1e-6


def trainer_start_params():
    from tiny_unified import VOCAB, build_lora_model
    model = build_lora_model(VOCAB.size, hidden=16, layers=2, heads=2, rank=2, seed=0).double()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def run_trainer(world, per_device_batch, output_dir, accumulation=1, dtype=torch.float64):
    """BalancedTrainer for STEPS optimizer steps in order (sequential sampler): ranks see
    consecutive slices of each global batch, like one process on the whole batch; with
    ``accumulation`` micro-batches per optimizer step, each rank's slice is split further."""
    import transformers
    from tiny_unified import VOCAB, build_lora_model
    from fused_balance.training.hf import BalancedTrainer

    model = build_lora_model(VOCAB.size, hidden=16, layers=2, heads=2, rank=2, seed=0).to(dtype)
    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=accumulation, learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        train_sampling_strategy="sequential", ddp_backend="gloo" if world > 1 else None)
    trainer = BalancedTrainer(model=model, args=args, train_dataset=DemoRows(STEPS * TRAINER_BATCH),
                              objectives_fn=trainer_objectives, policy="pareto_lora", segments="layer")
    traffic = collectives(trainer.train)
    logged = [{k: v for k, v in e.items() if k.startswith("balance/")}
              for e in trainer.state.log_history if "balance/weight_text" in e]
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "traffic": traffic, "bank_numel": trainer.balancer.bank.buffer.numel(),
            "logged": logged, "weights": [h["weights"] for h in trainer.balancer.history],
            "segments": trainer.balancer.segment_names, "world_size": args.world_size}


# ----------------------------------------------------------------------------- spawning
_RESULTS: dict = {}


def ranks_of(size, tmp_path_factory):
    """Start ``size`` ranks once per module run and load their results."""
    if size not in _RESULTS:
        _RESULTS[size] = run_ranks(_scenarios, size, tmp_path_factory.mktemp(f"ddp{size}"), __name__,
                                   TIMEOUT_S, ())  # the balancers pick their own backend
    return _RESULTS[size]


@pytest.fixture(scope="module")
def ranks2(tmp_path_factory):
    return ranks_of(2, tmp_path_factory)


@pytest.fixture(scope="module")
def ranks4(tmp_path_factory):
    return ranks_of(4, tmp_path_factory)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def check_equal_ranks_and_single(got, want):
    for name, value in want.items():
        for g in got:
            close(g["params"][name], value)
        for g in got[1:]:  # the ranks never diverge: the same bits everywhere
            assert torch.equal(g["params"][name], got[0]["params"][name]), name
    assert any(not torch.equal(want[n], p) for n, p in Net().named_parameters() if n in want)


def check_one_bank_all_reduce_per_step(traffic, bank_numel):
    """Per step: exactly one collective, an all-reduce of the whole [K, N] bank (K·N·esize
    bytes) — DDP's reducer moves nothing."""
    for step in traffic:
        assert step == [("gloo:all_reduce", bank_numel)], step


# ----------------------------------------------------------------------------- checks
@pytest.mark.parametrize("fused", [False, True], ids=["torch-adamw", "fused"])
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("size", [2, 4], ids=["world2", "world4"])
def test_ddp_wrapped_pareto_lora_equals_one_process_on_the_whole_batch(request, size, policy, fused):
    ranks = request.getfixturevalue(f"ranks{size}")
    got = [r["ddp", policy, fused] for r in ranks]
    check_equal_ranks_and_single(got, train_single(policy, fused))
    assert got[0]["segments"] == ["layers.0", "layers.1"]  # per-layer, no "module." prefix
    # K rows of every parameter, each padded to 16 bytes (4 fp32) so rows load 128 bits at a time
    assert got[0]["bank_numel"] == 2 * sum(-(-p.numel() // 4) * 4 for p in Net().parameters())
    for g in got:
        check_one_bank_all_reduce_per_step(g["traffic"], g["bank_numel"])
        assert all(torch.equal(a, b) for a, b in zip(g["weights"], got[0]["weights"]))
        assert g["planned"]  # data parallel takes the planned step (O(1) host work) too


def test_ddp_state_loads_into_the_unwrapped_model(ranks2):
    state = ranks2[0]["ddp", "pareto_lora", False]["state"]
    assert state["settings"]["param_names"] == [n for n, _ in Net().named_parameters()]
    balancer = ParetoLoRA(Net(), make_optimizer(False))
    balancer.load_state_dict(state)
    assert balancer.step_count == STEPS


def test_ddp_reducer_armed_before_pareto_lora_is_refused_before_any_write(ranks2):
    for r in ranks2:
        assert r["armed"]["error"] is not None and "before the forward" in r["armed"]["error"]
        assert r["armed"]["unchanged"] and r["armed"]["then_took"]


def test_ddp_attached_after_steps_steps_the_same_tensors_on_every_rank(ranks2):
    """What the bare steps left unreached (on one rank only) is live under the group: the live
    mask follows the attach, and the ranks stay equal."""
    runs = [r["attached_after_steps"] for r in ranks2]
    assert runs[0]["dead_before"] == [] and runs[1]["dead_before"] == ["1.weight", "1.bias"]
    assert runs[0]["dead_after"] == [] and runs[1]["dead_after"] == []
    for name, value in runs[0]["params"].items():
        assert torch.equal(value, runs[1]["params"][name]), name


def test_ddp_setups_that_cannot_be_correct_are_refused(ranks2):
    for r in ranks2:
        errors = r["refusals"]["errors"]
        assert "would differ between ranks" in errors["unbalanced"]
        assert "distributed='data'" in errors["sharded"]
        assert "static_graph" in errors["static_graph"]
        assert r["refusals"]["sync_untouched"]


@pytest.mark.skipif(not HAVE_ACCELERATE, reason="accelerate is not installed")
def test_accelerate_prepared_model_equals_one_process(ranks2):
    got = [r["accelerate"] for r in ranks2]
    assert got[0]["wrapper"] == "DistributedDataParallel" and "MULTI_CPU" in got[0]["distributed_type"]
    check_equal_ranks_and_single(got, train_single("pareto_lora", False))
    for g in got:
        check_one_bank_all_reduce_per_step(g["traffic"], g["bank_numel"])


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")
@pytest.mark.parametrize("run", ["trainer", "trainer_accumulating"])
def test_balanced_trainer_under_ddp_equals_one_process(ranks2, tmp_path, run):
    """The Trainer's DDP (2 ranks), with or without gradient accumulation (2 micro-batches per
    optimizer step on each rank), against one process on the whole batch: the same parameters
    and weights, one all-reduce of the bank per optimizer step (not per micro-batch)."""
    got = [r[run] for r in ranks2]
    want = run_trainer(1, TRAINER_BATCH, str(tmp_path))
    assert got[0]["world_size"] == 2 and want["world_size"] == 1
    assert got[0]["segments"] == want["segments"]
    start = trainer_start_params()
    for name, value in want["params"].items():
        moved = (value - start[name]).norm()
        assert moved > 0, name
        for g in got:
            error = (g["params"][name] - value).norm()
            assert error <= TRAINER_NORMWISE * moved, (name, float(error / moved))
        assert torch.equal(got[0]["params"][name], got[1]["params"][name]), name
    for g in got:  # balance statistics are global: every rank logs the same
        assert g["logged"] == got[0]["logged"] and len(g["logged"]) == STEPS
        for w_got, w_want in zip(g["weights"], want["weights"]):
            close(w_got, w_want)
        bank_reduces = [t for t in g["traffic"] if t == ("gloo:all_reduce", g["bank_numel"])]
        assert len(bank_reduces) == STEPS
        # the other all-reduces are the Trainer's loss bookkeeping (scalars), no gradient;
        # (broadcasts: DDP's one-time parameter sync when the Trainer wraps the model)
        others = [n for name, n in g["traffic"] if name == "gloo:all_reduce" and n != g["bank_numel"]]
        assert sum(others) <= 4 * STEPS, others
