"""The study (`fused-balance study --quick|--full|--tiny --out DIR`, `make demo` = --quick).

Runs every (study, arm, seed) as one job, writes each finished job to
``DIR/jobs/<study>/<arm>__seed<k>.json`` (a rerun skips finished jobs, so an interrupted study
resumes), then generates ``DIR/summary.md``, ``DIR/tables.json`` and the PNG plots from those
files alone. Every arm of a study uses the same seeds, initial weights, batches and steps.
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import torch

from fused_balance.study.jobs import run_job

UNIFIED = ("emu2", "chameleon")
TUNING_SEED = 100  # tuning runs (static weight, GradNorm α): their own seed, scored on the validation split

_UNIFIED_MODEL = dict(hidden=32, layers=4, rank=8, visual_dim=16, visual_scale=0.25, lr=5e-3, clip=1.0,
                      batch_size=16, generation_fraction=0.5, max_objects=1, gradnorm_lr=0.025,
                      gradnorm_alpha=1.5)
# cd_phase: steps per one-sided phase of feature_cd / language_cd (our reading of CoMMIT's baselines)
_LLAVA_MODEL = dict(hidden=32, layers=2, rank=8, lr=3e-3, batch_size=32, max_objects=2, probe_size=32,
                    exact_every=5, aux_weight=0.05, cd_phase=10)
_LLAVA_ARMS = ["constant", "llm_only", "encoder_only", "sched_first", "sched_exact", "sched_aux", "feature_cd",
               "language_cd"]
_MAIN_ARMS = {"vanilla": {"kind": "vanilla"}, "static": {"kind": "static"},
              "gradnorm": {"kind": "gradnorm"}, "mgda": {"kind": "mgda"},
              "pareto": {"kind": "pareto", "tau": 5.0, "segments": "layer", "magnitude": "mean"}}
_ABLATIONS = {**{f"pareto_tau{t:g}": {"kind": "pareto", "tau": float(t), "segments": "layer", "magnitude": "mean"}
                 for t in (2, 20, 100)},
              **{f"pareto_{s}": {"kind": "pareto", "tau": 5.0, "segments": s, "magnitude": "mean"}
                 for s in ("group", "tensor", "global")},
              # the magnitude rule (fb.policy_weights): only the weaker raised, or only the image objective
              "pareto_weaker": {"kind": "pareto", "tau": 5.0, "segments": "layer", "magnitude": "weaker"},
              "pareto_protect_image": {"kind": "pareto", "tau": 5.0, "segments": "layer", "magnitude": "image"}}

CONFIGS = {
    # runs in seconds: the end-to-end test
    "tiny": dict(seeds=2, eval_examples=4, unified=dict(_UNIFIED_MODEL, steps=4, eval_every=4, diag_every=2),
                 emu2_arms=["vanilla", "static", "gradnorm", "pareto"],
                 chameleon_arms=["vanilla", "pareto"], static_grid={"emu2": [4.0], "chameleon": []},
                 static_search=dict(factor=3.0, max_extensions=1), gradnorm_alpha_grid={"emu2": [1.5]},
                 llava=dict(_LLAVA_MODEL, steps=4, eval_every=2, batch_size=8, probe_size=8, exact_every=2),
                 llava_arms=["constant", "sched_exact"]),
    # `make demo`: a few minutes on 2 cores
    "quick": dict(seeds=3, eval_examples=32, unified=dict(_UNIFIED_MODEL, steps=200, eval_every=100, diag_every=5),
                  emu2_arms=["vanilla", "static", "gradnorm", "pareto"],
                  chameleon_arms=["vanilla", "pareto", "pareto_protect_image"],
                  static_grid={"emu2": [30.0], "chameleon": []}, static_search=dict(factor=3.0, max_extensions=2),
                  gradnorm_alpha_grid={"emu2": [0.5, 1.5, 3.0]},
                  llava=dict(_LLAVA_MODEL, steps=100, eval_every=10),
                  llava_arms=list(_LLAVA_ARMS)),
    # about 85 CPU-minutes: every ablation on the Emu2-style family (τ 2/20/100; segments per layer
    # group, per tensor, global), the Chameleon-style family vanilla vs Pareto-LoRA (the mean,
    # weaker and image-protecting magnitude rules)
    "full": dict(seeds=5, eval_examples=64, unified=dict(_UNIFIED_MODEL, steps=300, eval_every=150, diag_every=5),
                 emu2_arms=list(_MAIN_ARMS) + list(_ABLATIONS),
                 chameleon_arms=["vanilla", "pareto", "pareto_weaker", "pareto_protect_image"],
                 static_grid={"emu2": [3.0, 10.0, 30.0], "chameleon": [0.5, 2.0]},
                 static_search=dict(factor=3.0, max_extensions=3),
                 gradnorm_alpha_grid={"emu2": [0.0, 0.5, 1.5, 3.0]},
                 llava=dict(_LLAVA_MODEL, steps=200, eval_every=10),
                 llava_arms=list(_LLAVA_ARMS)),
}
ARM_SPECS = {**_MAIN_ARMS, **_ABLATIONS}
TESTBEDS = {"unified": "testbed", "encoder_llm": "testbed_llava"}  # --testbed-check: name -> its files' prefix
# what --testbed-check runs: the check, then the methods where it found the regime (unified) or
# accepted the testbed (encoder+LLM: the scheduler)
RUNNERS = {"unified": ("testbed_methods", "check_and_compare"), "encoder_llm": ("testbed_llava", "testbed_check")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    size = parser.add_mutually_exclusive_group()
    for name in CONFIGS:
        size.add_argument(f"--{name}", dest="size", action="store_const", const=name,
                          help=f"the {name} configuration" + (" (default)" if name == "quick" else ""))
    parser.set_defaults(size="quick")
    parser.add_argument("--out", default="runs/study", help="output folder (default runs/study)")
    parser.add_argument("--seeds", type=int, default=None, help="override the number of seeds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: tiny matrices, and results are "
                             "bitwise-reproducible at a fixed thread count)")
    parser.add_argument("--only", choices=["emu2", "chameleon", "llava"], action="append",
                        help="run only these studies (repeatable)")
    parser.add_argument("--arms", default=None,
                        help="comma-separated arm names: run only these arms (e.g. a second worker "
                             "on the same --out; the report then covers only them: rerun without it)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: write the report from the jobs finished so far")
    parser.add_argument("--testbed-check", nargs="?", const="all", choices=list(TESTBEDS) + ["all"],
                        help="run the testbed checks instead of the study (pretraining cached under DIR/cache): "
                             "'unified' (unimodal references and vanilla LoRA: DIR/testbed_check.md and "
                             ".json; then the methods on its regime tasks: DIR/testbed_methods_<task>.md), "
                             "'encoder_llm' (LLM-only, encoder-only and both-sided LoRA: "
                             "DIR/testbed_llava_check.md and .json; then, if accepted, the schedulers) or "
                             "'all' (the default)")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="--testbed-check: processes of one torch thread each (default: 2 where "
                             "there are 2 cores; the results do not depend on it)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--no-plots", action="store_true")


def _job_path(out: Path, study: str, arm: str, seed: int) -> Path:
    return out / "jobs" / study / f"{arm}__seed{seed}.json"


def _tuning_job(out: Path, family: str, name: str, arm: dict, cfg: dict, validation: dict, bar,
                report_only: bool) -> dict | None:
    """One tuning run (tuning seed, validation split); None when missing in report-only mode."""
    from fused_balance.study.arms import train_unified

    r = run_job(_job_path(out, f"{family}_tuning", name, TUNING_SEED),
                lambda: train_unified(family, arm, TUNING_SEED, cfg, validation),
                {**cfg, **arm, "eval_examples": len(validation["generation"]["grid"])}, report_only)
    bar.update(1)
    return r


def tune_static(out: Path, family: str, cfg: dict, grid: list[float], validation: dict, bar,
                report_only: bool = False, search: dict | None = None) -> dict:
    """Static image weight from 1 (= vanilla) and the grid on the validation split, tuning seed:
    the best validation image cell score among weights whose validation text accuracy stays
    within 2 % (relative) of weight 1's. While the best weight is at the grid's edge the grid is
    extended geometrically (``search``: factor, max_extensions; no extension for an empty grid:
    the family is not tuned); ``search`` in the result says whether the choice is interior."""
    from fused_balance.study.tuning import constrained_score, grid_search

    search = search or {}
    finals = {}

    def final(w):
        if w not in finals:
            if w != 1.0 and w not in grid:  # an extension: one more job than planned
                bar.total += 1
            r = _tuning_job(out, family, f"w{w:g}", {"kind": "static", "image_weight": w}, cfg, validation, bar,
                            report_only)
            finals[w] = r and r["final"]
        return finals[w]

    if final(1.0) is None:  # report only, nothing tuned yet
        return {"grid": {}, "chosen": 1.0, "search": None}
    reference = finals[1.0]["text_acc"]
    found = grid_search(lambda w: None if final(w) is None else constrained_score(final(w), reference),
                        [1.0] + list(grid), prefer=1.0, factor=search.get("factor", 3.0),
                        max_extensions=search.get("max_extensions", 0) if grid else 0)
    return {"grid": {f"{w:g}": {"text_acc": finals[w]["text_acc"], "cell_score": finals[w]["cell_score"]}
                     for w in found["scores"]},
            "chosen": found["best"], "search": {k: v for k, v in found.items() if k not in ("scores", "best")}}


def tune_gradnorm(out: Path, family: str, cfg: dict, alphas: list[float], validation: dict, reference_text,
                  bar, report_only: bool = False) -> dict:
    """GradNorm's α on the validation split, tuning seed, by the static weight's rule: the best
    validation image cell score among α whose text accuracy stays within 2 % of vanilla's
    (``reference_text``: weight 1 of the static tuning). The grid is not extended (α = 0 is its
    natural lower end); ``search`` records whether the choice is at its edge, ``allowed`` whether
    any α met the text condition (if none did, the default α is used)."""
    from fused_balance.study.tuning import constrained_score, grid_search

    default = cfg["gradnorm_alpha"]
    if not alphas or reference_text is None:
        return {"grid": {}, "chosen": default, "search": None, "allowed": None}
    finals = {}

    def score(a):
        r = _tuning_job(out, family, f"gradnorm_a{a:g}", {"kind": "gradnorm", "alpha": a}, cfg, validation, bar,
                        report_only)
        if r is None:
            return None
        finals[a] = r["final"]
        return constrained_score(r["final"], reference_text)

    found = grid_search(score, alphas, prefer=default)
    allowed = any(s > -math.inf for s in found["scores"].values())
    return {"grid": {f"{a:g}": {"text_acc": finals[a]["text_acc"], "cell_score": finals[a]["cell_score"]}
                     for a in found["scores"]},
            "chosen": found["best"] if allowed else default, "allowed": allowed,
            "search": {k: v for k, v in found.items() if k not in ("scores", "best")}}


def _testbed_checks(args) -> int:
    """``--testbed-check``: each chosen testbed judged, its table printed."""
    import importlib

    out = Path(args.out)
    for name in TESTBEDS if args.testbed_check == "all" else [args.testbed_check]:
        module = importlib.import_module(f"fused_balance.study.{TESTBEDS[name]}")
        runner_module, runner = RUNNERS[name]
        seeds = list(range(args.seeds if args.seeds else module.CONFIGS[args.size]["seeds"]))
        run = getattr(importlib.import_module(f"fused_balance.study.{runner_module}"), runner)
        result = run(out, args.size, seeds, progress=not args.no_progress, workers=args.workers, plots=not args.no_plots)
        table = out / f"{TESTBEDS[name]}_check.md"
        print(table.read_text())
        print(f"wrote {table} and .json in {result['meta']['wall_s']:.0f} s")
        for shift in result.get("scheduler", {}):  # the method's check, run on an accepted testbed
            print((out / f"{TESTBEDS[name]}_scheduler_{shift}.md").read_text())
        for task in result.get("methods", {}):  # the methods, on the unified testbed's regime tasks
            print((out / f"testbed_methods_{task}.md").read_text())
    return 0


def main(args) -> int:
    from tqdm.auto import tqdm

    from fused_balance.study import llava, report
    from fused_balance.study.arms import train_unified
    from fused_balance.study.data import TEST_SEED, VALIDATION_SEED
    from fused_balance.study.unified import make_split

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    if args.testbed_check:
        return _testbed_checks(args)
    config = CONFIGS[args.size]
    if args.arms:  # a misspelt arm would otherwise run nothing and say nothing
        known = list(dict.fromkeys([*(a for f in UNIFIED for a in config[f"{f}_arms"]), *config["llava_arms"]]))
        unknown = [a for a in args.arms.split(",") if a not in known]
        if unknown:
            raise SystemExit(f"fused-balance study: --arms names {unknown}, not arms of the {args.size} study; "
                             f"its arms: {', '.join(known)}")
    seeds = list(range(args.seeds if args.seeds else config["seeds"]))
    studies = args.only or ["emu2", "chameleon", "llava"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ucfg, lcfg = config["unified"], config["llava"]
    n_eval = config["eval_examples"]
    total = sum((len(config[f"{f}_arms"]) * len(seeds) + 1 + len(config["static_grid"][f])
                 + (len(config["gradnorm_alpha_grid"].get(f, [])) if "gradnorm" in config[f"{f}_arms"] else 0))
                for f in UNIFIED if f in studies) + (len(config["llava_arms"]) * len(seeds) if "llava" in studies else 0)
    bar = tqdm(total=total, desc=f"study ({args.size})", disable=args.no_progress, dynamic_ncols=True,
               file=sys.stderr)
    results = {"unified": {}, "tuning": {}, "llava": {}}
    for family in UNIFIED:
        if family not in studies:
            continue
        validation = make_split(VALIDATION_SEED, n_eval, ucfg["max_objects"])
        test = make_split(TEST_SEED, n_eval, ucfg["max_objects"])
        bar.set_postfix_str(f"{family} tuning")
        static = tune_static(out, family, ucfg, config["static_grid"][family], validation, bar, args.report_only,
                             config["static_search"])
        tuning = {"static": static}
        if "gradnorm" in config[f"{family}_arms"]:
            reference = static["grid"].get("1", {}).get("text_acc")  # weight 1 = vanilla on the tuning seed
            tuning["gradnorm"] = tune_gradnorm(out, family, ucfg, config["gradnorm_alpha_grid"].get(family, []),
                                               validation, reference, bar, args.report_only)
        results["tuning"][family] = tuning
        runs = {}
        for arm_name in _selected(config[f"{family}_arms"], args.arms):
            spec = dict(ARM_SPECS[arm_name])
            if spec["kind"] == "static":
                spec["image_weight"] = tuning["static"]["chosen"]
            elif spec["kind"] == "gradnorm":
                spec["alpha"] = tuning["gradnorm"]["chosen"]
            for seed in seeds:
                bar.set_postfix_str(f"{family} {arm_name} seed {seed}")
                r = run_job(_job_path(out, family, arm_name, seed),
                            lambda: train_unified(family, spec, seed, ucfg, test), {**ucfg, **spec, "eval_examples": n_eval}, args.report_only)
                if r is not None:
                    runs.setdefault(arm_name, []).append(r)
                bar.update(1)
        results["unified"][family] = runs
    if "llava" in studies:
        test = llava.make_batch(max(64, 2 * n_eval), torch.Generator().manual_seed(TEST_SEED), lcfg["max_objects"])
        for arm in _selected(config["llava_arms"], args.arms):
            for seed in seeds:
                bar.set_postfix_str(f"llava {arm} seed {seed}")
                r = run_job(_job_path(out, "llava", arm, seed), lambda: llava.train_llava(arm, seed, lcfg, test),
                            _llava_settings(lcfg, arm, max(64, 2 * n_eval)), args.report_only)
                if r is not None:
                    results["llava"].setdefault(arm, []).append(r)
                bar.update(1)
    bar.close()
    meta = {"configuration": args.size, "config": config, "seeds": seeds, "threads": torch.get_num_threads(),
            "command": "fused-balance study " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["study"] else sys.argv[1:]),
            "machine": _cpu_model(), "python": platform.python_version(), "torch": torch.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "wall_s_this_invocation": time.perf_counter() - started,
            "job_wall_s_total": _total_job_wall(results)}
    tables = report.write_report(out, results, meta, plots=not args.no_plots)
    print((out / "summary.md").read_text())
    print(f"wrote {out}/summary.md, tables.json and plots in {time.perf_counter() - started:.0f} s")
    return 0 if tables else 1


def _llava_settings(lcfg: dict, arm: str, test_examples: int) -> dict:
    """A llava job's stored settings: the config, the arm and the test size; ``cd_phase`` only for
    the alternating arms that use it (so jobs finished before it existed still resume)."""
    from fused_balance.study.llava import CD_FIRST

    settings = {**lcfg, "arm": arm, "test_examples": test_examples}
    if arm not in CD_FIRST:
        settings.pop("cd_phase", None)
    return settings


def _selected(arms: list[str], chosen: str | None) -> list[str]:
    return arms if not chosen else [a for a in chosen.split(",") if a in arms]


def _total_job_wall(results) -> float:
    runs = [r for fam in results["unified"].values() for arm in fam.values() for r in arm]
    runs += [r for arm in results["llava"].values() for r in arm]
    return sum(r["wall_s"] for r in runs)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fused_balance.study.run", description=__doc__)
    add_arguments(parser)
    return parser


if __name__ == "__main__":
    sys.exit(main(_parser().parse_args()))
