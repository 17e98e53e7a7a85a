// Portable CPU kernels: the scalar code of multi_tensor.h, no ISA flag.
#include "cpu_kernels.h"

#define FB_ISA_NS isa_default
#define FB_SIMD 0
#include "cpu_kernels_impl.h"

namespace fused_balance {
namespace cpu {

const KernelTable* kernels_default() {
  static const KernelTable table{"default", isa_default::gram_chunk, isa_default::combine_chunk,
                                 isa_default::adamw_chunk,
                                 isa_default::gram64_chunk};
  return &table;
}

}  // namespace cpu
}  // namespace fused_balance
