// CPU kernels for AVX2 + FMA + F16C, selected at run time when torch reports AVX2 (or above).
// Only this file's own code is compiled for the ISA (see cpu_kernels_impl.h).
#define FB_ISA avx2
#define FB_SIMD 2
#define FB_TARGET "avx2,fma,f16c"
#include "cpu_kernels_impl.h"
