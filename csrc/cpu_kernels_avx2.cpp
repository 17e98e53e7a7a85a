// CPU kernels for AVX2 + FMA + F16C, selected at run time when torch reports AVX2 (or above).
// Only this file's own code is compiled for the ISA (see cpu_kernels_impl.h).
#include "cpu_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define FB_ISA_NS isa_avx2
#define FB_SIMD 2
#include "cpu_kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace fused_balance {
namespace cpu {
const KernelTable* kernels_avx2() {
  static const KernelTable table{"avx2", isa_avx2::gram_chunk, isa_avx2::combine_chunk,
                                 isa_avx2::adamw_chunk,
                                 isa_avx2::gram64_chunk};
  return &table;
}
}  // namespace cpu
}  // namespace fused_balance

#else
namespace fused_balance {
namespace cpu {
const KernelTable* kernels_avx2() { return nullptr; }
}  // namespace cpu
}  // namespace fused_balance
#endif
