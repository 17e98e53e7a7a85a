"""Helpers shared by the test modules (plain functions; the fixtures live in conftest.py).

- ``random_grads``: the one generator of per-objective gradients for the op tests.
- ``TOLERANCE``: the one (rtol, atol) table for comparing an op with a float64 reference.
- ``backend_device_pairs``: every (backend, device) this machine can run, for the
  ``backend_device`` fixture of conftest.py (the conformance suite's parametrisation).
- ``run_ranks``: starts a gloo process group of real processes for the distributed tests.
- ``run_process``: subprocess.run with room for a cold extension build, naming what it waited
  for when it runs out of time.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# (rtol, atol) per input dtype, on values of order one, against a float64 reference computed
# from the same (already rounded) inputs.
# - "gram": accumulated in fp32 (fp64 for fp64 inputs) whatever the input dtype, so only the
#   summation order differs; scale atol by sqrt(G_kk G_ll) for entries that are long sums.
# - "output": combine / AdamW results rounded to the input dtype: about one ulp of that dtype.
TOLERANCE = {
    torch.float64: {"gram": (1e-12, 1e-12), "output": (1e-12, 1e-12)},
    torch.float32: {"gram": (2e-5, 1e-5), "output": (1e-5, 1e-6)},
    torch.bfloat16: {"gram": (2e-5, 1e-5), "output": (1e-2, 1e-2)},
    torch.float16: {"gram": (2e-5, 1e-5), "output": (2e-3, 2e-3)},
}


# A subprocess that imports fused_balance may compile the C++ extension cold (~100 s alone on the
# 2-core machine, over 5 minutes beside a full test run, more with the CUDA kernels).
COLD_BUILD_S = 1200


def run_process(args, what, *, timeout=COLD_BUILD_S, **kwargs):
    """``subprocess.run(args, capture_output=True, text=True)``; on a timeout, fails the test
    saying what it waited for (``what``) and what the process had printed."""
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as exc:
        out, err = (s.decode(errors="replace") if isinstance(s, bytes) else (s or "")
                    for s in (exc.stdout, exc.stderr))
        pytest.fail(f"{what} did not finish in {timeout} s; it printed: {out[-2000:]} {err[-3000:]}")


def random_grads(K, shapes, dtype=torch.float32, seed=0, *, noncontiguous=False, scales=None, device="cpu"):
    """K objectives' gradients, one tensor per shape (an int is a 1-D length): ``grads[k][p]``.
    Drawn in float64 and rounded to ``dtype`` (so a float64 reference sees the same values);
    ``scales[k]`` multiplies objective k; non-contiguous tensors are every other element of a
    twice-longer buffer."""
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for k in range(K):
        scale = 1.0 if scales is None else scales[k]
        row = []
        for shape in shapes:
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            if noncontiguous:
                numel = 1
                for d in shape:
                    numel *= d
                t = torch.randn(2 * numel, generator=gen, dtype=torch.float64)[::2].reshape(shape)
            else:
                t = torch.randn(shape, generator=gen, dtype=torch.float64)
            row.append((t * scale).to(dtype).to(device))
        grads.append(row)
    return grads


def backend_device_pairs() -> list[tuple[str, str]]:
    """(backend name, device type) for every backend available on every device type here: the
    CPU backends always (triton under TRITON_INTERPRET=1, set by conftest.py without a GPU),
    the CUDA ones when a GPU is visible."""
    from fused_balance.backends import BACKEND_NAMES, availability

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(name, device) for device in devices for name in BACKEND_NAMES if availability(name, device)[0]]


# Multi-process tests need gloo (torch builds without distributed have none).
needs_gloo = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank, scenarios, world, port, outdir, backends):
    """One rank: join the gloo group, run ``scenarios(rank, world, backends) -> dict``, save it."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        results = scenarios(rank, world, backends)
        dist.barrier()
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(scenarios, world, outdir, caller_module, timeout_s, backends):
    """Start ``world`` ranks that each run ``scenarios(rank, world, backends)`` (a module-level
    function of ``caller_module``) and return a dict of results; wait at most ``timeout_s`` (a
    hang fails the test); return each rank's dict."""
    import fused_balance as fb

    # Build/load every backend here first, so the ranks only load cached kernels.
    for backend in backends:
        fb.gram([[torch.ones(2)], [torch.ones(2)]], backend=backend)
    # forkserver: the ranks fork from one server that imported torch and fused_balance once
    # (a fresh interpreter per rank costs seconds each on a loaded 2-core machine); unlike a
    # plain fork, the server never ran an OpenMP region, so forking it is safe.
    start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if start_method == "forkserver":
        mp.get_context("forkserver").set_forkserver_preload(["torch", "fused_balance", caller_module])
    context = mp.start_processes(_rank_entry, args=(scenarios, world, _free_port(), str(outdir), backends),
                                 nprocs=world, join=False, start_method=start_method)
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks did not finish within {timeout_s} s (hang?)")
    finally:
        for process in context.processes:  # only the processes this test started
            if process.is_alive():
                process.kill()
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


class TwoLayerNet(torch.nn.Module):
    """Two linear layers under ``layers.<i>`` (segments="layer" gives one segment per layer),
    the same initial weights in every process (seeded), for the distributed tests."""

    def __init__(self, d_in: int, hidden: int, d_out: int, seed: int = 1234):
        super().__init__()
        torch.manual_seed(seed)
        self.layers = torch.nn.ModuleList([torch.nn.Linear(d_in, hidden), torch.nn.Linear(hidden, d_out)])

    def forward(self, x):
        return self.layers[1](torch.tanh(self.layers[0](x)))


# The two-objective regression the distributed tests train: objective k reads y @ MIX[k].
MIX = torch.tensor([[1.0, 0.5, 0.0], [-0.3, 0.2, 1.0]])
D_IN, HIDDEN, D_OUT = 6, 8, 3
REGRESSION_LR = 1e-2


def regression_net() -> TwoLayerNet:
    return TwoLayerNet(D_IN, HIDDEN, D_OUT)


def regression_optimizer(fused: bool):
    """ParetoLoRA's optimizer argument: the fused AdamW, or torch's with the same settings."""
    return "fused_adamw" if fused else (lambda ps: torch.optim.AdamW(ps, lr=REGRESSION_LR, weight_decay=0.01))


def train_regression(steps: int, batch, *, fused: bool, **balancer_kwargs):
    """One process on the whole batch (the distributed tests' reference): final parameters by
    name and the balancer's history after ``steps`` steps on ``batch(step) -> (x, t)``."""
    from fused_balance.training import ParetoLoRA

    model = regression_net()
    balancer = ParetoLoRA(model, regression_optimizer(fused), lr=REGRESSION_LR, weight_decay=0.01,
                          **balancer_kwargs)
    for step in range(steps):
        x, t = batch(step)
        balancer.step(regression_objectives(model(x), t))
        balancer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, balancer.history


def regression_batch(step: int, batch: int, d_in: int, seed: int):
    """Inputs [batch, d_in] and two targets [batch, 2] of one step, the same in every process."""
    gen = torch.Generator().manual_seed(seed + step)
    return torch.randn(batch, d_in, generator=gen), torch.randn(batch, 2, generator=gen)


def regression_objectives(y, t, scale: float = 1.0) -> dict:
    return {name: scale * ((y @ MIX[k] - t[:, k]) ** 2).mean() for k, name in enumerate(("text", "image"))}


class DemoRows(torch.utils.data.Dataset):
    """``n`` rows of the demo's interleaved text/image data, as a Trainer dataset."""

    def __init__(self, n: int):
        from tiny_unified import make_batch

        rows = make_batch(n, torch.Generator().manual_seed(0), 0.5)
        self.rows = [{"input_ids": rows["input_ids"][i], "attention_mask": rows["attention_mask"][i]}
                     for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def dispatched_fused_balance_ops(fn) -> list[str]:
    """The fused_balance ops ``fn`` dispatches (names like 'bank_gram'), recorded with a
    TorchDispatchMode: how a test sees which engine a step took."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.name()
            if name.startswith("fused_balance::"):
                self.ops.append(name.split("::")[1].split(".")[0])
            return func(*args, **(kwargs or {}))
    with Record() as record:
        fn()
    return record.ops
