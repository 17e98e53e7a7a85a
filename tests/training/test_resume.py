"""Exact resume across processes (CPU): N steps uninterrupted == t steps, checkpoint.save,
a NEW Python process that builds the same objects, checkpoint.load, and steps t..N.

The runs draw their data from the global random generators (torch, Python's ``random``,
NumPy), so the checkpoint must carry them too. Two set-ups on a tiny PEFT Llama:
ParetoLoRA + torch AdamW (one param group per component) + BalanceScheduler, saving the
whole model; and the fused BalancedAdamW path (cpp backend when available), saving only the
trainable (LoRA) tensors. A control continues without restoring the random generators and
must NOT match (the data would differ): the comparison is sensitive.

This file is also the continuing process: ``python tests/training/test_resume.py CKPT_DIR OUT``.
"""
from __future__ import annotations

import os
import random
import sys
import warnings

import numpy
import pytest
import torch

from shared import run_process

warnings.filterwarnings("ignore", category=FutureWarning)

N_STEPS, T_SAVE = 6, 3
SCENARIOS = ("torch-adamw+scheduler", "fused")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build(scenario):
    import fused_balance as fb
    from tiny_unified import VOCAB, build_lora_model
    from fused_balance.training import BalanceScheduler, ParetoLoRA, lora_parameters

    backend = "cpp" if "cpp" in fb.available_backends("cpu") else "torch"
    model = build_lora_model(VOCAB.size, hidden=32, layers=2, heads=2, rank=4, seed=0)
    named = lora_parameters(model)
    if scenario == "fused":
        balancer = ParetoLoRA(named, "fused_adamw", lr=5e-3, weight_decay=0.01, backend=backend)
        return model, balancer, None
    comps = {"encoder": [p for n, p in named if "layers.0." in n or "embed_tokens" in n],
             "llm": [p for n, p in named if "layers.1." in n or "lm_head" in n]}
    opt = torch.optim.AdamW(BalanceScheduler.param_groups(comps, lr=5e-3, encoder={"lr": 1e-3}),
                            weight_decay=0.01)
    balancer = ParetoLoRA(named, opt, backend=backend)
    return model, balancer, BalanceScheduler(opt, comps, backend=backend)


def train(model, balancer, scheduler, steps):
    """Every step draws its batch and loss weighting from the GLOBAL generators."""
    from tiny_unified import make_batch, modality_losses

    for _ in steps:
        seed = int(torch.randint(0, 2 ** 31 - 1, ()))
        text_weight = 0.5 + random.random() + float(numpy.random.rand())
        losses, _ = modality_losses(model, make_batch(4, torch.Generator().manual_seed(seed)),
                                    text_weight=text_weight)
        balancer.step(losses)
        if scheduler is not None:
            scheduler.step()
        balancer.zero_grad()


def outcome(model, balancer, scheduler) -> dict:
    opt = balancer.optimizer
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad},
            "moments": [{k: v.clone() for k, v in opt.state[p].items()} for p in balancer.params],
            "weights": [h["weights"] for h in balancer.history],
            "step": balancer.step_count, "lrs": [g["lr"] for g in opt.param_groups],
            "multipliers": None if scheduler is None else scheduler.multipliers}


def seed_all():
    torch.manual_seed(11)
    random.seed(12)
    numpy.random.seed(13)


def checkpoint_path(folder, scenario):
    return os.path.join(folder, f"{scenario}.pt")


# ----------------------------------------------------------------------------- the new process
def continue_runs(folder, out):
    """Build fresh objects, load each scenario's checkpoint and step to N_STEPS."""
    from fused_balance.training import checkpoint

    torch.set_num_threads(1)
    results = {}
    for scenario in SCENARIOS:
        for restore_rng in (True, False):
            if not restore_rng and scenario != "fused":
                continue
            model, balancer, scheduler = build(scenario)
            seed_all()  # the control starts from some other generator state
            extra = checkpoint.load(checkpoint_path(folder, scenario), model=model, pareto=balancer,
                                    scheduler=scheduler, rng=restore_rng)
            assert extra == {"next_step": T_SAVE} and balancer.step_count == T_SAVE
            train(model, balancer, scheduler, range(T_SAVE, N_STEPS))
            results[scenario, restore_rng] = outcome(model, balancer, scheduler)
    torch.save(results, out)


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    continue_runs(*sys.argv[1:3])
    sys.exit(0)


# ----------------------------------------------------------------------------- the test
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from fused_balance.training import checkpoint

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same as the continuing process
    folder = tmp_path_factory.mktemp("resume")
    try:
        uninterrupted = {}
        for scenario in SCENARIOS:
            model, balancer, scheduler = build(scenario)
            seed_all()
            train(model, balancer, scheduler, range(N_STEPS))
            uninterrupted[scenario] = outcome(model, balancer, scheduler)

            model, balancer, scheduler = build(scenario)
            seed_all()
            train(model, balancer, scheduler, range(T_SAVE))
            checkpoint.save(checkpoint_path(folder, scenario), model=model, pareto=balancer,
                            scheduler=scheduler, extra={"next_step": T_SAVE},
                            model_state="trainable" if scenario == "fused" else "full")
    finally:
        torch.set_num_threads(threads)
    out = folder / "continued.pt"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, "tests"),
                                                   os.environ.get("PYTHONPATH", "")]))
    proc = run_process([sys.executable, os.path.abspath(__file__), str(folder), str(out)],
                       "the resumed training in a new process", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return uninterrupted, torch.load(out, weights_only=False), folder


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_resume_in_a_new_process_is_bitwise(runs, scenario):
    uninterrupted, continued, _ = runs
    want, got = uninterrupted[scenario], continued[scenario, True]
    assert got["step"] == want["step"] == N_STEPS
    assert want["params"].keys() == got["params"].keys()
    for name, value in want["params"].items():
        assert torch.equal(value, got["params"][name]), name
    for m_want, m_got in zip(want["moments"], got["moments"]):
        assert all(torch.equal(m_want[k], m_got[k]) for k in m_want)
    assert len(got["weights"]) == N_STEPS  # the history came along
    assert all(torch.equal(a, b) for a, b in zip(want["weights"], got["weights"]))
    assert got["lrs"] == want["lrs"] and got["multipliers"] == want["multipliers"]


def test_without_the_random_generators_the_run_differs(runs):
    uninterrupted, continued, _ = runs
    want, got = uninterrupted["fused"], continued["fused", False]
    assert any(not torch.equal(v, got["params"][n]) for n, v in want["params"].items())


def test_trainable_only_checkpoint_is_small_and_loads_strictly(runs):
    from fused_balance.training import checkpoint

    _, _, folder = runs
    fused = checkpoint.read(checkpoint_path(folder, "fused"))
    full = checkpoint.read(checkpoint_path(folder, "torch-adamw+scheduler"))
    assert set(fused["model"]) < set(full["model"])
    assert all("lora_" in k or "modules_to_save" in k for k in fused["model"])
    model, balancer, scheduler = build("torch-adamw+scheduler")
    with pytest.raises(ValueError, match="holds no"):  # a scheduler the checkpoint lacks
        checkpoint.load(checkpoint_path(folder, "fused"), model=model, scheduler=scheduler)
    with pytest.raises(ValueError, match="fused"):  # another set-up: nothing loaded
        checkpoint.load(checkpoint_path(folder, "fused"), model=model, pareto=balancer)
    assert balancer.step_count == 0 and len(balancer.history) == 0
