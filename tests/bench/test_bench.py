"""The benchmark suite: a --quick run end to end, the cross-check that keeps wrong contenders
out of the tables, the byte counting behind the roofline, the timer's statistics."""
from __future__ import annotations

import argparse
import itertools
import json
import random
import time

import pytest
import torch

from fused_balance.benchmarking import add_arguments, main
from fused_balance.benchmarking import contenders as C, oracles
from fused_balance.benchmarking.problems import (get_problem, make_gradients, make_params,
                                                 synthetic_problem)
from fused_balance.benchmarking.roofline import StageBytes, roofline_seconds, stage_bytes
from fused_balance.benchmarking.suite import SuiteOptions, choose_ours
from fused_balance.benchmarking.results import tolerance
from fused_balance.benchmarking.running import build_case, run_stage
from fused_balance.benchmarking.timing import (interleaved_times, median, paired_ratio,
                                               peak_extra_memory, plan_repeats)

STAGES = ("gram", "weights", "combine", "pareto_combine", "adamw")


def _parse(argv):
    return add_arguments(argparse.ArgumentParser()).parse_args(argv)


# ---------------------------------------------------------------------------------------------
# End to end

@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    # one thread: the run's duration must not depend on how loaded the shared machine is
    args = _parse(["--out", str(out), "--quick", "--time-budget", "10", "--threads", "1",
                   "--no-progress"])
    return out, main(args)


def test_quick_run_writes_results(quick_run):
    out, code = quick_run
    assert code == 0
    for name in ("results.json", "results.md", "stages.png", "roofline.png", "scaling_params.png",
                 "scaling_tensors.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    md = (out / "results.md").read_text()
    assert "## Targets" in md and "| stage | contender |" in md


def test_quick_run_has_the_host_overhead_stage(quick_run):
    out, _ = quick_run
    overhead = json.loads((out / "results.json").read_text())["overhead"]
    assert overhead["counts"] == [28, 448]
    for name in ("list_pareto_combine", "plan_step", "plan_adamw", "per_tensor_loop", "torch_fused_adamw"):
        assert all(overhead["seconds"][name][str(P)] > 0 for P in (28, 448)), name
    assert "## Host overhead" in (out / "results.md").read_text()
    assert (out / "overhead.png").is_file()


def test_quick_run_json_has_stages_contenders_roofline(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["bandwidth"]["read_GBps"] > 0 and results["bandwidth"]["triad_GBps"] > 0
    assert results["machine"]["torch"] == torch.__version__
    case = results["cases"][0]
    assert case["problem"]["name"] == "small" and case["K"] == 2
    assert set(STAGES) <= set(case["stages"])
    primary = results["ours"]["primary"]
    for stage in ("gram", "combine", "pareto_combine", "adamw"):
        st = case["stages"][stage]
        assert st["roofline_s"] > 0 and st["bytes"]["read"] > 0
        ours = st["contenders"][primary]
        assert ours["status"] == "ok"
        assert ours["roofline_fraction"] > 0 and ours["GBps"] > 0 and ours["median_s"] > 0
        assert ours["peak_extra_bytes"] >= 0
    names = set(case["stages"]["pareto_combine"]["contenders"])
    assert {"loop", "flatcat", "foreach", "compile", "torchjd_mgda", "torchjd_upgrad",
            primary} <= names
    # compile is skipped in --quick, with the reason
    compiled = case["stages"]["gram"]["contenders"]["compile"]
    assert compiled["status"] == "skipped" and "quick" in compiled["reason"]
    assert [r["target"] for r in results["targets"]["rows"]]
    assert results["scaling"]["sweeps"]["tensors"]


def test_quick_run_cross_check_passes(quick_run):
    out, _ = quick_run
    results = json.loads((out / "results.json").read_text())
    assert results["self_check_passed"]
    for case in results["cases"]:
        for stage, st in case["stages"].items():
            for name, info in st["contenders"].items():
                assert info["status"] in ("ok", "skipped"), (case["label"], stage, name, info)
                if info["status"] == "ok":
                    assert info["check"]["passed"]
                    assert info["check"]["error"] <= info["check"]["tolerance"]
                    assert len(info["samples_s"]) == info["repeats"]
                    assert info["repeats"] >= 3 or info.get("single_sample")


# ---------------------------------------------------------------------------------------------
# The cross-check on small cases: every contender agrees, a wrong one is caught

def _small_case(K, dtype, contenders, num_tensors=6, num_params=6000):
    problem = synthetic_problem(num_params, num_tensors)
    grads = make_gradients(problem, K, dtype)
    return build_case(problem, grads, "cpu", contenders)


def _opts(tmp_path):
    return SuiteOptions(out=tmp_path, quick=True, repeats=3, stage_budget_s=0.01).resolved()


BANDWIDTH = {"read_GBps": 10.0, "triad_GBps": 10.0}


@pytest.mark.parametrize("K,dtype", [(2, torch.float32), (3, torch.float32), (2, torch.bfloat16),
                                     (4, torch.bfloat16)])
def test_every_contender_agrees_with_ours(tmp_path, K, dtype):
    opts = _opts(tmp_path)
    ours = choose_ours(opts)
    contenders = C.make_contenders(ours, C.CompileBudget(0.0))
    primary = C.ours_name(ours[0][0])
    case, exact = _small_case(K, dtype, contenders)
    for stage in STAGES:
        st = run_stage(case, stage, contenders, primary, opts, BANDWIDTH, exact, memory=False,
                       log=lambda msg: None)
        for name, info in st["contenders"].items():
            if name in ("compile", "ours_triton"):
                assert info["status"] == "skipped"
                continue
            assert info["status"] == "ok", (stage, name, info)


class _WrongGram(C.Foreach):
    name, label = "wrong", "wrong gram"
    stages = ("gram", "combine")

    def _gram(self, case):
        return lambda: 2 * self.gram_tensor(case.grads)

    def _combine(self, case):  # forgets the last objective
        w = C._weights_list(case.weights_in[0])[:-1]
        return lambda: self.combine_lists(case.grads[:-1], w)


def test_a_wrong_contender_is_reported_not_timed(tmp_path):
    opts = _opts(tmp_path)
    ours = choose_ours(opts)
    contenders = C.make_contenders(ours, C.CompileBudget(0.0)) + [_WrongGram()]
    primary = C.ours_name(ours[0][0])
    case, exact = _small_case(2, torch.float32, contenders)
    for stage in ("gram", "combine"):
        st = run_stage(case, stage, contenders, primary, opts, BANDWIDTH, exact, memory=False,
                       log=lambda msg: None)
        info = st["contenders"]["wrong"]
        assert info["status"] == "wrong" and not info["check"]["passed"]
        assert "median_s" not in info and "not timed" in info["reason"]
        assert st["contenders"]["foreach"]["status"] == "ok"


def test_tolerances_are_tight_for_fp32():
    assert tolerance("gram", torch.float32) <= 1e-3
    assert tolerance("pareto_combine", torch.float32, iterative_solver=True,
                     num_objectives=2) <= 1e-3
    assert tolerance("adamw", torch.float32) <= 1e-3


# ---------------------------------------------------------------------------------------------
# Byte counting and roofline

def test_stage_bytes_match_the_design():
    N = 1000
    assert stage_bytes("gram", 2, N, 4) == StageBytes(2 * N * 4, 0)
    assert stage_bytes("combine", 3, N, 2) == StageBytes(3 * N * 2, N * 2)
    pc = stage_bytes("pareto_combine", 2, N, 4)
    assert pc.read == stage_bytes("gram", 2, N, 4).read + stage_bytes("combine", 2, N, 4).read
    assert pc.written == N * 4
    # fused AdamW, K=2 fp32: reads g1, g2, p, m, v and writes p, m, v = 32 N bytes
    adamw = stage_bytes("adamw", 2, N, 4)
    assert adamw.total == 32 * N and adamw.written == 12 * N
    assert stage_bytes("adamw", 2, N, 2, state_element_size=4).total == (2 * 2 + 6 * 4) * N
    assert stage_bytes("weights", 2, N, 4) is None
    with pytest.raises(ValueError):
        stage_bytes("nonsense", 2, N, 4)


def test_roofline_uses_read_or_triad_bandwidth():
    bw = {"read_GBps": 20.0, "triad_GBps": 10.0}
    assert roofline_seconds(StageBytes(20e9, 0), bw) == pytest.approx(1.0)
    assert roofline_seconds(StageBytes(20e9, 10e9), bw) == pytest.approx(3.0)
    assert roofline_seconds(None, bw) is None


# ---------------------------------------------------------------------------------------------
# Timer statistics

def test_median_odd_even_and_empty():
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median([5.0]) == 5.0
    with pytest.raises(ValueError):
        median([])
    xs = [random.random() for _ in range(101)]
    assert median(xs) == sorted(xs)[50]


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # round 2 is disturbed for both; per-round ratios are all 2 -> 2 exactly
    assert paired_ratio([2.0, 20.0, 4.0], [1.0, 10.0, 2.0]) == 2.0
    # the ratio of medians would be 4/2 = 2, the median of ratios is 3
    assert paired_ratio([3.0, 4.0, 30.0], [1.0, 2.0, 6.0]) == 3.0
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_plan_repeats_respects_budget_and_bounds():
    assert plan_repeats(0.1, 15, 1.0) == 10
    assert plan_repeats(1.0, 15, 1.0) == 3      # at least 3 rounds
    assert plan_repeats(1e-6, 15, 1.0) == 15    # at most `repeats`
    assert plan_repeats(1.0, 2, 1.0) == 2       # never more than asked


def test_interleaved_rounds_rotate_and_count():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    samples = interleaved_times(fns, 4, warmup=1)
    assert all(len(v) == 4 for v in samples.values())
    assert calls[:3] == ["a", "b", "c"]                      # warm-up
    rounds = [calls[3 + 3 * r: 6 + 3 * r] for r in range(4)]
    assert rounds == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_interleaved_budget_shrinks_rounds():
    fns = {"slow": lambda: time.sleep(0.02)}
    samples = interleaved_times(fns, 50, budget_s=0.1)
    assert 3 <= len(samples["slow"]) <= 6
    assert median(samples["slow"]) >= 0.02


def test_peak_extra_memory_sees_torch_allocations():
    n = 1 << 20
    x = torch.ones(n)
    peak, method = peak_extra_memory(lambda: torch.cat([x, x]))   # 8 MiB output
    assert 2 * n * 4 <= peak < 3 * n * 4
    peak, _ = peak_extra_memory(lambda: torch.dot(x, x))
    assert peak < 1024
    assert "profiler" in method


# ---------------------------------------------------------------------------------------------
# Problems and solvers

def test_lora_problem_sizes():
    llama = get_problem("llama2-7b")
    assert llama.num_tensors == 448
    assert llama.num_params == 32 * 16 * (4 * 2 * 4096 + 3 * (4096 + 11008))  # 39,976,960
    assert llama.shapes[:2] == ((16, 4096), (4096, 16))
    assert len(llama.layer_ranges()) == 32 and all(len(r) == 14 for r in llama.layer_ranges())
    emu2 = get_problem("emu2-llm")
    assert emu2.num_tensors == 60 * 14 and emu2.num_params == 60 * 16 * (8 * 6656 + 3 * 24576)


def test_gradients_are_deterministic_and_prefix_stable():
    problem = get_problem("small")
    g2 = make_gradients(problem, 2, seed=3)
    g4 = make_gradients(problem, 4, seed=3)
    for k in range(2):
        assert all(torch.equal(a, b) for a, b in zip(g2[k], g4[k]))
    g_other = make_gradients(problem, 2, seed=4)
    assert not torch.equal(g2[0][0], g_other[0][0])
    assert all(torch.equal(a, b) for a, b in zip(make_params(problem), make_params(problem)))


def _kkt_ok(G, w, tol=1e-9):
    """Min-norm optimality on the simplex: (G w)_i >= w^T G w for all i, equality on the
    support."""
    Gw = [sum(G[i][j] * w[j] for j in range(len(w))) for i in range(len(w))]
    value = sum(wi * gi for wi, gi in zip(w, Gw))
    scale = max(abs(x) for row in G for x in row)
    return all(g >= value - tol * scale for g in Gw) and all(
        abs(g - value) <= 1e-7 * scale for g, wi in zip(Gw, w) if wi > 1e-9)


def value(G, w):
    K = len(w)
    return sum(w[i] * G[i][j] * w[j] for i, j in itertools.product(range(K), repeat=2))


@pytest.mark.parametrize("K", [2, 3, 4, 5])
def test_exact_min_norm_weights_satisfy_kkt(K):
    gen = torch.Generator().manual_seed(K)
    for trial in range(20):
        A = torch.randn(K, 7, generator=gen, dtype=torch.float64)
        if trial % 3 == 0:
            A[1] = -0.5 * A[0]          # opposite gradients: the optimum is an interior point
        G = (A @ A.T).tolist()
        w = oracles.exact_min_norm_weights(G)
        assert abs(sum(w) - 1) < 1e-12 and min(w) >= 0
        assert _kkt_ok(G, w)
        # the classic Frank-Wolfe solver gets close (it converges like 1/t), never below
        fw = oracles.frank_wolfe_min_norm(G, max_iter=2000, tol=1e-12)
        scale = max(G[i][i] for i in range(K))
        assert value(G, fw) >= value(G, w) - 1e-12 * scale
        assert value(G, fw) <= value(G, w) + 1e-3 * scale
