// CUDA implementation of fused_balance::policy_weights: one thread per segment runs policy.h's
// solve (K <= 32: a few thousand flops), its working memory in a scratch tensor rather than in
// local memory (25 KB a thread would reserve gigabytes of local memory for a full GPU).
// No host synchronisation: one launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "policy_ops.h"

namespace fused_balance {
namespace cuda {
namespace {

constexpr int kPolicyThreads = 64;

template <typename T>
__global__ void policy_kernel(const T* __restrict__ gram, const bool* __restrict__ active, int64_t S, int K,
                              policy::Options options, double largest, policy::Workspace* scratch,
                              T* __restrict__ weights, int64_t* __restrict__ branch) {
  const int64_t s = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (s >= S) return;
  policy::Workspace& ws = scratch[s];
  double out[policy::kMaxObjectives];
  policy::load_gram(gram + s * K * K, active ? active + s * K : nullptr, K, ws);
  branch[s] = policy::solve_segment(options, K, ws, out);
  for (int k = 0; k < K; ++k) weights[s * K + k] = policy::saturate_to<T>(out[k], largest);
}

std::tuple<at::Tensor, at::Tensor> policy_weights_cuda(const at::Tensor& gram, int64_t policy, double tau,
                                                       bool rescale_to_sum, double rounding,
                                                       const c10::optional<at::Tensor>& active) {
  const c10::cuda::CUDAGuard guard(gram.device());
  PolicyCall call = prepare_policy_call(gram, policy, tau, rescale_to_sum, rounding, active);
  if (call.S == 0) return {call.weights, call.branch};
  at::Tensor scratch = at::empty({call.S * int64_t(sizeof(policy::Workspace))}, gram.options().dtype(at::kByte));
  auto* ws = reinterpret_cast<policy::Workspace*>(scratch.data_ptr());
  const bool* mask = call.active.has_value() ? call.active->data_ptr<bool>() : nullptr;
  const int blocks = int((call.S + kPolicyThreads - 1) / kPolicyThreads);
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (call.gram.scalar_type() == at::kDouble) {
    policy_kernel<double><<<blocks, kPolicyThreads, 0, stream>>>(
        call.gram.data_ptr<double>(), mask, call.S, int(call.K), call.options, call.largest, ws,
        call.weights.data_ptr<double>(), call.branch.data_ptr<int64_t>());
  } else {
    policy_kernel<float><<<blocks, kPolicyThreads, 0, stream>>>(
        call.gram.data_ptr<float>(), mask, call.S, int(call.K), call.options, call.largest, ws,
        call.weights.data_ptr<float>(), call.branch.data_ptr<int64_t>());
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {call.weights, call.branch};
}

}  // namespace
}  // namespace cuda
}  // namespace fused_balance

TORCH_LIBRARY_IMPL(fused_balance, CUDA, m) {
  m.impl("policy_weights", &fused_balance::cuda::policy_weights_cuda);
}
