// Gram stage 1 for K > 8, shared by the list op (gram_cuda.cu) and the plan's bank op
// (bank_cuda.cu): one chunk's partial <g_k, g_l> for every pair k <= l, written to out[q]
// (q = pair_index(k, l, K), the partials layout of the K <= 8 kernels).
//
// The block stages a slab of the chunk (all K rows, kStageSlots<A> 16-byte packs) in shared memory;
// each warp then sums one tile of 8 x 8 pairs (multi_tensor.h: gram_tile_pair) from it, the 64
// products of an element in registers (the K <= 8 kernels' scheme, 16 values read per element).
// kWarps tiles are summed per pass over the chunk; a K with more tiles takes more passes:
//   bytes read per element position = gram_tile_passes(K, kWarps) * K * sizeof(T)
//   (passes = ceil(T(T+1)/2 / 8), T = ceil(K / 8): K = 9: 9 sizeof(T) (the minimum), K = 16:
//   16 sizeof(T) (the minimum), K = 32: 2 * 32 sizeof(T) (twice the minimum); one pair at a time
//   read (K + 1) K sizeof(T): 10x, 17x and 33x the minimum).
// Each row is read with 16-byte loads when all K rows of the chunk start 16-byte aligned, else
// element by element. The next slab's loads are issued before the current slab is summed, so the
// loads of one slab overlap the arithmetic of the previous one.
//
// Deterministic: lane e of a warp sums the slab elements e, e + 32, ... of every slab (slabs
// depend only on K and T), then the warp's shuffle tree sums its lanes: the result does not depend
// on the grid. Products accumulate in A (the callers' choice: acc_t<T> for the list op, double
// for the bank); sums of lanes are in double.
#pragma once

#include <cuda_runtime.h>

#include "block_reduce.cuh"
#include "cuda_launch.cuh"
#include "multi_tensor.h"

namespace fused_balance {
namespace cuda {

// 16-byte packs each thread stages per slab: about 16 KiB of loads in flight per SM either way
// (float accumulators fit 128 registers, two blocks per SM; double ones take ~210, one block).
template <typename A>
constexpr int kStagePacks = sizeof(A) == 8 ? 4 : 2;
template <typename A>
constexpr int kStageSlots = kThreads * kStagePacks<A>;  // packs per slab (8 or 16 KiB of shared memory)
constexpr int kMaxTiledGramObjectives = kThreads * 2;   // a slab holds at least one pack per row
static_assert(kMaxTiledGramObjectives <= kStageSlots<float> && kMaxTiledGramObjectives <= kStageSlots<double>);

// Elements [first, first + count) of src (count may exceed the pack or be <= 0), the rest of the
// pack zero: the scalar path for misaligned rows and the chunk's tail.
template <typename T>
__device__ __forceinline__ uint4 pack_elements(const T* src, int64_t count) {
  using A = acc_t<T>;
  uint4 u = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
  for (int j = 0; j < Pack16<T>::n; ++j) {
    if (j < count) Pack16<T>::template put<A>(u, j, to_acc<A>(ldg_elem(src + j)));  // exact round trip
  }
  return u;
}

// This thread's packs of the slab starting at element s0: slot = threadIdx.x + u kThreads holds
// packs [slot % per_row] of row slot / per_row.
template <typename T, int PACKS, typename Rows>
__device__ __forceinline__ void load_slab(const Rows& rows, bool vec, int64_t s0, int64_t len, int per_row,
                                          int used, uint4 (&pending)[PACKS]) {
  constexpr int N = Pack16<T>::n;
#pragma unroll
  for (int u = 0; u < PACKS; ++u) {
    const int slot = threadIdx.x + u * kThreads;
    if (slot < used) {
      const int64_t first = s0 + int64_t(slot % per_row) * N;
      const T* src = global_ptr(rows[slot / per_row]) + first;
      if (vec && first + N <= len) {
        RawElems<N, T> raw;
        load_raw<N, /*ReadOnly=*/true>(src, raw);
        pending[u] = raw.pack[0];
      } else {
        pending[u] = pack_elements(src, len - first);
      }
    }
  }
}

// rows[k]: objective k's first element of the chunk (a GradsOf view, or bank rows ld apart);
// 1 <= len; K <= kMaxTiledGramObjectives; `stage` is the block's shared slab. Called by every
// thread of the block (it synchronises).
template <typename T, typename A, typename Rows>
__device__ __forceinline__ void gram_tiles_chunk(const Rows& rows, int K, int64_t len, double* out,
                                                 uint4 (&stage)[kStageSlots<A>]) {
  constexpr int N = Pack16<T>::n;
  constexpr int PACKS = kStagePacks<A>;
  const int per_row = kStageSlots<A> / K;  // packs of each row in a slab
  const int used = per_row * K;
  const int slab_elems = per_row * N;  // <= kStageSlots<A> * 8
  bool aligned_rows = true;
  for (int k = threadIdx.x; k < K; k += kThreads) aligned_rows &= aligned16(rows[k]);
  const bool vec = __syncthreads_and(aligned_rows);  // uniform: 16-byte loads for every row or none
  const int blocks = gram_row_blocks(K), tiles = gram_tile_count(K);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const T* slab = reinterpret_cast<const T*>(stage);  // row k at slab[k * slab_elems]

  for (int first_tile = 0; first_tile < tiles; first_tile += kWarps) {
    const int tile = first_tile + warp;
    const bool summing = tile < tiles;  // uniform per warp: no barrier or shuffle depends on a lane
    int bi = 0, bj = 0;
    if (summing) pair_of_index(tile, blocks, &bi, &bj);
    const int row_i = bi * kGramTile, row_j = bj * kGramTile;
    A acc[kGramTile][kGramTile];
#pragma unroll
    for (int i = 0; i < kGramTile; ++i)
#pragma unroll
      for (int j = 0; j < kGramTile; ++j) acc[i][j] = A(0);

    uint4 pending[PACKS];
    load_slab<T>(rows, vec, 0, len, per_row, used, pending);
    for (int64_t s0 = 0; s0 < len; s0 += slab_elems) {
      __syncthreads();  // the previous slab's readers are done
#pragma unroll
      for (int u = 0; u < PACKS; ++u) {
        if (threadIdx.x + u * kThreads < used) stage[threadIdx.x + u * kThreads] = pending[u];
      }
      __syncthreads();
      if (s0 + slab_elems < len) load_slab<T>(rows, vec, s0 + slab_elems, len, per_row, used, pending);
      if (!summing) continue;
      const int n = int(len - s0 < slab_elems ? len - s0 : slab_elems);
      for (int e = lane; e < n; e += 32) {
        // Tile rows past K read row K - 1: only slots that gram_tile_pair discards see them.
        A x[kGramTile];
#pragma unroll
        for (int i = 0; i < kGramTile; ++i) x[i] = to_acc<A>(slab[min(row_i + i, K - 1) * slab_elems + e]);
#pragma unroll
        for (int j = 0; j < kGramTile; ++j) {
          if (row_j + j >= K) break;  // a last block's missing columns (uniform per warp): no work
          const A y = to_acc<A>(slab[(row_j + j) * slab_elems + e]);
#pragma unroll
          for (int i = 0; i < kGramTile; ++i) acc[i][j] = fma_acc(x[i], y, acc[i][j]);
        }
      }
    }
    if (summing) {
#pragma unroll
      for (int i = 0; i < kGramTile; ++i) {
#pragma unroll
        for (int j = 0; j < kGramTile; ++j) {
          const double total = warp_sum(double(acc[i][j]));
          const int q = gram_tile_pair(K, bi, bj, i, j);
          if (lane == 0 && q >= 0) out[q] = total;
        }
      }
    }
  }
}

}  // namespace cuda
}  // namespace fused_balance
