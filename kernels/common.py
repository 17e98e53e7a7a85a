"""Pieces shared by the Triton kernels: dtype maps, launch limits, the autotuning switch and the
bf16 rounding helper.

Triton decides at decoration time whether ``@triton.jit`` compiles for a GPU or builds an
interpreted function, so ``INTERPRETED`` records what the kernels of this process really are.
"""
from __future__ import annotations

import collections
import os
import threading

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"

# CUDA caps gridDim.x at 2**31 - 1 (y and z at 65535, which is why every kernel here uses x only).
# Module-level so tests can lower it to exercise the multi-launch path.
MAX_GRID_X = 2**31 - 1

# Under the interpreter every loop trip is Python: take big blocks (a divisor of CHUNK).
INTERPRETER_BLOCK = 4096

# Launches per kernel name since import (or since the last reset): the tests check "one launch per
# stage" with it, the benchmarks report it.
LAUNCHES: collections.Counter = collections.Counter()

TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float64: tl.float64,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
}


def accumulate_tl_dtype(dtype: torch.dtype):
    """Reductions accumulate in fp32, or fp64 for fp64 inputs (as fused_balance._dtypes)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def autotune_enabled() -> bool:
    """Autotuning is on by default on a GPU, off when FUSED_BALANCE_TRITON_AUTOTUNE=0, and always
    off under the interpreter (nothing to time there)."""
    return not INTERPRETED and os.environ.get("FUSED_BALANCE_TRITON_AUTOTUNE", "1") != "0"


def launch_over_programs(num_programs: int, launch, name: str) -> None:
    """Calls ``launch(first_program, count)`` once per slice of at most MAX_GRID_X programs (one
    launch in any realistic case: 2**31 programs of 16384 elements is 3.5e13 elements)."""
    first = 0
    while first < num_programs:
        count = min(MAX_GRID_X, num_programs - first)
        launch(first, count)
        LAUNCHES[name] += 1
        first += count


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return _nullcontext()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class TunedKernel:
    """A jit kernel launched either with a fixed (BLOCK, num_warps) or through triton.autotune.

    The autotuner is built lazily per (GPU major version, shape parameters) so the candidate list
    can depend on the architecture (Hopper gets larger blocks and 16 warps) and be pruned by the
    register footprint of the tile shape, without touching CUDA at import time. Only kernels that
    write fresh buffers use this: autotuning re-runs a kernel, which in-place kernels cannot afford
    (their outputs sit behind a pointer table, out of reach of restore_value).
    """

    def __init__(self, kernel, key, candidates, default, shape_params):
        self.kernel = kernel
        self.key = list(key)
        self.candidates = candidates  # (major, meta) -> [(BLOCK, num_warps), ...]
        self.default = default  # meta -> (BLOCK, num_warps)
        self.shape_params = tuple(shape_params)
        self._tuners = {}
        self._lock = threading.Lock()

    def _tuner(self, meta):
        major = torch.cuda.get_device_capability()[0]
        tkey = (major,) + tuple(meta[p] for p in self.shape_params)
        with self._lock:
            tuner = self._tuners.get(tkey)
            if tuner is None:
                configs = [triton.Config({"BLOCK": b}, num_warps=w)
                           for b, w in self.candidates(major, meta)]
                tuner = triton.autotune(configs=configs, key=self.key)(self.kernel)
                self._tuners[tkey] = tuner
        return tuner

    def __call__(self, grid, *args, **meta):
        if autotune_enabled():
            self._tuner(meta)[grid](*args, **meta)
        else:
            block, warps = self.default(meta)
            self.kernel[grid](*args, **meta, BLOCK=block, num_warps=warps)


def registers_per_value(acc) -> int:
    """32-bit registers one accumulator value takes (fp64 takes a pair)."""
    return 2 if acc == tl.float64 else 1


def block_candidates(major: int, tile_rows: int, fallback, max_regs: int = 64):
    """(BLOCK, num_warps) pairs worth timing for a kernel whose live tile is tile_rows x BLOCK
    values: those needing at most ``max_regs`` registers of tile per thread (Hopper also gets
    4096-wide blocks and 16 warps), else the fixed ``fallback``."""
    blocks = (128, 256, 512, 1024, 2048) + ((4096,) if major >= 9 else ())
    warps = (4, 8) + ((16,) if major >= 9 else ())
    out = [(b, w) for b in blocks for w in warps
           if b >= 32 * w and tile_rows * b // (32 * w) <= max_regs]
    return out or [tuple(fallback)]


@triton.jit
def round_to_bf16(x):
    """fp32 -> fp32 holding the nearest bf16 (ties to even; NaN stays a quiet NaN).

    The conversion to bf16 is then exact. Done by hand because the interpreter's own fp32->bf16
    cast truncates; integer arithmetic gives the same bits on the GPU and in the interpreter.
    """
    bits = x.to(tl.uint32, bitcast=True)
    lsb = (bits >> 16) & 1
    rounded = (bits + 0x7FFF + lsb) & 0xFFFF0000
    rounded = tl.where(x != x, (bits | 0x00400000) & 0xFFFF0000, rounded)
    return rounded.to(tl.float32, bitcast=True)


@triton.jit
def cast_for_store(x, DTYPE: tl.constexpr):
    """x (fp32/fp64 accumulator) rounded to DTYPE, to nearest even as torch's .to() does."""
    if DTYPE == tl.bfloat16:
        return round_to_bf16(x.to(tl.float32)).to(tl.bfloat16)
    else:
        return x.to(DTYPE)


@triton.jit
def weighted_chunk(grad_table, chunk_tensor, chunk_offset, sizes, segment, weights, num_tensors,
                   first_program, K: tl.constexpr, KP: tl.constexpr, IN_DTYPE: tl.constexpr,
                   ACC: tl.constexpr, CHUNK: tl.constexpr):
    """What a combine-like program reads first: its chunk (tensor t, first element ``start``,
    ``length``), the K gradient pointers at the chunk's start ([KP], ``row_ok`` masks the padding)
    and the segment's K weights ([KP] in ACC)."""
    c = tl.program_id(0).to(tl.int64) + first_program
    t = tl.load(chunk_tensor + c)
    start = tl.load(chunk_offset + c)
    length = tl.minimum(tl.load(sizes + t) - start, CHUNK)
    s = tl.load(segment + t)
    rows = tl.arange(0, KP)
    row_ok = rows < K
    address = tl.load(grad_table + rows.to(tl.int64) * num_tensors + t, mask=row_ok, other=0)
    base = address.to(tl.pointer_type(IN_DTYPE)) + start
    w = tl.load(weights + s * K + rows, mask=row_ok, other=0.0).to(ACC)
    return t, start, length, base, row_ok, w
