// Fast screens of the list API's arguments (fused_balance/_validate.py), ~50 ns per tensor.
//
// Each screen either vouches for its arguments (every check the Python validation makes passes)
// and returns them normalised, or returns None: then the Python validation runs and raises the
// precise error (or accepts an unusual but valid input, e.g. a Tensor subclass or a storage shared
// by disjoint outputs). The screens never raise for bad input, so the error messages live in one
// place, and they are conservative: anything they are not sure of goes to the Python path. They
// re-read every tensor on every call (no cache), so a changed input is always checked.
#include <pybind11/pybind11.h>
#include <torch/csrc/autograd/python_variable.h>

#include <cstdint>
#include <tuple>
#include <unordered_set>
#include <vector>

namespace fused_balance {
namespace {

namespace py = pybind11;

bool is_sequence(PyObject* obj) { return PyList_CheckExact(obj) || PyTuple_CheckExact(obj); }

// Plain Tensor or Parameter (not a subclass such as DTensor), dense.
const at::Tensor* plain_tensor(PyObject* obj) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || t.layout() != at::kStrided) return nullptr;
  return &t;
}

bool supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

struct StorageKey {
  int8_t type, index;
  const void* ptr;
  bool operator==(const StorageKey& o) const { return type == o.type && index == o.index && ptr == o.ptr; }
};
struct StorageKeyHash {
  size_t operator()(const StorageKey& k) const {
    return std::hash<const void*>()(k.ptr) ^ (size_t(uint8_t(k.type)) << 8) ^ size_t(uint8_t(k.index));
  }
};

// Tensors without elements touch no memory; meta tensors have none (the Python check skips both).
bool touches_memory(const at::Tensor& t) { return t.numel() > 0 && !t.is_meta(); }

StorageKey storage_key(const at::Tensor& t) {
  return {int8_t(t.device().type()), int8_t(t.device().index()), t.storage().data()};
}

// grads: K lists/tuples of P tensors -> (flat objective-major list, K, P, whether any of them
// requires grad), or None.
py::object screen_grads(py::handle grads) {
  PyObject* outer = grads.ptr();
  if (!is_sequence(outer)) return py::none();
  const Py_ssize_t K = PySequence_Fast_GET_SIZE(outer);
  if (K < 1) return py::none();
  PyObject* row0 = PySequence_Fast_GET_ITEM(outer, 0);
  if (!is_sequence(row0)) return py::none();
  const Py_ssize_t P = PySequence_Fast_GET_SIZE(row0);
  if (P < 1) return py::none();
  const at::Tensor* first = plain_tensor(PySequence_Fast_GET_ITEM(row0, 0));
  if (first == nullptr || !supported_dtype(first->scalar_type())) return py::none();
  const at::ScalarType dtype = first->scalar_type();
  const at::Device device = first->device();
  std::vector<const at::Tensor*> reference(P);
  bool requires_grad = false;
  py::list flat(K * P);
  for (Py_ssize_t k = 0; k < K; ++k) {
    PyObject* row = PySequence_Fast_GET_ITEM(outer, k);
    if (!is_sequence(row) || PySequence_Fast_GET_SIZE(row) != P) return py::none();
    for (Py_ssize_t p = 0; p < P; ++p) {
      PyObject* item = PySequence_Fast_GET_ITEM(row, p);
      const at::Tensor* t = plain_tensor(item);
      if (t == nullptr || t->scalar_type() != dtype || t->device() != device) return py::none();
      if (k == 0) {
        reference[p] = t;
      } else if (t->sizes() != reference[p]->sizes()) {
        return py::none();
      }
      requires_grad = requires_grad || t->requires_grad();
      Py_INCREF(item);
      PyList_SET_ITEM(flat.ptr(), k * P + p, item);
    }
  }
  return py::make_tuple(flat, K, P, requires_grad);
}

// segments: a list/tuple of P Python ints covering 0..S-1 -> (new list, S), or None.
py::object screen_segments(py::handle segments, Py_ssize_t P) {
  PyObject* seq = segments.ptr();
  if (!is_sequence(seq) || PySequence_Fast_GET_SIZE(seq) != P) return py::none();
  long long largest = -1;
  for (Py_ssize_t p = 0; p < P; ++p) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq, p);
    if (!PyLong_CheckExact(item)) return py::none();  // bool, numpy ints, ...: the Python path
    int overflow = 0;
    const long long s = PyLong_AsLongLongAndOverflow(item, &overflow);
    if (overflow != 0 || s < 0 || s >= P) return py::none();  // S > P cannot be covered without gaps
    if (s > largest) largest = s;
  }
  std::vector<char> used(size_t(largest + 1), 0);
  for (Py_ssize_t p = 0; p < P; ++p) used[size_t(PyLong_AsLongLong(PySequence_Fast_GET_ITEM(seq, p)))] = 1;
  for (char u : used)
    if (!u) return py::none();
  py::list ids(P);
  for (Py_ssize_t p = 0; p < P; ++p) {
    PyObject* item = PySequence_Fast_GET_ITEM(seq, p);
    Py_INCREF(item);
    PyList_SET_ITEM(ids.ptr(), p, item);
  }
  return py::make_tuple(ids, largest + 1);
}

// written: lists/tuples of P tensors written in place, each matching flat[p] (of the first P
// gradients) in shape, dtype and device, sharing no storage with each other or with any of the
// gradients in flat -> a list of new lists, or None. Storages shared by disjoint views are left
// to the Python check (byte ranges).
py::object screen_written(py::handle written, py::handle flat, Py_ssize_t P) {
  PyObject* groups = written.ptr();
  PyObject* grads = flat.ptr();
  if (!PyList_CheckExact(groups) || !PyList_CheckExact(grads) || PyList_GET_SIZE(grads) < P) return py::none();
  const Py_ssize_t G = PyList_GET_SIZE(groups);
  std::vector<const at::Tensor*> reference(P);
  for (Py_ssize_t p = 0; p < P; ++p) {
    reference[p] = plain_tensor(PyList_GET_ITEM(grads, p));
    if (reference[p] == nullptr) return py::none();
  }
  std::unordered_set<StorageKey, StorageKeyHash> storages;
  storages.reserve(size_t(G * P) * 2);
  py::list result(G);
  for (Py_ssize_t g = 0; g < G; ++g) {
    PyObject* seq = PyList_GET_ITEM(groups, g);
    if (!is_sequence(seq) || PySequence_Fast_GET_SIZE(seq) != P) return py::none();
    py::list tensors(P);
    for (Py_ssize_t p = 0; p < P; ++p) {
      PyObject* item = PySequence_Fast_GET_ITEM(seq, p);
      const at::Tensor* t = plain_tensor(item);
      const at::Tensor& ref = *reference[p];
      if (t == nullptr || t->sizes() != ref.sizes() || t->scalar_type() != ref.scalar_type() ||
          t->device() != ref.device())
        return py::none();
      if (touches_memory(*t) && !storages.insert(storage_key(*t)).second) return py::none();
      Py_INCREF(item);
      PyList_SET_ITEM(tensors.ptr(), p, item);
    }
    PyList_SET_ITEM(result.ptr(), g, tensors.release().ptr());
  }
  const Py_ssize_t n = PyList_GET_SIZE(grads);
  for (Py_ssize_t i = 0; i < n; ++i) {
    const at::Tensor* t = plain_tensor(PyList_GET_ITEM(grads, i));
    if (t == nullptr) return py::none();
    if (touches_memory(*t) && storages.count(storage_key(*t))) return py::none();
  }
  return std::move(result);
}

}  // namespace

void register_list_checks(py::module_& m) {
  m.def("screen_grads", &screen_grads, py::arg("grads"),
        "(flat, K, P, requires_grad) when every gradient check of the list API passes, else None");
  m.def("screen_segments", &screen_segments, py::arg("segments"), py::arg("num_tensors"),
        "(segment ids, S) when the ids are P plain ints covering 0..S-1, else None");
  m.def("screen_written", &screen_written, py::arg("written"), py::arg("flat"), py::arg("num_tensors"),
        "the written tensor lists when they match the gradients and alias nothing, else None");
}

}  // namespace fused_balance
