// CPU implementations of the plan ops (schemas in ops_cpu.cpp's TORCH_LIBRARY block).
//
// The K gradients live in one [K, ld] bank and the chunk table (multi_tensor.h, PlanColumn) is
// built once by fused_balance.BalancePlan, so a call passes four tensors whatever the number of
// parameters: no pointer table, no per-tensor argument. The per-chunk kernels are those of the
// list ops (the ISA table of cpu_kernels.h); the Gram accumulates in double (gram64_chunk).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "cpu_dispatch.h"
#include "bank_common.h"

namespace fused_balance {
namespace {

struct CpuChunk {
  int64_t start, length, segment, param, param_offset, group;
};

// The table as structs, every range checked against the bank (O(C), no device read on a CPU).
std::vector<CpuChunk> read_chunks(const char* op, const at::Tensor& chunks, const BankView& b, int64_t S,
                                  int64_t P, int64_t G, int64_t* total_elems) {
  const int64_t C = chunks.size(0);
  const int64_t* t = chunks.data_ptr<int64_t>();
  std::vector<CpuChunk> out(C);
  int64_t total = 0;
  for (int64_t c = 0; c < C; ++c) {
    const int64_t* r = t + c * kPlanColumns;
    CpuChunk ch{r[kColStart], r[kColLength], r[kColSegment], r[kColParam], r[kColParamOffset], r[kColGroup]};
    TORCH_CHECK_VALUE(ch.start >= 0 && ch.length >= 1 && ch.length <= kChunkElems && ch.start + ch.length <= b.row &&
                          ch.segment >= 0 && ch.segment < S && ch.param >= 0 && ch.param < P && ch.group >= 0 &&
                          ch.group < G && ch.param_offset >= 0,
                      "fused_balance::", op, ": chunk ", c, " of the table is out of range (start ", ch.start,
                      ", length ", ch.length, ", segment ", ch.segment, " for a row of ", b.row, " elements and ", S,
                      " segments)");
    total += ch.length;
    out[c] = ch;
  }
  *total_elems = total;
  return out;
}

// Chunks per parallel task: about 16 K elements each, so tiny tensors do not pay a task apiece.
int64_t grain_for(int64_t C, int64_t total) {
  const int64_t avg = total / (C > 0 ? C : 1);
  return std::max<int64_t>(1, (int64_t(1) << 14) / std::max<int64_t>(1, avg));
}

bool skip_set(const std::optional<at::Tensor>& skip) {
  return skip.has_value() && skip->defined() && skip->item<bool>();
}

// Runs body(c, streams) for every chunk c of the table, in one parallel region; streams: the K
// bank rows at the chunk's first element.
template <typename F>
void for_each_chunk(const at::Tensor& bank, const BankView& b, const std::vector<CpuChunk>& ch, int64_t total,
                    F&& body) {
  const char* base = static_cast<const char*>(bank.data_ptr());
  const int64_t esize = elem_size(b.code);
  const int64_t C = int64_t(ch.size());
  at::parallel_for(0, C, grain_for(C, total), [&](int64_t begin, int64_t end) {
    std::vector<const void*> streams(b.K);
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t k = 0; k < b.K; ++k) streams[k] = base + (k * b.ld + ch[c].start) * esize;
      body(c, streams.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor> bank_gram_cpu(const at::Tensor& bank, const at::Tensor& chunks,
                                                 const at::Tensor& seg_offsets, int64_t num_segments) {
  const char* op = "bank_gram";
  const BankView b = check_bank_gram(bank, chunks, seg_offsets, num_segments, at::kCPU);
  int64_t total = 0;
  const std::vector<CpuChunk> ch = read_chunks(op, chunks, b, num_segments, INT64_MAX, INT64_MAX, &total);
  const int64_t C = int64_t(ch.size());
  const int K = int(b.K);
  const int npairs = pair_count(K);
  const int64_t* so = seg_offsets.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(so[0] == 0 && so[num_segments] == C, "fused_balance::", op,
                    ": seg_offsets must run from 0 to the chunk count");
  for (int64_t s = 0; s < num_segments; ++s) {
    TORCH_CHECK_VALUE(so[s] <= so[s + 1], "fused_balance::", op, ": seg_offsets must not decrease");
    for (int64_t c = so[s]; c < so[s + 1]; ++c)
      TORCH_CHECK_VALUE(ch[c].segment == s, "fused_balance::", op, ": chunk ", c, " is not in segment ", s);
  }
  std::vector<double> partials(size_t(C) * npairs);
  const cpu::KernelTable* kt = cpu::active_table();
  for_each_chunk(bank, b, ch, total, [&](int64_t c, const void* const* streams) {
    kt->gram64_chunk(streams, K, b.code, ch[c].length, partials.data() + c * npairs);
  });
  at::Tensor G = at::empty({num_segments, b.K, b.K}, bank.options().dtype(at::kDouble));
  double* o = G.data_ptr<double>();
  bool finite = true;
  for (int64_t s = 0; s < num_segments; ++s) {
    for (int q = 0; q < npairs; ++q) {
      int k, l;
      pair_of_index(q, K, &k, &l);
      const double total_q = reduce_partials_fixed_order(partials.data() + q, so[s], so[s + 1], npairs);
      finite = finite && std::isfinite(total_q);
      o[(s * K + k) * K + l] = total_q;
      o[(s * K + l) * K + k] = total_q;
    }
  }
  return {G, at::scalar_tensor(!finite, bank.options().dtype(at::kBool))};
}

std::vector<double> weights_double(const at::Tensor& weights) {
  const at::Tensor w = weights.to(at::kDouble).contiguous();
  return std::vector<double>(w.data_ptr<double>(), w.data_ptr<double>() + w.numel());
}

// Saturating like weight_as<float> for fp32 math (the kernels round each weight with A(w)).
void saturate_for(std::vector<double>& w, int32_t code) {
  if (code == kFloat64) return;
  for (double& x : w) x = double(weight_as<float>(x));
}

void bank_combine_into_cpu(const at::Tensor& bank, const at::Tensor& weights, const at::Tensor& chunks,
                           const at::Tensor& out, const std::optional<at::Tensor>& skip) {
  const char* op = "bank_combine_into";
  const BankView b = check_bank_combine_into(bank, weights, chunks, out, skip, at::kCPU);
  int64_t total = 0;
  const std::vector<CpuChunk> ch = read_chunks(op, chunks, b, weights.size(0), INT64_MAX, INT64_MAX, &total);
  if (skip_set(skip)) return;
  std::vector<double> w = weights_double(weights);
  saturate_for(w, b.code);
  const int K = int(b.K);
  const int64_t esize = elem_size(b.code);
  char* o = static_cast<char*>(out.data_ptr());
  const cpu::KernelTable* kt = cpu::active_table();
  for_each_chunk(bank, b, ch, total, [&](int64_t c, const void* const* streams) {
    kt->combine_chunk(streams, K, b.code, ch[c].length, w.data() + ch[c].segment * K, o + ch[c].start * esize);
  });
}

void bank_adamw_cpu(const at::Tensor& bank, const at::Tensor& weights, const at::Tensor& chunks,
                    const at::Tensor& param_ptrs, const at::Tensor& exp_avg, const at::Tensor& exp_avg_sq,
                    const at::Tensor& hyper, const at::Tensor& step, const std::optional<at::Tensor>& skip,
                    const std::optional<at::Tensor>& live) {
  const BankView b = check_bank_adamw(bank, weights, chunks, param_ptrs, exp_avg, exp_avg_sq, hyper, step, skip,
                                      live, at::kCPU);
  const int32_t pcode = elem_type_of(exp_avg.scalar_type(), "bank_adamw_");
  int64_t total = 0;
  const std::vector<CpuChunk> ch =
      read_chunks("bank_adamw_", chunks, b, weights.size(0), param_ptrs.numel(), hyper.size(0), &total);
  if (skip_set(skip)) return;
  const bool* alive = live.has_value() ? live->data_ptr<bool>() : nullptr;
  float* steps = step.data_ptr<float>();
  const double* hy = hyper.data_ptr<double>();
  std::vector<double> w = weights_double(weights);
  saturate_for(w, b.code);
  const int K = int(b.K);
  const int64_t pes = elem_size(pcode);
  const int64_t* pp = param_ptrs.data_ptr<int64_t>();
  char* m = static_cast<char*>(exp_avg.data_ptr());
  char* v = static_cast<char*>(exp_avg_sq.data_ptr());
  const cpu::KernelTable* kt = cpu::active_table();
  for_each_chunk(bank, b, ch, total, [&](int64_t c, const void* const* streams) {
    const CpuChunk& x = ch[c];
    if (alive != nullptr && !alive[x.param]) return;  // not reached this step: not stepped
    // The step about to be taken: this parameter's stored count + 1 (read from memory, as the
    // GPU kernel does). Constants per chunk: two pow next to a chunk of element updates.
    const int64_t t = int64_t(steps[x.param]) + 1;
    const double* h = hy + x.group * kHyperColumns;
    cpu::AdamWChunk task;
    task.grads = streams;
    task.K = K;
    task.grad_dtype = b.code;
    task.n = x.length;
    task.weights = w.data() + x.segment * K;
    task.param = reinterpret_cast<char*>(pp[x.param]) + x.param_offset * pes;
    task.param_dtype = pcode;
    task.exp_avg = m + x.start * pes;
    task.exp_avg_dtype = pcode;
    task.exp_avg_sq = v + x.start * pes;
    task.exp_avg_sq_dtype = pcode;
    if (pcode == kFloat64) {
      task.consts_f64 = make_adamw_consts<double>(h[kHyLr], h[kHyWeightDecay], h[kHyBeta1], h[kHyBeta2], h[kHyEps], t);
    } else {
      task.consts_f32 = make_adamw_consts<float>(h[kHyLr], h[kHyWeightDecay], h[kHyBeta1], h[kHyBeta2], h[kHyEps], t);
    }
    kt->adamw_chunk(&task);
  });
  for (int64_t p = 0; p < param_ptrs.numel(); ++p) {
    if (alive == nullptr || alive[p]) steps[p] += 1.0f;
  }
}

}  // namespace
}  // namespace fused_balance

TORCH_LIBRARY_IMPL(fused_balance, CPU, m) {
  m.impl("bank_gram", &fused_balance::bank_gram_cpu);
  m.impl("bank_combine_into", &fused_balance::bank_combine_into_cpu);
  m.impl("bank_adamw_", &fused_balance::bank_adamw_cpu);
}
