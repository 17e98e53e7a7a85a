// CPU implementation of fused_balance::policy_weights: the segments in parallel, each solved
// serially by policy.h, so the result does not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <memory>

#include "policy_ops.h"

namespace fused_balance {
namespace {

template <typename T>
void solve_segments(const PolicyCall& call) {
  const int K = int(call.K);
  const T* gram = call.gram.data_ptr<T>();
  const bool* active = call.active.has_value() ? call.active->data_ptr<bool>() : nullptr;
  T* weights = call.weights.data_ptr<T>();
  int64_t* branch = call.branch.data_ptr<int64_t>();
  // Tiny problems (K=2: ~100 flops a segment) stay on one thread; K=32 spreads one segment each.
  const int64_t grain = std::max<int64_t>(1, 4096 / (int64_t(K) * K * K));
  at::parallel_for(0, call.S, grain, [&](int64_t begin, int64_t end) {
    auto ws = std::make_unique<policy::Workspace<policy::kMaxObjectives>>();
    const policy::SerialRows rows;
    for (int64_t s = begin; s < end; ++s) {
      policy::load_gram(rows, gram + s * K * K, active ? active + s * K : nullptr, K, *ws);
      branch[s] = policy::solve_segment(rows, call.options, K, *ws);
      for (int k = 0; k < K; ++k) weights[s * K + k] = policy::saturate_to<T>(ws->weights[k], call.largest);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> policy_weights_cpu(const at::Tensor& gram, int64_t policy, double tau,
                                                      double rescale, double rounding,
                                                      const c10::optional<at::Tensor>& active, int64_t magnitude) {
  PolicyCall call = prepare_policy_call(gram, policy, tau, rescale, rounding, active, magnitude);
  if (call.gram.scalar_type() == at::kDouble) solve_segments<double>(call);
  else solve_segments<float>(call);
  return {call.weights, call.branch};
}

}  // namespace
}  // namespace fused_balance

TORCH_LIBRARY_IMPL(fused_balance, CPU, m) {
  m.impl("policy_weights", &fused_balance::policy_weights_cpu);
}
