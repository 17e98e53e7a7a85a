"""Run the benchmark: cases x stages x contenders, checked, timed interleaved, with memory and
scaling sweeps; write results.json, results.md and the plots. What to run comes from suite.py,
what the numbers mean from results.py; report.py and plots.py only format them."""
from __future__ import annotations

import json
import time
import torch

from fused_balance.benchmarking import contenders as C, oracles
from fused_balance.benchmarking.suite import (DTYPE_NAMES, LARGE_PROBLEM_STAGES, SCALING_AFTER_CASES,
                                                 SCALING_CONTENDERS, SuiteOptions, case_stages, choose_ours,
                                                 plan_cases, scaling_plan)
from fused_balance.benchmarking.problems import get_problem, make_gradients, synthetic_problem
from fused_balance.benchmarking.results import (apply_roofline, best_bandwidth, check_result, evaluate_targets,
                                                self_check_passed, stage_result_for_check)
from fused_balance.benchmarking.roofline import measure_bandwidth, roofline_seconds, stage_bytes
from fused_balance.benchmarking.timing import (interleaved_times, machine_info, median,
                                               paired_ratio, peak_extra_memory, time_call)

__all__ = ["run_suite", "run_stage", "build_case"]

# ----------------------------------------------------------------------------------------------
# One stage of one case

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
        checked = stage_result_for_check(stage, fn, first)
        ref = None if reference_name is None else (reference_name, results[reference_name])
        check = check_result(stage, c, case, checked, ref, exact)
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


def build_case(problem, grads, device, contenders) -> tuple[C.Case, dict]:
    """A Case with its stage inputs (the float64 Gram in fp32, its exact min-norm weights) and
    the float64 references ours is checked against."""
    K, dtype = len(grads), grads[0][0].dtype
    case = C.Case(problem, K, dtype, torch.device(device), grads)
    exact = {"gram": oracles.exact_gram(grads)}
    exact["weights"] = w_exact = oracles.exact_min_norm_weights(exact["gram"])
    case.gram_in = exact["gram"].to(device=device, dtype=torch.float32)[None]
    case.weights_in = torch.tensor([w_exact], dtype=torch.float32, device=device)
    exact["weights_of_gram_in"] = oracles.exact_min_norm_weights(case.gram_in[0].double())
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
    memory = opts.memory and (plan_entry == plan_cases(opts)[0] or
                              (not opts.quick and K == 2 and dtype == torch.float32))
    torch._dynamo.reset()   # fresh compile caches per case (the recompile limit is per code)
    start_case = time.perf_counter()
    allowed = LARGE_PROBLEM_STAGES.get(problem_name) if not opts.explicit_plan else None
    for stage in case_stages(opts):
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
    ours = choose_ours(opts)
    primary = C.ours_name(ours[0][0])   # choose_ours puts the runnable one first
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
    n_case_steps = len(plan_cases(opts)) * len(case_stages(opts))
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
    cases = plan_cases(opts) if case_stages(opts) else []
    k_needed: dict = {}
    for name, dtype, K in cases:
        k_needed[(name, dtype)] = max(K, k_needed.get((name, dtype), 0))
    grads_cache: dict = {}
    n_stages = len(case_stages(opts))
    # the target case, the scaling sweeps, then the other cases (each model once first)
    with tqdm(total=n_case_steps + n_scaling, desc="bench", unit="step",
              disable=not opts.progress) as progress:
        for index, entry in enumerate(cases):
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
    if "overhead" in opts.stages and "overhead" not in results:  # tiny tensors: host work vs P
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
    results["self_check_passed"] = self_check_passed(results)
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
