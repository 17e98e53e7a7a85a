// The fused_balance op schemas and their CPU implementations.
//
// Every op cuts all tensors into fixed-size chunks (multi_tensor.h) and runs the chunks in one
// at::parallel_for region through the kernel table of the selected ISA. The Gram writes one
// partial per (chunk, pair) and reduces them per segment in chunk order afterwards, so the result
// does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>

#include "cpu_dispatch.h"
#include "ops_common.h"

namespace fused_balance {
namespace cpu {
namespace {

struct Isa {
  const char* name;
  const KernelTable* (*table)();
  int min_capability;  // rank of the CPU capability needed to run it (see capability_rank)
};

const Isa kIsas[] = {
    {"default", kernels_default, 0},
    {"avx2", kernels_avx2, 1},      // null table on non-x86 builds
    {"avx512", kernels_avx512, 2},
};

std::mutex g_mutex;
std::atomic<const KernelTable*> g_table{nullptr};

// torch's capability report ("DEFAULT", "AVX2", "AVX512", ...) as a rank: 0, 1, 2.
int capability_rank() {
  const std::string cap = at::get_cpu_capability();
  if (cap.find("AVX512") != std::string::npos) return 2;
  if (cap.find("AVX2") != std::string::npos) return 1;
  return 0;
}

bool runnable(const Isa& isa) { return isa.table() != nullptr && capability_rank() >= isa.min_capability; }

const Isa* find_isa(const std::string& name) {
  for (const Isa& isa : kIsas)
    if (name == isa.name) return &isa;
  return nullptr;
}

const KernelTable* choose(const std::string& requested) {
  if (requested.empty() || requested == "auto") {
    const KernelTable* best = nullptr;
    for (const Isa& isa : kIsas)
      if (runnable(isa)) best = isa.table();
    return best;
  }
  const Isa* isa = find_isa(requested);
  if (isa == nullptr)
    throw std::invalid_argument("fused_balance: unknown CPU kernel path '" + requested +
                                "' (choose default, avx2, avx512 or auto)");
  if (!runnable(*isa))
    throw std::invalid_argument("fused_balance: CPU kernel path '" + requested +
                                "' cannot run here (CPU capability " + at::get_cpu_capability() +
                                ", or not compiled in)");
  return isa->table();
}

}  // namespace

const KernelTable* active_table() {
  const KernelTable* t = g_table.load(std::memory_order_acquire);
  if (t != nullptr) return t;
  std::lock_guard<std::mutex> lock(g_mutex);
  t = g_table.load(std::memory_order_relaxed);
  if (t == nullptr) {
    const char* env = std::getenv("FUSED_BALANCE_CPU_ISA");
    try {
      t = choose(env ? env : "");
    } catch (const std::invalid_argument& e) {
      TORCH_CHECK(false, e.what(), " [from FUSED_BALANCE_CPU_ISA]");
    }
    g_table.store(t, std::memory_order_release);
  }
  return t;
}

std::string active_isa() { return active_table()->name; }

std::string set_isa(const std::string& name) {
  const KernelTable* t = choose(name);
  std::lock_guard<std::mutex> lock(g_mutex);
  g_table.store(t, std::memory_order_release);
  return t->name;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const Isa& isa : kIsas)
    if (runnable(isa)) names.emplace_back(isa.name);
  return names;
}

}  // namespace cpu

namespace {

bool skip_requested(const std::optional<at::Tensor>& skip) {
  return skip.has_value() && skip->defined() && skip->item<bool>();
}

// Runs body(c, streams) for every chunk c, in one parallel region; streams: the K gradient
// pointers of chunk c, advanced to the chunk's first element.
template <typename F>
void for_each_chunk(const GradTable& g, F&& body) {
  const int64_t esize = elem_size(g.code);
  at::parallel_for(0, g.num_chunks(), 1, [&](int64_t begin, int64_t end) {
    std::vector<const void*> streams(g.K);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t offset_bytes = g.chunk_start[c] * esize;
      for (int64_t k = 0; k < g.K; ++k)
        streams[k] = static_cast<const char*>(g.ptr(k, g.chunk_tensor[c])) + offset_bytes;
      body(c, streams.data());
    }
  });
}

// Segment weights as doubles ([S * K], row-major); the kernels round them to the math type, which
// is the same single rounding as the reference's weights.to(accumulate dtype).
std::vector<double> weights_as_double(const at::Tensor& weights) {
  const at::Tensor w = weights.to(at::kDouble).contiguous();
  const double* data = w.data_ptr<double>();
  return std::vector<double>(data, data + w.numel());
}

at::Tensor gram_cpu(at::TensorList grads, int64_t num_objectives, at::IntArrayRef segment_ids,
                    int64_t num_segments) {
  const GradTable g = gram_table(grads, num_objectives, segment_ids, num_segments, at::kCPU);
  const int K = int(g.K);
  const int npairs = pair_count(K);
  std::vector<double> partials(size_t(g.num_chunks()) * npairs);
  const cpu::KernelTable* kt = cpu::active_table();
  for_each_chunk(g, [&](int64_t c, const void* const* streams) {
    const int64_t n = chunk_length(g.numel[g.chunk_tensor[c]], g.chunk_start[c], kChunkElems);
    kt->gram_chunk(streams, K, g.code, n, partials.data() + c * npairs);
  });
  const SegmentChunks sc = make_segment_chunks(g);
  at::Tensor out = at::empty({g.S, g.K, g.K}, at::TensorOptions().dtype(accumulate_type(g.dtype)));
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fused_balance_gram_reduce", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    for (int64_t s = 0; s < g.S; ++s) {
      for (int q = 0; q < npairs; ++q) {
        int k, l;
        pair_of_index(q, K, &k, &l);
        const double total =
            reduce_segment_pair(partials.data(), npairs, sc.offsets.data(), sc.chunks.data(), s, q);
        o[(s * K + k) * K + l] = static_cast<scalar_t>(total);
        o[(s * K + l) * K + k] = static_cast<scalar_t>(total);
      }
    }
  });
  return out;
}

// out[p] = sum_k w[seg(p), k] g[k][p] for every chunk, into the output table's pointers.
void run_combine(const GradTable& g, const std::vector<double>& w, const std::vector<void*>& out_ptrs) {
  const int K = int(g.K);
  const int64_t esize = elem_size(g.code);
  const cpu::KernelTable* kt = cpu::active_table();
  for_each_chunk(g, [&](int64_t c, const void* const* streams) {
    const int64_t p = g.chunk_tensor[c];
    const int64_t n = chunk_length(g.numel[p], g.chunk_start[c], kChunkElems);
    void* out = static_cast<char*>(out_ptrs[p]) + g.chunk_start[c] * esize;
    kt->combine_chunk(streams, K, g.code, n, w.data() + g.segment[p] * K, out);
  });
}

std::vector<at::Tensor> combine_cpu(at::TensorList grads, const at::Tensor& weights, at::IntArrayRef segment_ids) {
  const GradTable g = weighted_grad_table("combine", grads, weights, segment_ids, std::nullopt, at::kCPU);
  NewOutputs o = new_outputs(g);
  run_combine(g, weights_as_double(weights), o.ptrs);
  return o.tensors;
}

void combine_into_cpu(at::TensorList grads, const at::Tensor& weights, at::IntArrayRef segment_ids,
                      at::TensorList out, const std::optional<at::Tensor>& skip) {
  const GradTable g = weighted_grad_table("combine_into", grads, weights, segment_ids, skip, at::kCPU);
  OutputTable o = combine_into_outputs(out, g);
  if (skip_requested(skip)) return;
  run_combine(g, weights_as_double(weights), o.ptrs);
  o.finish();
}

void balanced_adamw_cpu(at::TensorList grads, const at::Tensor& weights, at::IntArrayRef segment_ids,
                        at::TensorList params, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                        at::ArrayRef<double> lrs, at::ArrayRef<double> weight_decays, double beta1, double beta2,
                        double eps, int64_t step, const std::optional<at::Tensor>& skip) {
  const GradTable g = adamw_grad_table(grads, weights, segment_ids, skip, beta1, beta2, eps, step, at::kCPU);
  AdamWArgs a = adamw_args(g, params, exp_avgs, exp_avg_sqs, lrs, weight_decays);
  if (skip_requested(skip)) return;
  const std::vector<double> w = weights_as_double(weights);
  const int K = int(g.K);
  const cpu::KernelTable* kt = cpu::active_table();
  for_each_chunk(g, [&](int64_t c, const void* const* streams) {
    const int64_t p = g.chunk_tensor[c];
    const int64_t start = g.chunk_start[c];
    cpu::AdamWChunk t;
    t.grads = streams;
    t.K = K;
    t.grad_dtype = g.code;
    t.n = chunk_length(g.numel[p], start, kChunkElems);
    t.weights = w.data() + g.segment[p] * K;
    t.param = static_cast<char*>(a.params.ptrs[p]) + start * elem_size(a.params.code);
    t.param_dtype = a.params.code;
    t.exp_avg = static_cast<char*>(a.exp_avgs.ptrs[p]) + start * elem_size(a.exp_avgs.code);
    t.exp_avg_dtype = a.exp_avgs.code;
    t.exp_avg_sq = static_cast<char*>(a.exp_avg_sqs.ptrs[p]) + start * elem_size(a.exp_avg_sqs.code);
    t.exp_avg_sq_dtype = a.exp_avg_sqs.code;
    t.consts_f32 = make_adamw_consts<float>(a.lr[p], a.weight_decay[p], beta1, beta2, eps, step);
    t.consts_f64 = make_adamw_consts<double>(a.lr[p], a.weight_decay[p], beta1, beta2, eps, step);
    kt->adamw_chunk(&t);
  });
  a.finish();
}

}  // namespace
}  // namespace fused_balance

TORCH_LIBRARY(fused_balance, m) {
  // The fake (meta) and autograd registrations live in Python; importing this module adds them.
  m.set_python_module("fused_balance.ops");
  m.def("gram(Tensor[] grads, int num_objectives, int[] segment_ids, int num_segments) -> Tensor");
  m.def("combine(Tensor[] grads, Tensor weights, int[] segment_ids) -> Tensor[]");
  m.def("combine_into(Tensor[] grads, Tensor weights, int[] segment_ids, Tensor(a!)[] out, Tensor? skip) -> ()");
  m.def(
      "balanced_adamw_(Tensor[] grads, Tensor weights, int[] segment_ids, Tensor(a!)[] params, "
      "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, float[] lrs, float[] weight_decays, float beta1, "
      "float beta2, float eps, int step, Tensor? skip) -> ()");
  // Plan ops (bank_cpu.cpp, bank_cuda.cu): gradients in one [K, N] bank, a chunk table built once.
  m.def("bank_gram(Tensor bank, Tensor chunks, Tensor seg_offsets, int num_segments) -> (Tensor, Tensor)");
  m.def("bank_combine_into(Tensor bank, Tensor weights, Tensor chunks, Tensor(a!) out, Tensor? skip) -> ()");
  m.def(
      "bank_adamw_(Tensor bank, Tensor weights, Tensor chunks, Tensor param_ptrs, Tensor(a!) exp_avg, "
      "Tensor(b!) exp_avg_sq, Tensor hyper, Tensor(c!) step, Tensor? skip, Tensor? live=None) -> ()");
  // The policy solve (policy_cpu.cpp, policy_cuda.cu): [S, K, K] Gram -> weights, branch.
  m.def("policy_weights(Tensor gram, int policy, float tau, float rescale, float rounding, Tensor? active, int magnitude=-1) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fused_balance, CPU, m) {
  m.impl("gram", &fused_balance::gram_cpu);
  m.impl("combine", &fused_balance::combine_cpu);
  m.impl("combine_into", &fused_balance::combine_into_cpu);
  m.impl("balanced_adamw_", &fused_balance::balanced_adamw_cpu);
}
