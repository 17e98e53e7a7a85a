"""Every Triton kernel variant the launchers can use compiles ahead of time for Hopper (sm_90)
and Ampere (sm_80) without a GPU, and fits in registers.

triton.compile with an explicit GPUTarget runs the full pipeline down to a cubin with Triton's
bundled ptxas, whose ``-v`` log gives registers and spill bytes per thread. The kernels must be JIT
functions, not interpreted ones, so the compilation runs in a child process with TRITON_INTERPRET
removed (the backend tests set it) and a fresh Triton cache (a cached kernel runs no ptxas).

Coverage (kept under ~3 minutes on 2 cores by a pool of 2 compile processes):
- the fixed configuration (autotune off) of every kernel -- gram partials and reduce, combine,
  combine_into, balanced AdamW -- on sm_90 for every
  dtype and one K per padded-K bucket (BUCKET_KS), and for every K in KS in fp32 and fp64 (bf16
  and fp16 accumulate in fp32 and load narrower values, so fp32 bounds them; fp64 takes two
  registers per value); on sm_80 (fewer registers per SM, same per thread) in fp32/fp64, K 2, 9;
- every autotune candidate on sm_90 (a superset of sm_80's list: larger blocks, 16 warps) for
  every padded-K bucket in fp32, and for K 2 and 9 in fp64.
"""
import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

from shared import run_process

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]

KS = (1, 2, 3, 4, 8, 9, 16, 17, 32)  # 32 objectives is the most the plan launches natively
BUCKET_KS = (1, 2, 3, 8, 9, 17)  # one K per padded K (1, 2, 4, 8, 16, 32) with a ragged row
DTYPES = ("fp32", "bf16", "fp16", "fp64")
# Spill bound per thread (stores and loads): 8 bytes, i.e. at most a couple of registers parked
# by ptxas (seen: 4 B in the fp16 K=17 Gram and one 16-warp Gram candidate), not a spilled tile.
MAX_SPILL_BYTES = 8

CHILD = r"""
import json, sys
from concurrent.futures import ProcessPoolExecutor
import triton.language as tl
from fused_balance.kernels import aot, common
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}

def specs(arch, dtype, K, autotune):
    return aot.kernel_specs(DTYPES[dtype], K, autotune_major=arch // 10 if autotune else None)

def compile_one(job):
    arch, dtype, K, autotune, index = job
    name, fn, sig, constexprs, warps = specs(arch, dtype, K, autotune)[index]
    kernel, usage = aot.compile_kernel(fn, sig, constexprs, arch, warps)
    ptx = kernel.asm["ptx"]
    return dict(arch=arch, dtype=dtype, K=K, name=name, num_warps=warps,
                block=constexprs.get("BLOCK", constexprs.get("RBLOCK")),
                cubin_bytes=len(kernel.asm["cubin"]), ptx_target=f".target sm_{arch}" in ptx,
                entry=fn.__name__ in ptx, **usage)

if __name__ == "__main__":
    assert not common.INTERPRETED
    cases = json.loads(sys.argv[1])
    jobs, seen = [], set()  # the same variant twice would hit the cache and log no ptxas run
    for a, d, K, t in cases:
        for i, (_, fn, _, constexprs, warps) in enumerate(specs(a, d, K, t)):
            key = (a, fn.__name__, warps, repr(sorted(constexprs.items())))
            if key not in seen:
                seen.add(key)
                jobs.append((a, d, K, t, i))
    with ProcessPoolExecutor(2) as pool:
        report = list(pool.map(compile_one, jobs, chunksize=4))
    print(json.dumps(report))
"""


def _cases():
    # every dtype in every padded-K bucket; every K of KS in fp32 (the fp32 tile is the largest
    # of fp32/bf16/fp16) and fp64
    cases = [(90, d, K, False) for d in ("fp32", "fp64") for K in KS]
    cases += [(90, d, K, False) for d in ("bf16", "fp16") for K in BUCKET_KS]
    cases += [(80, d, K, False) for d in ("fp32", "fp64") for K in (2, 9)]
    cases += [(90, "fp32", K, True) for K in BUCKET_KS]
    cases += [(90, "fp64", K, True) for K in (2, 9)]
    return cases


def _compile_report(cases):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as cache:
        env["TRITON_CACHE_DIR"] = cache
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
            script.write(CHILD)
        try:
            proc = run_process([sys.executable, script.name, json.dumps(cases)],
                               "the Triton AOT compile of every kernel variant", cwd=ROOT, env=env)
        finally:
            os.unlink(script.name)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_every_kernel_variant_compiles_for_sm90_and_sm80_without_spills():
    report = _compile_report(_cases())
    if os.environ.get("FUSED_BALANCE_AOT_REPORT"):  # the table, for notes and reviews
        Path(os.environ["FUSED_BALANCE_AOT_REPORT"]).write_text(json.dumps(report, indent=1))
    assert {r["arch"] for r in report} == {90, 80}
    names = {"gram_partials", "gram_reduce", "combine", "combine_into", "balanced_adamw"}
    assert {r["name"] for r in report} == names
    covered = {(r["name"], r["K"], r["dtype"]) for r in report if r["arch"] == 90}
    # Compiled once, reported under the first dtype: the Gram reduce depends only on the
    # accumulator dtype (bf16/fp16 are fp32's).
    assert covered >= {(n, K, d) for n in names for K in BUCKET_KS for d in DTYPES
                       if not (n == "gram_reduce" and d in ("bf16", "fp16"))}
    for r in report:
        assert r["cubin_bytes"] > 0 and r["ptx_target"] and r["entry"], r
    spilling = [r for r in report if max(r["spill_stores"], r["spill_loads"]) > MAX_SPILL_BYTES]
    assert not spilling, "\n".join(json.dumps(r) for r in spilling)
