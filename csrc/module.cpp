// Python module of the extension: importing it registers the ops (static initialisers in
// the ops_*.cpp / *_cuda.cu files) and exposes the CPU kernel-path controls.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_dispatch.h"
#include "multi_tensor.h"

#ifndef FUSED_BALANCE_WITH_CUDA
#define FUSED_BALANCE_WITH_CUDA 0
#endif

namespace fused_balance {
void register_list_checks(pybind11::module_& m);  // list_checks.cpp
void register_grad_slots(pybind11::module_& m);   // grad_slots.cpp
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fused_balance C++/CUDA kernels (ops under torch.ops.fused_balance)";
  m.def("cpu_isa", &fused_balance::cpu::active_isa, "the CPU kernel path in use");
  m.def("set_cpu_isa", &fused_balance::cpu::set_isa, pybind11::arg("name"),
        "force the CPU kernel path: 'default', 'avx2', 'avx512' or 'auto'; returns the path in use");
  m.def("supported_cpu_isas", &fused_balance::cpu::supported_isas, "CPU kernel paths this machine can run");
  m.def("cuda_compiled", []() { return bool(FUSED_BALANCE_WITH_CUDA); }, "whether the CUDA kernels are built in");
  m.attr("chunk_elems") = fused_balance::kChunkElems;  // elements per chunk of the list ops
  fused_balance::register_list_checks(m);
  fused_balance::register_grad_slots(m);
}
