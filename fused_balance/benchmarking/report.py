"""results.md: Markdown tables from the results dictionary."""
from __future__ import annotations

from pathlib import Path

from fused_balance.benchmarking.results import headline_case

__all__ = ["write_markdown", "format_seconds", "format_bytes", "markdown"]

STAGE_TITLES = {"gram": "Gram", "weights": "weights (K x K solve)", "combine": "combine",
                "pareto_combine": "pareto_combine (Gram + weights + combine)",
                "adamw": "optimizer step (AdamW on the combined gradient)"}


def format_seconds(t) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"


def format_bytes(n) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join("" if c is None else str(c) for c in row) + " |" for row in rows]
    return out


def _ordered_contenders(results: dict) -> list[str]:
    names = list(results.get("contenders", {}))
    return sorted(names, key=lambda n: (results["contenders"][n]["number"], n))


def _case_detail(results: dict, case: dict) -> list[str]:
    rows = []
    for stage, st in case["stages"].items():
        primary = st["primary"]
        for name, info in sorted(st["contenders"].items(),
                                 key=lambda kv: (kv[0] != primary, kv[1]["number"], kv[0])):
            status = info.get("status")
            if status != "ok":
                rows.append([stage, info["label"], f"*{status}*", "", "", "", "",
                             info.get("reason", "")[:90]])
                continue
            frac = info.get("roofline_fraction")
            ratio = info.get("slowdown_vs_primary")
            check = info.get("check", {})
            mem = info.get("peak_extra_bytes")
            mem_s = "-" if mem is None else f"{format_bytes(mem)} ({info['peak_extra_xN']:.2f} N)"
            if check.get("accurate", True):
                check_text = f"ok ({check.get('error', 0):.1e} vs {check.get('against', '?')})"
            else:
                check_text = (f"**inaccurate**: {check['error']:.1e} > {check['tolerance']:.0e} "
                              f"vs {check.get('against', '?')}")
            median_text = format_seconds(info["median_s"]) + (
                " (1 call)" if info.get("single_sample") else f" (n={info.get('repeats')})")
            rows.append([stage, info["label"], median_text,
                         "-" if info.get("GBps") is None else f"{info['GBps']:.1f}",
                         "-" if frac is None else f"{100 * frac:.0f} %",
                         "1 (ref)" if name == primary else
                         ("-" if ratio is None else f"{ratio:.2f}x"),
                         mem_s, check_text])
    return _table(["stage", "contender", "median", "GB/s", "of measured BW", "time / ours",
                   "peak extra memory", "check"], rows)


def _stage_matrix(results: dict, stage: str) -> list[str]:
    names = [n for n in _ordered_contenders(results)
             if any(stage in c["stages"] and n in c["stages"][stage]["contenders"]
                    for c in results["cases"])]
    if not names:
        return []
    primary = results["ours"]["primary"]
    names.sort(key=lambda n: (n != primary, results["contenders"][n]["number"], n))
    rows = []
    for case in results["cases"]:
        st = case["stages"].get(stage)
        if st is None:
            continue
        row = [case["label"], case["num_tensors"], f"{case['num_params'] / 1e6:.1f} M"]
        for n in names:
            info = st["contenders"].get(n)
            if info is None:
                row.append("")
            elif info.get("status") != "ok":
                row.append(info.get("status"))
            elif n == st["primary"]:
                frac = info.get("roofline_fraction")
                row.append(format_seconds(info["median_s"]) +
                           ("" if frac is None else f" ({100 * frac:.0f} % of BW)"))
            else:
                ratio = info.get("slowdown_vs_primary")
                flags = ("" if info.get("check", {}).get("accurate", True) else " !") + (
                    " 1x" if info.get("single_sample") else "")
                row.append(format_seconds(info["median_s"]) +
                           ("" if ratio is None else f" ({ratio:.1f}x)") + flags)
        rows.append(row)
    labels = [results["contenders"][n]["label"] for n in names]
    return _table(["case", "P", "N"] + labels, rows)


def _scaling_tables(results: dict) -> list[str]:
    sc = results.get("scaling")
    if not sc:
        return []
    out = ["## Scaling (K=2, fp32)", "",
           "Median times; the fused path should stay flat in the tensor count where the "
           "per-tensor loops grow. Plots: `scaling_params.png`, `scaling_tensors.png`.", ""]
    for sweep, title in (("params", "time vs total parameters (fixed tensor count)"),
                         ("tensors", "time vs tensor count (fixed total parameters)")):
        points = sc["sweeps"].get(sweep, [])
        if not points:
            continue
        for stage in sc["stages"]:
            names = [n for n in points[0]["stages"][stage] if not n.startswith("_")]
            rows = []
            for pt in points:
                row = [f"{pt['num_params']:.2e}", pt["num_tensors"],
                       format_seconds(pt["stages"][stage].get("_roofline_s"))]
                for n in names:
                    e = pt["stages"][stage][n]
                    row.append(format_seconds(e["median_s"]) if e.get("median_s")
                               else e.get("status"))
                rows.append(row)
            labels = [results["contenders"].get(n, {}).get("label", n) for n in names]
            out += [f"### {stage}: {title}", ""]
            out += _table(["N", "P", "roofline"] + labels, rows) + [""]
    sens = sc.get("tensor_count_sensitivity")
    if sens:
        out += ["Tensor-count sensitivity (time at the most tensors / time at the fewest, same "
                "total size):", ""]
        names = sorted({n for s in sens.values() for n in s})
        out += _table(["stage"] + names,
                      [[stage] + [f"{sens[stage].get(n, float('nan')):.2f}" for n in names]
                       for stage in sens]) + [""]
    return out


def _problems_reasons(results: dict) -> list[str]:
    grouped: dict = {}
    for case in results["cases"]:
        for stage, st in case["stages"].items():
            for name, info in st["contenders"].items():
                if info.get("status") in ("skipped", "wrong", "error"):
                    key = (info["label"], info["status"], info.get("reason", ""))
                    grouped.setdefault(key, []).append(f"{case['label']} / {stage}")
    out = []
    skipped = results.get("skipped_cases", []) + [
        {"case": f"{c['label']} / {stage}", "reason": why}
        for c in results.get("cases", []) for stage, why in c.get("skipped_stages", {}).items()] + [
        {"case": f"scaling {p['sweep']} N={p['num_params']:.0e} P={p['num_tensors']}",
         "reason": p["reason"]} for p in (results.get("scaling") or {}).get("skipped_points", [])]
    if skipped:
        out += ["## Cases not run", ""] + _table(["case", "reason"],
                                                [[c["case"], c["reason"]] for c in skipped]) + [""]
    if not grouped:
        return out
    rows = [[label, status, reason,
             f"{len(where)}: {where[0]}" + (" ..." if len(where) > 1 else "")]
            for (label, status, reason), where in grouped.items()]
    return out + ["## Skipped, failed or wrong contenders", ""] + _table(
        ["contender", "status", "reason", "where (count: first)"], rows) + [""]


def markdown(results: dict) -> str:
    m = results["machine"]
    bw = results.get("bandwidth", {})
    ours = results["ours"]
    lines = ["# fused_balance benchmark", "",
             f"- date: {m['date']}; device: {m['device']}"
             + (f" ({m['gpu']})" if m.get("gpu") else ""),
             f"- machine: {m['cpu_model']}, {m['cpu_cores']} cores, torch threads "
             f"{m['torch_threads']}, ATen CPU capability {m['cpu_capability']}; torch "
             f"{m['torch']}, Python {m['python']}"
             + (f"; load average at start {m['load_average'][0]:.1f}"
                if m.get("load_average") else ""),
             f"- ours: `{ours['primary']}`; backends: " + ", ".join(
                 f"{b['backend']} ("
                 + ("available" if b["available"] else f"not available: {b['reason']}") + ")"
                 for b in ours["backends"]),
             f"- memory bandwidth (same run): read {bw.get('read_GBps', float('nan')):.1f} GB/s "
             f"(torch.sum {bw.get('sum_GBps', float('nan')):.1f}, torch.dot "
             f"{bw.get('dot_GBps', float('nan')):.1f}), triad "
             f"{bw.get('triad_GBps', float('nan')):.1f}"
             f" GB/s; {bw.get('method', '')}",
             "- roofline time = the stage's minimal bytes / that bandwidth; it is a reference, not a "
             "hard bound: a fused kernel whose read/write mix suits the memory system better than "
             "the probes can exceed it (over 100 % of the measured bandwidth)",
             f"- options: {results['options']}; total time {results.get('elapsed_s', 0):.0f} s",
             f"- ours agrees with the float64 reference everywhere: "
             f"{'yes' if results.get('self_check_passed') else 'NO'}", ""]
    load = [x for x in (m.get("load_average"), m.get("load_average_end")) if x]
    threads = results["options"].get("threads") or m["torch_threads"]
    if load and max(l[0] for l in load) > 1.25 * (m.get("cpu_cores") or 1) and m["device"] == "cpu":
        lines += [f"> **Shared machine:** the load average was "
                  f"{' -> '.join(f'{l[0]:.1f}' for l in load)} on {m['cpu_cores']} cores during "
                  f"this run. With {threads} OpenMP threads per process, every parallel region "
                  "then waits for a descheduled thread, so contenders made of many small ops "
                  "(per-tensor loops, foreach) slow down far more than one fused pass: their "
                  "ratios here overstate what an idle machine shows (compare `--threads 1`).", ""]
    targets = results.get("targets", {})
    if targets.get("rows"):
        lines += [f"## Targets ({targets['case']}"
                  + ("" if targets.get("is_target_problem") else
                     "; NOT the target problem Llama-2-7B K=2 fp32, which was not run") + ")", ""]
        rows = []
        for r in targets["rows"]:
            v = r["value"]
            rows.append([r["target"], r["stage"], r["measure"],
                         "-" if v is None else f"{v:.3g}",
                         "n/a" if r["met"] is None else ("met" if r["met"] else "not met")])
        lines += _table(["target", "stage", "measured as", "value", "status"], rows) + [""]
    cases = results.get("cases", [])
    if cases:
        head = headline_case(cases)
        lines += [f"## {head['label']}: every stage and contender "
                  f"(P = {head['num_tensors']} tensors, N = {head['num_params']:,} parameters)", ""]
        lines += _case_detail(results, head) + [""]
        lines += ["## All cases, by stage", "",
                  "ours: median time (the fraction of the measured bandwidth reached); "
                  "others: median time (time / ours, "
                  "median of per-round ratios). `!`: result inaccurate beyond the tolerance but "
                  "not wrong (see the check column / JSON); `1x`: too slow to repeat, timed once. "
                  "wrong / error / skipped: see the list below.", ""]
        for stage in ("gram", "weights", "combine", "pareto_combine", "adamw"):
            table = _stage_matrix(results, stage)
            if table:
                lines += [f"### {STAGE_TITLES[stage]}", ""] + table + [""]
    lines += _scaling_tables(results)
    if results.get("overhead"):
        from fused_balance.benchmarking.overhead import markdown as overhead_markdown
        lines += overhead_markdown(results["overhead"])
    lines += _problems_reasons(results)
    lines += ["## Contenders", ""]
    lines += _table(["contender", "what is timed"],
                    [[results["contenders"][n]["label"], results["contenders"][n]["note"]]
                     for n in _ordered_contenders(results)]) + [""]
    lines += ["## Method", ""] + [f"- {k}: {v}" for k, v in results.get("method", {}).items()]
    mem_method = next((st.get("memory_method") for c in cases for st in c["stages"].values()
                       if st.get("memory_method")), None)
    if mem_method:
        lines.append(f"- peak extra memory: {mem_method}; one extra call per contender, on the "
                     "first case and every K=2 fp32 case; N = the bytes of one objective's "
                     "gradients (the combined output of combine / pareto_combine is 1 N)")
    return "\n".join(lines) + "\n"


def write_markdown(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.write_text(markdown(results))
    return path
