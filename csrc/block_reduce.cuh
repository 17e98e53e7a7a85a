// Block sums shared by the CUDA Gram kernels (list API in ops_cuda.cu, plan in plan_cuda.cu), so
// both reduce their pair accumulators in the same fixed order: warp shuffles, then the warps in
// index order (results do not depend on scheduling).
#pragma once

#include <cuda_runtime.h>

#include "multi_tensor.h"

namespace fused_balance {

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
    double v = double(acc[q]);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
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

}  // namespace fused_balance
