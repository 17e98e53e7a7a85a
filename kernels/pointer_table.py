"""Host-built tables that let one Triton launch walk any number of tensors.

Two kinds of table, each cached in a small LRU:

- the *pointer table*: an int64 device tensor of data addresses, row-major over tensor sets
  (``table[r * P + p]`` is the address of tensor p of set r; sets are objectives, outputs, or the
  params / exp_avgs / exp_avg_sqs of the optimizer). Kernels load an address and cast it with
  ``.to(tl.pointer_type(dtype))``. Keyed on the data addresses of all tensors plus the device, so
  any new storage (``zero_grad(set_to_none=True)`` reallocates ``.grad``) builds a new table, and
  a hit means the addresses are exactly those in the table.
- the *chunk table*: which tensor and offset every program (chunk of CHUNK elements) works on, the
  segment of every tensor, and the chunks of every segment in a fixed order (the stage-2 Gram
  reduction walks that list, which makes it deterministic). Keyed on sizes and segment ids only,
  so a new storage of the same shapes reuses it.

Contiguous per-objective buffers (the K rows of one [K, N] GradBank buffer, each tensor a view at
a segment offset) need no separate path: their views' addresses go into the same table, built once
because the buffer never moves, and the kernels read the same one int64 per (set, chunk) either
way. The tables live in device memory, so their size is bounded only by that memory; all index
arithmetic in the kernels is int64.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

# Elements per program. A multiple of every BLOCK the kernels use (<= 4096), large enough that
# the per-program metadata loads are noise, small enough that a 40 M-parameter adapter still
# spreads over ~2.5 k programs (many waves on 132 SMs).
CHUNK = 16384
CACHE_ENTRIES = 8


class LRUCache:
    """A small thread-safe LRU with hit/miss counters (the tests look at them)."""

    def __init__(self, max_entries: int = CACHE_ENTRIES):
        self.max_entries = max_entries
        self._entries: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_build(self, key, build):
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return value
        value = build()
        with self._lock:
            self.misses += 1
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)


POINTER_TABLES = LRUCache()
CHUNK_TABLES = LRUCache()


def in_use_on_current_stream(table: torch.Tensor) -> torch.Tensor:
    """Tell the caching allocator that the current stream reads a cached device table: an
    eviction (the LRU drops its reference) must not hand the memory to another allocation while
    a kernel on this stream, possibly not the one that built the table, still reads it."""
    if table.is_cuda:
        table.record_stream(torch.cuda.current_stream(table.device))
    return table


@dataclass(frozen=True)
class PointerTable:
    addresses: torch.Tensor  # int64 [len(tensors)] on the device
    aligned: bool  # every address is a multiple of ALIGN_BYTES: the kernels may vectorise


# 16-byte alignment lets a thread move 4 fp32 / 8 bf16 / 2 fp64 values in one instruction.
ALIGN_BYTES = 16


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-built table on the device without a host synchronisation: to a GPU from pinned
    memory, non-blocking (a pageable copy waits for the stream). The caching host allocator keeps
    the pinned block until the copy has run."""
    if torch.device(device).type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def pointer_table(tensors: Sequence[torch.Tensor], device: torch.device, *, cache: bool = True) -> PointerTable:
    """The tensors' data addresses as a device table (tensors must be contiguous).

    Keyed on the addresses and the device alone: the table holds nothing else (sizes live in the
    chunk table, dtypes are kernel constants), so equal keys mean an identical table, and any
    reallocated storage changes the key. map() keeps the key cheap: ~0.4 us per tensor, which
    matters at thousands of tensors per call. ``cache=False`` for tensors allocated by the call
    itself (fresh outputs never repeat: caching them would only evict tables that do).
    """
    addresses = tuple(map(torch.Tensor.data_ptr, tensors))

    def build():
        table = to_device(torch.tensor(addresses, dtype=torch.int64), device)
        return PointerTable(table, all(a % ALIGN_BYTES == 0 for a in addresses))

    table = POINTER_TABLES.get_or_build((device, addresses), build) if cache else build()
    in_use_on_current_stream(table.addresses)
    return table


@dataclass(frozen=True)
class ChunkTable:
    """Per-tensor and per-chunk metadata, packed into one device int64 tensor (one copy)."""

    num_tensors: int
    num_chunks: int
    num_segments: int
    chunk: int
    sizes_d: torch.Tensor  # [P] elements of tensor p
    segment_d: torch.Tensor  # [P] segment of tensor p
    chunk_tensor_d: torch.Tensor  # [C] tensor of chunk c
    chunk_offset_d: torch.Tensor  # [C] first element of chunk c inside its tensor
    segment_chunk_ptr_d: torch.Tensor  # [S + 1] CSR row pointers into segment_chunks_d
    segment_chunks_d: torch.Tensor  # [C] chunk ids grouped by segment, ascending inside a segment


def build_chunk_table(sizes: Sequence[int], segment_ids: Sequence[int], num_segments: int,
                      device: torch.device, chunk: int = CHUNK) -> ChunkTable:
    sizes_np = np.asarray(sizes, dtype=np.int64).reshape(-1)
    segment_np = np.asarray(segment_ids, dtype=np.int64).reshape(-1)
    counts = (sizes_np + chunk - 1) // chunk  # an empty tensor gets no chunk
    num_chunks = int(counts.sum())
    chunk_tensor = np.repeat(np.arange(len(sizes_np), dtype=np.int64), counts)
    first_chunk = np.cumsum(counts) - counts
    chunk_offset = (np.arange(num_chunks, dtype=np.int64) - np.repeat(first_chunk, counts)) * chunk
    chunk_segment = segment_np[chunk_tensor]
    segment_chunks = np.argsort(chunk_segment, kind="stable").astype(np.int64)
    segment_ptr = np.concatenate(
        [[0], np.cumsum(np.bincount(chunk_segment, minlength=num_segments))]).astype(np.int64)
    parts = [sizes_np, segment_np, chunk_tensor, chunk_offset, segment_ptr, segment_chunks]
    packed = to_device(torch.from_numpy(np.concatenate(parts)), device)
    views, at = [], 0
    for part in parts:
        views.append(packed[at:at + len(part)])
        at += len(part)
    return ChunkTable(len(sizes_np), num_chunks, num_segments, chunk, *views)


def chunk_table(sizes: Sequence[int], segment_ids: Sequence[int], num_segments: int,
                device: torch.device, chunk: int = CHUNK) -> ChunkTable:
    key = (device, tuple(sizes), tuple(segment_ids), num_segments, chunk)
    table = CHUNK_TABLES.get_or_build(
        key, lambda: build_chunk_table(sizes, segment_ids, num_segments, device, chunk))
    in_use_on_current_stream(table.sizes_d)  # the views share one packed storage
    return table


def hyper_table(values: Sequence[float], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small per-call table (AdamW hyper-parameters and bias corrections, which change every
    step) on the device, without a host synchronisation (``to_device``)."""
    return to_device(torch.tensor(values, dtype=dtype), device)
