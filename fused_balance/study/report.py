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


# Contrasts between variants, besides each arm against the reference arm: (A, B) read "A − B".
UNIFIED_CONTRASTS = (("pareto", "static"), ("pareto", "gradnorm"), ("pareto", "mgda"))
LLAVA_CONTRASTS = (("sched_exact", "sched_first"), ("sched_aux", "sched_first"), ("llm_only", "encoder_only"))
CONTRAST_METRICS = (("text_acc", "Δ text acc (points)", 100, 1),
                    ("cell_score", "Δ image cell score (points)", 100, 1), ("psnr", "Δ PSNR (dB)", 1, 2))


def one_setting_pairs(specs: dict) -> list[tuple[str, str, str]]:
    """(A, B, setting) for every two arms of the same kind whose specs differ in exactly one
    setting: numeric settings read smaller − larger (τ 2 − τ 5), others later arm − earlier."""
    pairs, names = [], list(specs)
    for i, first in enumerate(names):
        for second in names[i + 1:]:
            sa, sb = specs[first], specs[second]
            if set(sa) != set(sb) or sa.get("kind") != sb.get("kind"):
                continue
            differ = [k for k in sa if sa[k] != sb[k]]
            if len(differ) != 1:
                continue
            key = differ[0]
            numeric = all(isinstance(v, (int, float)) for v in (sa[key], sb[key]))
            a, b = (first, second) if numeric and sa[key] < sb[key] else (second, first)
            pairs.append((a, b, key))
    return pairs


def paired_by_seed(runs: dict, a: str, b: str, value) -> tuple[list[int], dict] | None:
    """Per-seed differences value(A run) − value(B run) over the seeds both arms ran, with
    stats.paired's 95 % t-interval; None with fewer than two common seeds."""
    left, right = ({r["seed"]: r for r in runs.get(arm, [])} for arm in (a, b))
    seeds = sorted(set(left) & set(right))
    if len(seeds) < 2:
        return None
    return seeds, paired([value(left[s]) for s in seeds], [value(right[s]) for s in seeds])


def unified_contrasts(runs: dict) -> list[dict]:
    """Paired differences between variants: the fixed method pairs (UNIFIED_CONTRASTS) and every
    two arms that differ in one setting, on the final test metrics."""
    specs = {arm: rs[0]["arm"] for arm, rs in runs.items() if rs and isinstance(rs[0].get("arm"), dict)}
    pairs = [(a, b, None) for a, b in UNIFIED_CONTRASTS] + one_setting_pairs(specs)
    out = []
    for a, b, setting in pairs:
        found = {key: paired_by_seed(runs, a, b, lambda r, key=key: r["final"][key]) for key, *_ in CONTRAST_METRICS}
        if any(f is None for f in found.values()):  # an arm missing, or fewer than two common seeds
            continue
        row = {"a": a, "b": b, "setting": setting, "seeds": found["text_acc"][0],
               **{key: f[1] for key, f in found.items()}}
        if setting is not None:
            row["values"] = [specs[a][setting], specs[b][setting]]
        out.append(row)
    return out


def steps_to_reach(record: dict, goal: float) -> int | None:
    """The first evaluated step whose accuracy reaches ``goal``; None if none does."""
    return next((e["step"] for e in record["curve"] if e["acc"] >= goal), None)


def llava_contrasts(runs: dict, steps: int) -> list[dict]:
    """Paired differences between scheduler variants, final accuracy and steps-to-threshold
    apart. The threshold is the constant-LR arm's final accuracy on the same seed; a seed that
    never reaches it counts as the whole budget (``censored`` counts them per arm)."""
    goal = {r["seed"]: r["final"]["acc"] for r in runs.get("constant", [])}
    out = []
    for a, b in LLAVA_CONTRASTS:
        final = paired_by_seed(runs, a, b, lambda r: r["final"]["acc"])
        if final is None:
            continue
        row = {"a": a, "b": b, "seeds": final[0], "acc": final[1]}
        with_goal = {arm: [r for r in runs[arm] if r["seed"] in goal] for arm in (a, b)}

        def steps_or_budget(r):
            hit = steps_to_reach(r, goal[r["seed"]])
            return steps if hit is None else hit

        found = paired_by_seed(with_goal, a, b, steps_or_budget)
        if found is not None:
            row["steps_seeds"], row["steps_to_constant_final"] = found
            row["censored"] = {arm: sum(steps_to_reach(r, goal[r["seed"]]) is None
                                        for r in with_goal[arm] if r["seed"] in found[0]) for arm in (a, b)}
        out.append(row)
    return out


def write_report(out: Path, results: dict, meta: dict, plots: bool = True) -> dict:
    config = meta["config"]
    tables = {"meta": meta, "unified": {}, "gradient_ratio": {}, "tuning": results["tuning"], "llava": None}
    for family, runs in results["unified"].items():
        tables["unified"][family] = unified_tables(runs)
        tables["gradient_ratio"][family] = gradient_ratio(runs)
        tables.setdefault("branches", {})[family] = branch_fractions(runs)
        tables.setdefault("contrasts", {})[family] = unified_contrasts(runs)
    if results["llava"]:
        tables["llava"] = llava_tables(results["llava"], config["llava"]["steps"])
        tables["llava_contrasts"] = llava_contrasts(results["llava"], config["llava"]["steps"])
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
        how = f" after {search['extensions']} geometric extension(s) (×{search['factor']:g})"
        return "the choice is interior to the searched grid" + (how if search["extensions"] else "")
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
        lines += _contrast_lines(tables.get("contrasts", {}).get(family, []))
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
                  f"{l['eval_every']} steps." + _cd_text(tables["llava"], l), "",
                  "Final accuracy:", "",
                  "| arm | final accuracy (%) | Δ vs constant LR (points) | excl. 0 |", "|---|---|---|---|"]
        for arm, row in tables["llava"].items():
            d = row.get("delta_acc")
            lines.append(f"| {ARM_LABELS.get(arm, arm)} | {_fmt(*row['acc'], 100)} | "
                         + (f"{_interval(d, 100, 1)} | {_verdict(d)}" if d else "— | —") + " |")
        lines += ["", "Steps to reach the constant-LR arm's final accuracy (same seed; evaluated every "
                  f"{l['eval_every']} steps):", "",
                  "| arm | seeds reaching it | steps (per seed) | mean fraction of the budget |", "|---|---|---|---|"]
        for arm, row in tables["llava"].items():
            lines.append(f"| {ARM_LABELS.get(arm, arm)} | {row.get('reached', '—')}/{row['n']} | "
                         + ", ".join(str(x) if x is not None else "never"
                                     for x in row.get("steps_to_constant_final", []))
                         + f" | {100 * row.get('mean_fraction_of_steps', math.nan):.0f} % |")
        lines += _llava_contrast_lines(tables.get("llava_contrasts") or [], l["steps"])
        lines += ["", _scheduler_claim(tables["llava"])]
    lines += ["", "Files: tables.json (every number above), jobs/ (one JSON per arm and seed, with curves and "
              "histories), pictures_*.png, curves_*.png, grad_ratio_*.png, llava_kappa.png, llava_curves.png."]
    return "\n".join(lines) + "\n"


def _cd_text(table: dict, lcfg: dict) -> str:
    """The alternating one-sided arms' description, where the table has one."""
    if not any(arm in table for arm in ("feature_cd", "language_cd")):
        return ""
    return (" Feature-CD and Language-CD are *our reading* of CoMMIT's one-sided baselines (the paper's exact "
            "definitions are not available to us): the constant-LR arm, except that training alternates phases "
            f"of {lcfg.get('cd_phase', '?')} steps in which only one side's LoRA is updated (the other's tensors and "
            "AdamW state do not change), the encoder first (Feature-CD) or the LLM first (Language-CD); the "
            "projector, embeddings and head train in every phase.")


def _contrast_label(row: dict) -> str:
    return f"{ARM_LABELS.get(row['a'], row['a'])} − {ARM_LABELS.get(row['b'], row['b'])}"


def _contrast_lines(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    lines = ["", "Paired differences between variants (A − B per seed: mean and 95 % t-interval of the "
             "difference; points of accuracy, dB of PSNR):", "",
             "| A − B | differs in | seeds | " + " | ".join(label for _, label, _, _ in CONTRAST_METRICS) + " |",
             "|---|---|---|" + "---|" * len(CONTRAST_METRICS)]
    for row in rows:
        differs = "method" if row["setting"] is None else f"{row['setting']} " + " vs ".join(
            f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in row["values"])
        lines.append(f"| {_contrast_label(row)} | {differs} | {len(row['seeds'])} | " + " | ".join(
            _interval(row[key], scale, digits) for key, _, scale, digits in CONTRAST_METRICS) + " |")
    return lines


def _llava_contrast_lines(rows: list[dict], steps: int) -> list[str]:
    if not rows:
        return []
    lines = ["", "Paired differences between variants (A − B per seed, mean and 95 % t-interval), final accuracy "
             "and steps to the constant-LR final accuracy apart (a seed that never reaches it counts as the "
             f"whole budget, {steps} steps; \"never\" gives how many seeds of A / B that is):", "",
             "| A − B | seeds | Δ final accuracy (points) | Δ steps to constant-LR final acc | never (A / B) |",
             "|---|---|---|---|---|"]
    for row in rows:
        st = row.get("steps_to_constant_final")
        lines.append(f"| {_contrast_label(row)} | {len(row['seeds'])} | {_interval(row['acc'], 100, 1)} | "
                     + (f"{_interval(st, 1, 0)} | {row['censored'][row['a']]} / {row['censored'][row['b']]}"
                        if st else "— | —") + " |")
    return lines


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
