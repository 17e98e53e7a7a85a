// CUDA implementation of fused_balance::gram (list API): per-segment Gram matrices of the K
// objectives' gradients, in two launches over the metadata table of cuda_launch.cuh:
//   stage 1 writes one partial per (chunk, pair), stage 2 sums them per segment in a fixed order
//   (no float atomics: results are deterministic run to run).
// The chunking and pair indexing are those of multi_tensor.h, shared with the CPU kernels.
//
// Each list op's .cu file registers its own CUDA implementation (a TORCH_LIBRARY_IMPL block per
// translation unit, each op registered once; the schemas are in ops_cpu.cpp's TORCH_LIBRARY).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include "block_reduce.cuh"
#include "cuda_launch.cuh"
#include "gram_tiles.cuh"
#include "ops_common.h"

namespace fused_balance {
namespace cuda {
namespace {

// Stage 1, K <= KMAX: all pairs of a chunk accumulate in registers (indexed in the KMAX layout,
// written out in the K layout), per-thread sums in the accumulate type, block sums in double.
template <typename T, int KMAX>
__global__ void __launch_bounds__(kThreads) gram_partials_kernel(Meta meta, int64_t num_chunks, double* partials) {
  using A = acc_t<T>;
  constexpr int NPMAX = KMAX * (KMAX + 1) / 2;
  __shared__ double scratch[kWarps][NPMAX];
  const int K = meta.K;
  const int npairs = pair_count(K);
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const auto [p, start, len] = chunk_span(meta, c);
    const T* g[KMAX];
#pragma unroll
    for (int k = 0; k < KMAX; ++k)
      g[k] = k < K ? reinterpret_cast<const T*>(meta.grad_ptrs[int64_t(k) * meta.P + p]) + start : nullptr;
    A acc[NPMAX];
#pragma unroll
    for (int q = 0; q < NPMAX; ++q) acc[q] = A(0);

    int64_t first_scalar = 0;
    if (meta.vec_ok[p]) {
      const int64_t nvec = len / kVec;
      for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
        A x[KMAX][kVec];
#pragma unroll
        for (int k = 0; k < KMAX; ++k) {
          if (k < K) load_vec<T>(g[k] + v * kVec, x[k]);
        }
        int q = 0;
#pragma unroll
        for (int k = 0; k < KMAX; ++k) {
#pragma unroll
          for (int l = k; l < KMAX; ++l, ++q) {
            if (l < K) {
#pragma unroll
              for (int j = 0; j < kVec; ++j) acc[q] = fma_acc(x[k][j], x[l][j], acc[q]);
            }
          }
        }
      }
      first_scalar = nvec * kVec;
    }
    for (int64_t i = first_scalar + threadIdx.x; i < len; i += kThreads) {
      A x[KMAX];
#pragma unroll
      for (int k = 0; k < KMAX; ++k) x[k] = k < K ? to_acc<A>(g[k][i]) : A(0);
      accumulate_pair_products<KMAX>(x, acc);
    }

    // Block sums of every pair, in a fixed order (shared with the plan's Gram).
    store_block_pair_sums<KMAX, kWarps>(acc, scratch, K, npairs, partials + c * npairs);
  }
}

// Stage 1 for K > 8: pair tiles over slabs staged in shared memory (gram_tiles.cuh).
template <typename T>
__global__ void __launch_bounds__(kThreads) gram_partials_tiled_kernel(Meta meta, int64_t num_chunks,
                                                                       double* partials) {
  __shared__ uint4 stage[kStageSlots<acc_t<T>>];
  const int K = meta.K;
  const int npairs = pair_count(K);
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const auto [p, start, len] = chunk_span(meta, c);
    const GradsOf<T> rows{meta.grad_ptrs, meta.P, p, start};
    gram_tiles_chunk<T, acc_t<T>>(rows, K, len, partials + c * npairs, stage);
  }
}

// Stage 2: block s sums the partials of segment s's chunks for each pair and writes both
// triangles of G[s]. The order of the sum depends only on the chunk list (fixed by the host).
template <typename A>
__global__ void __launch_bounds__(kThreads) gram_reduce_kernel(Meta meta, const double* partials, A* out) {
  __shared__ double scratch[kWarps];
  const int K = meta.K;
  const int npairs = pair_count(K);
  const int64_t s = blockIdx.x;
  const int64_t begin = meta.seg_offsets[s], end = meta.seg_offsets[s + 1];
  for (int q = 0; q < npairs; ++q) {
    double v = 0.0;
    for (int64_t j = begin + threadIdx.x; j < end; j += kThreads) v += partials[int64_t(meta.seg_chunks[j]) * npairs + q];
    const double total = block_sum<kWarps>(v, scratch);
    if (threadIdx.x == 0) {
      int k, l;
      pair_of_index(q, K, &k, &l);
      out[(s * K + k) * K + l] = A(total);
      out[(s * K + l) * K + k] = A(total);
    }
    __syncthreads();
  }
}

at::Tensor gram_cuda(at::TensorList grads, int64_t num_objectives, at::IntArrayRef segment_ids, int64_t num_segments) {
  const GradTable g = gram_table(grads, num_objectives, segment_ids, num_segments, at::kCUDA);
  const c10::cuda::CUDAGuard guard(g.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g.device.index()).stream();
  const at::ScalarType acc = accumulate_type(g.dtype);
  const int64_t C = g.num_chunks();
  const int npairs = pair_count(int(g.K));
  TORCH_CHECK_VALUE(g.K <= kMaxTiledGramObjectives, "fused_balance::gram: at most ", kMaxTiledGramObjectives,
                    " objectives on CUDA, got ", g.K);
  at::Tensor out = at::empty({g.S, g.K, g.K}, grads[0].options().dtype(acc));
  if (C == 0) return out.zero_();

  const SegmentChunks sc = make_segment_chunks(g);
  MetaTable table(g);
  table.put(&Meta::vec_ok, vector_alignment(g, nullptr, 0));
  table.put(&Meta::seg_offsets, sc.offsets);
  table.put(&Meta::seg_chunks, sc.chunks);
  const Meta meta = table.upload(g.device);

  at::Tensor partials = at::empty({C, npairs}, grads[0].options().dtype(at::kDouble));
  with_type(g.code, [&](auto tag) {
    using T = decltype(tag);
    double* part = partials.data_ptr<double>();
    const auto launch = [&](auto kernel) { kernel<<<grid_for(kernel, C), kThreads, 0, stream>>>(meta, C, part); };
    if (g.K <= 2) launch(gram_partials_kernel<T, 2>);
    else if (g.K <= 4) launch(gram_partials_kernel<T, 4>);
    else if (g.K <= 8) launch(gram_partials_kernel<T, 8>);
    else launch(gram_partials_tiled_kernel<T>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const unsigned reduce_grid = unsigned(g.S);
  if (acc == at::kDouble)
    gram_reduce_kernel<double><<<reduce_grid, kThreads, 0, stream>>>(meta, partials.data_ptr<double>(), out.data_ptr<double>());
  else
    gram_reduce_kernel<float><<<reduce_grid, kThreads, 0, stream>>>(meta, partials.data_ptr<double>(), out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fused_balance

TORCH_LIBRARY_IMPL(fused_balance, CUDA, m) {
  m.impl("gram", &fused_balance::cuda::gram_cuda);
}
