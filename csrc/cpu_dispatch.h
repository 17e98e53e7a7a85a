// Run-time choice of the CPU kernel table (no torch header: module.cpp includes it).
#pragma once

#include <string>
#include <vector>

#include "cpu_kernels.h"

namespace fused_balance {
namespace cpu {

// The table in use: chosen on first use from FUSED_BALANCE_CPU_ISA (default|avx2|avx512) if set,
// else from the CPU capability torch reports (at::get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY), as ATen picks its own kernels.
const KernelTable* active_table();
std::string active_isa();
// Force a path ("default", "avx2", "avx512"; "auto" = the automatic choice). Throws
// std::invalid_argument for unknown names or paths this CPU/build cannot run. Returns the name.
std::string set_isa(const std::string& name);
// The paths this CPU and build can run, slowest first.
std::vector<std::string> supported_isas();

}  // namespace cpu
}  // namespace fused_balance
