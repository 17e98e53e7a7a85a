// Host-side argument checks and output allocation of the policy_weights op, shared by the CPU
// (policy_cpu.cpp) and CUDA (policy_cuda.cu) implementations.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "policy.h"

namespace fused_balance {

struct PolicyCall {
  at::Tensor gram;                // [S, K, K], contiguous, float32 or float64
  c10::optional<at::Tensor> active;  // [S, K] bool, contiguous
  at::Tensor weights;             // [S, K], the Gram's dtype
  at::Tensor branch;              // [S], int64
  policy::Options options;
  int64_t S = 0, K = 0;
  double largest = 0.0;           // the weights dtype's largest finite value
};

inline PolicyCall prepare_policy_call(const at::Tensor& gram, int64_t policy, double tau, double rescale,
                                      double rounding, const c10::optional<at::Tensor>& active,
                                      int64_t magnitude) {
  TORCH_CHECK_VALUE(gram.dim() == 3 && gram.size(1) == gram.size(2),
                    "fused_balance::policy_weights: gram must be [S, K, K], got ", gram.sizes());
  TORCH_CHECK_VALUE(gram.size(1) >= 1 && gram.size(1) <= policy::kMaxObjectives,
                    "fused_balance::policy_weights: K must be in 1..", policy::kMaxObjectives, ", got ",
                    gram.size(1));
  TORCH_CHECK_TYPE(gram.scalar_type() == at::kFloat || gram.scalar_type() == at::kDouble,
                   "fused_balance::policy_weights: gram must be float32 or float64, got ", gram.scalar_type());
  TORCH_CHECK_VALUE(policy >= policy::kSum && policy <= policy::kMmPareto,
                    "fused_balance::policy_weights: unknown policy code ", policy);
  TORCH_CHECK_VALUE(magnitude == policy::kMagnitudeMean || magnitude == policy::kMagnitudeWeaker ||
                        (magnitude >= 0 && magnitude < gram.size(1)),
                    "fused_balance::policy_weights: magnitude must be -1 (mean), -2 (weaker) or a protected "
                    "objective's index below K = ", gram.size(1), ", got ", magnitude);
  TORCH_CHECK_VALUE(std::isfinite(rescale) && rescale >= 0,
                    "fused_balance::policy_weights: rescale must be a finite factor >= 0 (0: no rescale), got ",
                    rescale);
  PolicyCall call;
  call.gram = gram.contiguous();
  call.S = gram.size(0);
  call.K = gram.size(1);
  if (active.has_value()) {
    const at::Tensor& a = *active;
    TORCH_CHECK_TYPE(a.scalar_type() == at::kBool, "fused_balance::policy_weights: active must be bool");
    TORCH_CHECK_VALUE(a.dim() == 2 && a.size(0) == call.S && a.size(1) == call.K,
                      "fused_balance::policy_weights: active must be [S, K], got ", a.sizes());
    TORCH_CHECK_VALUE(a.device() == gram.device(), "fused_balance::policy_weights: active is on ", a.device(),
                      " but gram is on ", gram.device());
    call.active = a.contiguous();
  }
  call.weights = at::empty({call.S, call.K}, gram.options());
  call.branch = at::empty({call.S}, gram.options().dtype(at::kLong));
  call.options = policy::Options{policy, tau, rescale, rounding, magnitude};
  call.largest = gram.scalar_type() == at::kDouble ? std::numeric_limits<double>::max()
                                                   : double(std::numeric_limits<float>::max());
  return call;
}

}  // namespace fused_balance
