"""Ahead-of-time compilation of every kernel for a given NVIDIA architecture, without a GPU.

``triton.compile`` on an ``ASTSource`` with an explicit ``GPUTarget`` runs the whole pipeline
(TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with Triton's bundled ptxas), so a CPU-only machine can
check that the kernels build for Hopper (sm_90) and Ampere (sm_80) and see their register use.
Must run in a process where TRITON_INTERPRET is unset (the kernels must be JIT functions).
"""
from __future__ import annotations

import contextlib
import io
import re

import triton
from triton import knobs
import triton.language as tl
from triton.backends.compiler import GPUTarget

from . import adamw, combine, common, gram
from .pointer_table import CHUNK

_SIG = {tl.float32: "fp32", tl.float64: "fp64", tl.bfloat16: "bf16", tl.float16: "fp16"}
_I64 = "*i64"


def _acc(dtype):
    return tl.float64 if dtype == tl.float64 else tl.float32


def _configs(tuned_candidates, default, meta, major):
    """The (BLOCK, num_warps) pairs a launcher can use: its fixed default, plus every autotune
    candidate when ``major`` (GPU major version) is given and the kernel is autotuned."""
    configs = [tuple(default(meta))]
    if major is not None and tuned_candidates is not None:
        configs += [tuple(c) for c in tuned_candidates(major, meta) if tuple(c) not in configs]
    return configs


def kernel_specs(dtype=tl.float32, K: int = 2, autotune_major: int | None = None):
    """(name, jit function, signature, constexprs, num_warps) for every kernel, with the fixed
    configuration the launcher uses when autotuning is off, plus (when ``autotune_major`` is the
    GPU major version) every autotune candidate the launcher would time on that GPU."""
    acc = _acc(dtype)
    KP = triton.next_power_of_2(K)
    specs = []
    meta = {"KP": KP, "ACC": acc}
    for block, warps in _configs(gram._candidates, gram._default, meta, autotune_major):
        specs.append(("gram_partials", gram.gram_partials_kernel,
                      dict(table=_I64, chunk_tensor=_I64, chunk_offset=_I64, sizes=_I64,
                           partials="*" + _SIG[acc], num_tensors="i64", first_program="i64"),
                      dict(K=K, KP=KP, IN_DTYPE=dtype, ACC=acc, ALIGNED=True, CHUNK=CHUNK,
                           BLOCK=block), warps))
    specs.append(("gram_reduce", gram.gram_reduce_kernel,
                  dict(partials="*" + _SIG[acc], segment_chunk_ptr=_I64, segment_chunks=_I64,
                       out="*" + _SIG[acc], first_program="i64"),
                  dict(K=K, KP=KP, ACC=acc, RBLOCK=gram.reduce_block(KP)), 4))
    # combine (fresh outputs, autotuned) and combine_into (in place, a skip flag, never tuned)
    meta = {"KP": KP, "ACC": acc}
    for label, has_skip, tuned in (("combine", False, combine._candidates),
                                   ("combine_into", True, None)):
        for block, warps in _configs(tuned, combine._default, meta, autotune_major):
            specs.append((label, combine.combine_kernel,
                          dict(table=_I64, chunk_tensor=_I64, chunk_offset=_I64, sizes=_I64,
                               segment=_I64, weights="*" + _SIG[acc], out_table=_I64, skip="*i1",
                               num_tensors="i64", first_program="i64"),
                          dict(K=K, KP=KP, IN_DTYPE=dtype, OUT_DTYPE=dtype, ACC=acc,
                               HAS_SKIP=has_skip, ALIGNED=True, CHUNK=CHUNK, BLOCK=block), warps))
    block, warps = adamw._default_config(K, fp64=dtype == tl.float64)
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
    """(compiled kernel, resource usage). The kernel's ``.asm`` holds ttir, ttgir, llir, ptx and
    cubin; the usage is what Triton's own ptxas run (same flags as a GPU build) reports."""
    if common.INTERPRETED:
        raise RuntimeError("kernels were decorated under TRITON_INTERPRET=1: nothing to compile")
    source = triton.compiler.ASTSource(fn, signature, constexprs)
    log = io.StringIO()
    # Triton prints its ptxas -v log when asked; a cached kernel runs no ptxas, so the caller
    # gives this process a fresh TRITON_CACHE_DIR.
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": num_warps})
    return kernel, ptxas_usage(log.getvalue())


def ptxas_usage(log: str) -> dict:
    """Registers, spill bytes (stores, loads) and stack frame per thread from a ``ptxas -v`` log
    of a single kernel; raises if the log has no register line (nothing was compiled)."""
    regs = re.search(r"Used (\d+) registers", log)
    if regs is None:
        raise RuntimeError(f"no ptxas resource usage in the log (cached kernel?):\n{log}")
    field = lambda pattern: int(m.group(1)) if (m := re.search(pattern, log)) else 0
    return {"registers": int(regs.group(1)),
            "stack_bytes": field(r"(\d+) bytes stack frame"),
            "spill_stores": field(r"(\d+) bytes spill stores"),
            "spill_loads": field(r"(\d+) bytes spill loads")}
