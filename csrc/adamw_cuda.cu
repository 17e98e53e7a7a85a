// CUDA implementation of fused_balance::balanced_adamw_ (list API): the combined gradient
// sum_k w[seg(p), k] g_k[p] is formed in registers and fed to torch.optim.AdamW's update in one
// launch over the metadata table of cuda_launch.cuh; params and moments are read and written
// once, in their own dtypes. The element update is multi_tensor.h's adamw_update, shared with the
// CPU kernels. Registers its own op (see gram_cuda.cu).
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

// T: gradient dtype; A: math type (double for fp64 params, else float). The combined gradient is
// formed in registers; params / moments are read and written once, in their own dtypes.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) adamw_kernel(Meta meta, int64_t num_chunks, const acc_t<T>* weights,
                                                         const bool* skip, int32_t p_code, int32_t m_code,
                                                         int32_t v_code, AdamWConsts<A> base) {
  using GA = acc_t<T>;
  if (skip != nullptr && *skip) return;
  const int K = meta.K;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const auto [p, start, len, g, w] = weighted_chunk<T>(meta, c, weights);
    AdamWConsts<A> consts = base;
    consts.decay = A(meta.decay[p]);
    consts.step_size = A(meta.step_size[p]);
    void* param = reinterpret_cast<void*>(meta.out_ptrs[p]);
    void* exp_avg = reinterpret_cast<void*>(meta.exp_avg_ptrs[p]);
    void* exp_avg_sq = reinterpret_cast<void*>(meta.exp_avg_sq_ptrs[p]);
    for (int64_t i = threadIdx.x; i < len; i += kThreads) {
      const int64_t e = start + i;
      // A 16-bit combination is rounded to the gradient dtype first (the rule of every backend).
      const A d = A(round_through<T>(combine_element<GA>(g, K, w, i)));
      A pv = load_as<A>(param, p_code, e);
      A mv = load_as<A>(exp_avg, m_code, e);
      A vv = load_as<A>(exp_avg_sq, v_code, e);
      adamw_update(pv, mv, vv, d, consts);
      store_as(param, p_code, e, pv);
      store_as(exp_avg, m_code, e, mv);
      store_as(exp_avg_sq, v_code, e, vv);
    }
  }
}

void balanced_adamw_cuda(at::TensorList grads, const at::Tensor& weights, at::IntArrayRef segment_ids,
                         at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                         at::ArrayRef<double> lrs, at::ArrayRef<double> weight_decays, double beta1, double beta2,
                         double eps, int64_t step, const std::optional<at::Tensor>& skip) {
  const GradTable g = adamw_grad_table(grads, weights, segment_ids, skip, beta1, beta2, eps, step, at::kCUDA);
  const c10::cuda::CUDAGuard guard(g.device);
  AdamWArgs a = adamw_args(g, params, exp_avgs, exp_avg_sqs, lrs, weight_decays);
  const int64_t C = g.num_chunks();
  if (C > 0) {
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(g.device.index()).stream();
    const at::Tensor w = device_weights(weights, g);
    std::vector<double> decay(g.P), step_size(g.P);
    for (int64_t p = 0; p < g.P; ++p) {
      const AdamWConsts<double> c = make_adamw_consts<double>(a.lr[p], a.weight_decay[p], beta1, beta2, eps, step);
      decay[p] = c.decay;
      step_size[p] = c.step_size;
    }
    MetaTable table(g);
    table.put(&Meta::out_ptrs, addresses(a.params.ptrs));
    table.put(&Meta::exp_avg_ptrs, addresses(a.exp_avgs.ptrs));
    table.put(&Meta::exp_avg_sq_ptrs, addresses(a.exp_avg_sqs.ptrs));
    table.put(&Meta::decay, decay);
    table.put(&Meta::step_size, step_size);
    const Meta meta = table.upload(g.device);
    const int grid = grid_for(C);
    const bool* skip_ptr = skip_pointer(skip);
    const int32_t p_code = a.params.code, m_code = a.exp_avgs.code, v_code = a.exp_avg_sqs.code;
    with_type(g.code, [&](auto tag) {
      using T = decltype(tag);
      const auto* wp = static_cast<const acc_t<T>*>(w.data_ptr());
      if (p_code == kFloat64) {
        const auto base = make_adamw_consts<double>(0.0, 0.0, beta1, beta2, eps, step);
        adamw_kernel<T, double><<<grid, kThreads, 0, stream>>>(meta, C, wp, skip_ptr, p_code, m_code, v_code, base);
      } else {
        const auto base = make_adamw_consts<float>(0.0, 0.0, beta1, beta2, eps, step);
        adamw_kernel<T, float><<<grid, kThreads, 0, stream>>>(meta, C, wp, skip_ptr, p_code, m_code, v_code, base);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  a.finish();
}

}  // namespace
}  // namespace cuda
}  // namespace fused_balance

TORCH_LIBRARY_IMPL(fused_balance, CUDA, m) {
  m.impl("balanced_adamw_", &fused_balance::cuda::balanced_adamw_cuda);
}
