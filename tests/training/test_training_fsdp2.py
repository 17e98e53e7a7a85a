"""ParetoLoRA on FSDP2 (``fully_shard``) models, real processes (gloo on 127.0.0.1, 2 and 4
ranks, as the other distributed tests): no extra argument, a torch optimizer or the fused AdamW
(and BalancedAdamW alone as a plain optimizer), and BalancedTrainer's loop. Each rank trains on
its own micro-batch; FSDP reduce-scatters each objective's gradient (averaged over the ranks), the
bank holds the local shards, the plan sums the Gram partials over the shard group in one
all-reduce. After 5 steps the gathered parameters equal one process trained on the whole batch
(fp32 rounding: the sums over ranks and shards are ordered differently, 1e-5 relative), and the
communication per step is FSDP's own plus exactly one all-reduce of S·K·K + 1 float64."""
from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from fused_balance.training import BalancedAdamW, ParetoLoRA
from shared import (D_IN, REGRESSION_LR, dispatched_fused_balance_ops, needs_gloo, regression_batch,
                    regression_net, regression_objectives, regression_optimizer, run_ranks)

STEPS = 5
BATCH = 8  # the global batch, split over the ranks
TIMEOUT_S = 180
pytestmark = needs_gloo

def batch(step):
    return regression_batch(step, BATCH, D_IN, seed=300)


def _count_collectives(fn):
    """Run ``fn`` recording the collectives it dispatches (c10d ops, whoever calls them: FSDP
    and the balancer): (op name, dtype, numel of the first tensor argument)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            namespace, _, name = func.name().partition("::")
            if namespace in ("c10d", "_c10d_functional"):
                tensors = [a for a in args if isinstance(a, torch.Tensor)] or \
                          [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
                first = tensors[0] if tensors else None
                self.calls.append((name.split(".")[0], str(first.dtype) if first is not None else "",
                                   first.numel() if first is not None else 0))
            return func(*args, **(kwargs or {}))
    with Record() as record:
        fn()
    return record.calls


def _shard(model, mesh=None):
    """``model`` with each of its layers an FSDP2 group and the root another (in place)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _fsdp2_regression(rank, world, hsdp=False, fused=False):
    """``hsdp``: a (replicate, shard) = (2, world / 2) mesh: FSDP all-reduces over the replicas,
    the balancer sums the Gram partials over the shard dimension only. ``fused``: the fused
    AdamW steps the local shards (its moments are DTensors over flat buffers, as torch's AdamW's
    are DTensors)."""
    mesh = None
    if hsdp:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
    model = _shard(regression_net(), mesh)
    balancer = ParetoLoRA(model, regression_optimizer(fused), lr=REGRESSION_LR, weight_decay=0.01)
    traffic, ops = [], []
    for step in range(STEPS):
        x, t = batch(step)
        xs, ts = x.chunk(world)[rank], t.chunk(world)[rank]

        def one_step():
            ops.extend(dispatched_fused_balance_ops(lambda: balancer.step(regression_objectives(model(xs), ts))))
        traffic.append(_count_collectives(one_step))
        balancer.zero_grad()
    params = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    return {"params": params, "traffic": traffic, "ops": ops, "segments": balancer.num_segments,
            "weights": [h["weights"] for h in balancer.history], "moments": _moments(model, balancer.optimizer)}


def _moments(model, optimizer):
    """Each parameter's AdamW moments by name, gathered when they are DTensors; and whether they
    were DTensors laid out like their parameter."""
    out = {}
    for name, p in model.named_parameters():
        state = optimizer.state[p]
        like = [type(state[m]) is type(p) and getattr(state[m], "placements", None) == getattr(p, "placements", None)
                for m in ("exp_avg", "exp_avg_sq")]
        out[name] = ([(state[m].full_tensor() if hasattr(state[m], "full_tensor") else state[m]).detach().clone()
                      for m in ("exp_avg", "exp_avg_sq")], all(like))
    return out


def _fsdp2_fused_resumed(rank, world):
    """The fused scenario interrupted after 2 steps: the balancer's state (its DTensor moments
    included) and the model's go through torch.save / torch.load into a new sharded model and
    ParetoLoRA, which trains the last 3 steps."""
    import io

    def build():
        model = _shard(regression_net())
        return model, ParetoLoRA(model, "fused_adamw", lr=REGRESSION_LR, weight_decay=0.01)

    def train(model, balancer, steps):
        for step in steps:
            x, t = batch(step)
            balancer.step(regression_objectives(model(x.chunk(world)[rank]), t.chunk(world)[rank]))
            balancer.zero_grad()
    model, balancer = build()
    train(model, balancer, range(2))
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "balancer": balancer.state_dict()}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=False)
    model, balancer = build()
    model.load_state_dict(state["model"])
    balancer.load_state_dict(state["balancer"])
    train(model, balancer, range(2, STEPS))
    return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}


def _fsdp2_plain_balanced_adamw(rank, world):
    """BalancedAdamW as a drop-in optimizer (``step()`` on ``.grad``) of an FSDP2 model."""
    return _plain_balanced_adamw(_shard(regression_net()), lambda x: x.chunk(world)[rank])


def _plain_balanced_adamw(model, rows_of):
    optimizer = BalancedAdamW(model.parameters(), lr=REGRESSION_LR, weight_decay=0.01)
    for step in range(STEPS):
        x, t = batch(step)
        sum(regression_objectives(model(rows_of(x)), rows_of(t)).values()).backward()
        optimizer.step()
        optimizer.zero_grad()
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # noqa: E731
    return {n: full(p).detach().clone() for n, p in model.named_parameters()}


def _accumulating(model, balancer, rows_of, steps=4, nan_step=2):
    """Two micro-batches per step; in step ``nan_step`` the second one's text loss is NaN on the
    last rank (or everywhere when ``rows_of`` takes the whole batch): every rank skips it.
    Returns the parameters (full) and what each step returned."""
    took = []
    for step in range(steps):
        for micro in range(2):
            x, t = batch(10 * step + micro)
            losses = regression_objectives(model(rows_of(x)), rows_of(t))
            if step == nan_step and micro == 1 and rows_of.poisoned:
                losses["text"] = losses["text"] * float("nan")
            balancer.accumulate(losses)
        took.append(balancer.step())
        balancer.zero_grad()
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # noqa: E731
    return {n: full(p).detach().clone() for n, p in model.named_parameters()}, took


def _fsdp2_accumulating(rank, world):
    model = _shard(regression_net())
    balancer = ParetoLoRA(model, torch.optim.AdamW(model.parameters(), lr=REGRESSION_LR, weight_decay=0.01))

    def rows_of(x):
        return x.chunk(world)[rank]
    rows_of.poisoned = rank == world - 1
    params, took = _accumulating(model, balancer, rows_of)
    return {"params": params, "took": took, "skipped": balancer.skipped_steps}


LLAVA_ROWS = 2  # per rank


def _llava_batch(step, rows):
    import real_models
    return real_models.llava_batch(torch.Generator().manual_seed(500 + step), rows)


def _train_llava(model, rows_of, steps=STEPS):
    """A tiny LLaVA with LoRA (PEFT) trained by ParetoLoRA with torch's AdamW; ``rows_of(batch)``
    picks this process's rows. Returns the LoRA tensors gathered, by name."""
    import real_models

    params = [p for p in model.parameters() if p.requires_grad]
    balancer = ParetoLoRA(model, torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0))
    for step in range(steps):
        balancer.step(real_models.understanding_losses(model, rows_of(_llava_batch(step, LLAVA_ROWS * rows_of.world))))
        balancer.zero_grad()
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # noqa: E731
    return {n: full(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _fsdp2_llava(rank, world):
    """LLaVA's decoder and vision layers each one FSDP group, the root another."""
    import real_models
    from torch.distributed.fsdp import fully_shard

    model = real_models.lora_model(next(f for f in real_models.FAMILIES if f.name == "llava"))
    base = real_models.inner(model).model
    for layer in [*base.language_model.layers, *base.vision_tower.encoder.layers]:
        fully_shard(layer)
    fully_shard(model)

    def rows_of(batch):
        return {k: v.chunk(world)[rank] for k, v in batch.items()}
    rows_of.world = world
    return _train_llava(model, rows_of)


class _RegressionRows(torch.utils.data.Dataset):
    """The rows ``rows_of`` picks of each step's batch, in step order, as a Trainer dataset."""

    def __init__(self, rows_of):
        self.rows = []
        for step in range(STEPS):
            x, t = (rows_of(a) for a in batch(step))
            self.rows += [{"x": xi, "t": ti} for xi, ti in zip(x, t)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _trainer(model, rows_of, rows_per_step, output_dir, shard=None):
    """BalancedTrainer on the regression (sequential batches, torch AdamW, constant LR, no
    clipping or weight decay); ``shard(model)`` runs after the trainer was built, as accelerate's
    FSDP2 preparation does when training starts. Returns the parameters, gathered, by name."""
    import transformers
    from fused_balance.training.hf import BalancedTrainer

    class Forward(torch.nn.Module):  # forward(**inputs), as the Trainer calls it
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x, t=None):
            return self.net(x)

    args = transformers.TrainingArguments(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=rows_per_step,
        learning_rate=REGRESSION_LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
        optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, train_sampling_strategy="sequential", remove_unused_columns=False)
    wrapped = Forward(model)
    trainer = BalancedTrainer(model=wrapped, args=args, train_dataset=_RegressionRows(rows_of),
                              objectives_fn=lambda m, inputs, y: regression_objectives(y, inputs["t"]),
                              segments="layer")
    if shard is not None:
        shard(model)
    trainer.train()
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # noqa: E731
    return {"params": {n: full(p).detach().clone() for n, p in model.named_parameters()},
            "sharded": trainer.balancer.process_group is not None, "steps": trainer.balancer.step_count}


def _fsdp2_trainer(rank, world):
    import tempfile

    return _trainer(regression_net(), lambda a: a.chunk(world)[rank], BATCH // world,
                    tempfile.mkdtemp(prefix=f"fsdp2-trainer{rank}-"), _shard)


def _scenarios(rank, world, backends):
    results = {"regression": _fsdp2_regression(rank, world), "llava": _fsdp2_llava(rank, world),
               "accumulating": _fsdp2_accumulating(rank, world)}
    results["fused"] = _fsdp2_regression(rank, world, fused=True)
    results["fused_resumed"] = _fsdp2_fused_resumed(rank, world)
    results["plain_balanced_adamw"] = _fsdp2_plain_balanced_adamw(rank, world)
    results["trainer"] = _fsdp2_trainer(rank, world)
    if world == 4:
        results["hsdp"] = _fsdp2_regression(rank, world, hsdp=True)
    return results


_RESULTS: dict = {}


def _ranks(world, tmp_path_factory):
    if world not in _RESULTS:
        outdir = tmp_path_factory.mktemp(f"fsdp2_{world}")
        started = time.monotonic()
        _RESULTS[world] = run_ranks(_scenarios, world, outdir, __name__, TIMEOUT_S, ["cpp"])
        _RESULTS[world, "seconds"] = time.monotonic() - started
    return _RESULTS[world]


def _one_process(fused):
    """ParetoLoRA on the whole batch in one process: parameters, history, moments by name."""
    model = regression_net()
    balancer = ParetoLoRA(model, regression_optimizer(fused), lr=REGRESSION_LR, weight_decay=0.01)
    for step in range(STEPS):
        x, t = batch(step)
        balancer.step(regression_objectives(model(x), t))
        balancer.zero_grad()
    return ({n: p.detach().clone() for n, p in model.named_parameters()}, balancer.history,
            _moments(model, balancer.optimizer))


@pytest.mark.parametrize("world, layout", [(2, "regression"), (4, "regression"), (4, "hsdp"), (2, "fused"),
                                           (4, "fused")],
                         ids=["2-ranks", "4-ranks", "hsdp-2x2", "fused-adamw-2-ranks", "fused-adamw-4-ranks"])
def test_fsdp2_pareto_lora_equals_one_process_on_the_whole_batch(world, layout, tmp_path_factory):
    ranks = _ranks(world, tmp_path_factory)
    fused = layout == "fused"
    want, history, moments = _one_process(fused)
    for r in ranks:
        got = r[layout]
        moved = False
        for name, value in want.items():
            torch.testing.assert_close(got["params"][name], value, rtol=1e-5, atol=1e-6)
            moved |= not torch.equal(value, dict(regression_net().named_parameters())[name])
        assert moved
        for w_got, h in zip(got["weights"], history):
            torch.testing.assert_close(w_got, h["weights"], rtol=1e-5, atol=1e-6)
        for name, (pair, like_param) in got["moments"].items():  # the optimizer state, gathered
            assert like_param, name  # DTensors with the parameter's placements (what DCP saves)
            for m_got, m_want in zip(pair, moments[name][0]):
                torch.testing.assert_close(m_got, m_want, rtol=1e-5, atol=1e-7)
        # the plan's ops only, and one collective of ours per step: the Gram partials and the flag
        writer = "bank_adamw_" if fused else "bank_combine_into"
        assert set(got["ops"]) == {"bank_gram", writer, "policy_weights"}, got["ops"]
        S = got["segments"]
        for calls in got["traffic"]:
            ours = [c for c in calls if c[1] == "torch.float64"]
            assert ours == [("allreduce_", "torch.float64", S * 2 * 2 + 1)], calls
            # FSDP's own: gradients reduce-scattered once per objective and FSDP group (2 layers)
            assert sum(1 for c in calls if "reduce_scatter" in c[0]) == 2 * 2, calls
    for name in want:  # every rank holds the same full parameters
        assert all(torch.equal(r[layout]["params"][name], ranks[0][layout]["params"][name]) for r in ranks)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_fused_adamw_resumes_from_a_saved_state_as_if_never_stopped(world, tmp_path_factory):
    """torch.save of the balancer's state (the fused AdamW's DTensor moments are views of flat
    buffers, which torch cannot pickle as they are: the state holds copies) and a resume on a
    new sharded model give the uninterrupted run's parameters, bitwise."""
    for r in _ranks(world, tmp_path_factory):
        for name, value in r["fused"]["params"].items():
            assert torch.equal(r["fused_resumed"][name], value), name


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_balanced_adamw_as_a_plain_optimizer_equals_one_process(world, tmp_path_factory):
    """BalancedAdamW.step() on the DTensor ``.grad`` FSDP2 reduce-scatters (no ParetoLoRA)."""
    ranks = _ranks(world, tmp_path_factory)
    start = dict(regression_net().named_parameters())
    want = _plain_balanced_adamw(regression_net(), lambda x: x)
    assert any(not torch.equal(want[n], start[n]) for n in want)
    for r in ranks:
        for name, value in want.items():
            torch.testing.assert_close(r["plain_balanced_adamw"][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [2, 4])
def test_balanced_trainer_on_a_model_sharded_when_training_starts_equals_one_process(world, tmp_path_factory,
                                                                                        tmp_path):
    """The Trainer's own loop over a model fully_shard-ed after BalancedTrainer was built (what
    accelerate's FSDP2 preparation does on GPUs; on a CPU accelerate runs no FSDP, so each rank's
    Trainer is a one-process Trainer over its rows and FSDP2 does the cross-rank work): the
    balancer is rebuilt over the sharded parameters and the ranks equal one process."""
    ranks = _ranks(world, tmp_path_factory)
    start = dict(regression_net().named_parameters())
    want = _trainer(regression_net(), lambda a: a, BATCH, str(tmp_path))
    assert any(not torch.equal(want["params"][n], start[n]) for n in start) and not want["sharded"]
    for r in ranks:
        got = r["trainer"]
        assert got["sharded"] and got["steps"] == STEPS == want["steps"]
        for name, value in want["params"].items():
            torch.testing.assert_close(got["params"][name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_llava_with_peft_lora_equals_one_process(world, tmp_path_factory):
    import real_models

    ranks = _ranks(world, tmp_path_factory)
    model = real_models.lora_model(next(f for f in real_models.FAMILIES if f.name == "llava"))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def whole(batch):
        return batch
    whole.world = world
    want = _train_llava(model, whole)
    assert any(not torch.equal(want[n], before[n]) for n in want)
    for r in ranks:
        got = r["llava"]
        assert got.keys() == want.keys() and len(want) > 10
        for name, value in want.items():
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_accumulation_and_a_nan_on_one_rank_equal_one_process(world, tmp_path_factory):
    """Two accumulated micro-batches per step; a NaN loss on one rank makes every rank skip that
    step (found_inf travels with the Gram partials); the rest equals one process."""
    ranks = _ranks(world, tmp_path_factory)
    model = regression_net()
    balancer = ParetoLoRA(model, torch.optim.AdamW(model.parameters(), lr=REGRESSION_LR, weight_decay=0.01))

    def whole(x):
        return x
    whole.poisoned = True
    with pytest.warns(RuntimeWarning, match="skipped"):
        want, took = _accumulating(model, balancer, whole)
    assert took == [True, True, False, True]
    for r in ranks:
        got = r["accumulating"]
        assert got["took"] == took and got["skipped"] == 1
        for name, value in want.items():
            torch.testing.assert_close(got["params"][name], value, rtol=1e-5, atol=1e-6)


def test_deepspeed_is_refused_naming_the_fsdp2_route():
    zero3 = torch.nn.Parameter(torch.zeros(3))
    zero3.ds_id = 0  # what DeepSpeed ZeRO-3 puts on the parameters it partitions
    with pytest.raises(NotImplementedError, match="DeepSpeed ZeRO.*fully_shard"):
        ParetoLoRA([("w", zero3)], torch.optim.AdamW([zero3]))

    class DeepSpeedEngine(torch.nn.Module):  # the engine deepspeed.initialize returns
        def __init__(self):
            super().__init__()
            self.module = torch.nn.Linear(2, 2)
    with pytest.raises(NotImplementedError, match="DeepSpeed is not driven.*fully_shard"):
        ParetoLoRA(DeepSpeedEngine(), torch.optim.AdamW(DeepSpeedEngine().parameters()))
