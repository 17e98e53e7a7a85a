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
  every padded-K bucket in fp32, and for K 2 and 9 in fp64;
- the bank kernels (kernels/bank.py) as their launchers compile a plan's launch (aligned tensors,
  fp fusion off for combine and AdamW), on sm_90 in fp32, bf16 and fp64 for K 2, 9 and 64 (in a
  second child: ~70 s of CPU, 75-140 s here beside other jobs; each AdamW variant takes ~8 s,
  nearly all of it in Triton's MLIR passes).
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
BANK_KS = (2, 9, 64)  # one block pair / several (Gram); rows unrolled / a loop (combine, AdamW)
# Bank-row loads in the unmasked body of a combine / AdamW chunk: up to 16 rows are unrolled
# (bank._combination), past that row 0 and the loop's row.
BANK_ROW_LOADS = {2: 2, 9: 9, 64: 2}
BANK_DTYPES = ("fp32", "bf16", "fp64")
# Spill bound per thread (stores and loads): 8 bytes, i.e. at most a couple of registers parked
# by ptxas (seen: 4 B in the fp16 K=17 Gram and one 16-warp Gram candidate), not a spilled tile.
MAX_SPILL_BYTES = 8

CHILD = r"""
import json, re, sys
from concurrent.futures import ProcessPoolExecutor
import triton.language as tl
from fused_balance.kernels import aot, common
DTYPES = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16, "fp64": tl.float64}
# 128-bit global loads: four 32-bit or two 64-bit lanes (the PTX of an LDG.E.128)
LOAD_128 = re.compile(r"\bld\.global(?:\.\w+)*\.(?:v4\.[bfu]32|v2\.[bfu]64)\b")
# floating-point fused multiply-adds (integer mad.lo is address arithmetic)
FP_FMA = re.compile(r"\b(?:fma|mad)(?:\.\w+)*\.f(?:32|64)\b")
# a 32-bit product with the argument ld in the TTIR (the JIT types an int below 2**31 as i32)
LD_PRODUCT_I32 = re.compile(r"= arith\.muli [^:\n]*%ld\b[^:\n]*: i32\b")

def specs(family, arch, dtype, K, autotune):
    if family == "bank":
        return aot.bank_kernel_specs(DTYPES[dtype], K)
    return aot.kernel_specs(DTYPES[dtype], K, autotune_major=arch // 10 if autotune else None)

def compile_one(job):
    case, index = job
    arch, dtype, K = case[1:4]
    spec = specs(*case)[index]
    kernel, usage = aot.compile_kernel(spec.fn, spec.signature, spec.constexprs, arch, spec.num_warps,
                                       spec.aligned, spec.options)
    ptx = kernel.asm["ptx"]
    return dict(arch=arch, dtype=dtype, K=K, name=spec.name, num_warps=spec.num_warps,
                block=spec.constexprs.get("BLOCK", spec.constexprs.get("RBLOCK")),
                cubin_bytes=len(kernel.asm["cubin"]), ptx_target=f".target sm_{arch}" in ptx,
                entry=spec.fn.__name__ in ptx, loads_128=len(LOAD_128.findall(ptx)),
                fp_fma=len(FP_FMA.findall(ptx)), ld_products_i32=len(LD_PRODUCT_I32.findall(kernel.asm["ttir"])),
                **usage)

if __name__ == "__main__":
    assert not common.INTERPRETED
    cases = json.loads(sys.argv[1])
    jobs, seen = [], set()  # the same variant twice would hit the cache and log no ptxas run
    for case in cases:
        for i, spec in enumerate(specs(*case)):
            key = (case[1], spec.fn.__name__, spec.num_warps, repr(sorted(spec.signature.items())),
                   repr(sorted(spec.constexprs.items())))
            if key not in seen:
                seen.add(key)
                jobs.append((case, i))
    with ProcessPoolExecutor(2) as pool:
        report = list(pool.map(compile_one, jobs))  # one at a time: AdamW's take ~8 s
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
    return [("pointer_table",) + case for case in cases]


def _compile_report(cases, report_name):
    """One record per distinct variant of the cases' kernels (family, arch, dtype, K, autotune);
    also written to $FUSED_BALANCE_AOT_REPORT/<report_name>.json when set (for notes and reviews)."""
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
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if os.environ.get("FUSED_BALANCE_AOT_REPORT"):
        folder = Path(os.environ["FUSED_BALANCE_AOT_REPORT"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{report_name}.json").write_text(json.dumps(report, indent=1))
    return report


def test_every_kernel_variant_compiles_for_sm90_and_sm80_without_spills():
    report = _compile_report(_cases(), "pointer_table")
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


def test_bank_kernels_compile_for_sm90_without_spills_with_128_bit_bank_loads_and_no_fma():
    """The launchers' configuration of every bank kernel fits in registers on sm_90; combine and
    AdamW load the bank rows 128 bits at a time (the aligned body of each chunk) and contain no
    FMA (fp fusion off: the GPU rounds w*g + d twice, as the C++ ops on the CPU do). The Gram's
    loads are scalar (its chunk starts are not known to be 16-byte aligned): recorded in the
    report, not asserted. Every row offset k * ld is computed in 64 bits."""
    report = _compile_report([("bank", 90, d, K, False) for d in BANK_DTYPES for K in BANK_KS], "bank")
    names = {"bank_gram_partials", "bank_gram_reduce", "bank_combine", "bank_adamw", "bank_count_steps"}
    assert {r["name"] for r in report} == names
    # the reduce (float64 partials) compiled once per K, the step count once: under fp32
    covered = {(r["name"], r["K"], r["dtype"]) for r in report}
    assert covered >= {(n, K, d) for n in ("bank_gram_partials", "bank_combine", "bank_adamw")
                       for K in BANK_KS for d in BANK_DTYPES}
    assert covered >= {("bank_gram_reduce", K, "fp32") for K in BANK_KS}
    for r in report:
        assert r["cubin_bytes"] > 0 and r["ptx_target"] and r["entry"], r
    spilling = [r for r in report if r["spill_stores"] or r["spill_loads"]]
    assert not spilling, "\n".join(json.dumps(r) for r in spilling)
    streaming = [r for r in report if r["name"] in ("bank_combine", "bank_adamw")]
    fused = [r for r in streaming if r["fp_fma"]]
    assert not fused, "\n".join(json.dumps(r) for r in fused)
    # AdamW also loads m and v (one vector each: the bank's dtype). Its parameters are scalar: a
    # parameter's start in the bank row need not be 16-byte aligned.
    scalar = [r for r in streaming
              if r["loads_128"] < BANK_ROW_LOADS[r["K"]] + (2 if r["name"] == "bank_adamw" else 0)]
    assert not scalar, "\n".join(json.dumps(r) for r in scalar)
    # Row offsets k * ld in 64 bits: (K - 1) * N passes 2**31 for K = 64 and N >= 34M.
    narrow = [r for r in report if r["ld_products_i32"]]
    assert not narrow, "\n".join(json.dumps(r) for r in narrow)
