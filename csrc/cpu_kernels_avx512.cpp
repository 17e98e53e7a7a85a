// CPU kernels for AVX-512 (F, BW, VL, DQ), selected at run time when torch reports AVX512.
// Only this file's own code is compiled for the ISA (see cpu_kernels_impl.h).
#include "cpu_kernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>

// GCC 12 reports its own AVX-512 intrinsics (_mm512_undefined_*) as maybe-uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#endif

#define FB_ISA_NS isa_avx512
#define FB_SIMD 3
#include "cpu_kernels_impl.h"

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace fused_balance {
namespace cpu {
const KernelTable* kernels_avx512() {
  static const KernelTable table{"avx512", isa_avx512::gram_chunk, isa_avx512::combine_chunk,
                                 isa_avx512::adamw_chunk,
                                 isa_avx512::gram64_chunk};
  return &table;
}
}  // namespace cpu
}  // namespace fused_balance

#else
namespace fused_balance {
namespace cpu {
const KernelTable* kernels_avx512() { return nullptr; }
}  // namespace cpu
}  // namespace fused_balance
#endif
