"""PNG plots of the study (matplotlib, imported here only)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from fused_balance.study.labels import arm_label as _label


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    return plt


def plot_pictures(path: Path, family: str, runs: dict) -> None:
    """Rows: the targets, then each arm's greedily generated pictures (seed 0, test split)."""
    from fused_balance.study.data import render

    plt = _plt()
    arms = list(runs)
    first = runs[arms[0]][0]["final"]
    rows = [("target", first["targets"])] + [(_label(a), runs[a][0]["final"]["pictures"]) for a in arms]
    cols = len(first["targets"])
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.1 * cols + 2.2, 1.1 * len(rows)), squeeze=False)
    for i, (name, pics) in enumerate(rows):
        for j in range(cols):
            ax = axes[i, j]
            ax.imshow(render(torch.tensor(pics[j]), 4).permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(f"{family}: generated pictures on test captions (seed 0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_unified_curves(path: Path, family: str, runs: dict) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for arm, rs in runs.items():
        steps = [e["step"] for e in rs[0]["curve"]]
        for ax, key in zip(axes, ("cell_score", "text_acc")):
            mean = [sum(r["curve"][i][key] for r in rs) / len(rs) for i in range(len(steps))]
            ax.plot(steps, [100 * m for m in mean], label=_label(arm), lw=1.2,
                    ls="-" if not arm.startswith("pareto_") else ":")
    axes[0].set_title(f"{family}: image cell score (%), test, mean over seeds", fontsize=9)
    axes[1].set_title(f"{family}: text token accuracy (%), test, mean over seeds", fontsize=9)
    for ax in axes:
        ax.set_xlabel("step")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_grad_ratio(path: Path, family: str, runs: dict) -> None:
    obs = [o for r in runs.get("vanilla", []) for o in r["grad_ratios"]]
    if not obs:
        return
    plt = _plt()
    segments = sorted({o["segment"] for o in obs}, key=lambda s: (len(s), s))
    data = [[math.log10(o["ratio"]) for o in obs if o["segment"] == s] for s in segments]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.boxplot(data)
    ax.set_xticks(range(1, len(segments) + 1), [s.rsplit(".", 2)[-2] + "." + s.rsplit(".", 1)[-1]
                                                 if "." in s else s for s in segments], fontsize=8)
    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax.set_ylabel("log10 |g_text| / |g_image|")
    ax.set_title(f"{family}, vanilla LoRA: per-layer gradient-norm ratio (all seeds, every few steps)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_llava(out: Path, runs: dict) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for arm, rs in runs.items():
        steps = [e["step"] for e in rs[0]["curve"]]
        mean = [sum(r["curve"][i]["acc"] for r in rs) / len(rs) for i in range(len(steps))]
        ax.plot(steps, [100 * m for m in mean], label=_label(arm), lw=1.2, ls="--" if arm.endswith("_cd") else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("test accuracy (%), mean over seeds")
    ax.set_title("tiny LLaVA: learning curves", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "llava_curves.png", dpi=100)
    plt.close(fig)
    sched = [a for a in runs if a.startswith("sched")]
    if not sched:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for arm in sched:
        r = runs[arm][0]
        steps = range(1, len(r["kappa"]) + 1)
        axes[0].plot(steps, [k if k is not None else math.nan for k in r["kappa"]], label=_label(arm), lw=1.1)
        for c, (name, ls) in enumerate((("encoder", "-"), ("llm", "--"))):
            axes[1].plot(steps, [m[c] for m in r["multipliers"]], ls=ls, lw=1.1, label=f"{_label(arm)}: {name}")
    axes[0].axhline(0.5, color="grey", lw=0.8, ls=":")
    axes[0].set_title("κ_t = smoothed encoder share of the learning (seed 0; 0.5 = balanced)", fontsize=9)
    axes[1].set_title("learning-rate multipliers (seed 0)", fontsize=9)
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "llava_kappa.png", dpi=100)
    plt.close(fig)


def _mean_series(series: list[list]) -> list[float]:
    """Pointwise mean over seeds (None entries skipped; NaN where every seed has None)."""
    out = []
    for values in zip(*series):
        known = [v for v in values if v is not None]
        out.append(sum(known) / len(known) if known else math.nan)
    return out


def plot_testbed_llava(path: Path, runs: dict) -> None:
    """Per shift (rows): test accuracy per arm, κ_t and the normalised LoRA gradient norms of the
    ``both`` arm, means over seeds (``runs[shift][arm]``: the seeds' results)."""
    plt = _plt()
    fig, axes = plt.subplots(len(runs), 3, figsize=(13, 3.3 * len(runs)), squeeze=False)
    for row, (shift, arms) in enumerate(runs.items()):
        for arm, rs in arms.items():
            steps = [e["step"] for e in rs[0]["curve"]]
            axes[row, 0].plot(steps, [100 * a for a in _mean_series([[e["acc"] for e in r["curve"]] for r in rs])],
                              label=arm, lw=1.2)
        both = arms["both"]
        for key, label in (("kappa", "raw"), ("kappa_per_parameter", "per parameter")):
            axes[row, 1].plot(range(1, len(both[0][key]) + 1), _mean_series([r[key] for r in both]), lw=1.1,
                              label=label)
        axes[row, 1].legend(fontsize=7)
        axes[row, 1].axhline(0.5, color="grey", lw=0.8, ls=":")
        steps = [e["step"] for e in both[0]["grad_norms"]]
        for side, ls in (("encoder", "-"), ("llm", "--")):
            axes[row, 2].plot(steps, _mean_series([[e[side] for e in r["grad_norms"]] for r in both]), ls=ls,
                              label=side, lw=1.1)
        axes[row, 2].set_yscale("log")
        axes[row, 0].set_ylabel(f"{shift}\ntest accuracy (%)")
        axes[row, 1].set_ylabel("κ_t (encoder share)")
        axes[row, 2].set_ylabel("‖g‖ / √parameters")
        for ax in axes[row]:
            ax.set_xlabel("step")
        axes[row, 0].legend(fontsize=7)
        axes[row, 2].legend(fontsize=7)
    fig.suptitle("encoder+LLM testbed: LoRA arms; diagnostics of tuning both (means over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_testbed_llava_scheduler(path: Path, shift: str, runs: dict) -> None:
    """The scheduler check (``runs[arm]``: the seeds' results, curves and, for the scheduled
    arms, κ_t and the [encoder, LLM] rate multipliers per step), means over seeds."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for i, (arm, rs) in enumerate(runs.items()):
        colour = f"C{i}"  # one colour per arm in every panel
        steps = [e["step"] for e in rs[0]["curve"]]
        axes[0].plot(steps, [100 * a for a in _mean_series([[e["acc"] for e in r["curve"]] for r in rs])],
                     label=arm, lw=1.2, color=colour)
        if "kappa" in rs[0] and "multipliers" in rs[0]:
            axes[1].plot(range(1, len(rs[0]["kappa"]) + 1), _mean_series([r["kappa"] for r in rs]), lw=1.1, label=arm,
                         color=colour)
            for side, ls in ((0, "-"), (1, "--")):
                axes[2].plot(range(1, len(rs[0]["multipliers"]) + 1),
                             _mean_series([[m[side] for m in r["multipliers"]] for r in rs]), ls=ls, lw=1.1,
                             label=f"{arm}: {('encoder', 'LLM')[side]}", color=colour)
    axes[1].axhline(0.5, color="grey", lw=0.8, ls=":")
    axes[2].set_yscale("log")
    for ax, label in zip(axes, ("test accuracy (%)", "κ_t (encoder share)", "rate multiplier")):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"encoder+LLM testbed, shift {shift}: constant rates (both) against acting BalanceSchedulers "
                 "(means over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_testbed_methods(path: Path, verdicts: dict, image_target: float, text_cost: float) -> None:
    """The methods on the unified testbed's regime tasks (``verdicts[task]``: judge_methods's
    result): per task and comparison the test relative change with its paired 95 % interval, image
    cell score and text accuracy side by side, the issue's target lines dotted."""
    plt = _plt()
    rows = [(task, name, c) for task, v in verdicts.items() for name, c in v["comparisons"].items()]
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.32 * len(rows) + 1.6), sharey=True)
    names = list(dict.fromkeys(name for _, name, _ in rows))
    for ax, key, target in ((axes[0], "image", image_target), (axes[1], "text", -text_cost)):
        for y, (task, name, c) in enumerate(rows):
            x = c[key]
            ax.errorbar(100 * x["mean"], -y, xerr=[[100 * (x["mean"] - x["low"])], [100 * (x["high"] - x["mean"])]],
                        fmt="o", ms=4, capsize=2, color=f"C{names.index(name)}")
        ax.axvline(0, color="grey", lw=0.8)
        ax.axvline(100 * target, color="grey", lw=0.8, ls=":")
        ax.set_xlabel(f"Δ {'image cell score' if key == 'image' else 'text accuracy'} (%, relative, test)")
    axes[0].set_yticks([-y for y in range(len(rows))],
                       [f"{task}: {name} ({c['arm']})" for task, name, c in rows], fontsize=7)
    fig.suptitle("unified testbed, regime tasks: paired relative changes, 95 % intervals over seeds "
                 "(dotted: +10 % image target, −2 % text cost)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_plots(out: Path, results: dict) -> None:
    for family, runs in results["unified"].items():
        plot_pictures(out / f"pictures_{family}.png", family, runs)
        plot_unified_curves(out / f"curves_{family}.png", family, runs)
        plot_grad_ratio(out / f"grad_ratio_{family}.png", family, runs)
    if results["llava"]:
        plot_llava(out, results["llava"])
