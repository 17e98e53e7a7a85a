"""The Triton kernels compile ahead of time for Hopper (sm_90) and Ampere (sm_80), no GPU needed.

triton.compile with an explicit GPUTarget runs the full pipeline down to a cubin (Triton bundles
ptxas). The kernels must be JIT functions, not interpreted ones, so the compilation runs in a child
process with TRITON_INTERPRET removed from its environment (the backend tests set it).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys
import triton.language as tl
from fused_balance.kernels import aot, common
assert not common.INTERPRETED
cases = [(90, tl.float32, 2), (90, tl.bfloat16, 3), (90, tl.float16, 2), (90, tl.float64, 2),
         (80, tl.float32, 2), (80, tl.bfloat16, 3)]
report = []
for arch, dtype, K in cases:
    for name, fn, sig, constexprs, warps in aot.kernel_specs(dtype, K):
        kernel = aot.compile_kernel(fn, sig, constexprs, arch, warps)
        ptx = kernel.asm["ptx"]
        report.append(dict(arch=arch, dtype=str(dtype), K=K, name=name,
                           cubin_bytes=len(kernel.asm["cubin"]),
                           ptx_target=f".target sm_{arch}" in ptx,
                           entry=fn.__name__ in ptx, **aot.ptxas_usage(ptx, arch)))
print(json.dumps(report))
"""


def test_kernels_compile_for_sm90_and_sm80():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {r["arch"] for r in report} == {90, 80}
    assert len({r["name"] for r in report}) == 6  # gram x2, combine x3 variants, adamw
    for r in report:
        assert r["cubin_bytes"] > 0 and r["ptx_target"] and r["entry"], r
        assert r["spill_bytes"] == 0, r  # the fixed configurations fit in registers
