"""The CPU part of ``make gpu-check`` (fused_balance.benchmarking.gpu_check), so the command
that runs first on a GPU cannot rot: every op check passes on small shapes here, the CUDA-only
checks say so, and the throughput table is filled."""
import io

import pytest
import torch

from fused_balance.benchmarking import gpu_check


def test_gpu_check_runs_its_cpu_part_and_every_check_passes():
    out = io.StringIO()
    report = gpu_check.run("cpu", quick=True, repeats=2, out=out)
    text = out.getvalue()
    assert not report.failed, text
    names = [name for name, _, _ in report.checks]
    for op in ("list gram cpp K=9 bfloat16 odd offsets", "list combine triton K=2 float32 aligned",
               "plan gram cpp K=9 float32", "plan combine cpp K=2 bfloat16", "plan adamw cpp K=9 bfloat16",
               "plan gram triton K=9 float32", "plan combine triton K=2 bfloat16", "plan adamw triton K=9 bfloat16",
               "list gram cpp K=33 bfloat16 odd offsets", "plan gram cpp K=33 float32"):
        assert op in names, names
    cuda_only = {name: ok for name, ok, _ in report.checks if "graph" in name or "2^31" in name or "sync" in name}
    assert len(cuda_only) == 5 and all(ok is None for ok in cuda_only.values()), cuda_only
    timed = [row[0] for row in report.timings]
    assert timed[0] == "device copy (read + write)" and "bank adamw cpp K=2" in timed and "list gram triton K=9" in timed \
        and "bank adamw triton K=2" in timed
    assert all(row[1] > 0 and row[3] > 0 for row in report.timings)
    assert text.strip().splitlines()[-1].startswith(f"{len(report.checks)} passed, 0 failed")


def test_a_wrong_result_fails_the_check(monkeypatch):
    """The checks can fail: a combine that is off by 5 % is reported, in every dtype."""
    import fused_balance as fb
    real = fb.combine

    def off(*args, **kwargs):
        return [t * 1.05 for t in real(*args, **kwargs)]
    monkeypatch.setattr(fb, "combine", off)
    report = gpu_check.Report()
    gpu_check._check_ops(report, gpu_check._problem(quick=True), torch.device("cpu"))
    failed = [name for name, ok, _ in report.checks if ok is False]
    assert failed and all(name.startswith("list combine") for name in failed) and \
        len([n for n, _, _ in report.checks if n.startswith("list combine")]) == len(failed)


def test_gpu_check_asks_for_a_gpu_where_there_is_none():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        gpu_check.run("cuda", quick=True)
