"""Host-overhead stage: tiny tensors (4 elements each), so the data work is ~0 and what is timed
is the per-call host work and launches, at P = 28, 448 and 5,000 tensors (K = 2, fp32, one
segment per 14 tensors, as Llama's layers, or a fixed number of segments with ``--segments``).
Flat in P is the goal.

Contenders: ours through the list API (``fb.pareto_combine(..., out=)``, ``fb.balanced_adamw_step``),
ours through a BalancePlan (Gram -> pareto_lora weights -> combine into ``.grad``; the same with
the fused AdamW), the per-tensor loop (the torch reference backend's pareto_combine), foreach
(``torch._foreach_norm`` of the K·P gradients: one foreach op, a lower bound of a foreach-built
Gram) and ``torch._fused_adamw_`` on the same P tensors; and a whole training step on the same
P tensors by hand (``zero_grad`` setting ``.grad`` to None, and keeping them) and through
``ParetoLoRA.step``, whose difference from the cheaper by-hand step is the balancer's overhead.
That difference carries the O(P) run-to-run noise of the whole step (loss forward, backward
passes, AdamW), so the step is also taken apart within each call: the time inside autograd's
backward, inside ``optimizer.step``, and the rest of the step call (``ParetoLoRA.step(losses)``, or
by hand the two ``.backward()`` calls and ``optimizer.step()``; the loss forward and ``zero_grad``,
the same in both, outside). The balancer's own host work is that rest minus the by-hand rest; its
backward passes (into the bank rows, in place) are compared with the by-hand ones (into fresh
``.grad``) apart.

    python -m fused_balance.benchmarking.overhead [--device cpu|cuda] [--threads 1] [--segments S]
"""
from __future__ import annotations

import argparse
import contextlib
import time

import torch

import fused_balance as fb

__all__ = ["OVERHEAD_COUNTS", "run_overhead", "markdown"]

OVERHEAD_COUNTS = (28, 448, 5000)
ELEMS = 4
K = 2
TENSORS_PER_SEGMENT = 14  # one Llama decoder layer's LoRA tensors
CONTENDERS = {
    "list_pareto_combine": "ours, list API: fb.pareto_combine(out=)",
    "list_adamw": "ours, list API: pareto_weights + fb.balanced_adamw_step",
    "plan_step": "ours, plan: Gram -> weights -> combine into .grad",
    "plan_adamw": "ours, plan: Gram -> weights -> fused AdamW",
    "plan_ops": "ours, plan ops alone: Gram + combine (weights given, no policy)",
    "per_tensor_loop": "per-tensor loop (torch reference pareto_combine)",
    "foreach_norm": "foreach: torch._foreach_norm of the K·P gradients",
    "torch_fused_adamw": "torch._fused_adamw_ (P tensors)",
    "step_by_hand": "two backward passes + torch AdamW.step + zero_grad, by hand",
    "step_by_hand_kept": "the same with zero_grad(set_to_none=False): no .grad allocated per step",
    "paretolora_step": "ParetoLoRA.step (torch AdamW) + zero_grad, the same passes",
}
BY_HAND = ("step_by_hand", "step_by_hand_kept")
# the derived row: what ParetoLoRA.step adds to the same backward passes and optimizer step
STEP_OVERHEAD = ("ParetoLoRA.step overhead (median over rounds of ParetoLoRA.step minus the cheaper "
                 "by-hand step of the same round)")
OWN_OVERHEAD = ("ParetoLoRA.step's own host work (its call minus the time inside backward and "
                "optimizer.step, minus the same of the by-hand step's calls)")
BACKWARD_EXTRA = "its backward passes (into the bank rows) minus the by-hand ones (into .grad)"
STEPS = (*BY_HAND, "paretolora_step")
PARTS = ("call", "backward", "optimizer")  # what _StepClock counts


class _StepClock:
    """Seconds spent in the training-step contenders' step call (``call``: ``ParetoLoRA.step``,
    or by hand the backward calls and ``optimizer.step``), and within it inside
    ``torch.autograd.backward`` (what ``Tensor.backward`` calls) and ``optimizer.step``."""

    def __init__(self):
        self.seconds = dict.fromkeys(PARTS, 0.0)
        self._started = {}

    def start(self, part: str):
        self._started[part] = time.perf_counter()

    def stop(self, part: str):
        self.seconds[part] += time.perf_counter() - self._started[part]

    @contextlib.contextmanager
    def timing_backward(self):
        """Patches ``torch.autograd.backward`` for the benchmark's duration (restored after)."""
        original = torch.autograd.backward

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds["backward"] += time.perf_counter() - started
        torch.autograd.backward = timed
        try:
            yield
        finally:
            torch.autograd.backward = original


def _segment_of(i: int, P: int, segments: int | None) -> int:
    """Tensor i's segment: one per TENSORS_PER_SEGMENT tensors, or ``segments`` equal blocks."""
    return i // TENSORS_PER_SEGMENT if segments is None else i * segments // P


def _setup(P: int, device: torch.device, segments: int | None):
    from fused_balance.training.bank import GradBank
    gen = torch.Generator().manual_seed(P)
    params = [torch.nn.Parameter(torch.randn(ELEMS, generator=gen).to(device)) for _ in range(P)]
    bank = GradBank(params, K)
    with torch.no_grad():
        bank.buffer.copy_(torch.randn(bank.buffer.shape, generator=gen))
        bank.zero_padding_()
    return params, bank, [_segment_of(i, P, segments) for i in range(P)]


def _contenders(P: int, device: torch.device, num_segments: int | None = None,
                clock: _StepClock | None = None) -> dict:
    params, bank, segments = _setup(P, device, num_segments)
    outs = [torch.zeros_like(p) for p in params]
    fns = {}
    fns["list_pareto_combine"] = lambda: fb.pareto_combine(bank.grads, segments, policy="pareto_lora",
                                                           out=outs, backend="cpp")
    list_m = [torch.zeros_like(p) for p in params]
    list_v = [torch.zeros_like(p) for p in params]
    list_p = [p.detach().clone() for p in params]

    def list_adamw():
        res = fb.pareto_weights(bank.grads, segments, policy="pareto_lora", backend="cpp")
        fb.balanced_adamw_step(bank.grads, res.weights, segments, list_p, list_m, list_v, lrs=1e-6,
                               weight_decays=0.0, step=1, skip=res.found_inf, backend="cpp")
    fns["list_adamw"] = list_adamw
    plan = fb.BalancePlan(bank, segments, policy="pareto_lora")
    fns["plan_step"] = plan.combine_into_grads
    m, v, step = plan.new_adamw_state()
    hyper = plan.hyper_table([(1e-6, 0.0, 0.9, 0.999, 1e-8)], device)

    def plan_adamw():
        res = plan.weights()
        plan.adamw_step(res.weights, m, v, hyper, step, res.found_inf)
    fns["plan_adamw"] = plan_adamw
    fixed = plan.weights().weights
    grad_flat = plan.attach_grads()

    def plan_ops():
        G, found_inf = plan.gram()
        plan.combine_into(grad_flat, fixed, found_inf)
    fns["plan_ops"] = plan_ops
    ref_outs = [torch.zeros_like(p) for p in params]
    fns["per_tensor_loop"] = lambda: fb.pareto_combine(bank.grads, segments, policy="pareto_lora",
                                                       out=ref_outs, backend="torch")
    flat = [g for row in bank.grads for g in row]
    fns["foreach_norm"] = lambda: torch._foreach_norm(flat)
    t_params = [p.detach().clone() for p in params]
    t_grads = [g.clone() for g in bank.grads[0]]
    t_m = [torch.zeros_like(p) for p in t_params]
    t_v = [torch.zeros_like(p) for p in t_params]
    t_steps = [torch.zeros((), device=device) for _ in t_params]
    fns["torch_fused_adamw"] = lambda: torch._fused_adamw_(
        t_params, t_grads, t_m, t_v, [], t_steps, lr=1e-6, beta1=0.9, beta2=0.999, weight_decay=0.0,
        eps=1e-8, amsgrad=False, maximize=False)
    fns["step_by_hand"], fns["step_by_hand_kept"], fns["paretolora_step"] = _training_steps(P, device,
                                                                                           num_segments, clock)
    return fns


def _training_steps(P: int, device: torch.device, segments: int | None = None,
                    clock: _StepClock | None = None):
    """A training step on P tiny LoRA-like tensors, by hand (``zero_grad`` to None, and keeping
    the ``.grad``) and through ParetoLoRA (the same losses, backward passes and torch AdamW):
    their difference is the balancer's overhead. ``clock`` times their step calls and optimizer
    steps."""
    clock = clock or _StepClock()
    from fused_balance.training import ParetoLoRA

    gen = torch.Generator().manual_seed(P + 1)
    steps = []
    for balanced, keep_grads in ((False, False), (False, True), (True, False)):
        params = [torch.nn.Parameter(torch.randn(ELEMS, generator=gen).to(device)) for _ in range(P)]
        text = torch.randn(P * ELEMS, generator=gen).to(device)
        image = (torch.randn(P * ELEMS, generator=gen) * 0.01).to(device)
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        optimizer.register_step_pre_hook(lambda *_: clock.start("optimizer"))
        optimizer.register_step_post_hook(lambda *_: clock.stop("optimizer"))

        def losses(params=params, text=text, image=image):
            x = torch.cat(params)
            return {"text": (x * text).sum(), "image": (x * image).sum()}
        if balanced:
            named = [(f"model.layers.{_segment_of(i, P, segments)}.lora.{i}", p) for i, p in enumerate(params)]
            balancer = ParetoLoRA(named, optimizer, policy="pareto_lora", segments="layer")

            def step(balancer=balancer, losses=losses):
                pair = losses()
                clock.start("call")
                balancer.step(pair)
                clock.stop("call")
                balancer.zero_grad()
        else:
            def step(optimizer=optimizer, losses=losses, keep_grads=keep_grads):
                pair = losses()
                clock.start("call")
                pair["text"].backward(retain_graph=True)
                pair["image"].backward()
                optimizer.step()
                clock.stop("call")
                optimizer.zero_grad(set_to_none=not keep_grads)
        steps.append(step)
    return steps


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_per_call(fn, device: torch.device, round_s: float, clock: _StepClock | None = None) -> tuple:
    """Seconds per call, and per call those ``clock`` counted in each part: calls looped for
    ~round_s, the device drained at the end."""
    _sync(device)
    before = dict(clock.seconds) if clock else {}
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        if calls >= 3 and time.perf_counter() - start >= round_s:
            break
    _sync(device)
    return (time.perf_counter() - start) / calls, {k: (clock.seconds[k] - before[k]) / calls for k in before}


def run_overhead(device="cpu", counts=OVERHEAD_COUNTS, rounds: int = 5, round_s: float = 0.05,
                 progress=None, segments: int | None = None) -> dict:
    """Median seconds per call of every contender at every P (interleaved rounds); ``segments``:
    that many segments at every P (default: one per TENSORS_PER_SEGMENT tensors)."""
    if segments is not None and not 1 <= segments <= min(counts):
        raise ValueError(f"segments must be in [1, {min(counts)}] (the smallest tensor count), got {segments}")
    device = torch.device(device)
    table: dict = {name: {} for name in CONTENDERS}
    paired: dict = {}
    parts: dict = {}
    clock = _StepClock()
    for P in counts:
        fns = _contenders(P, device, segments, clock)
        for fn in fns.values():  # warm-up: builds, caches, first launches
            fn()
            fn()
        samples = {name: [] for name in fns}
        for r in range(rounds):
            names = list(fns)
            names = names[r % len(names):] + names[:r % len(names)]
            for name in names:
                with clock.timing_backward() if name in STEPS else contextlib.nullcontext():
                    total, inner = _time_per_call(fns[name], device, round_s, clock)
                samples[name].append(total)
                if name in STEPS:  # kept per round: paired differences
                    parts.setdefault(name, {}).setdefault(P, []).append(inner)
        for name in STEPS:
            paired.setdefault(name, {})[P] = list(samples[name])
        for name, xs in samples.items():
            xs.sort()
            table[name][P] = xs[len(xs) // 2]
        if progress:
            progress(f"overhead P={P}: plan step {table['plan_step'][P] * 1e6:.0f} us, "
                     f"list pareto_combine {table['list_pareto_combine'][P] * 1e6:.0f} us")
    return {"device": str(device), "threads": torch.get_num_threads(), "counts": list(counts),
            "elements_per_tensor": ELEMS, "objectives": K, "segments": segments, "seconds": table,
            "step_rounds": paired, "step_parts": parts,
            "labels": dict(CONTENDERS)}


def markdown(result: dict) -> list[str]:
    counts = result["counts"]
    lines = ["## Host overhead (tiny tensors)", "",
             f"{result['elements_per_tensor']} elements per tensor, K = {result['objectives']}, fp32, "
             f"pareto_lora, " + (f"one segment per {TENSORS_PER_SEGMENT} tensors" if result.get("segments") is None
                                 else f"{result['segments']} segments at every P") + f"; {result['device']}, "
             f"{result['threads']} thread(s); median µs per call. Flat in P is the goal.", "",
             "| contender | " + " | ".join(f"P = {P}" for P in counts) + " | 5000 / 28 |",
             "| --- | " + " | ".join("---:" for _ in counts) + " | ---: |"]
    for name, label in result["labels"].items():
        row = result["seconds"].get(name, {})
        cells = [f"{row[P] * 1e6:.0f}" if P in row else "–" for P in counts]
        growth = (f"{row[counts[-1]] / row[counts[0]]:.2f}×" if counts[0] in row and counts[-1] in row else "–")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {growth} |")
    fused = result["seconds"].get("torch_fused_adamw", {})
    for label, overhead in ((STEP_OVERHEAD, step_overhead(result)), (OWN_OVERHEAD, step_overhead(result, "own")),
                            (BACKWARD_EXTRA, step_overhead(result, "backward"))):
        if not overhead:
            continue
        growth = (f"{overhead[counts[-1]] / overhead[counts[0]]:.2f}×"
                  if counts[0] in overhead and counts[-1] in overhead and overhead[counts[0]] > 0 else "–")
        lines.append(f"| {label} | " + " | ".join(
            f"{overhead[P] * 1e6:.0f} ({overhead[P] / fused[P]:.2f}× torch._fused_adamw_)" if P in fused
            else f"{overhead[P] * 1e6:.0f}" for P in counts) + f" | {growth} |")
    return lines + [""]


def step_overhead(result: dict, key: str = "step_rounds") -> dict:
    """Per P: seconds ParetoLoRA.step adds to the same passes and optimizer step by hand, the
    median over rounds of its time minus the cheaper by-hand step of that round (they ran back
    to back in every round: a paired difference, far less noisy than the difference of two
    medians of ~15 ms steps). ``key="own"``: the same of each step call's own work (the call
    minus the time inside backward and optimizer.step: no forward, backward or AdamW noise);
    ``key="backward"``: the same of the time inside backward."""
    if key == "step_rounds":
        rounds = result.get(key, {})
    else:
        def part(d):
            return d["call"] - d["backward"] - d["optimizer"] if key == "own" else d[key]
        rounds = {name: {P: [part(d) for d in per] for P, per in by_p.items()}
                  for name, by_p in result.get("step_parts", {}).items()}
    hands = [rounds[name] for name in BY_HAND if name in rounds]
    balanced = rounds.get("paretolora_step", {})
    out = {}
    for P in result["counts"]:
        if hands and all(P in hand for hand in hands) and P in balanced:
            diffs = sorted(b - min(h) for b, *h in zip(balanced[P], *(hand[P] for hand in hands)))
            out[P] = diffs[len(diffs) // 2]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_balance.benchmarking.overhead")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--segments", type=int, default=None,
                        help="this many segments at every P (default: one per 14 tensors)")
    parser.add_argument("--plot", default=None, help="write the plot to this PNG")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = run_overhead(args.device, rounds=args.rounds, progress=print, segments=args.segments)
    print("\n".join(markdown(result)))
    if args.plot:
        from fused_balance.benchmarking.plots import overhead_plot
        overhead_plot(result, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
