"""Per-parameter bookkeeping in one call: GradBank's backward fill (``GradSlots``) and a
BalancePlan's storage checks (``TensorStamp``): the C++ objects of the extension when it is loaded
(csrc/grad_slots.cpp: one call is a loop over P pointers), the same objects in Python otherwise.
Never builds the extension: a process that has not loaded it (torch backend only) runs the Python
loops, with the same results."""
from __future__ import annotations

from typing import Sequence

import torch

from fused_balance import _extension


def _alias(view: torch.Tensor) -> torch.Tensor:
    """The same memory as ``view`` with a version counter of its own (a view shares its base's):
    autograd's in-place accumulation into ``.grad`` then bumps exactly the slots it wrote."""
    return torch.empty(0, dtype=view.dtype, device=view.device).set_(
        view.untyped_storage(), view.storage_offset(), view.shape, view.stride())


class PythonGradSlots:
    """``GradSlots`` in Python: ``slots[k][i]`` is objective k's slot for ``params[i]``."""

    def __init__(self, params: Sequence[torch.Tensor], slots: Sequence[Sequence[torch.Tensor]]):
        self.params, self.saved = list(params), []
        self.slots = [[_alias(view) for view in row] for row in slots]
        self.hit, self.published, self.versions = [], [False] * len(self.params), []
        self.pointed, self.reached_last = None, 0
        self.begin_window()

    def save(self) -> None:
        self.saved = [p.grad for p in self.params]

    def restore(self) -> None:
        for p, g in zip(self.params, self.saved):
            p.grad = g  # the setter checks dtype, device and shape
        self.saved = []

    def begin_window(self) -> None:
        """Forget which parameters were reached (a 0-element one counts as reached)."""
        self.hit = [p.numel() == 0 for p in self.params]

    def point(self, k: int) -> None:
        """``.grad`` = objective k's slot for every parameter; remember the slots' versions."""
        for p, slot in zip(self.params, self.slots[k]):
            p.grad = slot
        self.versions = [slot._version for slot in self.slots[k]]
        self.pointed = k

    def collect(self, k: int) -> list[int]:
        """Mark the parameters objective k's backward reached; return those whose ``.grad`` is
        set and is not k's slot."""
        if k != self.pointed:
            raise RuntimeError(f"GradSlots.collect({k}) after point({self.pointed})")
        out, self.reached_last = [], 0
        for i, (p, slot) in enumerate(zip(self.params, self.slots[k])):
            g = p.grad
            if g is slot:
                reached = slot._version != self.versions[i]
            else:
                reached = g is not None
                if reached and (g.layout != torch.strided or g.data_ptr() != slot.data_ptr()):
                    out.append(i)
            if reached:
                self.hit[i] = True
                self.reached_last += 1
        self.pointed = None
        return out

    def mark(self, indices: Sequence[int]) -> None:
        for i in indices:
            self.hit[i] = True

    def last_reached(self) -> int:
        return self.reached_last

    def reached_if_changed(self) -> list[bool] | None:
        if self.hit == self.published:
            return None
        self.published = list(self.hit)
        return list(self.published)


def grad_slots(params: Sequence[torch.Tensor], slots: Sequence[Sequence[torch.Tensor]]):
    """The native ``GradSlots`` if the extension is loaded, else ``PythonGradSlots``."""
    native = _extension.loaded()
    if native is not None:
        return native.GradSlots(list(params), [list(row) for row in slots])
    return PythonGradSlots(params, slots)


def is_native(slots) -> bool:
    return not isinstance(slots, PythonGradSlots)


class PythonTensorStamp:
    """``TensorStamp`` (csrc/grad_slots.cpp: what a BalancePlan's tables and ``.grad`` views
    depend on, compared per step) in Python, for a process without the extension."""

    def __init__(self, tensors: Sequence[torch.Tensor]):
        self.tensors = list(tensors)
        self.views, self.view_ptrs, self.live = [], [], []
        self.record()

    @staticmethod
    def _entry(t: torch.Tensor) -> tuple:
        return (t.data_ptr(), t.dtype, t.device, t.numel(), t.requires_grad)

    def record(self) -> None:
        self.entries = [self._entry(t) for t in self.tensors]

    def changed(self) -> list[int]:
        return [i for i, (t, e) in enumerate(zip(self.tensors, self.entries)) if self._entry(t) != e]

    def expect_grads(self, views: Sequence[torch.Tensor]) -> None:
        if len(views) != len(self.tensors):
            raise RuntimeError(f"TensorStamp.expect_grads: {len(views)} views for {len(self.tensors)} tensors")
        self.views = list(views)
        self.view_ptrs = [v.data_ptr() for v in self.views]

    def set_live(self, live: Sequence[bool]) -> None:
        if live and len(live) != len(self.tensors):
            raise RuntimeError(f"TensorStamp.set_live: {len(live)} flags for {len(self.tensors)} tensors")
        self.live = list(live)

    def _is_live(self, i: int) -> bool:
        return not self.live or self.live[i]

    def attach_grads(self) -> list[int]:
        if len(self.views) != len(self.tensors):
            raise RuntimeError("TensorStamp.attach_grads: call expect_grads first")
        moved = []
        for i, (t, v, ptr) in enumerate(zip(self.tensors, self.views, self.view_ptrs)):
            if not self._is_live(i):
                continue
            if v.data_ptr() != ptr:
                moved.append(i)
                continue
            t.grad = v  # the setter checks dtype, device and shape
        return moved

    def _is_view(self, i: int) -> bool:
        g = self.tensors[i].grad
        return g is self.views[i] and g.data_ptr() == self.view_ptrs[i]

    def grads_state(self) -> int:
        """0: every live ``.grad`` is its view, 1: every one is None, 2: anything else."""
        live = [i for i in range(len(self.tensors)) if self._is_live(i)]
        if len(self.views) == len(self.tensors) and all(self._is_view(i) for i in live):
            return 0
        return 1 if all(self.tensors[i].grad is None for i in live) else 2

    def clear_grads(self) -> None:
        for i, t in enumerate(self.tensors):
            if self._is_live(i):
                t.grad = None

    def grads_are_views(self) -> bool:
        return len(self.views) == len(self.tensors) and all(
            self._is_view(i) for i in range(len(self.tensors)) if self._is_live(i))


def tensor_stamp(tensors: Sequence[torch.Tensor]):
    """The native ``TensorStamp`` if the extension is loaded, else ``PythonTensorStamp``."""
    native = _extension.loaded()
    if native is not None:
        return native.TensorStamp(list(tensors))
    return PythonTensorStamp(tensors)
