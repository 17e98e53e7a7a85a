"""Run the benchmark: cases x stages x contenders, checks, interleaved timing, roofline, memory,
scaling sweeps; write results.json, results.md and the plots."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fused_balance.benchmarking import contenders as C
from fused_balance.benchmarking.problems import (FULL_PROBLEMS, QUICK_PROBLEMS, get_problem,
                                                 make_gradients, make_params, synthetic_problem)
from fused_balance.benchmarking.roofline import (StageBytes, measure_bandwidth, roofline_seconds,
                                                 stage_bytes)
from fused_balance.benchmarking.timing import (interleaved_times, machine_info, median,
                                               paired_ratio, peak_extra_memory, time_call)

__all__ = ["SuiteOptions", "run_suite", "tolerance", "relative_list_error", "gram_error",
           "evaluate_targets", "HEADLINE"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "fp64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
HEADLINE = ("llama2-7b", 2, torch.float32)


@dataclass
class SuiteOptions:
    out: Path
    quick: bool = False
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    problems: tuple = ()
    objectives: tuple = ()
    dtypes: tuple = ()
    stages: tuple = ()
    repeats: int = 15
    stage_budget_s: float = 3.0
    slow_call_s: float = 2.0     # a contender slower than this is timed once (its first call)
    compile_budget_s: float = 120.0
    memory: bool = True
    plots: bool = True
    seed: int = 0
    ours_backends: tuple = ()    # forced backend names (else: picked from what is available)
    progress: bool = True
    explicit_plan: bool = False  # problems/objectives/dtypes given: run their cross product
    threads: int = 0             # > 0: torch.set_num_threads for the run (default: all cores)
    time_budget_s: float = 0.0   # > 0: cases that would start later are skipped

    def resolved(self) -> "SuiteOptions":
        quick = self.quick
        return SuiteOptions(
            out=Path(self.out), quick=quick, device=torch.device(self.device),
            problems=tuple(self.problems) or (QUICK_PROBLEMS if quick else FULL_PROBLEMS),
            # (the default plan is QUICK_PLAN / FULL_PLAN; these fill an explicit plan's gaps)
            objectives=tuple(self.objectives) or ((2, 3) if quick else (2, 3, 4)),
            dtypes=tuple(self.dtypes) or (torch.float32, torch.bfloat16),
            stages=tuple(self.stages) or (C.STAGES + ("scaling", "overhead")),
            repeats=self.repeats, stage_budget_s=self.stage_budget_s,
            slow_call_s=self.slow_call_s,
            compile_budget_s=self.compile_budget_s, memory=self.memory, plots=self.plots,
            seed=self.seed, ours_backends=tuple(self.ours_backends), progress=self.progress,
            explicit_plan=self.explicit_plan, time_budget_s=self.time_budget_s,
            threads=self.threads)


# ----------------------------------------------------------------------------------------------
# Checks

def tolerance(stage: str, dtype: torch.dtype, *, iterative_solver: bool = False,
              num_objectives: int = 2) -> float:
    """Largest accepted relative error: what rounding can explain, far below what any wrong
    formula gives (O(1)). fp32: 1e-3 (a BLAS Gram over 10^7 terms is off by ~3e-4 on the
    cosine scale); bf16/fp16: 2e-2 (results stored at ~3 significant digits). An iterative
    min-norm solver (Frank-Wolfe in the classic loop, TorchJD's MGDA) stops early for K > 2:
    its combined gradient is accepted within 5 % (10 % in bf16)."""
    low_precision = dtype in (torch.bfloat16, torch.float16)
    if stage == "adamw":
        return 0.1 if low_precision else 1e-3
    base = 2e-2 if low_precision else 1e-3   # Gram: fp32 BLAS over 10^7 terms reaches ~3e-4
    if iterative_solver and num_objectives > 2 and stage in ("weights", "pareto_combine"):
        return 0.1 if low_precision else 5e-2
    return base


# Above these relative errors a result is *wrong* (reported, not timed); between the tolerance
# and these it is the same computation with poor rounding (timed, flagged "inaccurate"): an
# fp32 BLAS Gram M @ M.T accumulates 10^8 terms with ~2 % error on the cosine scale.
WRONG_ABOVE = {False: 5e-2, True: 0.15}


def gram_error(G, reference) -> float:
    """max |G - R| / sqrt(R_ii R_jj): error on the cosine scale (off-diagonals may be ~0)."""
    G = torch.as_tensor(G).detach().to("cpu", torch.float64).reshape(reference.shape)
    R = torch.as_tensor(reference).detach().to("cpu", torch.float64)
    d = R.diagonal().clamp(min=1e-300).sqrt()
    return float(((G - R).abs() / (d[:, None] * d[None, :])).max())


def weights_error(w, reference_w, G) -> float:
    """|d(w) - d(ref)| / |d(ref)| for d(w) = sum_k w_k g_k, computed exactly from the Gram."""
    G = torch.as_tensor(G).detach().to("cpu", torch.float64)
    a = torch.as_tensor(w).detach().to("cpu", torch.float64).reshape(-1)
    b = torch.as_tensor(reference_w).detach().to("cpu", torch.float64).reshape(-1)
    diff = a - b
    return math.sqrt(max(0.0, float(diff @ G @ diff)) / max(float(b @ G @ b), 1e-300))


def relative_list_error(result, reference, base=None) -> float:
    """sqrt(sum_p |result_p - reference_p|^2 / sum_p |reference_p - base_p|^2), fp64
    accumulation tensor by tensor (no O(N) fp64 copy); ``base`` (optional) turns it into an
    error relative to the update reference - base."""
    num = den = 0.0
    for p, (a, b) in enumerate(zip(result, reference)):
        a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
        num += float(torch.sum((a64 - b64) ** 2))
        ref = b64 if base is None else b64 - base[p].detach().to(torch.float64)
        den += float(torch.sum(ref ** 2))
    if len(result) != len(reference):
        return float("inf")
    return math.sqrt(num / max(den, 1e-300))


def exact_combined_error(result, grads, weights) -> float:
    """Error of P combined tensors against sum_k w_k g_k in float64 (weights: K floats)."""
    w = [float(x) for x in torch.as_tensor(weights).reshape(-1).tolist()]
    num = den = 0.0
    for p, r in enumerate(result):
        exact = sum(w[k] * grads[k][p].to(torch.float64) for k in range(len(w)))
        num += float(torch.sum((r.to(torch.float64) - exact) ** 2))
        den += float(torch.sum(exact ** 2))
    return math.sqrt(num / max(den, 1e-300))


def exact_adamw_error(params_after, case: C.Case, steps: int = 1) -> float:
    """Error of the parameters after the first AdamW step on the combined gradient (weights
    case.weights_in), against the update computed in float64."""
    h = C.ADAMW_HYPER
    w = [float(x) for x in case.weights_in.reshape(-1).tolist()]
    p0 = make_params(case.problem, case.dtype, case.device, case.param_seed)
    num = den = 0.0
    for p, (after, start) in enumerate(zip(params_after, p0)):
        g = sum(w[k] * case.grads[k][p].to(torch.float64) for k in range(case.K))
        x = start.to(torch.float64)
        m = (1 - h["beta1"]) * g
        v = (1 - h["beta2"]) * g * g
        update = -h["lr"] * h["weight_decay"] * x - h["lr"] / (1 - h["beta1"]) * m / (
            (v / (1 - h["beta2"])).sqrt() + h["eps"])
        num += float(torch.sum((after.to(torch.float64) - (x + update)) ** 2))
        den += float(torch.sum(update ** 2))
    return math.sqrt(num / max(den, 1e-300))


# ----------------------------------------------------------------------------------------------
# One stage of one case

def _check(stage, contender, case, result, reference_result, exact) -> dict:
    """Compare a contender's first result with its reference (ours, or for ours: exact)."""
    tol = tolerance(stage, case.dtype, iterative_solver=contender.solver_iterative,
                    num_objectives=case.K)
    if reference_result is None:   # ours (or its like-for-like partner): against float64
        against = "float64 reference"
        if stage == "gram":
            err = gram_error(result, exact["gram"])
        elif stage == "weights":
            err = weights_error(result, exact["weights_of_gram_in"], case.gram_in[0])
        elif stage == "combine":
            err = exact_combined_error(result, case.grads, case.weights_in)
        elif stage == "pareto_combine":
            err = exact_combined_error(result, case.grads, exact[f"weights_{contender.name}"])
        else:
            err = exact_adamw_error(result, case)
    else:
        against = reference_result[0]
        ref = reference_result[1]
        if stage == "gram":
            err = gram_error(result, ref)
        elif stage == "weights":
            err = weights_error(result, ref, case.gram_in[0])
        elif stage in ("combine", "pareto_combine"):
            err = relative_list_error(result, ref)
        else:
            err = relative_list_error(result, ref, make_params(case.problem, case.dtype,
                                                               case.device, case.param_seed))
    timed_limit = max(tol, WRONG_ABOVE[case.dtype in (torch.bfloat16, torch.float16)])
    return {"error": err, "tolerance": tol, "accurate": bool(err <= tol),
            "wrong_above": timed_limit, "passed": bool(err <= timed_limit), "against": against}


def _stage_result_for_check(stage, fn, result):
    return fn.params if stage == "adamw" else result


def run_stage(case: C.Case, stage: str, contenders: list, primary: str, opts: SuiteOptions,
              bandwidth: dict, exact: dict, *, memory: bool, log=print) -> dict:
    esize = case.element_size
    traffic = stage_bytes(stage, case.K, case.num_params, esize)
    roof = roofline_seconds(traffic, bandwidth)
    entry = {"bytes": None if traffic is None else {"read": traffic.read,
                                                    "written": traffic.written},
             "roofline_s": roof, "primary": primary, "contenders": {}}
    entries = entry["contenders"]
    fns, results, slow = {}, {}, {}
    by_name = {c.name: c for c in contenders}
    # references first: the primary ours, then the others' like-for-like partners
    order = sorted([c for c in contenders if stage in c.stages],
                   key=lambda c: (c.name != primary, not c.is_ours, c.number, c.name))
    for c in order:
        info = {"label": c.label, "number": c.number, "note": c.note}
        entries[c.name] = info
        reason = c.unavailable(case, stage)
        if reason:
            info.update(status="skipped", reason=reason)
            continue
        reference_name = c.reference or (None if c.is_ours else primary)
        if reference_name is not None and reference_name not in results:
            reason = f"its reference {reference_name} did not produce a result"
            info.update(status="skipped", reason=reason)
            continue
        try:
            start = time.perf_counter()
            fn = c.prepare(case, stage)
            first = fn()
            info["first_call_s"] = time.perf_counter() - start
        except Exception as exc:  # a contender that cannot run is reported, not fatal
            info.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:500])
            log(f"  {case.label} {stage} {c.name}: {info['reason']}")
            continue
        checked = _stage_result_for_check(stage, fn, first)
        ref = None if reference_name is None else (reference_name, results[reference_name])
        check = _check(stage, c, case, checked, ref, exact)
        info["check"] = check
        if not check["accurate"] and check["passed"]:
            log(f"  {case.label} {stage} {c.name}: inaccurate (relative error "
                f"{check['error']:.2g} > {check['tolerance']:.2g} vs {check['against']}); timed")
        if not check["passed"]:
            info.update(status="wrong", reason=(f"result differs from {check['against']}: "
                                                f"relative error {check['error']:.3g} > "
                                                f"{check['tolerance']:.3g}; not timed"))
            log(f"  {case.label} {stage} {c.name}: {info['reason']}")
            continue
        info["status"] = "ok"
        if c.is_ours or c.name == primary:
            results[c.name] = checked
        if info["first_call_s"] > opts.slow_call_s and c.name != primary and \
                not isinstance(c, C.Compiled):
            # too slow to repeat within the time budget: one timed call after the checked one
            slow[c.name] = fn
        else:
            fns[c.name] = fn
        del first, checked
    results.clear()
    if not fns and not slow:
        return entry
    samples = interleaved_times(fns, opts.repeats, device=case.device,
                                budget_s=opts.stage_budget_s)
    for name, fn in slow.items():
        samples[name] = [time_call(fn, case.device)]
        entries[name]["single_sample"] = (
            f"first call took {entries[name]['first_call_s']:.1f} s > {opts.slow_call_s:g} s: "
            "timed once more after it, not repeated")
    base = samples.get(primary)
    for name, ts in samples.items():
        info = entries[name]
        t = median(ts)
        info.update(median_s=t, min_s=min(ts), samples_s=ts, repeats=len(ts))
        if traffic is not None:
            info["GBps"] = traffic.total / t / 1e9
            info["roofline_fraction"] = roof / t
        if base is not None:
            info["slowdown_vs_primary"] = (t / median(base) if name in slow
                                           else paired_ratio(ts, base))
        partner = by_name[name].reference
        if partner and partner in samples:
            info["slowdown_vs_" + partner] = (t / median(samples[partner]) if name in slow
                                              or partner in slow
                                              else paired_ratio(ts, samples[partner]))
    if memory:
        n_bytes = case.num_params * esize
        for name, fn in fns.items():  # (not the single-sample ones: one more slow call each)
            try:
                peak, method = peak_extra_memory(fn, case.device)
            except Exception as exc:  # profiler trouble must not cost the timings
                entries[name]["memory_error"] = f"{type(exc).__name__}: {exc}"[:300]
                continue
            entries[name]["peak_extra_bytes"] = peak
            entries[name]["peak_extra_xN"] = peak / n_bytes
            entry["memory_method"] = method
        entry["output_bytes"] = n_bytes if stage in ("combine", "pareto_combine") else 0
    return entry


# ----------------------------------------------------------------------------------------------
# Cases

def _choose_ours(opts: SuiteOptions) -> list[tuple[str, str | None]]:
    """(backend, reason it cannot run or None), primary first. CPU: cpp (else the torch
    reference stands in); CUDA: triton then cpp."""
    from fused_balance.backends import availability
    device = opts.device
    if opts.ours_backends:
        wanted = list(opts.ours_backends)
    elif device.type == "cuda":
        wanted = ["triton", "cpp"]
    else:
        wanted = ["cpp", "triton"]
    out = []
    for name in wanted:
        ok, reason = availability(name, device)
        if ok and name == "triton" and device.type == "cpu":
            ok, reason = False, ("Triton on CPU runs only under its interpreter "
                                 "(TRITON_INTERPRET=1): a correctness path, not a timed one")
        out.append((name, None if ok else reason))
    if not any(r is None for _, r in out):
        ok, reason = availability("torch", device)
        out.insert(0, ("torch", None if ok else reason))
    else:  # the runnable one first
        out.sort(key=lambda item: item[1] is not None)
    return out


QUICK_PLAN = (("small", torch.float32, 2), ("llama2-7b-slice", torch.float32, 2),
              ("small", torch.bfloat16, 2), ("small", torch.float32, 3))
# Run order = priority (the run stops starting cases at its time budget): the target case,
# (then the scaling sweeps,) every model once, bf16, then more objectives.
FULL_PLAN = (("llama2-7b", torch.float32, 2), ("emu2-llm", torch.float32, 2),
             ("small", torch.float32, 2), ("llama2-7b", torch.bfloat16, 2),
             ("llama2-7b", torch.float32, 3), ("llama2-7b", torch.float32, 4),
             ("small", torch.bfloat16, 2), ("small", torch.float32, 3),
             ("small", torch.float32, 4), ("emu2-llm", torch.bfloat16, 2))
SCALING_AFTER_CASES = 1   # the scaling sweeps run after this many cases (the target one)
# Each AdamW contender holds its own parameters and optimizer state (4 N); for the 122 M
# parameter model that is ~2 GB per contender: leave that stage out there.
LARGE_PROBLEM_STAGES = {"emu2-llm": ("gram", "weights", "combine", "pareto_combine")}


def _plan_cases(opts: SuiteOptions) -> list[tuple[str, torch.dtype, int]]:
    """(problem, dtype, K) in run order. With no --problems/--objectives/--dtypes: the default
    plan (the target case Llama-2-7B K=2 fp32 first; bf16 and K > 2 on a subset, Emu2 at K=2,
    to fit the time budget); otherwise every combination of what was asked for."""
    if not opts.explicit_plan:
        return list(QUICK_PLAN if opts.quick else FULL_PLAN)
    cases = [(name, dtype, K) for name in opts.problems for dtype in opts.dtypes
             for K in opts.objectives]
    headline = (HEADLINE[0], HEADLINE[2], HEADLINE[1])
    return sorted(cases, key=lambda c: c != headline)


def _case_stages(opts: SuiteOptions) -> list[str]:
    return [s for s in C.STAGES if s in opts.stages]


def build_case(problem, grads, device, contenders) -> tuple[C.Case, dict]:
    """A Case with its stage inputs (the float64 Gram in fp32, its exact min-norm weights) and
    the float64 references ours is checked against."""
    K, dtype = len(grads), grads[0][0].dtype
    case = C.Case(problem, K, dtype, torch.device(device), grads)
    exact = {"gram": C.exact_gram(grads)}
    exact["weights"] = w_exact = C.exact_min_norm_weights(exact["gram"])
    case.gram_in = exact["gram"].to(device=device, dtype=torch.float32)[None]
    case.weights_in = torch.tensor([w_exact], dtype=torch.float32, device=device)
    exact["weights_of_gram_in"] = C.exact_min_norm_weights(case.gram_in[0].double())
    for c in contenders:   # what each of our entries must reproduce in pareto_combine
        if c.is_ours:
            exact[f"weights_{c.name}"] = w_exact
    try:
        from torchjd.aggregation import UPGradWeighting
        exact["weights_ours_upgrad"] = UPGradWeighting()(exact["gram"]).tolist()
    except Exception:  # torchjd missing: the UPGrad entries are skipped anyway
        pass
    return case, exact


def run_case(opts, plan_entry, contenders, primary, bandwidth, progress, log, grads_cache,
             k_needed) -> dict:
    """Every stage of one (problem, dtype, K); gradients are drawn once per (problem, dtype)
    for the largest K needed and sliced (each objective has its own random stream)."""
    problem_name, dtype, K = plan_entry
    problem = get_problem(problem_name)
    key = (problem_name, dtype)
    if key not in grads_cache:
        grads_cache.clear()  # one problem's gradients in memory at a time
        progress.set_postfix_str(f"gradients {problem_name} {DTYPE_NAMES[dtype]}")
        grads_cache[key] = make_gradients(problem, k_needed[key], dtype, opts.device, opts.seed)
    case, exact = build_case(problem, grads_cache[key][:K], opts.device, contenders)
    w_exact = exact["weights"]
    record = {"problem": problem.summary(), "K": K, "dtype": DTYPE_NAMES[dtype],
              "element_size": case.element_size, "num_params": case.num_params,
              "num_tensors": case.num_tensors, "label": case.label,
              "exact_weights": w_exact, "stages": {}}
    # peak memory on the first case (the target one) and every K=2 fp32 case
    memory = opts.memory and (plan_entry == _plan_cases(opts)[0] or
                              (not opts.quick and K == 2 and dtype == torch.float32))
    torch._dynamo.reset()   # fresh compile caches per case (the recompile limit is per code)
    start_case = time.perf_counter()
    allowed = LARGE_PROBLEM_STAGES.get(problem_name) if not opts.explicit_plan else None
    for stage in _case_stages(opts):
        if allowed is not None and stage not in allowed:
            record.setdefault("skipped_stages", {})[stage] = (
                "left out on this 122 M-parameter model: every AdamW contender holds its own "
                "parameters and optimizer state (~2 GB each)")
            progress.update(1)
            continue
        progress.set_postfix_str(f"{case.label} {stage}")
        start = time.perf_counter()
        record["stages"][stage] = run_stage(case, stage, contenders, primary, opts,
                                            bandwidth, exact, memory=memory, log=log)
        record["stages"][stage]["elapsed_s"] = time.perf_counter() - start
        progress.update(1)
    record["elapsed_s"] = time.perf_counter() - start_case
    return record


# ----------------------------------------------------------------------------------------------
# Scaling sweeps

SCALING_CONTENDERS = ("loop", "flatcat", "foreach", "torchjd_mgda")


def scaling_plan(quick: bool) -> dict:
    if quick:
        return {"params": {"num_tensors": 56, "num_params": [1e5, 1e6]},
                "tensors": {"num_params": 1e6, "num_tensors": [10, 100, 300]}}
    return {"params": {"num_tensors": 448, "num_params": [1e5, 1e6, 1e7, 1e8]},
            "tensors": {"num_params": 1e7, "num_tensors": [10, 100, 1000, 5000]}}


def run_scaling(opts, contenders, primary, bandwidth, progress, log, over_budget) -> dict:
    """Time vs total parameters at a fixed tensor count and vs tensor count at a fixed total,
    for the Gram and the whole pareto_combine (K=2, fp32). ``over_budget()`` returns a reason
    to stop early (the run's time budget), or None."""
    plan = scaling_plan(opts.quick)
    chosen = [c for c in contenders if c.name == primary or c.name in SCALING_CONTENDERS]
    sweep_opts = SuiteOptions(**{**opts.__dict__, "repeats": min(opts.repeats, 7),
                                 "stage_budget_s": opts.stage_budget_s / 2})
    out = {"stages": ["gram", "pareto_combine"], "K": 2, "dtype": "fp32", "sweeps": {}}
    points = [("params", int(n), plan["params"]["num_tensors"])
              for n in plan["params"]["num_params"]]
    points += [("tensors", int(plan["tensors"]["num_params"]), p)
               for p in plan["tensors"]["num_tensors"]]
    for sweep, n, p in points:
        reason = over_budget()
        if reason:
            out.setdefault("skipped_points", []).append(
                {"sweep": sweep, "num_params": n, "num_tensors": p, "reason": reason})
            progress.update(1)
            continue
        problem = synthetic_problem(n, p)
        progress.set_postfix_str(f"scaling N={problem.num_params:.1e} P={p}")
        grads = make_gradients(problem, 2, torch.float32, opts.device, opts.seed)
        case, exact = build_case(problem, grads, opts.device, chosen)
        point = {"num_params": problem.num_params, "num_tensors": p, "stages": {}}
        start = time.perf_counter()
        for stage in out["stages"]:
            res = run_stage(case, stage, chosen, primary, sweep_opts, bandwidth, exact,
                            memory=False, log=log)
            point["stages"][stage] = {
                name: {"median_s": e.get("median_s"), "status": e.get("status"),
                       "reason": e.get("reason")} for name, e in res["contenders"].items()}
            point["stages"][stage]["_roofline_s"] = res["roofline_s"]
            point["stages"][stage]["_bytes"] = res["bytes"]
        point["elapsed_s"] = time.perf_counter() - start
        out["sweeps"].setdefault(sweep, []).append(point)
        del grads, case
        progress.update(1)
    # tensor-count sensitivity: time at the most tensors / time at the fewest
    tensors = out["sweeps"].get("tensors", [])
    if len(tensors) >= 2:
        sens = {}
        for stage in out["stages"]:
            for name in tensors[0]["stages"][stage]:
                t0 = tensors[0]["stages"][stage][name]
                t1 = tensors[-1]["stages"][stage][name]
                if isinstance(t0, dict) and t0.get("median_s") and t1.get("median_s"):
                    sens.setdefault(stage, {})[name] = t1["median_s"] / t0["median_s"]
        out["tensor_count_sensitivity"] = sens
    return out


# ----------------------------------------------------------------------------------------------
# Targets

TARGETS = [
    ("Gram reaches >= 80 % of the read bandwidth", "gram", "roofline_fraction", ">=", 0.8, None),
    ("pareto_combine <= 1.25x its roofline time", "pareto_combine", "roofline_fraction", ">=",
     1 / 1.25, None),
    ("fused AdamW <= 1.3x its roofline time", "adamw", "roofline_fraction", ">=", 1 / 1.3, None),
    (">= 2.5x faster than 3 (foreach)", "pareto_combine", "slowdown_vs_primary", ">=", 2.5,
     "foreach"),
    (">= 10x faster than 2 (flatten+concatenate)", "pareto_combine", "slowdown_vs_primary", ">=",
     10.0, "flatcat"),
    (">= 10x faster than 5 (TorchJD MGDA)", "pareto_combine", "slowdown_vs_primary", ">=", 10.0,
     "torchjd_mgda"),
    (">= 50x faster than 1 (per-tensor loop)", "pareto_combine", "slowdown_vs_primary", ">=",
     50.0, "loop"),
]


def headline_case(cases: list[dict]) -> dict | None:
    for c in cases:
        if (c["problem"]["name"], c["K"], DTYPES[c["dtype"]]) == HEADLINE:
            return c
    return cases[0] if cases else None


def evaluate_targets(cases: list[dict]) -> dict:
    case = headline_case(cases)
    if case is None:
        return {"case": None, "rows": []}
    rows = []
    for text, stage, field_name, op, threshold, contender in TARGETS:
        st = case["stages"].get(stage)
        value = None
        if st is not None:
            info = st["contenders"].get(contender or st["primary"], {})
            value = info.get(field_name)
        met = None if value is None else (value >= threshold)
        shown = value
        if value is not None and field_name == "roofline_fraction" and stage != "gram":
            shown = 1 / value  # "x roofline time"
        rows.append({"target": text, "stage": stage, "value": shown, "met": met,
                     "measure": ("time / roofline time" if field_name == "roofline_fraction"
                                 and stage != "gram" else
                                 "fraction of read bandwidth" if stage == "gram" else
                                 f"time of {contender} / time of ours")})
    # memory: ours must need nothing of O(K*N) beyond inputs and outputs
    st = case["stages"].get("pareto_combine")
    if st is not None:
        info = st["contenders"].get(st["primary"], {})
        peak = info.get("peak_extra_bytes")
        value = None if peak is None else (peak - st.get("output_bytes", 0)) / (
            case["K"] * case["num_params"] * case["element_size"])
        rows.append({"target": "ours: no O(K*N) scratch (peak extra - output < 5 % of K*N*esize)",
                     "stage": "pareto_combine", "value": value,
                     "met": None if value is None else value < 0.05,
                     "measure": "(peak extra - output bytes) / (K*N*esize)"})
    return {"case": case["label"], "is_target_problem":
            (case["problem"]["name"], case["K"], DTYPES[case["dtype"]]) == HEADLINE,
            "rows": rows}


# ----------------------------------------------------------------------------------------------
# The whole run

def run_suite(opts: SuiteOptions, log=None) -> dict:
    """Run everything ``opts`` asks for; write results.json, results.md and the plots."""
    opts = opts.resolved()
    opts.out.mkdir(parents=True, exist_ok=True)
    previous_threads = torch.get_num_threads()
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    try:
        return _run_suite(opts, log)
    finally:
        torch.set_num_threads(previous_threads)


def _run_suite(opts: SuiteOptions, log) -> dict:
    from tqdm.auto import tqdm
    device = opts.device
    say = log or (lambda msg: tqdm.write(msg))
    started = time.perf_counter()
    ours = _choose_ours(opts)
    primary = C.ours_name(ours[0][0])   # _choose_ours puts the runnable one first
    budget_reason = ("skipped in --quick: a cold torch.compile of one decoder layer takes "
                     "10-40 s on this machine (whole-model graph: minutes)" if opts.quick else "")
    budget = C.CompileBudget(0.0 if opts.quick else opts.compile_budget_s, budget_reason)
    contenders = C.make_contenders(ours, budget)
    results = {
        "machine": machine_info(device),
        "options": {"quick": opts.quick, "device": str(device), "problems": list(opts.problems),
                    "objectives": list(opts.objectives),
                    "dtypes": [DTYPE_NAMES[d] for d in opts.dtypes], "stages": list(opts.stages),
                    "repeats_max": opts.repeats, "stage_budget_s": opts.stage_budget_s,
                    "time_budget_s": opts.time_budget_s, "threads": torch.get_num_threads(),
                    "seed": opts.seed},
        "ours": {"backends": [{"backend": b, "available": r is None, "reason": r} for b, r in ours],
                 "primary": primary},
        "contenders": {c.name: {"label": c.label, "number": c.number, "note": c.note}
                       for c in contenders},
        "method": {
            "timing": ("wall clock (time.perf_counter, device synchronised), medians of repeated "
                       "rounds after a warm-up call (the checked first call); each round runs "
                       "every contender once in an order rotated per round; the first round "
                       "sets how many rounds fit the stage budget (at least 3); ratios are "
                       "medians of per-round ratios"),
            "roofline": ("roofline time = minimal bytes / measured bandwidth: read-only stages at "
                         "the read bandwidth, stages that write at the triad bandwidth; the "
                         "bandwidth comes from PyTorch primitives (best of the measurements at "
                         "the start and the end), so a kernel that streams better than "
                         "torch.dot / torch.add shows more than 100 %"),
            "check": ("every contender's first result is compared with ours (ours with a float64 "
                      "reference) before timing; within the rounding tolerance: ok; beyond it "
                      "but below 5 % (15 % in bf16): the same computation with poor rounding, "
                      "timed and flagged inaccurate; beyond that: wrong, reported, not timed"),
        },
        "cases": [],
    }
    json_path = opts.out / "results.json"

    def save():
        results["elapsed_s"] = time.perf_counter() - started
        json_path.write_text(json.dumps(results, indent=1, default=str))

    save()
    say(f"bench: device {device}, ours = {primary}; measuring memory bandwidth")
    results["bandwidth"] = measure_bandwidth(device, size_mib=256 if opts.quick else 512,
                                             repeats=5 if opts.quick else 7)
    bw = results["bandwidth"]
    say(f"bench: read {bw['read_GBps']:.1f} GB/s, triad {bw['triad_GBps']:.1f} GB/s")
    n_case_steps = len(_plan_cases(opts)) * len(_case_stages(opts))
    plan = scaling_plan(opts.quick)
    n_scaling = (len(plan["params"]["num_params"]) + len(plan["tensors"]["num_tensors"])
                 if "scaling" in opts.stages else 0)

    def over_budget() -> str | None:
        spent = time.perf_counter() - started
        if opts.time_budget_s and spent > opts.time_budget_s:
            return f"time budget: {spent:.0f} s spent of {opts.time_budget_s:.0f} s"
        return None

    # the quick sweeps are tiny and always run; the full ones stop at the time budget
    scaling_budget = (lambda: None) if opts.quick else over_budget
    plan_cases = _plan_cases(opts) if _case_stages(opts) else []
    k_needed: dict = {}
    for name, dtype, K in plan_cases:
        k_needed[(name, dtype)] = max(K, k_needed.get((name, dtype), 0))
    grads_cache: dict = {}
    n_stages = len(_case_stages(opts))
    # the target case, the scaling sweeps, then the other cases (each model once first)
    with tqdm(total=n_case_steps + n_scaling, desc="bench", unit="step",
              disable=not opts.progress) as progress:
        for index, entry in enumerate(plan_cases):
            if index == SCALING_AFTER_CASES and n_scaling:
                grads_cache.clear()
                results["scaling"] = run_scaling(opts, contenders, primary, bw, progress, say,
                                                 scaling_budget)
                save()
            reason = over_budget() if index > 0 else None
            if reason:
                results.setdefault("skipped_cases", []).append(
                    {"case": f"{entry[0]} K={entry[2]} {DTYPE_NAMES[entry[1]]}", "reason": reason})
                progress.update(n_stages)
                continue
            results["cases"].append(run_case(opts, entry, contenders, primary, bw, progress, say,
                                             grads_cache, k_needed))
            save()
        if n_scaling and "scaling" not in results:
            results["scaling"] = run_scaling(opts, contenders, primary, bw, progress, say,
                                             scaling_budget)
        grads_cache.clear()
    if "overhead" in opts.stages:  # tiny tensors: the host work per call against P
        from fused_balance.benchmarking.overhead import run_overhead
        results["overhead"] = run_overhead(device, counts=(28, 448) if opts.quick else (28, 448, 5000),
                                           rounds=3 if opts.quick else 5, progress=say)
        save()
    # The roofline is what the machine can do: load from other processes only lowers a
    # measurement, so take the best of the measurements at the start and at the end.
    say("bench: measuring memory bandwidth again")
    results["bandwidth_runs"] = [bw, measure_bandwidth(device, size_mib=256 if opts.quick else 512,
                                                      repeats=5 if opts.quick else 7)]
    results["bandwidth"] = best_bandwidth(results["bandwidth_runs"])
    apply_roofline(results, results["bandwidth"])
    results["targets"] = evaluate_targets(results["cases"])
    results["machine"]["load_average_end"] = machine_info(device).get("load_average")
    results["compile_seconds"] = budget.spent
    results["self_check_passed"] = _self_check_passed(results)
    from fused_balance.benchmarking import report
    report.write_markdown(results, opts.out / "results.md")
    if opts.plots:
        try:
            from fused_balance.benchmarking import plots
            results["plots"] = plots.write_plots(results, opts.out)
        except Exception as exc:  # plots are a convenience; the numbers are already written
            results["plots_error"] = f"{type(exc).__name__}: {exc}"
            say(f"bench: plots failed: {results['plots_error']}")
    save()
    say(f"bench: wrote {json_path} and {opts.out / 'results.md'} in "
        f"{time.perf_counter() - started:.0f} s")
    return results


def best_bandwidth(runs: list[dict]) -> dict:
    """Per figure, the best of several bandwidth measurements."""
    best = dict(runs[0])
    for run in runs[1:]:
        for key, value in run.items():
            if key.endswith("GBps"):
                best[key] = max(best[key], value)
    best["method"] = runs[0]["method"] + f"; best of {len(runs)} measurements (start, end)"
    return best


def apply_roofline(results: dict, bandwidth: dict) -> None:
    """(Re)compute every roofline time and fraction from ``bandwidth``."""
    for case in results.get("cases", []):
        for st in case["stages"].values():
            if not st.get("bytes"):
                continue
            roof = roofline_seconds(StageBytes(st["bytes"]["read"], st["bytes"]["written"]),
                                    bandwidth)
            st["roofline_s"] = roof
            for info in st["contenders"].values():
                if info.get("median_s"):
                    info["roofline_fraction"] = roof / info["median_s"]
    for points in (results.get("scaling") or {}).get("sweeps", {}).values():
        for point in points:
            for st in point["stages"].values():
                if st.get("_bytes"):
                    st["_roofline_s"] = roofline_seconds(
                        StageBytes(st["_bytes"]["read"], st["_bytes"]["written"]), bandwidth)


def _self_check_passed(results: dict) -> bool:
    """Did ours agree with the float64 reference everywhere it ran?"""
    for case in results["cases"]:
        for stage in case["stages"].values():
            for name, info in stage["contenders"].items():
                if name.startswith("ours") and info.get("status") in ("wrong", "error"):
                    return False
    return True
