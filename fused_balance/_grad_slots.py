"""Per-parameter ``.grad`` bookkeeping of GradBank's backward fill: the C++ ``GradSlots`` of the
extension when it is loaded (csrc/grad_slots.cpp: one call is a loop over P pointers), the same
object in Python otherwise. Never builds the extension: a process that has not loaded it (torch
backend only) runs the Python loops, with the same results."""
from __future__ import annotations

from typing import Sequence

import torch

from fused_balance import _extension


class PythonGradSlots:
    """``GradSlots`` in Python: ``slots[k][i]`` is objective k's view for ``params[i]``."""

    def __init__(self, params: Sequence[torch.Tensor], slots: Sequence[Sequence[torch.Tensor]]):
        self.params, self.slots, self.saved = list(params), [list(row) for row in slots], []

    def save(self) -> None:
        self.saved = [p.grad for p in self.params]

    def restore(self) -> None:
        for p, g in zip(self.params, self.saved):
            p.grad = g  # the setter checks dtype, device and shape
        self.saved = []

    def point(self, k: int, reached: Sequence[bool]) -> None:
        """``.grad`` = objective k's slot, None where ``reached[i]`` is False ([]: every one)."""
        for i, (p, slot) in enumerate(zip(self.params, self.slots[k])):
            p.grad = slot if not reached or reached[i] else None

    def moved(self, k: int) -> list[int]:
        """Indices of the parameters whose ``.grad`` is set and is not objective k's slot."""
        out = []
        for i, (p, slot) in enumerate(zip(self.params, self.slots[k])):
            g = p.grad
            if g is not None and g is not slot and (g.layout != torch.strided or g.data_ptr() != slot.data_ptr()):
                out.append(i)
        return out


def grad_slots(params: Sequence[torch.Tensor], slots: Sequence[Sequence[torch.Tensor]]):
    """The native ``GradSlots`` if the extension is loaded, else ``PythonGradSlots``."""
    native = _extension.loaded()
    if native is not None:
        return native.GradSlots(list(params), [list(row) for row in slots])
    return PythonGradSlots(params, slots)


def is_native(slots) -> bool:
    return not isinstance(slots, PythonGradSlots)
