// Argument checks of the plan ops (bank_gram, bank_combine_into, bank_adamw_), shared by the CPU
// (plan_cpu.cpp) and CUDA (plan_cuda.cu) implementations. Every check is O(1): the chunk table is
// built once by fused_balance.plan.BalancePlan and trusted (its ranges are checked against the
// bank's row length on the CPU path, where that costs no device read).
#pragma once

#include <ATen/ATen.h>

#include "multi_tensor.h"
#include "ops_common.h"

namespace fused_balance {

struct BankView {
  int64_t K = 0;
  int64_t ld = 0;      // elements between two rows
  int64_t row = 0;     // elements in a row
  at::ScalarType dtype = at::kFloat;
  int32_t code = kFloat32;
  at::Device device = at::kCPU;
};

inline BankView check_bank(const char* op, const at::Tensor& bank) {
  TORCH_CHECK_VALUE(bank.defined() && bank.dim() == 2, "fused_balance::", op, ": bank must be a [K, N] tensor, got ",
                    bank.defined() ? bank.sizes() : at::IntArrayRef{});
  TORCH_CHECK_VALUE(bank.size(0) >= 1, "fused_balance::", op, ": bank has no objective row");
  TORCH_CHECK_VALUE(bank.stride(1) == 1 && (bank.size(0) == 1 || bank.stride(0) >= bank.size(1)),
                    "fused_balance::", op, ": bank rows must be contiguous, got strides ", bank.strides());
  BankView b;
  b.K = bank.size(0);
  b.row = bank.size(1);
  b.ld = bank.size(0) == 1 ? bank.size(1) : bank.stride(0);
  b.dtype = bank.scalar_type();
  b.code = elem_type_of(b.dtype, op);
  b.device = bank.device();
  return b;
}

inline int64_t check_chunks(const char* op, const at::Tensor& chunks, const BankView& b) {
  TORCH_CHECK_VALUE(chunks.scalar_type() == at::kLong && chunks.dim() == 2 && chunks.size(1) == kPlanColumns &&
                        chunks.is_contiguous(),
                    "fused_balance::", op, ": chunks must be a contiguous int64 [C, ", int(kPlanColumns),
                    "] table (build it with fused_balance.BalancePlan)");
  TORCH_CHECK_VALUE(chunks.device() == b.device, "fused_balance::", op, ": chunks are on ", chunks.device(),
                    ", the bank on ", b.device);
  return chunks.size(0);
}

// A same-layout flat buffer (the plan's .grad buffer, AdamW moments): contiguous, covers a row.
inline void check_flat(const char* op, const char* what, const at::Tensor& t, const BankView& b) {
  TORCH_CHECK_VALUE(t.is_contiguous() && t.numel() >= b.row, "fused_balance::", op, ": ", what,
                    " must be a contiguous buffer of at least ", b.row, " elements, got shape ", t.sizes());
  TORCH_CHECK_VALUE(t.device() == b.device, "fused_balance::", op, ": ", what, " is on ", t.device(),
                    ", the bank on ", b.device);
}

inline void check_plan_weights(const char* op, const at::Tensor& weights, const BankView& b) {
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(1) == b.K, "fused_balance::", op,
                    ": weights must be [S, K=", b.K, "], got shape ", weights.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()), "fused_balance::", op,
                   ": weights must be floating point, got ", weights.scalar_type());
  TORCH_CHECK_VALUE(weights.device() == b.device, "fused_balance::", op, ": weights are on ", weights.device(),
                    ", the bank on ", b.device);
}

inline void check_plan_skip(const char* op, const std::optional<at::Tensor>& skip, const BankView& b) {
  if (!skip.has_value() || !skip->defined()) return;
  TORCH_CHECK_VALUE(skip->numel() == 1 && skip->scalar_type() == at::kBool && skip->device() == b.device,
                    "fused_balance::", op, ": skip must be a one-element bool tensor on ", b.device);
}

inline void check_plan_adamw(const char* op, const at::Tensor& param_ptrs, const at::Tensor& exp_avg,
                             const at::Tensor& exp_avg_sq, const at::Tensor& hyper, const at::Tensor& step,
                             at::ScalarType param_dtype, const BankView& b) {
  TORCH_CHECK_VALUE(param_ptrs.scalar_type() == at::kLong && param_ptrs.dim() == 1 && param_ptrs.is_contiguous() &&
                        param_ptrs.device() == b.device,
                    "fused_balance::", op, ": param_ptrs must be a contiguous int64 [P] tensor on ", b.device);
  check_flat(op, "exp_avg", exp_avg, b);
  check_flat(op, "exp_avg_sq", exp_avg_sq, b);
  TORCH_CHECK_TYPE(exp_avg.scalar_type() == param_dtype && exp_avg_sq.scalar_type() == param_dtype,
                   "fused_balance::", op, ": exp_avg / exp_avg_sq must have the parameters' dtype ", param_dtype);
  TORCH_CHECK_VALUE(hyper.scalar_type() == at::kDouble && hyper.dim() == 2 && hyper.size(1) == kHyperColumns &&
                        hyper.is_contiguous() && hyper.device() == b.device,
                    "fused_balance::", op, ": hyper must be a contiguous float64 [G, ", int(kHyperColumns),
                    "] tensor on ", b.device, " (lr, weight_decay, beta1, beta2, eps per group)");
  TORCH_CHECK_VALUE(step.numel() == 1 && step.scalar_type() == at::kFloat && step.device() == b.device,
                    "fused_balance::", op, ": step must be a one-element float32 tensor on ", b.device,
                    " (the steps taken so far; incremented unless skipped)");
}

}  // namespace fused_balance
