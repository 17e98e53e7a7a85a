"""Ahead-of-time compilation of every kernel for a given NVIDIA architecture, without a GPU.

``triton.compile`` on an ``ASTSource`` with an explicit ``GPUTarget`` runs the whole pipeline
(TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with Triton's bundled ptxas), so a CPU-only machine can
check that the kernels build for Hopper (sm_90) and Ampere (sm_80) and see their register use.
Must run in a process where TRITON_INTERPRET is unset (the kernels must be JIT functions).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from . import adamw, combine, common, gram
from .pointer_table import CHUNK

_SIG = {tl.float32: "fp32", tl.float64: "fp64", tl.bfloat16: "bf16", tl.float16: "fp16"}
_I64 = "*i64"


def _acc(dtype):
    return tl.float64 if dtype == tl.float64 else tl.float32


def kernel_specs(dtype=tl.float32, K: int = 2):
    """(name, jit function, signature, constexprs, num_warps) for every kernel, with the fixed
    configuration the launcher uses when autotuning is off."""
    acc = _acc(dtype)
    KP = triton.next_power_of_2(K)
    specs = []
    block, warps = gram._default({"KP": KP})
    specs.append(("gram_partials", gram.gram_partials_kernel,
                  dict(table=_I64, chunk_tensor=_I64, chunk_offset=_I64, sizes=_I64,
                       partials="*" + _SIG[acc], num_tensors="i64", first_program="i64"),
                  dict(K=K, KP=KP, IN_DTYPE=dtype, ACC=acc, ALIGNED=True, CHUNK=CHUNK,
                       BLOCK=block), warps))
    specs.append(("gram_reduce", gram.gram_reduce_kernel,
                  dict(partials="*" + _SIG[acc], segment_chunk_ptr=_I64, segment_chunks=_I64,
                       out="*" + _SIG[acc], first_program="i64"),
                  dict(K=K, KP=KP, ACC=acc, RBLOCK=gram.reduce_block(KP)), 4))
    # combine (fresh flat output), combine_into (pointer-table output, skip flag), and the
    # K-output combine of the Gram backward.
    for label, out_flat, has_skip, KO in (("combine", True, False, 1),
                                          ("combine_into", False, True, 1),
                                          ("combine_k_outputs", True, False, K)):
        KOP = triton.next_power_of_2(KO)
        block, warps = combine._default({"KP": KP, "KOP": KOP})
        specs.append((label,
                      combine.combine_kernel,
                      dict(table=_I64, chunk_tensor=_I64, chunk_offset=_I64, sizes=_I64,
                           starts=_I64, segment=_I64, weights="*" + _SIG[acc], out_table=_I64,
                           out_flat="*" + _SIG[dtype], skip="*i1", num_tensors="i64",
                           total="i64", first_program="i64"),
                      dict(K=K, KP=KP, KO=KO, KOP=KOP, IN_DTYPE=dtype, OUT_DTYPE=dtype, ACC=acc,
                           OUT_FLAT=out_flat, HAS_SKIP=has_skip, ALIGNED=True, CHUNK=CHUNK,
                           BLOCK=block), warps))
    block, warps = adamw._default_config(K)
    specs.append(("balanced_adamw", adamw.balanced_adamw_kernel,
                  dict(grad_table=_I64, state_table=_I64, chunk_tensor=_I64, chunk_offset=_I64,
                       sizes=_I64, segment=_I64, weights="*" + _SIG[acc],
                       hyper="*" + _SIG[acc], skip="*i1", num_tensors="i64",
                       first_program="i64"),
                  dict(K=K, KP=KP, G_DTYPE=dtype, P_DTYPE=dtype, M_DTYPE=dtype, V_DTYPE=dtype,
                       G_ACC=acc, ACC=acc, PER_TENSOR=False, HAS_SKIP=True, ALIGNED=True,
                       CHUNK=CHUNK, BLOCK=block), warps))
    return specs


def compile_kernel(fn, signature, constexprs, arch: int, num_warps: int = 4):
    """The compiled kernel (``.asm`` holds ttir, ttgir, llir, ptx, cubin)."""
    if common.INTERPRETED:
        raise RuntimeError("kernels were decorated under TRITON_INTERPRET=1: nothing to compile")
    source = triton.compiler.ASTSource(fn, signature, constexprs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps})


def ptxas_usage(ptx: str, arch: int) -> dict:
    """Registers and spill bytes per thread as reported by Triton's bundled ``ptxas -v``."""
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas, f"-arch={name}", "-v", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores", log)
    return {"registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spills.group(1)) if spills else 0}
