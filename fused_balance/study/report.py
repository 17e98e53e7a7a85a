"""The study's generated report: tables.json, summary.md and PNG plots, from the job results
alone (never hand-edited: rerunning the study regenerates all of it)."""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from fused_balance.study.labels import ARM_LABELS
from fused_balance.study.stats import mean_std, paired

UNIFIED_METRICS = (("text_acc", "text token acc (%)", 100), ("cell_score", "image cell score (%)", 100),
                   ("fg_acc", "fg cells (%)", 100), ("psnr", "PSNR (dB)", 1), ("exact", "exact pictures (%)", 100),
                   ("image_loss", "image loss", 1))


def _fmt(m, s, scale, digits=1):
    return f"{scale * m:.{digits}f} ± {scale * s:.{digits}f}"


def _interval(p, scale=1.0, digits=1, unit=""):
    return (f"{scale * p['mean']:+.{digits}f}{unit} [{scale * p['low']:+.{digits}f}, "
            f"{scale * p['high']:+.{digits}f}]")


def unified_tables(runs: dict) -> dict:
    table = {}
    base = {r["seed"]: r for r in runs.get("vanilla", [])}
    for arm, rs in runs.items():
        row = {"n": len(rs), "seeds": [r["seed"] for r in rs]}
        for key, _, _ in UNIFIED_METRICS:
            row[key] = mean_std(r["final"][key] for r in rs)
        both = [r for r in rs if r["seed"] in base]  # paired by seed
        if len(both) > 1 and arm != "vanilla":
            for key in ("text_acc", "cell_score", "psnr"):
                p = paired([r["final"][key] for r in both], [base[r["seed"]]["final"][key] for r in both])
                ref = statistics.fmean(base[r["seed"]]["final"][key] for r in both)
                p["relative"] = {k: p[k] / ref if ref else math.nan for k in ("mean", "low", "high")}
                row[f"delta_{key}"] = p
        table[arm] = row
    return table


def branch_fractions(runs: dict) -> dict:
    """Per balanced arm: the share of (segment, recorded step) decisions per branch, and the mean
    share of the image objective in the weights."""
    from fused_balance.policies import BRANCH_NAMES

    out = {}
    for arm, rs in runs.items():
        decisions = [b for r in rs for step in r.get("branches", []) for b in step]
        if not decisions:
            continue
        shares = [w[1] / (w[0] + w[1]) for r in rs for step in r["weights"] for w in step if w[0] + w[1] > 0]
        out[arm] = {"branches": {name: decisions.count(code) / len(decisions) for code, name in BRANCH_NAMES.items()},
                    "image_weight_share": statistics.fmean(shares) if shares else math.nan}
    return out


def gradient_ratio(runs: dict) -> dict | None:
    obs = [o for r in runs.get("vanilla", []) for o in r["grad_ratios"]]
    if not obs:
        return None
    per_layer = {}
    for o in obs:
        per_layer.setdefault(o["segment"], []).append(o["ratio"])
    per_seed = [statistics.median(o["ratio"] for o in r["grad_ratios"]) for r in runs["vanilla"] if r["grad_ratios"]]
    return {"median": statistics.median(o["ratio"] for o in obs), "observations": len(obs),
            "per_layer_median": {k: statistics.median(v) for k, v in per_layer.items()},
            "per_seed_median": per_seed, "fraction_above_10": sum(o["ratio"] >= 10 for o in obs) / len(obs)}


def llava_tables(runs: dict, steps: int) -> dict:
    table = {}
    base = {r["seed"]: r for r in runs.get("constant", [])}
    for arm, rs in runs.items():
        row = {"n": len(rs), "acc": mean_std(r["final"]["acc"] for r in rs)}
        rs = [r for r in rs if r["seed"] in base]
        if len(rs) > 1:
            reach = []
            for r in rs:
                goal = base[r["seed"]]["final"]["acc"]
                hit = next((e["step"] for e in r["curve"] if e["acc"] >= goal), None)
                reach.append(hit)
            row["steps_to_constant_final"] = reach
            reached = [x for x in reach if x is not None]
            row["reached"] = len(reached)
            # a seed that never reaches it counts as the whole budget (an optimistic bound)
            row["mean_fraction_of_steps"] = statistics.fmean((x if x is not None else steps) / steps for x in reach)
            if arm != "constant":
                row["delta_acc"] = paired([r["final"]["acc"] for r in rs],
                                          [base[r["seed"]]["final"]["acc"] for r in rs])
        table[arm] = row
    return table


def write_report(out: Path, results: dict, meta: dict, plots: bool = True) -> dict:
    config = meta["config"]
    tables = {"meta": meta, "unified": {}, "gradient_ratio": {}, "tuning": results["tuning"], "llava": None}
    for family, runs in results["unified"].items():
        tables["unified"][family] = unified_tables(runs)
        tables["gradient_ratio"][family] = gradient_ratio(runs)
        tables.setdefault("branches", {})[family] = branch_fractions(runs)
    if results["llava"]:
        tables["llava"] = llava_tables(results["llava"], config["llava"]["steps"])
    (out / "tables.json").write_text(json.dumps(tables, indent=1))
    (out / "summary.md").write_text(summary_markdown(tables, config))
    if plots:
        from fused_balance.study import plots as study_plots
        study_plots.write_plots(out, results)
    return tables


def _grid_text(name: str, grid: dict) -> str:
    return ", ".join(f"{name}={x}: text {100 * s['text_acc']:.1f} %, cell score {100 * s['cell_score']:.1f} %"
                     for x, s in grid.items()) or "nothing (no tuning run finished)"


def _search_text(search: dict | None) -> str:
    """Whether the tuned setting is bracketed by the grid (an edge choice only bounds the optimum)."""
    if not search:
        return "not searched"
    if search["status"] == "interior":
        how = f" after {search['extensions']} geometric extension(s) (×{search['factor']:g})" if search["extensions"] else ""
        return "the choice is interior to the searched grid" + how
    if search["status"] == "incomplete":
        return "the search is incomplete (tuning jobs missing)"
    if search["edge"] == "both":
        return "a single point, not searched"
    side = {"low": "lower", "high": "upper"}[search["edge"]]
    return (f"the choice is at the grid's **{side} edge** (the bound of {search['max_extensions']} geometric "
            f"extension(s) ×{search['factor']:g} was hit): the optimum may lie beyond it")


def _verdict(p) -> str:
    return "**yes**" if p["excludes_zero"] else "no"


def summary_markdown(tables: dict, config: dict) -> str:
    meta = tables["meta"]
    u, l = config["unified"], config["llava"]
    lines = ["# Study: what Pareto-LoRA and the BalanceScheduler do (generated by `fused-balance study`)", "",
             f"Configuration `{meta['configuration']}`, seeds {meta['seeds']}, {meta['threads']} torch thread(s), "
             f"{meta['machine']}, torch {meta['torch']}, finished {meta['date_utc']}; command `{meta['command']}`; "
             f"sum of job wall times {meta['job_wall_s_total'] / 60:.1f} min.", "",
             "All numbers are on the held-out test split; mean ± std over seeds; Δ is the paired per-seed "
             "difference against the reference arm with its 95 % t-interval in brackets; \"excl. 0\" says "
             "whether that interval excludes zero. The image metric is a readable **proxy for the paper's "
             "perceptual judge**: each test caption's picture is generated greedily (Chameleon: argmax image "
             "token; Emu2: nearest codebook entry to the regressed embedding, fed back for the next patch) and "
             "scored cell by cell against the target (cell score = mean of foreground- and background-cell "
             "accuracy), and by PSNR of the rendered pictures.", "",
             f"Unified models: Llama-style decoder, {u['layers']} layers, hidden {u['hidden']}, LoRA r={u['rank']} "
             f"on every decoder linear, embeddings and heads trained; {u['steps']} steps, batch {u['batch_size']} "
             f"(half caption→picture, half picture→caption), AdamW lr {u['lr']}, gradient clipping {u['clip']} "
             f"in every arm. Emu2-style codebook RMS {u['visual_scale']} (the scale of the frozen visual "
             "embeddings, a property of the synthetic setting that sets the loss scales)."]
    for family, table in tables["unified"].items():
        name = {"emu2": "Emu2-style (regressed visual embeddings, MSE; text cross-entropy)",
                "chameleon": "Chameleon-style (discrete image tokens; image loss from hidden states and lm_head, "
                             "because the model's forward masks image-token logits to the dtype minimum)"}[family]
        lines += ["", f"## {name}", ""]
        ratio = tables["gradient_ratio"].get(family)
        if ratio:
            held = "held" if ratio["median"] >= 10 else "did not hold"
            lines.append(f"Imbalance under vanilla LoRA: median per-layer |g_text| / |g_image| = "
                         f"**×{ratio['median']:.1f}** over {ratio['observations']} (layer, step) observations "
                         f"(per seed: {', '.join(f'×{x:.1f}' for x in ratio['per_seed_median'])}; "
                         f"≥ ×10 in {100 * ratio['fraction_above_10']:.0f} %); target ≥ ×10 {held}. Per layer: "
                         + ", ".join(f"{k.rsplit('.', 1)[-1] if k != 'other' else k} ×{v:.1f}"
                                     for k, v in ratio["per_layer_median"].items()) + ".")
        tuning = tables["tuning"].get(family) or {}
        static, gradnorm = tuning.get("static"), tuning.get("gradnorm")
        if static:
            lines.append("")
            lines.append(f"Static reweighting tuned on the validation split (tuning seed): image weight "
                         f"**{static['chosen']:g}** chosen from " + _grid_text("w", static["grid"])
                         + " (best cell score with text within 2 % of w=1); " + _search_text(static["search"]) + ".")
        if gradnorm:
            lines.append("")
            allowed = "" if gradnorm["allowed"] is not False else \
                " — no α kept text within 2 % of w=1, so the default α is used"
            lines.append(f"GradNorm's α tuned the same way: **α {gradnorm['chosen']:g}** chosen from "
                         + _grid_text("α", gradnorm["grid"]) + allowed + "; " + _search_text(gradnorm["search"]) + ".")
        lines += ["", "| arm | " + " | ".join(label for _, label, _ in UNIFIED_METRICS) + " |",
                  "|---|" + "---|" * len(UNIFIED_METRICS)]
        for arm, row in table.items():
            lines.append(f"| {ARM_LABELS.get(arm, arm)} | " + " | ".join(
                _fmt(*row[k], scale, 3 if k == "image_loss" else 1) for k, _, scale in UNIFIED_METRICS) + " |")
        lines += ["", "Paired against vanilla LoRA (relative change of the mean, %, with the interval):", "",
                  "| arm | Δ text acc | excl. 0 | Δ image cell score | excl. 0 | Δ PSNR (dB) | excl. 0 |",
                  "|---|---|---|---|---|---|---|"]
        for arm, row in table.items():
            if "delta_text_acc" not in row:
                continue
            t, c, p = row["delta_text_acc"], row["delta_cell_score"], row["delta_psnr"]
            lines.append(f"| {ARM_LABELS.get(arm, arm)} | {_interval(t['relative'], 100, 1, ' %')} | {_verdict(t)} | "
                         f"{_interval(c['relative'], 100, 1, ' %')} | {_verdict(c)} | {_interval(p, 1, 2)} | {_verdict(p)} |")
        branches = tables.get("branches", {}).get(family, {})
        if branches:
            lines += ["", "What the balancers chose (every recorded step and segment, all seeds): " + "; ".join(
                f"{ARM_LABELS.get(a, a)}: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in b["branches"].items())
                + f", mean image share of the weights {b['image_weight_share']:.2f}" for a, b in branches.items()) + "."]
        lines += ["", _pareto_claim(family, table)]
    if tables["llava"]:
        lines += ["", "## Encoder+LLM (tiny LLaVA: CLIP vision tower, projector, Llama) and the BalanceScheduler", "",
                  f"Both towers random (nothing pre-trained), LoRA r={l['rank']} on both, projector, embeddings and "
                  f"head trained with the LLM; {l['steps']} steps, batch {l['batch_size']}, AdamW lr {l['lr']} (the "
                  f"scheduler's base rate), KL probe every {l['exact_every']} steps on {l['probe_size']} examples, "
                  f"auxiliary weight {l['aux_weight']}. Accuracy: the one-word answer to a question about a "
                  "rendered scene (colour / shape at a place, or the count), evaluated every "
                  f"{l['eval_every']} steps.", "",
                  "| arm | final accuracy (%) | Δ vs constant LR | excl. 0 | seeds reaching constant-LR final acc | "
                  "steps to reach it (per seed) | mean fraction of the budget |",
                  "|---|---|---|---|---|---|---|"]
        for arm, row in tables["llava"].items():
            d = row.get("delta_acc")
            lines.append(f"| {ARM_LABELS.get(arm, arm)} | {_fmt(*row['acc'], 100)} | "
                         + (f"{_interval(d, 100, 1)} | {_verdict(d)}" if d else "— | —")
                         + f" | {row.get('reached', '—')}/{row['n']} | "
                         + ", ".join(str(x) if x is not None else "never" for x in row.get("steps_to_constant_final", []))
                         + f" | {100 * row.get('mean_fraction_of_steps', math.nan):.0f} % |")
        lines += ["", _scheduler_claim(tables["llava"])]
    lines += ["", "Files: tables.json (every number above), jobs/ (one JSON per arm and seed, with curves and "
              "histories), pictures_*.png, curves_*.png, grad_ratio_*.png, llava_kappa.png, llava_curves.png."]
    return "\n".join(lines) + "\n"


def _pareto_claim(family: str, table: dict) -> str:
    row = table.get("pareto")
    if row is None or "delta_cell_score" not in row:
        return ""
    c, t = row["delta_cell_score"], row["delta_text_acc"]
    image_ok = c["relative"]["mean"] >= 0.10 and c["excludes_zero"] and c["mean"] > 0
    text_ok = t["relative"]["mean"] >= -0.02
    verdict = "held" if image_ok and text_ok else "did not hold"
    text = (f"**Target (Pareto-LoRA vs vanilla: image +10 % relative, interval excluding zero, text within 2 %): "
            f"{verdict}** — image cell score {100 * c['relative']['mean']:+.1f} % "
            f"(interval {'excludes' if c['excludes_zero'] else 'includes'} zero), text accuracy "
            f"{100 * t['relative']['mean']:+.1f} %.")
    ok_text = [(a, r) for a, r in table.items() if "delta_text_acc" in r and r["delta_text_acc"]["relative"]["mean"] >= -0.02]
    if ok_text:
        best, r = max(ok_text, key=lambda ar: ar[1]["delta_cell_score"]["mean"])
    if ok_text and r["delta_cell_score"]["mean"] <= 0:
        text += " No arm with text within 2 % improved the image cell score over vanilla LoRA."
    elif ok_text:
        text += (f" Best image cell score with text within 2 %: {ARM_LABELS.get(best, best)} "
                 f"({100 * r['delta_cell_score']['relative']['mean']:+.1f} %, interval "
                 f"{'excludes' if r['delta_cell_score']['excludes_zero'] else 'includes'} zero).")
    return text


def _scheduler_claim(table: dict) -> str:
    parts = []
    for arm in ("sched_first", "sched_exact", "sched_aux"):
        row = table.get(arm)
        if row is None or "delta_acc" not in row:
            continue
        d = row["delta_acc"]
        fast = row["mean_fraction_of_steps"] <= 0.75 and row["reached"] == row["n"]
        not_lower = d["high"] >= 0
        parts.append(f"{ARM_LABELS[arm]}: reaches the constant-LR final accuracy in "
                     f"{100 * row['mean_fraction_of_steps']:.0f} % of the steps on average "
                     f"({row['reached']}/{row['n']} seeds reach it), final accuracy {100 * d['mean']:+.1f} points "
                     f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] → target "
                     + ("**held**" if fast and not_lower and d["mean"] >= 0 else "**did not hold**"))
    return ("**Target (scheduler reaches the constant-LR final accuracy in ≤ 75 % of the steps, final accuracy "
            "not lower):** " + "; ".join(parts) + ". A seed that never reaches it counts as the whole "
            "budget, which flatters the arm.") if parts else ""
