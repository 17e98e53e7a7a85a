// Per-tensor bookkeeping in C++. GradSlots, for GradBank's backward fill: pointing every parameter's
// .grad at its slot in the bank (objective k's view) before a backward pass, finding the
// parameters the pass reached and those whose .grad autograd left somewhere else (a hook
// replaced it, a sparse gradient), and putting the user's .grad back afterwards. The parameters
// and slots are held here once, so a call costs a loop over P pointers: a Python loop costs
// about a microsecond per tensor and would run several times per objective on hundreds of LoRA
// tensors. TensorStamp, for BalancePlan: the per-step check that every parameter and .grad view
// is still where its device tables point.
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace fused_balance {
namespace {

class GradSlots {
 public:
  // slots[k][i]: objective k's view for params[i] (shape, dtype and device of the parameter,
  // checked by GradBank when it was built; the dtype is checked again on every point()). Each
  // slot is held as an alias of the same memory with a version counter of its own (a view
  // shares its base's counter): autograd's in-place accumulation into .grad bumps exactly the
  // slots it wrote, which is how a backward pass tells which parameters it reached.
  GradSlots(std::vector<at::Tensor> params, std::vector<std::vector<at::Tensor>> slots)
      : params_(std::move(params)), hit_(params_.size(), false), published_(params_.size(), false),
        versions_(params_.size(), 0) {
    slots_.reserve(slots.size());
    for (const auto& row : slots) {
      TORCH_CHECK(row.size() == params_.size(), "GradSlots: ", row.size(), " slots for ", params_.size(),
                  " parameters");
      std::vector<at::Tensor> aliases;
      aliases.reserve(row.size());
      for (const auto& view : row) {
        aliases.push_back(at::empty({0}, view.options()).set_(view.storage(), view.storage_offset(),
                                                              view.sizes(), view.strides()));
      }
      slots_.push_back(std::move(aliases));
    }
    begin_window();
  }

  // Remember every parameter's .grad (restored by restore()).
  void save() {
    saved_.clear();
    saved_.reserve(params_.size());
    for (const auto& p : params_) saved_.push_back(p.grad());
  }

  void restore() {
    for (size_t i = 0; i < saved_.size(); ++i) mutable_grad(i) = saved_[i];
    saved_.clear();
  }

  // Forget which parameters were reached: a new accumulation window starts. A 0-element
  // parameter has nothing to reach and counts as reached.
  void begin_window() {
    for (size_t i = 0; i < params_.size(); ++i) hit_[i] = params_[i].numel() == 0;
  }

  // .grad = slot of objective k for every parameter (autograd then adds into it in place), and
  // every slot's version remembered for collect().
  void point(int64_t k) {
    TORCH_CHECK(k >= 0 && size_t(k) < slots_.size(), "GradSlots.point: no objective ", k);
    const auto& row = slots_[k];
    for (size_t i = 0; i < params_.size(); ++i) {
      // A parameter converted after the bank was built (module.to(dtype)) would get a gradient
      // of another dtype: refuse rather than accumulate into the wrong type.
      TORCH_CHECK_TYPE(params_[i].scalar_type() == row[i].scalar_type(), "parameter ", i, " has dtype ",
                       params_[i].scalar_type(), " but its gradient slot holds ", row[i].scalar_type(),
                       ": the parameters changed dtype after the bank was built; build a new one");
      mutable_grad(i) = row[i];
      versions_[i] = row[i]._version();
    }
    pointed_ = k;
  }

  // After objective k's backward: the parameters whose .grad is set and is not k's slot (a hook
  // replaced it, a sparse gradient: the caller copies it in). Every parameter the pass reached
  // (its slot written in place, or .grad replaced) is marked reached in this window; the count
  // of those is kept in last_reached().
  std::vector<int64_t> collect(int64_t k) {
    TORCH_CHECK(k == pointed_, "GradSlots.collect(", k, ") after point(", pointed_, ")");
    const auto& row = slots_[k];
    std::vector<int64_t> out;
    last_reached_ = 0;
    for (size_t i = 0; i < params_.size(); ++i) {
      const at::Tensor& g = params_[i].grad();
      bool reached = false;
      if (g.defined() && g.unsafeGetTensorImpl() == row[i].unsafeGetTensorImpl()) {
        reached = row[i]._version() != versions_[i];
      } else if (g.defined()) {
        reached = true;
        if (g.layout() != at::kStrided || g.data_ptr() != row[i].data_ptr()) out.push_back(int64_t(i));
      }
      if (reached) {
        hit_[i] = true;
        ++last_reached_;
      }
    }
    pointed_ = -1;
    return out;
  }

  // Mark parameters reached by another route (GradBank's batched fill, or a window begun under
  // an earlier GradSlots).
  void mark(const std::vector<int64_t>& indices) {
    for (int64_t i : indices) {
      TORCH_CHECK(i >= 0 && size_t(i) < params_.size(), "GradSlots.mark: no parameter ", i);
      hit_[i] = true;
    }
  }

  // Parameters reached by the last collect().
  int64_t last_reached() const { return last_reached_; }

  // The window's reached flags when they differ from those returned last time, else None: a
  // step whose reach does not change costs one comparison loop here, no Python list.
  std::optional<std::vector<bool>> reached_if_changed() {
    if (hit_ == published_) return std::nullopt;
    published_ = hit_;
    return published_;
  }

 private:
  at::Tensor& mutable_grad(size_t i) { return params_[i].mutable_grad(); }

  std::vector<at::Tensor> params_;  // share the callers' TensorImpls: .grad set here is theirs
  std::vector<std::vector<at::Tensor>> slots_;
  std::vector<at::Tensor> saved_;
  std::vector<bool> hit_, published_;
  std::vector<int64_t> versions_;
  int64_t pointed_ = -1, last_reached_ = 0;
};

// What a plan's device tables and .grad views depend on, for P tensors, recorded once and
// compared in one loop per step (a few ns per tensor): each tensor's storage address, dtype,
// device, size and requires_grad, and, once views are given, that its .grad is that exact view
// object still holding the recorded address. A first/last-tensor sample misses `p.data = ...` on a middle
// parameter (the fused step would then write through a freed address) and Module._apply, which
// swaps grad.data under a surviving .grad object (a stale gradient reused every step).
class TensorStamp {
 public:
  explicit TensorStamp(std::vector<at::Tensor> tensors) : tensors_(std::move(tensors)) { record(); }

  void record() {
    entries_.clear();
    entries_.reserve(tensors_.size());
    for (const auto& t : tensors_) entries_.push_back(entry_of(t));
  }

  // Indices of the tensors whose address, dtype, device or size changed since record().
  std::vector<int64_t> changed() const {
    std::vector<int64_t> out;
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (!(entry_of(tensors_[i]) == entries_[i])) out.push_back(int64_t(i));
    }
    return out;
  }

  // Remember the .grad views every tensor must hold (and their addresses).
  void expect_grads(std::vector<at::Tensor> views) {
    TORCH_CHECK(views.size() == tensors_.size(), "TensorStamp.expect_grads: ", views.size(), " views for ",
                tensors_.size(), " tensors");
    views_ = std::move(views);
    view_ptrs_.clear();
    view_ptrs_.reserve(views_.size());
    for (const auto& v : views_) view_ptrs_.push_back(v.data_ptr());
  }

  // Which tensors take a .grad view (attach_grads) and are checked (grads_are_views); the
  // others' .grad is left as it is (tensors no objective reached). Empty: every tensor.
  void set_live(std::vector<bool> live) {
    TORCH_CHECK(live.empty() || live.size() == tensors_.size(), "TensorStamp.set_live: ", live.size(),
                " flags for ", tensors_.size(), " tensors");
    live_ = std::move(live);
  }

  // .grad = its expected view for every live tensor whose view still holds the recorded address;
  // returns the others (Module._apply swapped their data: the caller makes new views).
  std::vector<int64_t> attach_grads() {
    TORCH_CHECK(views_.size() == tensors_.size(), "TensorStamp.attach_grads: call expect_grads first");
    std::vector<int64_t> moved;
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (!is_live(i)) continue;
      const at::Tensor& v = views_[i];
      if (v.data_ptr() != view_ptrs_[i]) {
        moved.push_back(int64_t(i));
        continue;
      }
      TORCH_CHECK_TYPE(v.scalar_type() == tensors_[i].scalar_type() && v.device() == tensors_[i].device() &&
                           v.sizes() == tensors_[i].sizes(),
                       "TensorStamp.attach_grads: tensor ", i, " is ", tensors_[i].scalar_type(), " ",
                       tensors_[i].sizes(), " on ", tensors_[i].device(), ", its gradient view ", v.scalar_type(),
                       " ", v.sizes(), " on ", v.device());
      tensors_[i].mutable_grad() = v;
    }
    return moved;
  }

  // The live tensors' .grad in one word: 0 every one is its expected view (at the recorded
  // address), 1 every one is None, 2 anything else (user tensors, a mix).
  int64_t grads_state() const {
    if (views_.size() != tensors_.size()) return all_live_grads_undefined() ? 1 : 2;
    bool views = true, none = true;
    for (size_t i = 0; i < tensors_.size() && (views || none); ++i) {
      if (!is_live(i)) continue;
      const at::Tensor& g = tensors_[i].grad();
      none = none && !g.defined();
      views = views && g.defined() && g.unsafeGetTensorImpl() == views_[i].unsafeGetTensorImpl() &&
              g.data_ptr() == view_ptrs_[i];
    }
    return views ? 0 : (none ? 1 : 2);
  }

  // .grad = None for every live tensor (undoing attach_grads when they were None before).
  void clear_grads() {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (is_live(i)) tensors_[i].mutable_grad() = at::Tensor();
    }
  }

  // Whether every live tensor's .grad is its expected view, at the recorded address.
  bool grads_are_views() const {
    if (views_.size() != tensors_.size()) return false;
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (!is_live(i)) continue;
      const at::Tensor& g = tensors_[i].grad();
      if (!g.defined() || g.unsafeGetTensorImpl() != views_[i].unsafeGetTensorImpl() ||
          g.data_ptr() != view_ptrs_[i]) {
        return false;
      }
    }
    return true;
  }

 private:
  struct Entry {
    const void* ptr;
    at::ScalarType dtype;
    at::Device device;
    int64_t numel;
    bool requires_grad;
    bool operator==(const Entry& o) const {
      return ptr == o.ptr && dtype == o.dtype && device == o.device && numel == o.numel &&
             requires_grad == o.requires_grad;
    }
  };
  static Entry entry_of(const at::Tensor& t) {
    return Entry{t.has_storage() ? t.data_ptr() : nullptr, t.scalar_type(), t.device(), t.numel(),
                 t.requires_grad()};
  }

  bool all_live_grads_undefined() const {
    for (size_t i = 0; i < tensors_.size(); ++i) {
      if (is_live(i) && tensors_[i].grad().defined()) return false;
    }
    return true;
  }

  std::vector<at::Tensor> tensors_;  // share the callers' TensorImpls: .data = ... is seen, .grad set here is theirs
  std::vector<Entry> entries_;
  bool is_live(size_t i) const { return live_.empty() || live_[i]; }

  std::vector<at::Tensor> views_;
  std::vector<const void*> view_ptrs_;
  std::vector<bool> live_;
};

}  // namespace

void register_grad_slots(pybind11::module_& m) {
  pybind11::class_<TensorStamp>(m, "TensorStamp")
      .def(pybind11::init<std::vector<at::Tensor>>(), pybind11::arg("tensors"))
      .def("record", &TensorStamp::record,
           "remember every tensor's address, dtype, device, size and requires_grad")
      .def("changed", &TensorStamp::changed, "indices of the tensors that changed since record()")
      .def("expect_grads", &TensorStamp::expect_grads, pybind11::arg("views"),
           "remember the .grad view every tensor must hold")
      .def("set_live", &TensorStamp::set_live, pybind11::arg("live"),
           "which tensors take (and are checked for) a .grad view; [] for all")
      .def("attach_grads", &TensorStamp::attach_grads,
           "point every .grad at its view; returns the tensors whose view no longer holds its address")
      .def("grads_state", &TensorStamp::grads_state,
           "the live tensors' .grad: 0 all their views, 1 all None, 2 anything else")
      .def("clear_grads", &TensorStamp::clear_grads, "set every live tensor's .grad to None")
      .def("grads_are_views", &TensorStamp::grads_are_views,
           "whether every live tensor's .grad is its expected view at the recorded address");

  pybind11::class_<GradSlots>(m, "GradSlots")
      .def(pybind11::init<std::vector<at::Tensor>, std::vector<std::vector<at::Tensor>>>(),
           pybind11::arg("params"), pybind11::arg("slots"))
      .def("save", &GradSlots::save, "remember every parameter's .grad")
      .def("restore", &GradSlots::restore, "put the remembered .grad back")
      .def("begin_window", &GradSlots::begin_window, "forget which parameters were reached")
      .def("point", &GradSlots::point, pybind11::arg("k"), "point every .grad at objective k's slot")
      .def("collect", &GradSlots::collect, pybind11::arg("k"),
           "after k's backward: mark the reached parameters; return those whose .grad is not k's slot")
      .def("mark", &GradSlots::mark, pybind11::arg("indices"), "mark these parameters reached")
      .def("last_reached", &GradSlots::last_reached, "parameters reached by the last collect()")
      .def("reached_if_changed", &GradSlots::reached_if_changed,
           "the window's reached flags if they changed since last returned, else None");
}

}  // namespace fused_balance
