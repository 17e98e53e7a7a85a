// Host-side argument checking and preparation shared by the CPU (ops_cpu.cpp) and CUDA
// (gram_cuda.cu, combine_cuda.cu, adamw_cuda.cu) implementations of the list ops, each op's
// checks written once (gram_table, weighted_grad_table, ...); the plan ops add theirs in
// bank_common.h. The Python API validates user input first; these checks are for direct calls of
// torch.ops.fused_balance.* and say what is wrong.
#pragma once

#include <ATen/ATen.h>

#include <cstring>
#include <string>
#include <vector>

#include "multi_tensor.h"

namespace fused_balance {

inline int32_t elem_type_of(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return kFloat32;
    case at::kDouble: return kFloat64;
    case at::kBFloat16: return kBFloat16;
    case at::kHalf: return kFloat16;
    default:
      TORCH_CHECK_TYPE(false, "fused_balance::", op, ": unsupported dtype ", t,
                       " (expected float32, float64, bfloat16 or float16)");
  }
  return kFloat32;
}

inline int64_t elem_size(int32_t code) { return code == kFloat64 ? 8 : code == kFloat32 ? 4 : 2; }

// Reductions and the combine run in fp32, or fp64 for fp64 inputs.
inline at::ScalarType accumulate_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The K*P gradients (objective-major: grads[k * P + p]) as contiguous tensors and raw pointers,
// with their segment ids and the chunk table.
struct GradTable {
  int64_t K = 0, P = 0, S = 0;
  at::ScalarType dtype = at::kFloat;
  int32_t code = kFloat32;
  at::Device device = at::kCPU;
  std::vector<at::Tensor> tensors;       // contiguous (a copy only where the input was not)
  std::vector<const void*> ptrs;         // [K * P]
  std::vector<int64_t> numel;            // [P]
  std::vector<int64_t> segment;          // [P]
  std::vector<int32_t> chunk_tensor;     // [C]
  std::vector<int64_t> chunk_start;      // [C]

  int64_t num_chunks() const { return int64_t(chunk_tensor.size()); }
  const void* ptr(int64_t k, int64_t p) const { return ptrs[k * P + p]; }
};

inline GradTable make_grad_table(const char* op, at::TensorList grads, int64_t K,
                                 at::IntArrayRef segment_ids, int64_t S) {
  TORCH_CHECK_VALUE(K >= 1, "fused_balance::", op, ": the number of objectives must be >= 1, got ", K);
  TORCH_CHECK_VALUE(!grads.empty(), "fused_balance::", op, ": grads is empty");
  TORCH_CHECK_VALUE(int64_t(grads.size()) % K == 0, "fused_balance::", op, ": len(grads) = ",
                    grads.size(), " is not a multiple of the number of objectives ", K);
  GradTable t;
  t.K = K;
  t.P = int64_t(grads.size()) / K;
  t.S = S;
  TORCH_CHECK_VALUE(int64_t(segment_ids.size()) == t.P, "fused_balance::", op, ": got ",
                    segment_ids.size(), " segment ids for ", t.P, " tensors");
  TORCH_CHECK_VALUE(t.P < (int64_t(1) << 31), "fused_balance::", op, ": too many tensors");
  TORCH_CHECK_VALUE(grads[0].defined(), "fused_balance::", op, ": grads[0] is undefined");
  t.dtype = grads[0].scalar_type();
  t.code = elem_type_of(t.dtype, op);
  t.device = grads[0].device();
  t.tensors.reserve(grads.size());
  t.ptrs.reserve(grads.size());
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t p = 0; p < t.P; ++p) {
      const at::Tensor& g = grads[k * t.P + p];
      const int64_t i = k * t.P + p;
      TORCH_CHECK_VALUE(g.defined(), "fused_balance::", op, ": grads[", i, "] is undefined");
      TORCH_CHECK_TYPE(g.scalar_type() == t.dtype, "fused_balance::", op, ": grads[", i, "] has dtype ",
                       g.scalar_type(), ", grads[0] has ", t.dtype);
      TORCH_CHECK_VALUE(g.device() == t.device, "fused_balance::", op, ": grads[", i, "] is on ",
                        g.device(), ", grads[0] on ", t.device);
      TORCH_CHECK_VALUE(g.sizes() == grads[p].sizes(), "fused_balance::", op, ": grads[", i, "] (objective ",
                        k, ", tensor ", p, ") has shape ", g.sizes(), " but objective 0 has ", grads[p].sizes());
      t.tensors.push_back(g.contiguous());
      t.ptrs.push_back(t.tensors.back().data_ptr());
    }
  }
  t.numel.resize(t.P);
  t.segment.resize(t.P);
  for (int64_t p = 0; p < t.P; ++p) {
    t.numel[p] = grads[p].numel();
    const int64_t s = segment_ids[p];
    TORCH_CHECK_VALUE(s >= 0 && s < S, "fused_balance::", op, ": segment_ids[", p, "] = ", s,
                      " is outside [0, ", S, ")");
    t.segment[p] = s;
  }
  const int64_t C = split_into_chunks(t.numel.data(), t.P, kChunkElems, nullptr, nullptr);
  t.chunk_tensor.resize(C);
  t.chunk_start.resize(C);
  split_into_chunks(t.numel.data(), t.P, kChunkElems, t.chunk_tensor.data(), t.chunk_start.data());
  return t;
}

// Segment -> chunks (fixed reduction order), see plan_segment_chunks.
struct SegmentChunks {
  std::vector<int64_t> offsets;  // [S + 1]
  std::vector<int32_t> chunks;   // [C]
};

inline SegmentChunks make_segment_chunks(const GradTable& t) {
  SegmentChunks sc;
  sc.offsets.resize(t.S + 1);
  sc.chunks.resize(t.num_chunks());
  plan_segment_chunks(t.chunk_tensor.data(), t.num_chunks(), t.segment.data(), t.S, sc.offsets.data(),
                      sc.chunks.data());
  return sc;
}

// P tensors written by an op. Non-contiguous ones are computed into a contiguous copy (holding
// their current values, which matters when `skip` leaves them untouched) and copied back.
struct OutputTable {
  std::vector<at::Tensor> targets, work;
  std::vector<void*> ptrs;
  at::ScalarType dtype = at::kFloat;
  int32_t code = kFloat32;

  void finish() {
    for (size_t i = 0; i < targets.size(); ++i)
      if (!work[i].is_same(targets[i])) targets[i].copy_(work[i]);
  }
};

inline OutputTable make_output_table(const char* op, const char* what, at::TensorList outs, const GradTable& g) {
  TORCH_CHECK_VALUE(int64_t(outs.size()) == g.P, "fused_balance::", op, ": ", what, " has ", outs.size(),
                    " tensors, expected one per gradient tensor (", g.P, ")");
  OutputTable t;
  TORCH_CHECK_VALUE(outs.empty() || outs[0].defined(), "fused_balance::", op, ": ", what, "[0] is undefined");
  if (!outs.empty()) {
    t.dtype = outs[0].scalar_type();
    t.code = elem_type_of(t.dtype, op);
  }
  for (int64_t p = 0; p < g.P; ++p) {
    const at::Tensor& o = outs[p];
    TORCH_CHECK_VALUE(o.defined(), "fused_balance::", op, ": ", what, "[", p, "] is undefined");
    TORCH_CHECK_TYPE(o.scalar_type() == t.dtype, "fused_balance::", op, ": ", what, "[", p, "] has dtype ",
                     o.scalar_type(), ", ", what, "[0] has ", t.dtype);
    TORCH_CHECK_VALUE(o.device() == g.device, "fused_balance::", op, ": ", what, "[", p, "] is on ", o.device(),
                      ", the gradients on ", g.device);
    TORCH_CHECK_VALUE(o.numel() == g.numel[p] && o.sizes() == g.tensors[p].sizes(), "fused_balance::", op, ": ",
                      what, "[", p, "] has shape ", o.sizes(), ", the gradient has ", g.tensors[p].sizes());
    t.targets.push_back(o);
    t.work.push_back(o.is_contiguous() ? o : o.contiguous());
    t.ptrs.push_back(t.work.back().data_ptr());
  }
  return t;
}

// The kernel of one device type was reached with data on another (`what`: "tensors", "a bank").
inline void check_kernel_device(const char* op, const char* what, const at::Device& device, at::DeviceType kernel) {
  TORCH_CHECK_VALUE(device.type() == kernel, "fused_balance::", op, ": ", kernel == at::kCUDA ? "CUDA" : "CPU",
                    " kernel called with ", what, " on ", device);
}

// weights[S, K]: K = number of objectives, floating point, on the device of the data (`data`:
// "the gradients", "the bank"). The caller checks that S exceeds every segment id.
inline void check_weights(const char* op, const at::Tensor& weights, int64_t K, const at::Device& device,
                          const char* data) {
  TORCH_CHECK_VALUE(weights.dim() == 2 && weights.size(1) == K, "fused_balance::", op, ": weights must be [S, K=", K,
                    "], got shape ", weights.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(weights.scalar_type()), "fused_balance::", op,
                   ": weights must be floating point, got ", weights.scalar_type());
  TORCH_CHECK_VALUE(weights.device() == device, "fused_balance::", op, ": weights are on ", weights.device(), ", ",
                    data, " on ", device);
}

inline void check_skip(const char* op, const std::optional<at::Tensor>& skip, const at::Device& device,
                       const char* data) {
  if (!skip.has_value() || !skip->defined()) return;
  TORCH_CHECK_VALUE(skip->numel() == 1 && skip->scalar_type() == at::kBool, "fused_balance::", op,
                    ": skip must be a one-element bool tensor, got ", skip->scalar_type(), " of shape ",
                    skip->sizes());
  TORCH_CHECK_VALUE(skip->device() == device, "fused_balance::", op, ": skip is on ", skip->device(), ", ", data,
                    " on ", device);
}

// Per-tensor AdamW hyper-parameters: one value per tensor, or a single value for all.
inline std::vector<double> per_tensor(const char* op, const char* what, at::ArrayRef<double> values, int64_t P) {
  TORCH_CHECK_VALUE(int64_t(values.size()) == P || values.size() == 1, "fused_balance::", op, ": ", what,
                    " has ", values.size(), " values for ", P, " tensors (give one per tensor, or one)");
  std::vector<double> out(P);
  for (int64_t p = 0; p < P; ++p) out[p] = values.size() == 1 ? values[0] : values[p];
  return out;
}

// ------------------------------------------------------------------- per-op preparation
// Each op's checks in one place; `kernel` is the device type of the implementation called.

// gram: the gradients' table.
inline GradTable gram_table(at::TensorList grads, int64_t num_objectives, at::IntArrayRef segment_ids,
                            int64_t num_segments, at::DeviceType kernel) {
  TORCH_CHECK_VALUE(num_segments >= 1, "fused_balance::gram: num_segments must be >= 1, got ", num_segments);
  GradTable g = make_grad_table("gram", grads, num_objectives, segment_ids, num_segments);
  check_kernel_device("gram", "tensors", g.device, kernel);
  return g;
}

// combine, combine_into, balanced_adamw_: the gradients' table, weights [S, K] and skip checked.
inline GradTable weighted_grad_table(const char* op, at::TensorList grads, const at::Tensor& weights,
                                     at::IntArrayRef segment_ids, const std::optional<at::Tensor>& skip,
                                     at::DeviceType kernel) {
  TORCH_CHECK_VALUE(weights.dim() == 2, "fused_balance::", op, ": weights must be [S, K], got shape ", weights.sizes());
  GradTable g = make_grad_table(op, grads, weights.size(1), segment_ids, weights.size(0));
  check_kernel_device(op, "tensors", g.device, kernel);
  check_weights(op, weights, g.K, g.device, "the gradients");
  check_skip(op, skip, g.device, "the gradients");
  return g;
}

// combine: new output tensors shaped as the gradients.
struct NewOutputs {
  std::vector<at::Tensor> tensors;
  std::vector<void*> ptrs;
};

inline NewOutputs new_outputs(const GradTable& g) {
  NewOutputs o;
  o.tensors.reserve(g.P);
  for (int64_t p = 0; p < g.P; ++p) {
    o.tensors.push_back(at::empty(g.tensors[p].sizes(), g.tensors[p].options()));
    o.ptrs.push_back(o.tensors.back().data_ptr());
  }
  return o;
}

// combine_into: `out`, one tensor per gradient tensor, in the gradients' dtype.
inline OutputTable combine_into_outputs(at::TensorList out, const GradTable& g) {
  OutputTable o = make_output_table("combine_into", "out", out, g);
  TORCH_CHECK_TYPE(o.dtype == g.dtype, "fused_balance::combine_into: out has dtype ", o.dtype, ", the gradients ",
                   g.dtype);
  return o;
}

// balanced_adamw_: the gradients' table as weighted_grad_table, and the scalar hyper-parameters.
inline GradTable adamw_grad_table(at::TensorList grads, const at::Tensor& weights, at::IntArrayRef segment_ids,
                                  const std::optional<at::Tensor>& skip, double beta1, double beta2, double eps,
                                  int64_t step, at::DeviceType kernel) {
  GradTable g = weighted_grad_table("balanced_adamw_", grads, weights, segment_ids, skip, kernel);
  TORCH_CHECK_VALUE(step >= 1, "fused_balance::balanced_adamw_: step must be >= 1, got ", step);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "fused_balance::balanced_adamw_: beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "fused_balance::balanced_adamw_: beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0.0, "fused_balance::balanced_adamw_: eps must be >= 0, got ", eps);
  return g;
}

// balanced_adamw_: per-tensor hyper-parameters and the optimizer state (after adamw_grad_table).
struct AdamWArgs {
  std::vector<double> lr, weight_decay;
  OutputTable params, exp_avgs, exp_avg_sqs;

  void finish() {
    params.finish();
    exp_avgs.finish();
    exp_avg_sqs.finish();
  }
};

inline AdamWArgs adamw_args(const GradTable& g, at::TensorList params, at::TensorList exp_avgs,
                            at::TensorList exp_avg_sqs, at::ArrayRef<double> lrs,
                            at::ArrayRef<double> weight_decays) {
  const char* op = "balanced_adamw_";
  AdamWArgs a;
  a.lr = per_tensor(op, "lrs", lrs, g.P);
  a.weight_decay = per_tensor(op, "weight_decays", weight_decays, g.P);
  a.params = make_output_table(op, "params", params, g);
  a.exp_avgs = make_output_table(op, "exp_avgs", exp_avgs, g);
  a.exp_avg_sqs = make_output_table(op, "exp_avg_sqs", exp_avg_sqs, g);
  return a;
}

}  // namespace fused_balance
