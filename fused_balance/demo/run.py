"""The training demo: vanilla LoRA vs Pareto-LoRA on a tiny unified text+image model.

    fused-balance train [--steps N] [--seeds S] [--out DIR] [--backend NAME]
    python -m fused_balance.demo.run ...

For every seed both methods start from the same weights and see the same batches. Vanilla LoRA
steps on the plain sum of the text and image losses; Pareto-LoRA balances the two objectives'
gradients per transformer layer (fb.pareto_combine). Writes results.json, summary.md and PNG
plots into --out.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

OBJECTIVES = ("text", "image")
METRICS = ("text_acc", "text_loss", "image_acc", "image_loss", "image_fg_acc", "image_exact")
EVAL_SEED = 10_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from fused_balance.training import FILL_MODES

    parser.add_argument("--steps", type=int, default=400, help="training steps per run (default 400)")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds, 0..N-1 (default 5)")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "cpp", "triton"],
                        help="fused_balance backend for the balancing passes (default auto)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--policy", default="pareto_lora", choices=["pareto_lora", "mgda"])
    parser.add_argument("--tau", type=float, default=5.0, help="norm-ratio threshold of pareto_lora")
    parser.add_argument("--segments", default="layer", choices=["layer", "tensor", "global"])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--generation-fraction", type=float, default=0.15,
                        help="share of caption->image examples in training batches (default 0.15: "
                             "text-heavy instruction data)")
    parser.add_argument("--max-objects", type=int, default=1, help="shapes per picture, 1..4 (default 1)")
    parser.add_argument("--text-weight", type=float, default=1.0, help="weight of the text loss")
    parser.add_argument("--eval-examples", type=int, default=256)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--diag-every", type=int, default=10,
                        help="vanilla runs: per-objective gradient statistics every N steps")
    parser.add_argument("--fill", default="backward", choices=list(FILL_MODES),
                        help="how per-objective gradients are produced (default backward)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the matrices are tiny, more threads only "
                             "add synchronisation and make timings noisy; 0 = torch's default)")
    parser.add_argument("--timing-repeats", type=int, default=20)
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--no-progress", action="store_true")


# -- evaluation -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, batches) -> dict:
    """Teacher-forced held-out metrics per modality (image metrics on caption->image examples,
    text metrics on every caption token)."""
    model.eval()
    sums = dict.fromkeys(("text_ok", "text_n", "text_nll", "image_ok", "image_n", "image_nll",
                          "fg_ok", "fg_n", "exact", "pictures"), 0.0)
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                b["labels_next"].reshape(-1), reduction="none")
        nll = nll.view_as(b["labels_next"])
        ok = logits.argmax(-1) == b["labels_next"]
        for key, mask in (("text", b["text_mask"]), ("image", b["image_mask"])):
            sums[f"{key}_ok"] += float((ok & mask).sum())
            sums[f"{key}_n"] += float(mask.sum())
            sums[f"{key}_nll"] += float((nll * mask).sum())
        sums["fg_ok"] += float((ok & b["image_fg_mask"]).sum())
        sums["fg_n"] += float(b["image_fg_mask"].sum())
        has_picture = b["image_mask"].any(1)
        all_right = (ok | ~b["image_mask"]).all(1)
        sums["exact"] += float((all_right & has_picture).sum())
        sums["pictures"] += float(has_picture.sum())
    model.train()
    div = lambda a, n: a / n if n else float("nan")  # noqa: E731
    return {"text_acc": div(sums["text_ok"], sums["text_n"]), "text_loss": div(sums["text_nll"], sums["text_n"]),
            "image_acc": div(sums["image_ok"], sums["image_n"]),
            "image_loss": div(sums["image_nll"], sums["image_n"]),
            "image_fg_acc": div(sums["fg_ok"], sums["fg_n"]),
            "image_exact": div(sums["exact"], sums["pictures"])}


# -- one training run -----------------------------------------------------------------------------
def train_run(method: str, seed: int, args, eval_batches, progress: bool) -> dict:
    from tqdm.auto import tqdm

    from fused_balance.demo.data import VOCAB, make_batch
    from fused_balance.demo.model import build_lora_model, modality_losses
    from fused_balance.training import ParetoLoRA, lora_parameters

    model = build_lora_model(VOCAB.size, hidden=args.hidden, layers=args.layers, rank=args.rank,
                             seed=seed)
    named = lora_parameters(model)
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, foreach=True)
    common = dict(segments=args.segments, tau=args.tau, backend=args.backend, fill=args.fill,
                  objectives=list(OBJECTIVES))
    if method == "pareto":
        balancer = ParetoLoRA(named, optimizer, policy=args.policy, **common)
    else:  # plain summed loss; a policy="sum" balancer only to observe the gradients now and then
        balancer = ParetoLoRA(named, None, policy="sum", **common)
    rng = torch.Generator().manual_seed(1000 + seed)  # same batches for both methods
    curves = {k: [] for k in OBJECTIVES}
    step_times, step_cpu, evals = [], [], []
    bar = tqdm(range(args.steps), desc=f"seed {seed} {method:7s}", disable=not progress,
               leave=False, dynamic_ncols=True, file=sys.stderr)
    for step in bar:
        batch = make_batch(args.batch_size, rng, args.generation_fraction, args.max_objects)
        observe = method == "vanilla" and step % args.diag_every == 0
        t0, c0 = time.perf_counter(), time.process_time()
        losses, _ = modality_losses(model, batch, text_weight=args.text_weight)
        balancer.step_count = step  # the history's step label
        if method == "pareto":
            balancer.step(losses)
        elif observe:
            balancer.backward(losses, accumulate=False)  # same gradient as the sum's backward
            optimizer.step()
        else:
            (losses["text"] + losses["image"]).backward()
            optimizer.step()
        optimizer.zero_grad()
        if not observe:
            step_times.append(time.perf_counter() - t0)
            step_cpu.append(time.process_time() - c0)
        for k in OBJECTIVES:
            curves[k].append(float(losses[k].detach()))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            evals.append({"step": step + 1, **evaluate(model, eval_batches)})
            bar.set_postfix(img_acc=f"{evals[-1]['image_acc']:.3f}", txt_acc=f"{evals[-1]['text_acc']:.3f}")
    bar.close()
    history = [{"step": h["step"], "norms": h["norms"].tolist(), "weights": h["weights"].tolist(),
                "cosine": h["cosines"][:, 0, 1].tolist(), "branch": h["branch"].tolist()}
               for h in balancer.history]
    return {"method": method, "seed": seed, "final": evals[-1], "evals": evals,
            "train_losses": curves, "step_time_s": step_times, "step_cpu_s": step_cpu,
            "segments": balancer.segment_names, "history": history,
            "skipped_steps": balancer.skipped_steps, "num_lora_params": sum(p.numel() for p in params)}


# -- measurements besides training ----------------------------------------------------------------
def _median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_fill_modes(args, repeats: int) -> dict:
    """GradBank: K backward passes into the bank vs one batched (vmap) backward, demo model."""
    from fused_balance.demo.data import VOCAB, make_batch
    from fused_balance.demo.model import build_lora_model, modality_losses
    from fused_balance.training import GradBank, lora_parameters

    model = build_lora_model(VOCAB.size, hidden=args.hidden, layers=args.layers, rank=args.rank, seed=0)
    params = [p for _, p in lora_parameters(model)]
    batch = make_batch(args.batch_size, torch.Generator().manual_seed(7), 0.5)
    out = {}
    for mode in ("backward", "batched"):
        bank = GradBank(params, 2, mode=mode)
        out[mode] = _median_time(lambda: bank.fill(list(modality_losses(model, batch)[0].values())), repeats)
    model.zero_grad()
    out["single_backward_of_sum"] = _median_time(
        lambda: sum(modality_losses(model, batch)[0].values()).backward(), repeats)
    return out


def time_optimizers(shapes, segment_ids, backend: str, repeats: int, policy: str, tau: float) -> dict:
    """Per-step optimizer cost with K = 2 objectives' gradients already computed:
    (a) torch.optim.AdamW(foreach) on one precomputed gradient (vanilla's optimizer step);
    (b) fb.pareto_combine into .grad + torch.optim.AdamW(foreach);
    (c) BalancedAdamW: fb.pareto_weights -> fused fb.balanced_adamw_step."""
    import fused_balance as fb
    from fused_balance.training import BalancedAdamW, GradBank

    gen = torch.Generator().manual_seed(0)
    make = lambda: [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]  # noqa: E731
    result = {"num_params": int(sum(math.prod(s) for s in shapes)), "num_tensors": len(shapes)}
    ref_params, fused_params = make(), make()
    bank = GradBank(ref_params, 2)
    bank.buffer.copy_(torch.randn(bank.buffer.shape, generator=gen) * 1e-3)
    for p in ref_params:
        p.grad = torch.zeros_like(p)
    torch_opt = torch.optim.AdamW(ref_params, lr=1e-4, weight_decay=0.0, foreach=True)
    result["torch_adamw_ms"] = 1e3 * _median_time(torch_opt.step, repeats)

    def combine_then_adamw():
        fb.pareto_combine(bank.grads, segment_ids, policy=policy, tau=tau, backend=backend,
                          out=[p.grad for p in ref_params])
        torch_opt.step()

    result["combine_plus_torch_adamw_ms"] = 1e3 * _median_time(combine_then_adamw, repeats)
    fused_opt = BalancedAdamW(fused_params, lr=1e-4, weight_decay=0.0, backend=backend)
    fused_grads = [[g for g in row] for row in bank.grads]

    def fused_step():
        res = fb.pareto_weights(fused_grads, segment_ids, policy=policy, tau=tau, backend=backend)
        fused_opt.balanced_step(fused_grads, res.weights, segment_ids, skip=res.found_inf)

    result["fused_balanced_adamw_ms"] = 1e3 * _median_time(fused_step, repeats)
    return result


def _lora_like_shapes(hidden: int, layers: int, rank: int) -> tuple[list, list]:
    inter = 2 * hidden
    dims = [(hidden, hidden)] * 4 + [(hidden, inter), (hidden, inter), (inter, hidden)]
    shapes, segs = [], []
    for layer in range(layers):
        for d_in, d_out in dims:
            shapes += [(rank, d_in), (d_out, rank)]
            segs += [layer, layer]
    return shapes, segs


# -- aggregation and report -----------------------------------------------------------------------
def _mean_std(values) -> tuple[float, float]:
    values = [v for v in values if v == v]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(runs: list[dict], tau: float) -> dict:
    by = {m: [r for r in runs if r["method"] == m] for m in ("vanilla", "pareto")}
    seeds = sorted({r["seed"] for r in runs})
    agg = {"metrics": {}, "deltas": {}}
    for m, rs in by.items():
        agg["metrics"][m] = {k: dict(zip(("mean", "std"), _mean_std([r["final"][k] for r in rs])))
                             for k in METRICS}
    for k in METRICS:
        diffs = []
        for s in seeds:
            v = [r for r in by["vanilla"] if r["seed"] == s][0]["final"][k]
            p = [r for r in by["pareto"] if r["seed"] == s][0]["final"][k]
            diffs.append(p - v)
        mean, std = _mean_std(diffs)
        agg["deltas"][k] = {"mean": mean, "std": std, "per_seed": diffs}
    times = {m: statistics.median(t for r in rs for t in r["step_time_s"]) for m, rs in by.items()}
    cpu = {m: statistics.median(t for r in rs for t in r["step_cpu_s"]) for m, rs in by.items()}
    agg["step_time_ms"] = {m: 1e3 * t for m, t in times.items()}
    agg["step_cpu_ms"] = {m: 1e3 * t for m, t in cpu.items()}
    agg["step_time_overhead"] = times["pareto"] / times["vanilla"] - 1.0
    agg["step_cpu_overhead"] = cpu["pareto"] / cpu["vanilla"] - 1.0
    # The imbalance seen by vanilla training: log10 |g_text| / |g_image| per layer.
    ratios = []
    for r in by["vanilla"]:
        for h in r["history"]:
            for n_text, n_image in h["norms"]:
                if n_text > 0 and n_image > 0:
                    ratios.append(math.log10(n_text / n_image))
    agg["vanilla_log10_ratio"] = {
        "median": statistics.median(ratios) if ratios else float("nan"),
        "fraction_text_larger": sum(r > 0 for r in ratios) / max(1, len(ratios)),
        "fraction_above_tau": sum(r > math.log10(tau) for r in ratios) / max(1, len(ratios))}
    branches = [b for r in by["pareto"] for h in r["history"] for b in h["branch"]]
    agg["pareto_branch_fraction"] = {name: sum(b == code for b in branches) / max(1, len(branches))
                                     for code, name in ((0, "sum"), (1, "rescale"), (2, "conflict"))}
    image_weights = [w[1] / (w[0] + w[1]) for r in by["pareto"] for h in r["history"] for w in h["weights"]
                     if w[0] + w[1] > 0]
    agg["pareto_mean_image_weight_share"] = statistics.fmean(image_weights) if image_weights else float("nan")
    return agg


def _fmt(ms: tuple[float, float] | dict, pct: bool = False) -> str:
    mean, std = (ms["mean"], ms["std"]) if isinstance(ms, dict) else ms
    if pct:
        return f"{100 * mean:.1f} ± {100 * std:.1f}"
    return f"{mean:.3f} ± {std:.3f}"


def _verdict(delta: dict, higher_is_better: bool = True) -> str:
    mean, std, per_seed = delta["mean"], delta["std"], delta["per_seed"]
    better = [d > 0 if higher_is_better else d < 0 for d in per_seed]
    good = mean > 0 if higher_is_better else mean < 0
    if abs(mean) <= std or (0 < sum(better) < len(better) and abs(mean) < 2 * std):
        return "no clear difference (the change is within the seed-to-seed spread)"
    return ("better" if good else "worse") + f" in {sum(better) if good else len(better) - sum(better)}" \
        f"/{len(better)} seeds"


def write_summary(path: Path, args, agg: dict, fill: dict, optim_timings: list, backend_name: str,
                  runs: list[dict]) -> None:
    from fused_balance.demo.data import VOCAB

    m, d = agg["metrics"], agg["deltas"]
    n = len({r["seed"] for r in runs})
    rows = [("text token accuracy (%)", "text_acc", True, True),
            ("text loss", "text_loss", False, False),
            ("image token accuracy (%)", "image_acc", True, True),
            ("image foreground-cell accuracy (%)", "image_fg_acc", True, True),
            ("whole picture right (%)", "image_exact", True, True),
            ("image loss", "image_loss", False, False)]
    lines = [
        "# Balanced training demo: vanilla LoRA vs Pareto-LoRA", "",
        f"Tiny unified text+image model (Llama decoder, {args.layers} layers, hidden {args.hidden}, "
        f"vocabulary of {VOCAB.text_size} text tokens + {VOCAB.num_image_codes} image codes; LoRA r={args.rank} on all linear layers, "
        f"embeddings and head trained), synthetic captions <-> 4x4 pictures, "
        f"{int(100 * args.generation_fraction)}% caption->image examples in training batches. "
        f"{args.steps} steps, batch {args.batch_size}, AdamW lr {args.lr}, {n} seed(s); "
        f"policy `{args.policy}` (tau {args.tau}) per `{args.segments}` segment, backend `{backend_name}`. "
        f"Held-out set: {args.eval_examples} examples, both directions equally. Mean ± std over seeds.", "",
        "| metric | vanilla LoRA | Pareto-LoRA | Pareto − vanilla |", "|---|---|---|---|"]
    for label, key, pct, _ in rows:
        lines.append(f"| {label} | {_fmt(m['vanilla'][key], pct)} | {_fmt(m['pareto'][key], pct)} | "
                     f"{_fmt(d[key], pct)} |")
    r = agg["vanilla_log10_ratio"]
    labels = {"image_acc": "token accuracy", "image_fg_acc": "foreground-cell accuracy",
              "image_loss": "loss", "text_acc": "token accuracy", "text_loss": "loss"}

    def clear(keys, word):
        found = []
        for k in keys:
            hib = not k.endswith("loss")
            if _verdict(d[k], hib).startswith(word):
                scale, unit = (1.0, "") if k.endswith("loss") else (100.0, " points")
                found.append(f"{labels[k]} {scale * d[k]['mean']:+.{3 if k.endswith('loss') else 1}f}{unit}")
        return found

    image_better, text_worse = clear(("image_loss", "image_acc", "image_fg_acc"), "better"), \
        clear(("text_acc", "text_loss"), "worse")
    bottom = ("**Bottom line:** Pareto-LoRA " + (f"clearly improved the image objective ({', '.join(image_better)})"
                                                 if image_better else "did not clearly improve the image objective")
              + (f" and cost the text objective ({', '.join(text_worse)})." if text_worse
                 else " and did not clearly change the text objective.")
              + " \"Clearly\": the mean change exceeds the seed-to-seed spread (see below).")
    lines += ["", bottom, "", "## What happened", "",
              f"- **Imbalance.** Under vanilla training the text gradient is larger than the image "
              f"gradient in {100 * r['fraction_text_larger']:.0f}% of (layer, step) observations; median "
              f"log10(|g_text|/|g_image|) = {r['median']:.2f} (×{10 ** r['median']:.1f}); the ratio exceeds "
              f"tau = {args.tau} in {100 * r['fraction_above_tau']:.0f}% of them (see grad_ratio_heatmap.png).",
              f"- **Image metric.** Pareto-LoRA vs vanilla on image token accuracy: "
              f"{100 * d['image_acc']['mean']:+.1f} ± {100 * d['image_acc']['std']:.1f} points, "
              f"{_verdict(d['image_acc'])}; foreground cells {100 * d['image_fg_acc']['mean']:+.1f} ± "
              f"{100 * d['image_fg_acc']['std']:.1f} points, {_verdict(d['image_fg_acc'])}; image loss "
              f"{d['image_loss']['mean']:+.3f} ± {d['image_loss']['std']:.3f}, "
              f"{_verdict(d['image_loss'], higher_is_better=False)}.",
              f"- **Text cost.** Text token accuracy {100 * d['text_acc']['mean']:+.1f} ± "
              f"{100 * d['text_acc']['std']:.1f} points, {_verdict(d['text_acc'])}; text loss "
              f"{d['text_loss']['mean']:+.3f} ± {d['text_loss']['std']:.3f}, "
              f"{_verdict(d['text_loss'], higher_is_better=False)}.",
              f"- **Branches taken by Pareto-LoRA** (per layer and step): "
              + ", ".join(f"{k} {100 * v:.0f}%" for k, v in agg["pareto_branch_fraction"].items())
              + f"; mean image share of the weights {agg['pareto_mean_image_weight_share']:.2f} (0.5 = equal).",
              f"- **Step time.** Median full training step (forward, backward(s), balancing, AdamW): "
              f"vanilla {agg['step_time_ms']['vanilla']:.1f} ms, Pareto-LoRA {agg['step_time_ms']['pareto']:.1f} ms "
              f"(+{100 * agg['step_time_overhead']:.0f}%; CPU time +{100 * agg['step_cpu_overhead']:.0f}%). "
              f"Per-objective gradients need one backward pass per objective: on the demo model, forward "
              f"plus K = 2 backward passes into the GradBank take {1e3 * fill['backward']:.1f} ms "
              f"(one batched vmap backward: {1e3 * fill['batched']:.1f} ms) against "
              f"{1e3 * fill['single_backward_of_sum']:.1f} ms for forward plus one backward of the summed "
              f"loss; the balancing passes themselves are timed in the table below.",
              "", "## Optimizer step with balancing (K = 2, gradients given)", "",
              "| parameters | AdamW(foreach) alone | pareto_combine + AdamW(foreach) | fused BalancedAdamW |",
              "|---|---|---|---|"]
    for t in optim_timings:
        lines.append(f"| {t['label']}: {t['num_params']:,} in {t['num_tensors']} tensors | "
                     f"{t['torch_adamw_ms']:.2f} ms | {t['combine_plus_torch_adamw_ms']:.2f} ms | "
                     f"{t['fused_balanced_adamw_ms']:.2f} ms |")
    lines += ["", "The fused step computes the Gram, the weights and AdamW on the combination without "
              "writing the combined gradient; it replaces both the combine pass and the optimizer step.",
              "", "Timings are medians on this machine (other processes may share its cores).", "",
              "Files: results.json (all numbers, per seed), grad_ratio_heatmap.png, weights.png, "
              "loss_curves.png."]
    path.write_text("\n".join(lines) + "\n")


def main(args) -> int:
    from fused_balance.backends import resolve_backend
    from fused_balance.demo.data import make_split

    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    backend_name = resolve_backend(args.backend, torch.device("cpu")).name
    started = time.perf_counter()
    eval_batches = make_split(args.eval_examples, EVAL_SEED, max_objects=args.max_objects)
    runs = []
    for seed in range(args.seeds):
        for method in ("vanilla", "pareto"):
            run = train_run(method, seed, args, eval_batches, progress)
            runs.append(run)
            f = run["final"]
            print(f"seed {seed} {method:7s}: text acc {f['text_acc']:.3f} loss {f['text_loss']:.3f} | "
                  f"image acc {f['image_acc']:.3f} fg {f['image_fg_acc']:.3f} loss {f['image_loss']:.3f} | "
                  f"step {1e3 * statistics.median(run['step_time_s']):.1f} ms", flush=True)
    agg = aggregate(runs, args.tau)
    repeats = max(3, args.timing_repeats)
    fill = time_fill_modes(args, repeats)
    shapes_demo, segs_demo = _lora_like_shapes(args.hidden, args.layers, args.rank)
    shapes_big, segs_big = _lora_like_shapes(1024, 8, 16)
    optim_timings = []
    for label, shapes, segs in (("demo-sized LoRA", shapes_demo, segs_demo),
                                ("larger LoRA (hidden 1024, 8 layers, r=16)", shapes_big, segs_big)):
        t = time_optimizers(shapes, segs, args.backend, repeats, args.policy, args.tau)
        optim_timings.append({"label": label, **t})
    results = {"settings": {k: v for k, v in vars(args).items() if k != "func"},
               "backend": backend_name, "aggregate": agg, "fill_mode_seconds": fill,
               "optimizer_timings": optim_timings, "runs": runs,
               "torch_threads": torch.get_num_threads(),
               "wall_seconds": time.perf_counter() - started}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_summary(out / "summary.md", args, agg, fill, optim_timings, backend_name, runs)
    if not args.no_plots:
        from fused_balance.demo.plots import write_plots
        write_plots(out, runs)
    elapsed = time.perf_counter() - started
    results["wall_seconds"] = elapsed
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print((out / "summary.md").read_text())
    print(f"wrote {out}/summary.md, results.json and plots in {elapsed:.0f} s")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fused_balance.demo.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(_parser().parse_args()))
