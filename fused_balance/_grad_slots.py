"""Per-parameter ``.grad`` bookkeeping of GradBank's backward fill: the C++ ``GradSlots`` of the
extension when it is loaded (csrc/grad_slots.cpp: one call is a loop over P pointers), the same
object in Python otherwise. Never builds the extension: a process that has not loaded it (torch
backend only) runs the Python loops, with the same results."""
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
