// CUDA implementations of fused_balance::combine and combine_into (list API): out[p] =
// sum_k w[seg(p), k] g_k[p] in one launch over the metadata table of cuda_launch.cuh, each element
// read and written once. The combine order is multi_tensor.h's combine_element, shared with the
// CPU kernels. Registers its own ops (see gram_cuda.cu).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <vector>

#include "cuda_launch.cuh"
#include "ops_common.h"

namespace fused_balance {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(Meta meta, int64_t num_chunks, const acc_t<T>* weights,
                                                           const bool* skip) {
  using A = acc_t<T>;
  if (skip != nullptr && *skip) return;
  const int K = meta.K;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const auto [p, start, len, g, w] = weighted_chunk<T>(meta, c, weights);
    T* out = reinterpret_cast<T*>(meta.out_ptrs[p]) + start;
    int64_t first_scalar = 0;
    if (meta.vec_ok[p]) {
      const int64_t nvec = len / kVec;
      for (int64_t v = threadIdx.x; v < nvec; v += kThreads) {
        A d[kVec], x[kVec];
        load_vec<T>(g[0] + v * kVec, x);
        const A w0 = w[0];
#pragma unroll
        for (int j = 0; j < kVec; ++j) d[j] = mul_rn(w0, x[j]);
#pragma unroll 4
        for (int k = 1; k < K; ++k) {
          load_vec<T>(g[k] + v * kVec, x);
          const A wk = w[k];
#pragma unroll
          for (int j = 0; j < kVec; ++j) d[j] = add_rn(d[j], mul_rn(wk, x[j]));
        }
        store_vec<T>(out + v * kVec, d);  // after every read of this element: out may alias g[k]
      }
      first_scalar = nvec * kVec;
    }
    for (int64_t i = first_scalar + threadIdx.x; i < len; i += kThreads)
      out[i] = from_acc<T>(combine_element<A>(g, K, w, i));
  }
}

// combine into the table's outputs (new tensors or work copies of `out`).
void launch_combine(const GradTable& g, const at::Tensor& weights, const std::vector<void*>& out_ptrs,
                    const bool* skip) {
  const int64_t C = g.num_chunks();
  if (C == 0) return;
  const c10::cuda::CUDAGuard guard(g.device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g.device.index()).stream();
  const at::Tensor w = device_weights(weights, g);
  MetaTable table(g);
  table.put(&Meta::vec_ok, vector_alignment(g, &out_ptrs, elem_size(g.code)));
  table.put(&Meta::out_ptrs, addresses(out_ptrs));
  const Meta meta = table.upload(g.device);
  with_type(g.code, [&](auto tag) {
    using T = decltype(tag);
    combine_kernel<T><<<grid_for(combine_kernel<T>, C), kThreads, 0, stream>>>(
        meta, C, static_cast<const acc_t<T>*>(w.data_ptr()), skip);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

std::vector<at::Tensor> combine_cuda(at::TensorList grads, const at::Tensor& weights, at::IntArrayRef segment_ids) {
  const GradTable g = weighted_grad_table("combine", grads, weights, segment_ids, std::nullopt, at::kCUDA);
  const c10::cuda::CUDAGuard guard(g.device);
  NewOutputs o = new_outputs(g);
  launch_combine(g, weights, o.ptrs, nullptr);
  return o.tensors;
}

void combine_into_cuda(at::TensorList grads, const at::Tensor& weights, at::IntArrayRef segment_ids,
                       at::TensorList out, const std::optional<at::Tensor>& skip) {
  const GradTable g = weighted_grad_table("combine_into", grads, weights, segment_ids, skip, at::kCUDA);
  const c10::cuda::CUDAGuard guard(g.device);
  OutputTable o = combine_into_outputs(out, g);
  launch_combine(g, weights, o.ptrs, skip_pointer(skip));
  o.finish();  // copies of non-contiguous outputs go back on the same stream (unchanged if skipped)
}

}  // namespace
}  // namespace cuda
}  // namespace fused_balance

TORCH_LIBRARY_IMPL(fused_balance, CUDA, m) {
  m.impl("combine", &fused_balance::cuda::combine_cuda);
  m.impl("combine_into", &fused_balance::cuda::combine_into_cuda);
}
