// The CPU kernels, compiled once per instruction set (default, AVX2, AVX-512) and reached through
// a table of plain function pointers: the kernel translation units include no torch header, so
// they can carry their own `#pragma GCC target` without ODR clashes with ATen's inline code, and
// the ATen glue (ops_cpu.cpp) picks a table at run time from the CPU capability torch reports.
#pragma once

#include <stdint.h>

#include "multi_tensor.h"

namespace fused_balance {
namespace cpu {

// AdamW on one chunk of one tensor: the combined gradient d = sum_k w[k] g_k is formed in
// registers / an L1-sized tile and never written to memory.
struct AdamWChunk {
  const void* const* grads;  // K pointers to the chunk's first element
  int32_t K;
  int32_t grad_dtype;        // ElemType
  int64_t n;
  const double* weights;     // K weights of the tensor's segment
  void* param; int32_t param_dtype;
  void* exp_avg; int32_t exp_avg_dtype;
  void* exp_avg_sq; int32_t exp_avg_sq_dtype;
  // Math runs in double when the parameter is fp64, else in float (torch.optim semantics).
  AdamWConsts<float> consts_f32;
  AdamWConsts<double> consts_f64;
};

struct KernelTable {
  const char* name;
  // pairs[q] = sum_i g_k[i] g_l[i] for the K(K+1)/2 pairs of the K streams of n elements
  // (overwritten). Accumulates in fp32 (fp64 for fp64 input) over tiles, tiles summed in double.
  void (*gram_chunk)(const void* const* g, int K, int dtype, int64_t n, double* pairs);
  // out[i] = sum_k w[k] g_k[i], computed in fp32 (fp64 for fp64), stored as dtype. out may be
  // the same memory as one of the inputs (each element is read before it is written).
  void (*combine_chunk)(const void* const* g, int K, int dtype, int64_t n, const double* w, void* out);
  void (*adamw_chunk)(const AdamWChunk* task);
  // As gram_chunk, every product and sum in double (the plan's range-safe Gram).
  void (*gram64_chunk)(const void* const* g, int K, int dtype, int64_t n, double* pairs);
};

// Null when the ISA was not compiled in (non-x86 builds).
const KernelTable* kernels_default();
const KernelTable* kernels_avx2();
const KernelTable* kernels_avx512();

}  // namespace cpu
}  // namespace fused_balance
