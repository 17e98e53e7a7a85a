"""GradBank: per-objective gradients in one contiguous ``[K, N]`` buffer.

The fused kernels read every objective's gradient for every tensor; keeping them in one flat
buffer (with per-parameter views into it) means the gradients land in place during backward and
are read as contiguous memory afterwards, with no gather copy. Each parameter starts on a 16-byte
boundary and the row length is a multiple of 16 bytes (``fused_balance.plan.row_offsets``), so
the kernels' 128-bit accesses apply to every chunk whatever the parameter sizes; the padding
between parameters holds zeros (no fill writes it), so sums and Gram are those of the gradients.

Two ways to fill it, giving the same numbers:

- ``"backward"``: for each objective k, point every parameter's ``.grad`` at its view in row k
  and call ``loss_k.backward()``. Autograd accumulates in place into an existing ``.grad``, so the
  gradient is written straight into the bank. K backward passes over the shared graph.
- ``"batched"``: one ``torch.autograd.grad`` of the stacked losses with ``grad_outputs=eye(K)``
  and ``is_grads_batched=True`` (vmap over the backward), then one copy per tensor into the bank.

On the tests' tiny unified model (CPU, 2 cores) ``"backward"`` is the faster of the two, so it
is the default. Where autograd cannot add into a bank view (a parameter of another dtype than
the bank's ``dtype=``, FSDP2's DTensor gradients) ``"backward"`` fills by copy: each backward
runs with ``.grad`` None and its gradients are added (cast) into the bank.
"""
from __future__ import annotations

from typing import Sequence

import torch

from fused_balance import _extension
from fused_balance._grad_slots import grad_slots, is_native
from fused_balance.plan import row_offsets
from fused_balance.training._fsdp import local_shard

__all__ = ["GradBank", "FILL_MODES", "check_params"]

FILL_MODES = ("backward", "batched")


def check_trainable(p, label: str, frozen_consequence: str) -> None:
    """A floating point tensor that requires grad; errors start with ``label`` and say what a
    frozen one would mean (``frozen_consequence``)."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{label} is a {type(p).__name__}, not a tensor")
    if not p.dtype.is_floating_point:
        raise TypeError(f"{label} has dtype {p.dtype}; only floating point tensors are trained")
    if not p.requires_grad:
        raise ValueError(f"{label} does not require grad (frozen): {frozen_consequence}; leave it out")


def check_params(params, owner: str, names: Sequence[str] | None = None) -> list[torch.Tensor]:
    """The parameters as a list, checked: leaf floating tensors that require grad, each once,
    all on one device. ``names`` (one per parameter) label them in errors."""
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{owner} needs a sequence of parameters, got a single Tensor; wrap it in a list")
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"{owner} needs a sequence of parameters, got {type(params).__name__}") from None
    if not params:
        raise ValueError(f"{owner} needs at least one parameter")
    seen: dict[int, int] = {}
    for i, p in enumerate(params):
        label = f"parameter {names[i]!r}" if names is not None else f"parameter {i}"
        check_trainable(p, label, "it would never receive a gradient")
        if not p.is_leaf:
            raise ValueError(f"{label} is not a leaf tensor: autograd gives it no .grad; pass "
                             "the parameters themselves")
        if id(p) in seen:
            first = names[seen[id(p)]] if names is not None else seen[id(p)]
            raise ValueError(f"{label} is the same tensor as parameter {first!r}: each parameter "
                             "may appear only once")
        seen[id(p)] = i
        if p.is_meta:
            raise ValueError(f"{label} is on the meta device (not materialised): load or initialise the "
                             "model's weights (e.g. model.to_empty(device=...) then load them) before balancing")
        if p.device != params[0].device:
            raise ValueError(f"{label} is on {p.device} but the first parameter is on "
                             f"{params[0].device}: all parameters must be on one device")
    return params


class GradBank:
    """Flat storage for K objectives' gradients of a fixed list of parameters.

    ``bank.grads[k][p]`` is a view (shape of parameter p) into ``bank.buffer[k]``, at
    ``offsets[p]`` (16-byte aligned; ``offsets[-1]`` is the row length N, ``numels[p]`` the
    parameter's size); pass ``bank.grads`` as the ``grads`` argument of ``fb.gram`` /
    ``fb.combine`` / ... . The padding between parameters must stay zero: a code writing the
    buffer directly (not through ``grads``) calls ``zero_padding_()`` afterwards.
    """

    def __init__(self, params: Sequence[torch.Tensor], num_objectives: int, *,
                 mode: str = "backward", dtype: torch.dtype | None = None):
        params = check_params(params, "GradBank")
        if isinstance(num_objectives, bool) or not isinstance(num_objectives, int):
            raise TypeError(f"num_objectives must be an int, got {type(num_objectives).__name__}")
        if num_objectives < 1:
            raise ValueError(f"num_objectives must be >= 1, got {num_objectives}")
        if mode not in FILL_MODES:
            raise ValueError(f"unknown fill mode {mode!r}; choose one of {FILL_MODES}")
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        dtypes = {p.dtype for p in params}
        if dtype is None:
            if len(dtypes) != 1:
                raise TypeError(f"parameters have several dtypes {sorted(map(str, dtypes))}; pass dtype= (the "
                                "bank's, e.g. torch.float32: their gradients are cast into it)")
            dtype = params[0].dtype
        self.params = params
        # FSDP2 (fully_shard) parameters are DTensors: the bank holds each one's local shard
        self.tensors = [local_shard(p) for p in params]
        self.sharded = any(t is not p for t, p in zip(self.tensors, params))
        self.num_objectives = num_objectives
        self.mode = mode
        self.dtype = dtype
        self.numels = [t.numel() for t in self.tensors]
        self.offsets = row_offsets(self.numels, dtype.itemsize)
        # the padding's columns (None: none), zeroed by zero_padding_
        pads = [torch.arange(a + n, b) for a, n, b in zip(self.offsets, self.numels, self.offsets[1:]) if a + n < b]
        self._pad_columns = torch.cat(pads).to(params[0].device) if pads else None
        self._slots = None  # the .grad bookkeeping of the backward fill (_grad_slots)
        self._buffer = torch.zeros(num_objectives, self.offsets[-1], dtype=dtype, device=params[0].device)
        self._make_views()
        # Per parameter: did an objective reach it in the current window (since the last fill
        # without accumulate)? A 0-element tensor has nothing to reach or write: it counts as
        # reached (it never turns the all-reached fast path off).
        self.reached = [n == 0 for n in self.numels]
        self.reached_version = 0  # counts changes of ``reached`` (to cache what depends on it)
        self.last_fill_reached_any = False  # did the last fill reach any of the parameters?
        # Checked once; a parameter converted later is refused by the slots at the next fill.
        self._params_have_bank_dtype = all(p.dtype == dtype for p in params)

    def _make_views(self) -> None:
        self.grads: list[list[torch.Tensor]] = [
            [self._buffer[k, a:a + n].view(t.shape) for a, n, t in zip(self.offsets, self.numels, self.tensors)]
            for k in range(self.num_objectives)]
        self._slots = None  # they hold the old views

    @property
    def buffer(self) -> torch.Tensor:
        """The ``[K, N]`` storage; ``grads`` are views of it."""
        return self._buffer

    @buffer.setter
    def buffer(self, value: torch.Tensor) -> None:
        """Replace the storage (e.g. a copy, or one moved to another device): ``grads`` and the
        backward fill's slots follow it, so nothing reads or writes the old one. Its padding is
        zeroed (in place)."""
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"a GradBank buffer must be a tensor, got {type(value).__name__}")
        old = self._buffer
        if value.shape != old.shape or value.dtype != old.dtype or value.stride(1) != 1:
            raise ValueError(f"a GradBank buffer must be {tuple(old.shape)} {old.dtype} with contiguous rows, "
                             f"got {tuple(value.shape)} {value.dtype}")
        if value.device != self.params[0].device:
            raise ValueError(f"a GradBank buffer must live with the parameters on {self.params[0].device}, "
                             f"got {value.device}")
        self._buffer = value
        self.zero_padding_()
        self._make_views()

    @property
    def num_params(self) -> int:
        return len(self.params)

    @property
    def numel(self) -> int:
        """Elements in a row: the parameters' and their padding."""
        return self.offsets[-1]

    def zero_(self) -> "GradBank":
        self.buffer.zero_()
        return self

    def zero_padding_(self) -> "GradBank":
        """Zero the padding between the parameters (after writing the buffer directly)."""
        if self._pad_columns is not None:
            with torch.no_grad():
                self._buffer.index_fill_(1, self._pad_columns, 0)
        return self

    def fill(self, losses: Sequence[torch.Tensor], *, mode: str | None = None,
             retain_graph: bool = False, accumulate: bool = False) -> "GradBank":
        """Overwrite the bank with d loss_k / d params for every objective k (``accumulate``:
        add to what the bank holds, e.g. over the micro-batches of one optimizer step).

        A parameter an objective does not reach gets zeros; an objective that reaches no
        parameter at all (a constant loss) gets a zero row. ``reached[i]`` tells whether any
        objective reached parameter i in this window (the fills since the last one without
        ``accumulate``); ``last_fill_reached_any`` is False when this fill's losses reached
        none of the parameters. ``retain_graph`` keeps the
        graph alive after the call (it is always kept between the objectives).
        """
        losses = self.check_losses(losses)
        mode = mode or self.mode
        if mode not in FILL_MODES:
            raise ValueError(f"unknown fill mode {mode!r}; choose one of {FILL_MODES}")
        slots = self._grad_slots(window_start=not accumulate)
        if not accumulate:
            self.buffer.zero_()
            slots.begin_window()
        if self.sharded or (mode == "backward" and not self._params_have_bank_dtype):
            # FSDP2's reduce-scattered shards (a DTensor .grad), or a .grad of another dtype
            self.last_fill_reached_any = self._fill_by_copy(slots, losses, retain_graph)
        elif mode == "backward":
            self.last_fill_reached_any = self._fill_backward(slots, losses, retain_graph)
        else:
            self.last_fill_reached_any = self._fill_batched(slots, losses, retain_graph)
        flags = slots.reached_if_changed()  # None, at no per-tensor cost, while the reach repeats
        if flags is not None and list(flags) != self.reached:
            self.reached = list(flags)
            self.reached_version += 1
        return self

    def flag_nonfinite(self, losses: Sequence[torch.Tensor] | torch.Tensor) -> None:
        """Turn one element of objective k's row into NaN when loss k is NaN/Inf (decided on the
        device, no host read), so the Gram reports ``found_inf`` and nothing is stepped, exactly
        as for a non-finite gradient. A loss can be infinite while its gradient is finite (a
        cross-entropy whose target logit was masked to the dtype's minimum). The flag travels
        with the gradients: averaged or all-reduced across ranks, it makes every rank skip.
        ``losses``: the K losses, or their values stacked in a [K] tensor."""
        if self.numel == 0:
            return
        values = losses if isinstance(losses, torch.Tensor) else \
            torch.stack([loss.detach().reshape(()) for loss in losses])
        poison = values.detach() - values.detach()  # 0 where finite, NaN where NaN or +-Inf
        self.buffer[:, 0].add_(poison.to(self.buffer.dtype))

    def check_losses(self, losses, names: Sequence[str] | None = None) -> list[torch.Tensor]:
        """The K losses as a list, checked (before anything is written): floating scalar
        tensors on the parameters' device. ``names`` label them in errors."""
        if isinstance(losses, torch.Tensor) or isinstance(losses, (str, bytes)):
            raise TypeError(f"losses must be a sequence of {self.num_objectives} scalar tensors, "
                            f"got {type(losses).__name__}")
        try:
            losses = list(losses)
        except TypeError:
            raise TypeError(f"losses must be a sequence of scalar tensors, got {type(losses).__name__}") from None
        if len(losses) != self.num_objectives:
            raise ValueError(f"expected {self.num_objectives} losses, got {len(losses)}")
        device = self.buffer.device
        for k, loss in enumerate(losses):
            label = f"loss {names[k]!r}" if names is not None else f"loss {k}"
            if not isinstance(loss, torch.Tensor):
                raise TypeError(f"{label} is a {type(loss).__name__}, not a tensor")
            if loss.numel() != 1:
                raise ValueError(f"{label} has shape {tuple(loss.shape)}: it must be a scalar "
                                 "(reduce it first, e.g. with .mean())")
            if not loss.dtype.is_floating_point:
                raise TypeError(f"{label} has dtype {loss.dtype}; a loss must be floating point")
            if loss.device != device:
                raise ValueError(f"{label} is on {loss.device} but the parameters are on {device}")
        return losses

    def _fill_backward(self, slots, losses, retain_graph) -> bool:
        # Every .grad points at its slot and autograd adds into it in place; the slots' version
        # counters tell which tensors a pass reached, and the check that follows each backward
        # finds a .grad a hook or a sparse gradient replaced (its value already includes the
        # slot's: copied back). One C++ call per objective when the extension is loaded
        # (fused_balance._grad_slots).
        live = [k for k, loss in enumerate(losses) if loss.requires_grad]
        reached = False
        slots.save()
        try:
            for j, k in enumerate(live):
                slots.point(k)
                losses[k].reshape(()).backward(retain_graph=retain_graph or j < len(live) - 1)
                for i in slots.collect(k):
                    self.grads[k][i].copy_(self.params[i].grad)
                reached = reached or slots.last_reached() > 0
        finally:
            slots.restore()
        return reached

    def _fill_by_copy(self, slots, losses, retain_graph) -> bool:
        """One backward per objective with every ``.grad`` None, then each gradient is added into
        the bank (one foreach add per objective, cast to the bank's dtype): what autograd cannot
        accumulate into a bank view, i.e. FSDP2's reduce-scattered DTensor ``.grad`` (its local
        shard) and the gradient of a parameter whose dtype is not the bank's. The user's
        ``.grad`` come back afterwards. O(P) Python per objective."""
        live = [k for k, loss in enumerate(losses) if loss.requires_grad]
        saved = [p.grad for p in self.params]
        hit = set()
        try:
            for j, k in enumerate(live):
                for p in self.params:
                    p.grad = None
                losses[k].reshape(()).backward(retain_graph=retain_graph or j < len(live) - 1)
                arrived = [(i, local_shard(p.grad)) for i, p in enumerate(self.params) if p.grad is not None]
                if arrived:
                    with torch.no_grad():
                        torch._foreach_add_([self.grads[k][i] for i, _ in arrived], [g for _, g in arrived])
                hit.update(i for i, _ in arrived)
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g
        slots.mark(sorted(hit))
        return bool(hit)

    def _grad_slots(self, window_start: bool):
        """The backward fill's .grad bookkeeping, which also tracks the window's reach. Built on
        first use and replaced by the native one once the extension is loaded, at a window's
        start; one built within a window (after a buffer swap) carries the window's reach on."""
        upgrade = self._slots is not None and not is_native(self._slots) and _extension.loaded() is not None
        if self._slots is None or (upgrade and window_start):
            self._slots = grad_slots(self.params, self.grads)
            if not window_start:
                self._slots.mark([i for i, hit in enumerate(self.reached) if hit])
        return self._slots

    def _fill_batched(self, slots, losses, retain_graph) -> bool:
        live = [k for k, loss in enumerate(losses) if loss.requires_grad]
        if not live:
            return False
        wanted = [i for i, p in enumerate(self.params) if p.requires_grad]
        stacked = torch.stack([losses[k].reshape(()) for k in live])
        eye = torch.eye(len(live), dtype=stacked.dtype, device=stacked.device)
        grads = torch.autograd.grad(stacked, [self.params[i] for i in wanted], grad_outputs=eye,
                                    is_grads_batched=True, allow_unused=True,
                                    retain_graph=retain_graph)
        hit = [i for i, g in zip(wanted, grads) if g is not None]
        with torch.no_grad():
            for i, g in zip(wanted, grads):
                if g is not None:
                    for row, k in enumerate(live):
                        self.grads[k][i].add_(g[row])
        slots.mark(hit)
        return bool(hit)

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.clone()}

    def load_state_dict(self, state: dict) -> None:
        """Load a saved buffer: this layout's, or the parameters packed end to end (the layout
        of banks saved before the 16-byte padding), copied parameter by parameter."""
        buffer = state.get("buffer") if isinstance(state, dict) else None
        if not isinstance(buffer, torch.Tensor):
            raise TypeError("a GradBank state must be a dict with a 'buffer' tensor")
        packed = row_offsets(self.numels)
        if buffer.dtype != self.buffer.dtype or buffer.dim() != 2 or buffer.shape[0] != self.num_objectives \
                or buffer.shape[1] not in (self.numel, packed[-1]):
            raise ValueError(f"saved buffer {tuple(buffer.shape)} {buffer.dtype} does not match this "
                             f"bank's {tuple(self.buffer.shape)} {self.buffer.dtype}")
        with torch.no_grad():
            if buffer.shape[1] == self.numel:
                self.buffer.copy_(buffer)
                self.zero_padding_()
            else:
                self.buffer.zero_()
                for a, n, old in zip(self.offsets, self.numels, packed):
                    self.buffer[:, a:a + n].copy_(buffer[:, old:old + n])
