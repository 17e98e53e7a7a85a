// Portable CPU kernels: the scalar code of multi_tensor.h, no ISA flag (see cpu_kernels_impl.h).
#define FB_ISA default
#define FB_SIMD 0
#include "cpu_kernels_impl.h"
