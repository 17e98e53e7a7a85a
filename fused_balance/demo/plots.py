"""PNG plots of the demo: the imbalance (per-layer gradient-norm ratio), the weights Pareto-LoRA
chose, and per-modality loss curves."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _ratio_matrix(run: dict) -> tuple[np.ndarray, list[int]]:
    """[segments, observations] of log10 |g_text| / |g_image| (NaN where a norm is zero)."""
    steps = [h["step"] for h in run["history"]]
    cols = []
    for h in run["history"]:
        col = []
        for n_text, n_image in h["norms"]:
            col.append(math.log10(n_text / n_image) if n_text > 0 and n_image > 0 else float("nan"))
        cols.append(col)
    return np.array(cols, dtype=float).T if cols else np.zeros((len(run["segments"]), 0)), steps


def plot_ratio_heatmap(path: Path, runs: list[dict]) -> None:
    seed = min(r["seed"] for r in runs)
    pair = [r for r in runs if r["seed"] == seed]
    pair.sort(key=lambda r: r["method"] != "vanilla")
    mats = [_ratio_matrix(r) for r in pair]
    finite = np.concatenate([m[np.isfinite(m)] for m, _ in mats if m.size]) if mats else np.zeros(1)
    lim = max(0.5, float(np.nanmax(np.abs(finite))) if finite.size else 1.0)
    fig, axes = plt.subplots(len(pair), 1, figsize=(9, 1.2 + 1.1 * len(pair) * len(pair[0]["segments"]) ** 0.5 + 1),
                             squeeze=False)
    for ax, run, (mat, steps) in zip(axes[:, 0], pair, mats):
        half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
        extent = [steps[0] - half if steps else 0, steps[-1] + half if steps else 1,
                  len(run["segments"]) - 0.5, -0.5]
        im = ax.imshow(np.ma.masked_invalid(mat), aspect="auto", cmap="coolwarm", vmin=-lim, vmax=lim,
                       interpolation="nearest", extent=extent)
        ax.set_yticks(range(len(run["segments"])))
        ax.set_yticklabels(run["segments"], fontsize=8)
        title = "vanilla LoRA (observed every few steps)" if run["method"] == "vanilla" else "Pareto-LoRA"
        ax.set_title(f"{title}, seed {seed}: log10 |g_text| / |g_image| per layer", fontsize=10)
        ax.set_xlabel("step")
        fig.colorbar(im, ax=ax, label="log10 ratio (red: text dominates)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_weights(path: Path, runs: list[dict]) -> None:
    pareto = [r for r in runs if r["method"] == "pareto"]
    if not pareto:
        return
    run = min(pareto, key=lambda r: r["seed"])
    steps = [h["step"] for h in run["history"]]
    weights = np.array([h["weights"] for h in run["history"]], dtype=float)  # [T, S, 2]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharex=True)
    smooth = max(1, len(steps) // 60)
    kernel = np.ones(smooth) / smooth
    for s, name in enumerate(run["segments"]):
        for k, ax in enumerate(axes):
            series = weights[:, s, k]
            if smooth > 1 and len(series) >= smooth:
                series = np.convolve(series, kernel, mode="same")
            ax.plot(steps, series, label=name, lw=1.2)
    for k, ax in enumerate(axes):
        ax.set_title(f"Pareto-LoRA weight of the {('text', 'image')[k]} objective (seed {run['seed']})",
                     fontsize=10)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ema(values, beta=0.9):
    out, m = [], None
    for v in values:
        m = v if m is None else beta * m + (1 - beta) * v
        out.append(m)
    return np.array(out)


def plot_losses(path: Path, runs: list[dict]) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    colours = {"vanilla": "tab:blue", "pareto": "tab:orange"}
    labels = {"vanilla": "vanilla LoRA", "pareto": "Pareto-LoRA"}
    for k, (objective, metric) in enumerate((("text", "text_loss"), ("image", "image_loss"))):
        ax = axes[k]
        for method in ("vanilla", "pareto"):
            rs = [r for r in runs if r["method"] == method]
            if not rs:
                continue
            train = np.mean([_ema(r["train_losses"][objective]) for r in rs], axis=0)
            ax.plot(np.arange(1, len(train) + 1), train, color=colours[method], alpha=0.45, lw=1,
                    label=f"{labels[method]} train (EMA, mean of seeds)")
            steps = [e["step"] for e in rs[0]["evals"]]
            held = np.array([[e[metric] for e in r["evals"]] for r in rs])
            ax.errorbar(steps, held.mean(0), yerr=held.std(0) if len(rs) > 1 else None, color=colours[method],
                        marker="o", lw=1.8, capsize=3, label=f"{labels[method]} held-out (per token)")
        ax.set_title(f"{objective} loss", fontsize=10)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.text(0.5, 0.005, "train curves: objective as optimised (sum over its tokens / all target tokens); "
             "held-out: mean per token of that modality", ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(out: Path, runs: list[dict]) -> list[Path]:
    out = Path(out)
    paths = [out / "grad_ratio_heatmap.png", out / "weights.png", out / "loss_curves.png"]
    plot_ratio_heatmap(paths[0], runs)
    plot_weights(paths[1], runs)
    plot_losses(paths[2], runs)
    return [p for p in paths if p.exists()]
