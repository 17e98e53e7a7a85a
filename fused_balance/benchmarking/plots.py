"""PNG plots of the results (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path

from fused_balance.benchmarking.results import headline_case

__all__ = ["write_plots", "overhead_plot"]


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path, dpi=110):
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _grouped_bars(plt, results, groups, names, value, title, ylabel, log=True):
    """One group of bars per stage (x axis), one bar per contender; ``value(stage, name)`` is the
    bar's height or None (no bar). Returns (figure, axes)."""
    names = sorted(names, key=lambda n: (results["contenders"][n]["number"], n))
    fig, ax = plt.subplots(figsize=(11, 5 if log else 4.5))
    width = 0.8 / max(1, len(names))
    for i, n in enumerate(names):
        bars = [(j + (i - (len(names) - 1) / 2) * width, value(g, n)) for j, g in enumerate(groups)]
        bars = [(x, y) for x, y in bars if y is not None]
        ax.bar([x for x, _ in bars], [y for _, y in bars], width, label=results["contenders"][n]["label"])
    ax.set_xticks(range(len(groups)), groups)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig, ax


def _stage_bars(plt, results, case, path):
    stages = [s for s in case["stages"] if s != "weights"]
    ok = lambda s, n: case["stages"][s]["contenders"].get(n, {}).get("status") == "ok"  # noqa: E731
    fig, ax = _grouped_bars(
        plt, results, stages, {n for s in stages for n in case["stages"][s]["contenders"] if ok(s, n)},
        lambda s, n: case["stages"][s]["contenders"][n]["median_s"] * 1e3 if ok(s, n) else None,
        f"{case['label']}: time per stage", "median time [ms] (dashed: roofline)")
    for j, s in enumerate(stages):
        roof = case["stages"][s].get("roofline_s")
        if roof:
            ax.hlines(roof * 1e3, j - 0.45, j + 0.45, colors="k", linestyles="dashed")
    ax.legend(fontsize=7, ncol=2)
    _save(plt, fig, path)


def _roofline_bars(plt, results, case, path):
    stages = [s for s in case["stages"] if case["stages"][s].get("roofline_s")]
    frac = lambda s, n: case["stages"][s]["contenders"].get(n, {}).get("roofline_fraction")  # noqa: E731
    fig, ax = _grouped_bars(
        plt, results, stages, {n for s in stages for n in case["stages"][s]["contenders"] if frac(s, n) is not None},
        lambda s, n: None if frac(s, n) is None else 100 * frac(s, n),
        f"{case['label']}: fraction of the memory roofline", "% of memory roofline", log=False)
    ax.axhline(100, color="k", linestyle="dashed", linewidth=1)
    ax.legend(fontsize=7, ncol=2)
    _save(plt, fig, path)


def _memory_bars(plt, results, case, path):
    mib = {(s, n): info["peak_extra_bytes"] / 2 ** 20 for s, st in case["stages"].items()
           for n, info in st["contenders"].items() if info.get("peak_extra_bytes") is not None}
    if not mib:
        return False
    stages = list(dict.fromkeys(s for s, _ in mib))
    fig, ax = _grouped_bars(
        plt, results, stages, {n for _, n in mib},
        lambda s, n: max(mib[s, n], 1e-3) if (s, n) in mib else None,
        f"{case['label']}: peak extra memory per call", "peak extra memory [MiB]")
    ax.legend(fontsize=7, ncol=2)
    _save(plt, fig, path)
    return True


def overhead_plot(result: dict, path) -> bool:
    """Host overhead (fused_balance.benchmarking.overhead) against the tensor count, log-log."""
    try:
        plt = _pyplot()
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, label in result["labels"].items():
        row = result["seconds"].get(name, {})
        xs = [P for P in result["counts"] if P in row]
        ax.plot(xs, [row[P] * 1e6 for P in xs], marker="o", label=label)
    _log_log(ax, "tensors P (4 elements each)", "µs per call (median)",
             f"host overhead, K={result['objectives']}, {result['device']}")
    ax.legend(fontsize=7)
    _save(plt, fig, path, dpi=120)
    return True


def _log_log(ax, xlabel, ylabel, title):
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)


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
        fixed = (f"P = {points[0]['num_tensors']}" if sweep == "params"
                 else f"N = {points[0]['num_params']:.1e}")
        _log_log(ax, "total parameters N" if sweep == "params" else "number of tensors P",
                 "median time [s]", f"{stage}, K=2 fp32, {fixed}")
        ax.legend(fontsize=7)
    _save(plt, fig, path)
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
        if overhead_plot(results["overhead"], out_dir / "overhead.png"):
            written.append("overhead.png")
    return written
