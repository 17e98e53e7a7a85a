// CPU kernels for AVX-512 (F, BW, VL, DQ), selected at run time when torch reports AVX512.
// Only this file's own code is compiled for the ISA (see cpu_kernels_impl.h).

// GCC 12 reports its own AVX-512 intrinsics (_mm512_undefined_*) as maybe-uninitialised.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

#define FB_ISA avx512
#define FB_SIMD 3
#define FB_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#include "cpu_kernels_impl.h"
