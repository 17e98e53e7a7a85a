"""Soak: many balanced steps on a small problem must hold up.

- 10,000 ParetoLoRA steps with the cpp backend, interleaved between the two paths (5,000 each:
  pareto_combine into ``.grad`` + torch AdamW, and pareto_weights + the fused BalancedAdamW):
  the resident set size (``/proc/self/statm``) after a warm-up and at the end differ by less
  than RSS_BOUND_MIB, and the history stays at its ``history_limit`` (an unbounded history grows
  by ~3.5 KB per step here, ~30 MiB over this soak, which the bound would catch).
- Pointer tables cannot go stale: ``.grad`` is freed every step (zero_grad(set_to_none=True),
  so the combine path writes into new tensors each time) and every CHECK_EVERY steps the
  gradient bank is reallocated at a NEW address (the old one is kept alive until then); the
  steps right after a reallocation are checked against the torch reference backend.
- The same, 200 steps, with the triton backend under TRITON_INTERPRET (where the kernels read
  real addresses from the tables), plus: its table cache stays bounded.
"""
from __future__ import annotations

import gc
import os
import time

import pytest
import torch

import fused_balance as fb
from fused_balance.backends import bank_backends
from fused_balance.training import ParetoLoRA

RSS_BOUND_MIB = 4.0
BACKENDS = bank_backends("cpu")  # ParetoLoRA runs a BalancePlan: the backends with bank ops


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        resident_pages = int(f.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class Net(torch.nn.Module):
    """Four tensors in two layers (two segments), two objectives."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)])

    def losses(self, x, t):
        y = self.layers[1](torch.tanh(self.layers[0](x)))
        return {"a": ((y[:, :2] - t) ** 2).mean(), "b": ((y[:, 2:] + 0.5 * t) ** 2).mean()}


def make_balancers(backend, history_limit):
    out = {}
    for fused in (False, True):
        model = Net()
        opt = "fused_adamw" if fused else (lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.01))
        out[fused] = (model, ParetoLoRA(model, opt, backend=backend, lr=1e-3, weight_decay=0.01,
                                        history_limit=history_limit))
    return out


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def checked_step(model, balancer, x, t, fused):
    """One step whose result is recomputed with the torch reference backend from the bank."""
    if fused:
        opt = balancer.optimizer
        before = [(p.detach().clone(), opt.state[p]["exp_avg"].clone(), opt.state[p]["exp_avg_sq"].clone(),
                   int(opt.state[p]["step"])) for p in balancer.params]
    assert balancer.step(model.losses(x, t))
    grads = balancer.bank.grads
    ref = fb.pareto_combine(grads, balancer.segment_ids, policy=balancer.policy, tau=balancer.tau,
                            backend="torch")
    close(balancer.history[-1]["weights"], ref.weights)
    if not fused:  # .grad holds this step's combination
        for p, want in zip(balancer.params, ref.combined):
            close(p.grad, want)
        return
    params, m, v, steps = (list(z) for z in zip(*before))
    group = balancer.optimizer.param_groups[0]
    fb.balanced_adamw_step(grads, ref.weights, balancer.segment_ids, params, m, v, lrs=group["lr"],
                           weight_decays=group["weight_decay"], beta1=group["betas"][0],
                           beta2=group["betas"][1], eps=group["eps"], step=steps[0] + 1, backend="torch")
    for p, want in zip(balancer.params, params):
        close(p.detach(), want)


def soak(backend, steps, check_every, warmup, history_limit):
    """Interleave the two paths for ``steps`` steps; returns figures for the report."""
    balancers = make_balancers(backend, history_limit)
    gen = torch.Generator().manual_seed(0)
    reallocations = 0
    rss_start = started = None
    for i in range(steps):
        if i == warmup:
            gc.collect()
            rss_start, started = rss_mib(), time.perf_counter()
        fused = bool(i % 2)
        model, balancer = balancers[fused]
        x, t = torch.randn(16, 8, generator=gen), torch.randn(16, 2, generator=gen)
        if i >= 2 and i % check_every in (0, 1):
            old = balancer.bank
            balancer.free_buffers()  # the next step allocates a new bank ...
            checked_step(model, balancer, x, t, fused)
            # ... at a new address, since the old one is still alive
            assert balancer.bank.buffer.data_ptr() != old.buffer.data_ptr()
            del old
            reallocations += 1
        else:
            assert balancer.step(model.losses(x, t))
        balancer.zero_grad(set_to_none=True)  # the combine path gets new .grad tensors every step
    gc.collect()
    rss_end, seconds = rss_mib(), time.perf_counter() - started
    for fused, (model, balancer) in balancers.items():
        history = balancer.history
        assert len(history) == history_limit
        assert history[-1]["step"] == balancer.step_count - 1 == steps // 2 - 1
        assert history[0]["step"] == balancer.step_count - history_limit
        assert balancer.skipped_steps == 0
        assert all(torch.isfinite(p).all() for p in balancer.params)
    return {"rss_start_mib": rss_start, "rss_end_mib": rss_end, "seconds": seconds,
            "ms_per_step": 1e3 * seconds / (steps - warmup), "reallocations_checked": reallocations}


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the cpp backend is not available")
def test_soak_10000_steps_cpp():
    figures = soak("cpp", steps=10_000, check_every=1000, warmup=500, history_limit=256)
    print(f"\ncpp soak: {figures}")
    assert figures["rss_end_mib"] - figures["rss_start_mib"] < RSS_BOUND_MIB, figures


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not available (TRITON_INTERPRET) or has no bank ops yet")
def test_soak_200_steps_triton():
    from fused_balance.kernels import pointer_table

    figures = soak("triton", steps=200, check_every=20, warmup=20, history_limit=32)
    print(f"\ntriton soak: {figures}, tables cached: {len(pointer_table.POINTER_TABLES)}")
    # the cache of device tables is an LRU: reallocated gradients do not pile up tables
    assert len(pointer_table.POINTER_TABLES) <= pointer_table.CACHE_ENTRIES
    assert figures["rss_end_mib"] - figures["rss_start_mib"] < RSS_BOUND_MIB, figures
