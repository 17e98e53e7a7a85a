// Fixed-order block reductions shared by the CUDA Gram kernels (list API in gram_cuda.cu, plan in
// bank_cuda.cu), so both reduce their pair accumulators in the same order: warp shuffles, then
// the warps in index order (results do not depend on scheduling).
#pragma once

#include <cuda_runtime.h>

#include "cuda_launch.cuh"
#include "multi_tensor.h"

namespace fused_balance {
namespace cuda {

// acc[q] += x[k] x[l] for every pair k <= l < KMAX (one FMA each), q in the KMAX pair layout.
template <int KMAX, typename A>
__device__ __forceinline__ void accumulate_pair_products(const A (&x)[KMAX], A (&acc)[KMAX * (KMAX + 1) / 2]) {
  int q = 0;
#pragma unroll
  for (int k = 0; k < KMAX; ++k) {
#pragma unroll
    for (int l = k; l < KMAX; ++l, ++q) acc[q] = fma_acc(x[k], x[l], acc[q]);
  }
}

// Sum over the warp (every lane takes part), in the fixed shuffle-tree order; valid in lane 0.
__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block; the result is valid in thread 0. `scratch` holds WARPS values; the caller
// synchronises before reusing it.
template <int WARPS>
__device__ __forceinline__ double block_sum(double v, double* scratch) {
  v = warp_sum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  double total = 0.0;
  if (threadIdx.x == 0)
    for (int w = 0; w < WARPS; ++w) total += scratch[w];
  return total;
}

// acc: this thread's NPMAX = KMAX(KMAX+1)/2 pair accumulators (pairs beyond K's hold zeros);
// scratch: shared [WARPS][NPMAX]. Thread q < pair_count(K) writes pair q's block total to out[q].
// Ends with a barrier: scratch may be reused at once.
template <int KMAX, int WARPS, typename A>
__device__ __forceinline__ void store_block_pair_sums(const A (&acc)[KMAX * (KMAX + 1) / 2],
                                                      double (*scratch)[KMAX * (KMAX + 1) / 2],
                                                      int K, int npairs, double* out) {
  constexpr int NPMAX = KMAX * (KMAX + 1) / 2;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int q = 0; q < NPMAX; ++q) {
    const double v = warp_sum(double(acc[q]));
    if (lane == 0) scratch[warp][q] = v;
  }
  __syncthreads();
  if (threadIdx.x < npairs) {
    int k, l;
    pair_of_index(threadIdx.x, K, &k, &l);
    const int qmax = pair_index(k, l, KMAX);
    double total = 0.0;
    for (int w = 0; w < WARPS; ++w) total += scratch[w][qmax];
    out[threadIdx.x] = total;
  }
  __syncthreads();
}

}  // namespace cuda
}  // namespace fused_balance
