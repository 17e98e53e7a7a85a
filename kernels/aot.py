"""Ahead-of-time compilation of every kernel for a given NVIDIA architecture, without a GPU.

``triton.compile`` on an ``ASTSource`` with an explicit ``GPUTarget`` runs the whole pipeline
(TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with Triton's bundled ptxas), so a CPU-only machine can
check that the kernels build for Hopper (sm_90) and Ampere (sm_80) and see their register use.
``kernel_specs`` lists the pointer-table kernels, ``bank_kernel_specs`` those of bank.py, each
variant as its launcher compiles it (block sizes from the launcher's own helpers; for the bank
kernels also the alignment the JIT specialises and the compile options, fp fusion off).
Must run in a process where TRITON_INTERPRET is unset (the kernels must be JIT functions).
"""
from __future__ import annotations

import contextlib
import io
import re
from typing import NamedTuple

import triton
from triton import knobs
import triton.language as tl
from triton.backends.compiler import GPUTarget

from . import adamw, bank, combine, common, gram
from .pointer_table import CHUNK

_SIG = {tl.float32: "fp32", tl.float64: "fp64", tl.bfloat16: "bf16", tl.float16: "fp16"}
_I64 = "*i64"
_TORCH_DTYPES = {tl_dtype: torch_dtype for torch_dtype, tl_dtype in common.TL_DTYPES.items()}


class KernelSpec(NamedTuple):
    """One kernel variant as a launcher compiles it."""
    name: str
    fn: object  # the @triton.jit function
    signature: dict  # argument -> Triton type, for the non-constexpr arguments
    constexprs: dict
    num_warps: int
    # arguments the launch specialises as multiples of 16 (tt.divisibility): addresses and ints
    aligned: tuple = ()
    # compile options the launcher passes besides num_warps (e.g. enable_fp_fusion)
    options: dict | None = None


def _acc(dtype):
    return tl.float64 if dtype == tl.float64 else tl.float32


def _configs(tuned_candidates, default, meta, major):
    """The (BLOCK, num_warps) pairs a launcher can use: its fixed default, plus every autotune
    candidate when ``major`` (GPU major version) is given and the kernel is autotuned."""
    configs = [tuple(default(meta))]
    if major is not None and tuned_candidates is not None:
        configs += [tuple(c) for c in tuned_candidates(major, meta) if tuple(c) not in configs]
    return configs


def kernel_specs(dtype=tl.float32, K: int = 2, autotune_major: int | None = None) -> list[KernelSpec]:
    """A KernelSpec for every pointer-table kernel, with the fixed configuration the launcher
    uses when autotuning is off, plus (when ``autotune_major`` is the GPU major version) every
    autotune candidate the launcher would time on that GPU."""
    acc = _acc(dtype)
    KP = triton.next_power_of_2(K)
    specs = []
    meta = {"KP": KP, "ACC": acc}
    for block, warps in _configs(gram._candidates, gram._default, meta, autotune_major):
        specs.append(KernelSpec("gram_partials", gram.gram_partials_kernel,
                                dict(table=_I64, chunk_tensor=_I64, chunk_offset=_I64, sizes=_I64,
                                     partials="*" + _SIG[acc], num_tensors="i64", first_program="i64"),
                                dict(K=K, KP=KP, IN_DTYPE=dtype, ACC=acc, ALIGNED=True, CHUNK=CHUNK,
                                     BLOCK=block), warps))
    specs.append(KernelSpec("gram_reduce", gram.gram_reduce_kernel,
                            dict(partials="*" + _SIG[acc], segment_chunk_ptr=_I64, segment_chunks=_I64,
                                 out="*" + _SIG[acc], first_program="i64"),
                            dict(K=K, KP=KP, ACC=acc, RBLOCK=gram.reduce_block(KP)), 4))
    # combine (fresh outputs, autotuned) and combine_into (in place, a skip flag, never tuned)
    meta = {"KP": KP, "ACC": acc}
    for label, has_skip, tuned in (("combine", False, combine._candidates),
                                   ("combine_into", True, None)):
        for block, warps in _configs(tuned, combine._default, meta, autotune_major):
            specs.append(KernelSpec(label, combine.combine_kernel,
                                    dict(table=_I64, chunk_tensor=_I64, chunk_offset=_I64, sizes=_I64,
                                         segment=_I64, weights="*" + _SIG[acc], out_table=_I64, skip="*i1",
                                         num_tensors="i64", first_program="i64"),
                                    dict(K=K, KP=KP, IN_DTYPE=dtype, OUT_DTYPE=dtype, ACC=acc,
                                         HAS_SKIP=has_skip, ALIGNED=True, CHUNK=CHUNK, BLOCK=block), warps))
    block, warps = adamw._default_config(K, fp64=dtype == tl.float64)
    specs.append(KernelSpec("balanced_adamw", adamw.balanced_adamw_kernel,
                            dict(grad_table=_I64, state_table=_I64, chunk_tensor=_I64, chunk_offset=_I64,
                                 sizes=_I64, segment=_I64, weights="*" + _SIG[acc],
                                 hyper="*" + _SIG[acc], skip="*i1", num_tensors="i64",
                                 first_program="i64"),
                            dict(K=K, KP=KP, G_DTYPE=dtype, P_DTYPE=dtype, M_DTYPE=dtype, V_DTYPE=dtype,
                                 G_ACC=acc, ACC=acc, PER_TENSOR=False, HAS_SKIP=True, ALIGNED=True,
                                 CHUNK=CHUNK, BLOCK=block), warps))
    return specs


# Ints of a plan's launch that the JIT finds to be multiples of 16 when the bank is aligned
# (N a multiple of 16) -- ld and row are N, the first program 0; the other counts are arbitrary.
_BANK_ALIGNED_INTS = ("ld", "row", "first_program")


def _bank_spec(name, fn, signature, constexprs, options=None) -> KernelSpec:
    """A bank kernel as the JIT specialises a plan's launch: every tensor is a PyTorch allocation
    (16-byte aligned), ints below 2**31 are i32, and the bank is the aligned case."""
    aligned = tuple(a for a, t in signature.items() if t.startswith("*") or a in _BANK_ALIGNED_INTS)
    return KernelSpec(name, fn, signature, constexprs, bank.NUM_WARPS, aligned, options)


def bank_kernel_specs(dtype=tl.float32, K: int = 2, state_dtype=None) -> list[KernelSpec]:
    """A KernelSpec for every kernel of kernels/bank.py, configured by the launchers' own helpers,
    for a [K, N] bank of ``dtype`` and AdamW states (and parameters) of ``state_dtype`` (default:
    the bank's), with the skip flag and live mask a BalancePlan passes."""
    state_dtype = dtype if state_dtype is None else state_dtype
    bank_type, state_type = _TORCH_DTYPES[dtype], _TORCH_DTYPES[state_dtype]
    g, s = "*" + _SIG[dtype], "*" + _SIG[state_dtype]
    kb, nb, gram_block = bank._gram_block(K)
    specs = [
        _bank_spec("bank_gram_partials", bank.bank_gram_partials_kernel,
                   dict(bank=g, ld="i32", chunks=_I64, partials="*fp64", found_inf="*u1", row="i32",
                        num_segments="i32", first_program="i32"),
                   dict(K=K, KB=kb, NB=nb, BLOCK=gram_block)),
        _bank_spec("bank_gram_reduce", bank.bank_gram_reduce_kernel,
                   dict(partials="*fp64", seg_offsets=_I64, gram="*fp64", found_inf="*u1", num_chunks="i32"),
                   dict(K=K, PB=bank._reduce_pairs(K), LANES=bank._REDUCE_LANES)),
    ]
    vec, block = bank._vector_block(bank_type)
    specs.append(_bank_spec(
        "bank_combine", bank.bank_combine_kernel,
        dict(bank=g, ld="i32", chunks=_I64, weights="*fp64", out=g, skip="*u1", row="i32",
             num_segments="i32", first_program="i32"),
        dict(K=K, DTYPE=dtype, ACC=common.accumulate_tl_dtype(bank_type), HAS_SKIP=True, VEC=vec,
             BLOCK=block),
        bank.EXACT_ROUNDING))
    vec, block = bank._vector_block(bank_type, state_type)
    specs.append(_bank_spec(
        "bank_adamw", bank.bank_adamw_kernel,
        dict(bank=g, ld="i32", chunks=_I64, weights="*fp64", param_ptrs=_I64, m=s, v=s, hyper="*fp64",
             step="*fp32", skip="*u1", live="*u1", row="i32", num_segments="i32", num_params="i32",
             num_groups="i32", first_program="i32"),
        dict(K=K, G_DTYPE=dtype, P_DTYPE=state_dtype, GA=common.accumulate_tl_dtype(bank_type),
             A=common.accumulate_tl_dtype(state_type), HAS_SKIP=True, HAS_LIVE=True, VEC=vec, BLOCK=block),
        bank.EXACT_ROUNDING))
    specs.append(_bank_spec("bank_count_steps", bank.count_steps_kernel,
                            dict(step="*fp32", skip="*u1", live="*u1", num_params="i32"),
                            dict(HAS_SKIP=True, HAS_LIVE=True, BLOCK=bank.COUNT_BLOCK)))
    return specs


def compile_kernel(fn, signature, constexprs, arch: int, num_warps: int = 4, aligned=(), options=None):
    """(compiled kernel, resource usage) of a KernelSpec's fields. ``aligned`` arguments get
    tt.divisibility 16, as the JIT gives 16-byte aligned tensors and ints that are multiples of
    16; ``options`` are further compile options. The kernel's ``.asm`` holds ttir, ttgir, llir,
    ptx and cubin; the usage is what Triton's own ptxas run (same flags as a GPU build) reports."""
    if common.INTERPRETED:
        raise RuntimeError("kernels were decorated under TRITON_INTERPRET=1: nothing to compile")
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    source = triton.compiler.ASTSource(fn, signature, constexprs, attrs=attrs)
    log = io.StringIO()
    # Triton prints its ptxas -v log when asked; a cached kernel runs no ptxas, so the caller
    # gives this process a fresh TRITON_CACHE_DIR.
    with knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                options={"num_warps": num_warps, **(options or {})})
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
