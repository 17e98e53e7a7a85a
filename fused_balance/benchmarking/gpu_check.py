"""``fused-balance gpu-check`` (``make gpu-check``): the first command to run on a GPU.

In a few minutes it checks what the CPU cannot: every cpp (CUDA) and Triton op and the plan
against a float64 reference on the LoRA tensors of a 7B model (448 tensors, 40 M elements; K = 2
and 9; fp32 and bf16; the list ops also on tensors at odd element offsets), a planned step under
``torch.cuda.set_sync_debug_mode("error")`` (no hidden host synchronisation), a CUDA graph of a
planned step replayed with new gradients, a changed learning rate and a NaN step against an
eager twin, a bank row of more than 2^31 elements, and the throughput of Gram / combine / fused
AdamW (list and bank, cpp and Triton) in GB/s against a device-to-device copy timed in the same
run. It prints one table and exits non-zero if a check failed.

``--device cpu --quick`` runs the same checks on small shapes on the CPU (the CUDA-only ones
are reported as such): ``make test`` runs that part, so the command cannot rot.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field

import torch

import fused_balance as fb
from fused_balance.benchmarking.problems import decoder_lora_problem, get_problem
from fused_balance.benchmarking.roofline import stage_bytes
from fused_balance.benchmarking.timing import median, time_call

__all__ = ["run", "main", "add_arguments"]

# Relative error allowed against the float64 reference: fp32 results (sums of up to 40 M terms
# in other orders, products rounded once) and bf16 outputs (rounded once to 8 mantissa bits).
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
BIG_ROW = 2 ** 31 + 4096  # elements: offsets past int32


@dataclass
class Report:
    checks: list = field(default_factory=list)   # (name, ok or None for "not here", detail)
    timings: list = field(default_factory=list)  # (name, seconds, bytes, GB/s, % of copy)

    def check(self, name: str, ok: bool | None, detail: str = "") -> None:
        self.checks.append((name, ok, detail))

    @property
    def failed(self) -> list:
        return [c for c in self.checks if c[1] is False]

    def table(self) -> str:
        lines = [f"{'check':62} result  detail"]
        for name, ok, detail in self.checks:
            lines.append(f"{name:62} {'ok' if ok else 'FAIL' if ok is False else 'n/a':7} {detail}")
        if self.timings:
            lines += ["", f"{'throughput':40} {'ms':>9} {'GB':>8} {'GB/s':>9} {'of copy':>8}"]
            for name, seconds, nbytes, gbps, share in self.timings:
                lines.append(f"{name:40} {seconds * 1e3:9.3f} {nbytes / 1e9:8.3f} {gbps:9.1f} "
                             f"{'' if share is None else f'{share:7.0%}'}")
        return "\n".join(lines)


def _problem(quick: bool):
    if quick:
        return decoder_lora_problem("quick", "2-layer decoder, hidden 64, intermediate 172, r=4", 2, 64, 172, 4)
    return get_problem("llama2-7b")


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max().clamp_min(1e-300)
    return float((got - want).abs().max() / scale)


def _bank(problem, K: int, dtype, device, seed: int = 0):
    """A GradBank over fresh LoRA-shaped parameters, its [K, N] buffer filled with conflicting
    gradients of different scales (the min-norm weights are neither trivial nor degenerate)."""
    from fused_balance.training import GradBank
    gen = torch.Generator(device=device).manual_seed(seed)
    params = [torch.nn.Parameter((0.02 * torch.randn(s, generator=gen, device=device)).to(dtype))
              for s in problem.shapes]
    bank = GradBank(params, K)
    with torch.no_grad():
        shared = torch.randn(bank.numel, generator=gen, device=device)
        for k in range(K):
            row = torch.randn(bank.numel, generator=gen, device=device).add_(shared, alpha=(-1) ** k * 0.7)
            bank.buffer[k].copy_(row.mul_(1e-3 * (1 + 0.5 * k)))
        bank.zero_padding_()
    return params, bank


def _odd_offset_grads(bank, problem):
    """The bank's gradients copied into views that start at odd element offsets of one buffer
    (no 16-byte alignment: the vectorised paths must notice)."""
    K, device, dtype = bank.num_objectives, bank.buffer.device, bank.buffer.dtype
    sizes = [int(torch.Size(s).numel()) for s in problem.shapes]
    buf = torch.empty(K, sum(n + 1 for n in sizes) + 1, device=device, dtype=dtype)
    grads, at = [[] for _ in range(K)], 1
    for p, (n, shape) in enumerate(zip(sizes, problem.shapes)):
        for k in range(K):
            view = buf[k, at:at + n].view(shape)
            view.copy_(bank.grads[k][p])
            grads[k].append(view)
        at += n + 1
    return grads


def _reference_gram(bank, segment_ids, S):
    flat = bank.buffer.double()
    G = torch.zeros(S, bank.num_objectives, bank.num_objectives, dtype=torch.float64, device=flat.device)
    for s in range(S):
        cols = torch.cat([torch.arange(bank.offsets[p], bank.offsets[p] + bank.numels[p], device=flat.device)
                          for p, seg in enumerate(segment_ids) if seg == s])
        part = flat[:, cols]
        G[s] = part @ part.T
    return G


def _reference_combine(bank, weights, segment_ids):
    out = torch.zeros(bank.numel, dtype=torch.float64, device=bank.buffer.device)  # the padding: zeros
    for p, s in enumerate(segment_ids):
        a, b = bank.offsets[p], bank.offsets[p] + bank.numels[p]
        out[a:b] = weights[s].double() @ bank.buffer[:, a:b].double()
    return out


def _check_ops(report: Report, problem, device) -> None:
    backends = [b for b in ("cpp", "triton") if b in fb.available_backends(device)]
    for name in ("cpp", "triton"):
        if name not in backends:
            from fused_balance import backends as registry
            report.check(f"backend {name} on {device.type}", None,
                         "unavailable: " + registry.availability(name, device.type)[1])
    segment_ids = list(problem.layer_of)
    S = max(segment_ids) + 1
    for dtype in (torch.float32, torch.bfloat16):
        for K in (2, 9):
            params, bank = _bank(problem, K, dtype, device)
            tol = REL_TOL[dtype]
            G_ref = _reference_gram(bank, segment_ids, S)
            w = torch.softmax(torch.randn(S, K, generator=torch.Generator().manual_seed(K)), -1).double().to(device)
            d_ref = _reference_combine(bank, w, segment_ids)
            tag = f"K={K} {str(dtype).removeprefix('torch.')}"
            for backend in backends:
                for layout, grads in (("aligned", bank.grads), ("odd offsets", _odd_offset_grads(bank, problem))):
                    G = fb.gram(grads, segment_ids, backend=backend)
                    err = _relative_error(G, G_ref)
                    report.check(f"list gram {backend} {tag} {layout}", err <= tol, f"rel err {err:.1e}")
                    d = fb.combine(grads, w.to(torch.float32), segment_ids, backend=backend)
                    err = _relative_error(torch.cat([t.flatten() for t in d]), d_ref)
                    report.check(f"list combine {backend} {tag} {layout}", err <= tol, f"rel err {err:.1e}")
            for backend in backends:  # the plan's bank ops of every kernel backend
                plan = fb.BalancePlan(bank, segment_ids, backend=backend)
                G, found_inf = plan.gram()
                err = _relative_error(G, G_ref)
                report.check(f"plan gram {backend} {tag}", err <= tol and not bool(found_inf), f"rel err {err:.1e}")
                if device.type == "cuda":  # the CPU plan on the same bank: the same reduction order
                    G_cpu, _ = fb.BalancePlan(bank.buffer.cpu(), segment_ids, numels=bank.numels,
                                              offsets=bank.offsets, backend="cpp").gram()
                    err = _relative_error(G.cpu(), G_cpu)
                    report.check(f"plan gram {backend} GPU vs cpp CPU {tag}", err <= 1e-10, f"rel err {err:.1e}")
                out = torch.empty(bank.numel, dtype=dtype, device=device)
                plan.combine_into(out, w)
                err = _relative_error(out, d_ref)
                report.check(f"plan combine {backend} {tag}", err <= tol, f"rel err {err:.1e}")
                _check_plan_adamw(report, plan, params, bank, w, segment_ids, f"{backend} {tag}", tol)
            del bank, params


def _check_gram_many_objectives(report: Report, problem, device, K: int = 33) -> None:
    """The cpp Gram for K > 8 sums 8 x 8 tiles of pairs, 8 tiles a pass over each chunk (K = 9 of
    _check_ops: one pass); K = 33 takes two passes (15 tiles) and has a last row block of one
    objective: list (aligned and odd offsets) and plan, fp32 and bf16."""
    if "cpp" not in fb.available_backends(device):
        return
    segment_ids = list(problem.layer_of)
    S = max(segment_ids) + 1
    for dtype in (torch.float32, torch.bfloat16):
        params, bank = _bank(problem, K, dtype, device)
        G_ref = _reference_gram(bank, segment_ids, S)
        tol = REL_TOL[dtype]
        tag = f"K={K} {str(dtype).removeprefix('torch.')}"
        for layout, grads in (("aligned", bank.grads), ("odd offsets", _odd_offset_grads(bank, problem))):
            err = _relative_error(fb.gram(grads, segment_ids, backend="cpp"), G_ref)
            report.check(f"list gram cpp {tag} {layout}", err <= tol, f"rel err {err:.1e}")
        G, found_inf = fb.BalancePlan(bank, segment_ids, backend="cpp").gram()
        err = _relative_error(G, G_ref)
        report.check(f"plan gram cpp {tag}", err <= tol and not bool(found_inf), f"rel err {err:.1e}")
        del bank, params


def _check_plan_adamw(report, plan, params, bank, w, segment_ids, tag, tol) -> None:
    """The plan's fused AdamW against the list API's torch reference on the same inputs."""
    hyper = (1e-3, 0.01, 0.9, 0.999, 1e-8)
    ref_params = [p.detach().clone() for p in params]
    before = [p.detach().clone() for p in params]
    ref_m = [torch.zeros_like(p) for p in params]
    ref_v = [torch.zeros_like(p) for p in params]
    m, v, step = plan.new_adamw_state()
    table = plan.hyper_table([hyper], bank.buffer.device)
    with torch.no_grad():
        plan.adamw_step(w, m, v, table, step)
        fb.balanced_adamw_step(bank.grads, w.float(), segment_ids, ref_params, ref_m, ref_v, lrs=hyper[0],
                               weight_decays=hyper[1], beta1=hyper[2], beta2=hyper[3], eps=hyper[4], step=1,
                               backend="torch")
    err = max(_relative_error(p, q) for p, q in zip(params, ref_params))
    moved = max(float((p.detach().double() - b.double()).abs().max()) for p, b in zip(params, before))
    report.check(f"plan adamw {tag}", err <= tol and bool((step == 1.0).all()) and moved > 0,
                 f"rel err {err:.1e} (parameters moved by up to {moved:.1e})")


def _check_no_sync(report: Report, device, backend: str) -> None:
    name = f"planned step {backend} under set_sync_debug_mode('error')"
    if device.type != "cuda":
        report.check(name, None, "needs CUDA")
        return
    from fused_balance.training import BalancedAdamW
    problem = _problem(quick=True)
    params, bank = _bank(problem, 2, torch.float32, device)
    plan = fb.BalancePlan(bank, list(problem.layer_of), backend=backend)
    optimizer = BalancedAdamW(params, lr=1e-3)
    res = plan.weights()
    optimizer.planned_step(plan, res.weights, skip=res.found_inf)  # adopt the flat state (O(P) once)
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        for lr in (1e-3, 5e-4):  # a changed lr rewrites the hyper table: still no sync
            optimizer.param_groups[0]["lr"] = lr
            res = plan.weights()
            optimizer.planned_step(plan, res.weights, skip=res.found_inf)
        report.check(name, True, "2 steps, lr changed")
    except RuntimeError as exc:
        report.check(name, False, str(exc).splitlines()[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _check_graph(report: Report, device, backend: str) -> None:
    name = f"CUDA graph of a planned step {backend} = eager (new grads, new lr, NaN)"
    if device.type != "cuda":
        report.check(name, None, "needs CUDA")
        return
    problem = _problem(quick=True)
    segment_ids = list(problem.layer_of)
    runs = []
    for _ in range(2):  # the captured one and its eager twin, identical inputs
        params, bank = _bank(problem, 2, torch.float32, device)
        plan = fb.BalancePlan(bank, segment_ids, backend=backend)
        m, v, step = plan.new_adamw_state()
        hyper = plan.hyper_table([(1e-3, 0.01, 0.9, 0.999, 1e-8)], device)
        runs.append((params, bank, plan, m, v, step, hyper))

    def one_step(run):
        _, _, plan, m, v, step, hyper = run
        res = plan.weights()
        plan.adamw_step(res.weights, m, v, hyper, step, res.found_inf)

    captured = runs[0]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture (workspaces, lazy init)
        one_step(captured)
    torch.cuda.current_stream().wait_stream(side)
    one_step(runs[1])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step(captured)
    gen = torch.Generator(device=device).manual_seed(7)
    ok, detail = True, []
    for i in range(4):
        fresh = torch.randn(captured[1].buffer.shape, generator=gen, device=device) * 1e-3
        if i == 3:
            fresh[1, 5] = float("nan")  # skipped on both
        for run in runs:
            run[1].buffer.copy_(fresh)
            run[1].zero_padding_()
            if i == 2:
                run[2].hyper_table([(5e-4, 0.01, 0.9, 0.999, 1e-8)], device, out=run[6])
        graph.replay()
        one_step(runs[1])
        torch.cuda.synchronize()
        same = all(torch.equal(p, q) for p, q in zip(runs[0][0], runs[1][0])) and \
            torch.equal(runs[0][5], runs[1][5])
        ok &= same
        detail.append("=" if same else "!=")
    report.check(name, ok, f"replays {' '.join(detail)}; step count {float(runs[0][5]):.0f} (one NaN step skipped)")


def _check_big_row(report: Report, device) -> None:
    name = f"bank row of {BIG_ROW:,} elements (> 2^31): gram, combine"
    if device.type != "cuda":
        report.check(name, None, "needs CUDA (17 GB)")
        return
    need = 3 * BIG_ROW * 2 + (1 << 30)
    free, _ = torch.cuda.mem_get_info(device)
    if free < need:
        report.check(name, None, f"needs {need / 2**30:.0f} GiB free, {free / 2**30:.0f} GiB here")
        return
    from fused_balance.training import GradBank
    param = torch.nn.Parameter(torch.zeros(BIG_ROW, dtype=torch.bfloat16, device=device))
    bank = GradBank([param], 1)
    with torch.no_grad():
        bank.buffer.fill_(1.0)
        bank.buffer[0, -7:] = 3.0  # past 2^31: a wrapped offset would miss these
    want = float(BIG_ROW - 7) + 7 * 9.0
    out = torch.zeros(BIG_ROW, dtype=torch.bfloat16, device=device)
    for backend in [b for b in ("cpp", "triton") if b in fb.available_backends(device)]:
        plan = fb.BalancePlan(bank, backend=backend)
        G, _ = plan.gram()
        out.zero_()
        plan.combine_into(out, torch.full((1, 1), 2.0, dtype=torch.float64, device=device))
        ok = float(G[0, 0, 0]) == want and float(out[-1]) == 6.0 and float(out[0]) == 2.0 and \
            float(out[2 ** 31]) == 2.0
        report.check(f"{name} ({backend})", ok, f"G {float(G[0, 0, 0]):.0f} (want {want:.0f}); out[-1] {float(out[-1])}")
    del bank, param, out


def _time(fn, device, repeats: int) -> float:
    fn()
    return median([time_call(fn, device) for _ in range(repeats)])


def _throughput(report: Report, problem, device, repeats: int) -> None:
    n = problem.num_params
    copy_src = torch.empty(2 * n, dtype=torch.float32, device=device)  # ~ the K = 2 bank
    copy_dst = torch.empty_like(copy_src)
    copy_s = _time(lambda: copy_dst.copy_(copy_src), device, repeats)
    copy_gbps = 2 * copy_src.numel() * 4 / copy_s / 1e9
    report.timings.append(("device copy (read + write)", copy_s, 2 * copy_src.numel() * 4, copy_gbps, None))
    segment_ids = list(problem.layer_of)
    backends = [b for b in ("cpp", "triton") if b in fb.available_backends(device)]

    def add(name, seconds, traffic):
        gbps = traffic.total / seconds / 1e9
        report.timings.append((name, seconds, traffic.total, gbps, gbps / copy_gbps))

    for K in (2, 9):
        params, bank = _bank(problem, K, torch.float32, device)
        S = max(segment_ids) + 1
        w = torch.full((S, K), 1.0 / K, dtype=torch.float64, device=device)
        for backend in backends:
            add(f"list gram {backend} K={K}", _time(lambda: fb.gram(bank.grads, segment_ids, backend=backend),
                                                    device, repeats), stage_bytes("gram", K, n, 4))
            if K == 2:
                add(f"list combine {backend} K=2",
                    _time(lambda: fb.combine(bank.grads, w.float(), segment_ids, backend=backend), device, repeats),
                    stage_bytes("combine", K, n, 4))
                m = [torch.zeros_like(p) for p in params]
                v = [torch.zeros_like(p) for p in params]
                add(f"list adamw {backend} K=2", _time(lambda: fb.balanced_adamw_step(
                    bank.grads, w.float(), segment_ids, params, m, v, lrs=1e-3, step=1, backend=backend),
                    device, repeats), stage_bytes("adamw", K, n, 4))
        for backend in backends:
            plan = fb.BalancePlan(bank, segment_ids, backend=backend)
            add(f"bank gram {backend} K={K}", _time(plan.gram, device, repeats), stage_bytes("gram", K, n, 4))
            if K == 2:
                out = torch.empty(bank.numel, device=device)
                add(f"bank combine {backend} K=2", _time(lambda: plan.combine_into(out, w), device, repeats),
                    stage_bytes("combine", K, n, 4))
                m, v, step = plan.new_adamw_state()
                hyper = plan.hyper_table([(1e-3, 0.0, 0.9, 0.999, 1e-8)], device)
                add(f"bank adamw {backend} K=2", _time(lambda: plan.adamw_step(w, m, v, hyper, step), device,
                                                       repeats), stage_bytes("adamw", K, n, 4))


def run(device: str | torch.device = "cuda", *, quick: bool = False, repeats: int = 10,
        out=sys.stdout) -> Report:
    """Every check on ``device``; prints the table to ``out`` and returns the report."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("gpu-check needs a CUDA GPU (torch.cuda.is_available() is False); "
                           "`fused-balance gpu-check --device cpu --quick` runs the CPU part")
    start = time.perf_counter()
    report = Report()
    problem = _problem(quick)
    from fused_balance import _extension
    info = _extension.build_info() if _extension.is_built() else {"cuda_compiled": False}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"gpu-check on {name}: {problem.description} ({problem.num_tensors} tensors, "
          f"{problem.num_params / 1e6:.1f} M elements); CUDA kernels compiled: {info.get('cuda_compiled')}",
          file=out, flush=True)
    if device.type == "cuda":
        report.check("CUDA kernels built", bool(_extension.load().cuda_compiled()), str(info.get("cuda_reason", "")))
    _check_ops(report, problem, device)
    _check_gram_many_objectives(report, problem, device)
    for backend in [b for b in ("cpp", "triton") if b in fb.available_backends(device)]:
        _check_no_sync(report, device, backend)
        _check_graph(report, device, backend)
    _check_big_row(report, device)
    _throughput(report, problem, device, repeats)
    print(report.table(), file=out)
    print(f"{len(report.checks) - len(report.failed)} passed, {len(report.failed)} failed "
          f"({time.perf_counter() - start:.0f} s)", file=out, flush=True)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="small shapes (what make test runs on the CPU)")
    parser.add_argument("--repeats", type=int, default=10, help="timed repeats per op (median)")


def main(args) -> int:
    report = run(args.device, quick=args.quick, repeats=args.repeats)
    return 1 if report.failed else 0
