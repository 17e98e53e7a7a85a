"""PNG plots of the results (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

from fused_balance.benchmarking.results import headline_case

__all__ = ["write_plots"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _stage_bars(plt, results, case, path):
    stages = [s for s in case["stages"] if s != "weights"]
    names = sorted({n for s in stages for n, i in case["stages"][s]["contenders"].items()
                    if i.get("status") == "ok"},
                   key=lambda n: (results["contenders"][n]["number"], n))
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        xs, ys = [], []
        for j, s in enumerate(stages):
            info = case["stages"][s]["contenders"].get(n, {})
            if info.get("status") == "ok":
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(info["median_s"] * 1e3)
        ax.bar(xs, ys, width, label=results["contenders"][n]["label"])
    for j, s in enumerate(stages):
        roof = case["stages"][s].get("roofline_s")
        if roof:
            ax.hlines(roof * 1e3, j - 0.45, j + 0.45, colors="k", linestyles="dashed")
    ax.set_xticks(range(len(stages)), stages)
    ax.set_yscale("log")
    ax.set_ylabel("median time [ms] (dashed: roofline)")
    ax.set_title(f"{case['label']}: time per stage")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _roofline_bars(plt, results, case, path):
    stages = [s for s in case["stages"] if case["stages"][s].get("roofline_s")]
    names = sorted({n for s in stages for n, i in case["stages"][s]["contenders"].items()
                    if i.get("roofline_fraction") is not None},
                   key=lambda n: (results["contenders"][n]["number"], n))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        xs, ys = [], []
        for j, s in enumerate(stages):
            frac = case["stages"][s]["contenders"].get(n, {}).get("roofline_fraction")
            if frac is not None:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(100 * frac)
        ax.bar(xs, ys, width, label=results["contenders"][n]["label"])
    ax.axhline(100, color="k", linestyle="dashed", linewidth=1)
    ax.set_xticks(range(len(stages)), stages)
    ax.set_ylabel("% of memory roofline")
    ax.set_title(f"{case['label']}: fraction of the memory roofline")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory_bars(plt, results, case, path):
    rows = []
    for s, st in case["stages"].items():
        for n, info in st["contenders"].items():
            if info.get("peak_extra_bytes") is not None:
                rows.append((s, n, info["peak_extra_bytes"] / 2 ** 20))
    if not rows:
        return False
    stages = list(dict.fromkeys(r[0] for r in rows))
    names = sorted({r[1] for r in rows}, key=lambda n: (results["contenders"][n]["number"], n))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        xs = [stages.index(s) + (i - (len(names) - 1) / 2) * width for s, m, _ in rows if m == n]
        ys = [max(v, 1e-3) for s, m, v in rows if m == n]
        ax.bar(xs, ys, width, label=results["contenders"][n]["label"])
    ax.set_xticks(range(len(stages)), stages)
    ax.set_yscale("log")
    ax.set_ylabel("peak extra memory [MiB]")
    ax.set_title(f"{case['label']}: peak extra memory per call")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _scaling(plt, results, sweep, path):
    sc = results["scaling"]
    points = sc["sweeps"].get(sweep, [])
    if len(points) < 2:
        return False
    stages = sc["stages"]
    fig, axes = plt.subplots(1, len(stages), figsize=(6 * len(stages), 4.5), squeeze=False)
    xkey = "num_params" if sweep == "params" else "num_tensors"
    for ax, stage in zip(axes[0], stages):
        names = [n for n in points[0]["stages"][stage] if not n.startswith("_")]
        for n in names:
            xs = [p[xkey] for p in points if p["stages"][stage].get(n, {}).get("median_s")]
            ys = [p["stages"][stage][n]["median_s"] for p in points
                  if p["stages"][stage].get(n, {}).get("median_s")]
            if xs:
                ax.plot(xs, ys, marker="o", label=results["contenders"].get(n, {}).get("label", n))
        roof = [(p[xkey], p["stages"][stage].get("_roofline_s")) for p in points]
        roof = [(x, y) for x, y in roof if y]
        if roof:
            ax.plot([x for x, _ in roof], [y for _, y in roof], "k--", label="roofline")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("total parameters N" if sweep == "params" else "number of tensors P")
        ax.set_ylabel("median time [s]")
        fixed = (f"P = {points[0]['num_tensors']}" if sweep == "params"
                 else f"N = {points[0]['num_params']:.1e}")
        ax.set_title(f"{stage}, K=2 fp32, {fixed}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(results: dict, out_dir: str | Path) -> list[str]:
    """Write the PNGs; returns their file names."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    written = []
    case = headline_case(results.get("cases", []))
    if case is not None:
        _stage_bars(plt, results, case, out_dir / "stages.png")
        written.append("stages.png")
        _roofline_bars(plt, results, case, out_dir / "roofline.png")
        written.append("roofline.png")
        if _memory_bars(plt, results, case, out_dir / "memory.png"):
            written.append("memory.png")
    if results.get("scaling"):
        for sweep in ("params", "tensors"):
            name = f"scaling_{sweep}.png"
            if _scaling(plt, results, sweep, out_dir / name):
                written.append(name)
    if results.get("overhead"):
        from fused_balance.benchmarking.overhead import plot as overhead_plot
        if overhead_plot(results["overhead"], out_dir / "overhead.png"):
            written.append("overhead.png")
    return written
