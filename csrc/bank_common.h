// Argument checks of the plan ops (bank_gram, bank_combine_into, bank_adamw_), shared by the CPU
// (bank_cpu.cpp) and CUDA (bank_cuda.cu) implementations, each op's written once. Every check is O(1): the chunk table is
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

inline void check_plan_adamw(const char* op, const at::Tensor& param_ptrs, const at::Tensor& exp_avg,
                             const at::Tensor& exp_avg_sq, const at::Tensor& hyper, const at::Tensor& step,
                             const std::optional<at::Tensor>& live, at::ScalarType param_dtype, const BankView& b) {
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
  TORCH_CHECK_VALUE(step.numel() == param_ptrs.numel() && step.scalar_type() == at::kFloat && step.is_contiguous() &&
                        step.device() == b.device,
                    "fused_balance::", op, ": step must be a contiguous float32 [P] tensor on ", b.device,
                    " (each parameter's steps taken so far; incremented where stepped), got shape ", step.sizes(),
                    " for ", param_ptrs.numel(), " parameters");
  TORCH_CHECK_VALUE(!live.has_value() || (live->scalar_type() == at::kBool && live->numel() == param_ptrs.numel() &&
                                          live->is_contiguous() && live->device() == b.device),
                    "fused_balance::", op, ": live must be None or a contiguous bool [P] tensor on ", b.device,
                    " (the parameters this step updates)");
}

// ------------------------------------------------------------------- the Gram's stage 2
// The order every device sums a segment's chunk partials in (bank_gram): lane l of 32 sums the
// chunks begin + l, begin + l + 32, ... in table order, then the 32 lane sums are added halving
// (lane l += lane l + 16 for l < 16, then + 8, ..., lane 0 += lane 1). On a GPU that is one warp
// and its shuffle tree (bank_cuda.cu: one warp per (segment, pair), not one thread); here it is
// this loop. Results do not depend on the thread or SM count; CPU and GPU differ only in how
// each sums the products inside a chunk (float64 rounding).
constexpr int kReduceLanes = 32;

inline double reduce_partials_fixed_order(const double* partials, int64_t begin, int64_t end, int64_t stride) {
  double lane[kReduceLanes];
  for (int l = 0; l < kReduceLanes; ++l) {
    double t = 0.0;
    for (int64_t c = begin + l; c < end; c += kReduceLanes) t += partials[c * stride];
    lane[l] = t;
  }
  for (int offset = kReduceLanes / 2; offset > 0; offset /= 2)
    for (int l = 0; l < offset; ++l) lane[l] += lane[l + offset];
  return lane[0];
}

// ------------------------------------------------------------------- per-op preparation
// Each op's checks in one place; `kernel` is the device type of the implementation called.
// Every check is O(1) (no device read).

// bank_gram: the bank and its chunk table grouped by segment (seg_offsets[S + 1]).
inline BankView check_bank_gram(const at::Tensor& bank, const at::Tensor& chunks, const at::Tensor& seg_offsets,
                                int64_t num_segments, at::DeviceType kernel) {
  const char* op = "bank_gram";
  const BankView b = check_bank(op, bank);
  check_kernel_device(op, "a bank", b.device, kernel);
  TORCH_CHECK_VALUE(num_segments >= 1, "fused_balance::", op, ": num_segments must be >= 1");
  check_chunks(op, chunks, b);
  TORCH_CHECK_VALUE(seg_offsets.scalar_type() == at::kLong && seg_offsets.numel() == num_segments + 1 &&
                        seg_offsets.is_contiguous() && seg_offsets.device() == b.device,
                    "fused_balance::", op, ": seg_offsets must be a contiguous int64 [S + 1] tensor on ", b.device);
  return b;
}

// bank_combine_into and bank_adamw_: the bank, chunk table, weights [S, K] and skip.
inline BankView check_weighted_bank(const char* op, const at::Tensor& bank, const at::Tensor& weights,
                                    const at::Tensor& chunks, const std::optional<at::Tensor>& skip,
                                    at::DeviceType kernel) {
  const BankView b = check_bank(op, bank);
  check_kernel_device(op, "a bank", b.device, kernel);
  check_chunks(op, chunks, b);
  check_weights(op, weights, b.K, b.device, "the bank");
  check_skip(op, skip, b.device, "the bank");
  return b;
}

// bank_combine_into: `out`, a flat buffer of the bank's dtype.
inline BankView check_bank_combine_into(const at::Tensor& bank, const at::Tensor& weights, const at::Tensor& chunks,
                                        const at::Tensor& out, const std::optional<at::Tensor>& skip,
                                        at::DeviceType kernel) {
  const char* op = "bank_combine_into";
  const BankView b = check_weighted_bank(op, bank, weights, chunks, skip, kernel);
  check_flat(op, "out", out, b);
  TORCH_CHECK_TYPE(out.scalar_type() == b.dtype, "fused_balance::", op, ": out has dtype ", out.scalar_type(),
                   ", the bank ", b.dtype);
  return b;
}

// bank_adamw_: the parameter pointer table, flat moments, hyper table, per-parameter step counts
// and the live mask.
inline BankView check_bank_adamw(const at::Tensor& bank, const at::Tensor& weights, const at::Tensor& chunks,
                                 const at::Tensor& param_ptrs, const at::Tensor& exp_avg,
                                 const at::Tensor& exp_avg_sq, const at::Tensor& hyper, const at::Tensor& step,
                                 const std::optional<at::Tensor>& skip, const std::optional<at::Tensor>& live,
                                 at::DeviceType kernel) {
  const char* op = "bank_adamw_";
  const BankView b = check_weighted_bank(op, bank, weights, chunks, skip, kernel);
  check_plan_adamw(op, param_ptrs, exp_avg, exp_avg_sq, hyper, step, live, exp_avg.scalar_type(), b);
  return b;
}

}  // namespace fused_balance
