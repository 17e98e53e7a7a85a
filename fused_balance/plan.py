"""BalancePlan: a balanced step whose per-call host work does not grow with the tensor count.

The one engine of the training layer (ParetoLoRA, BalancedTrainer, BalancedAdamW under
ParetoLoRA), on every backend: its passes are the backend's three bank ops (``bank_gram``,
``bank_combine_into``, ``bank_adamw_``; the contract is in ``fused_balance.backends``), the
backend resolved once at construction (``backend=``: None / "auto", "cpp", "torch", "triton").

The list API (``fb.gram``, ``fb.pareto_combine``, ...) takes K x P tensors per call and checks
them every time. A plan is built ONCE from the ``[K, N]`` gradient bank (a GradBank's buffer:
row k holds objective k's gradients of all P parameters, each starting on a 16-byte boundary, see
``row_offsets``) and the segments; it
validates once and keeps a chunk table on the device (rows of (start, length, segment, param,
offset in the param, group): the kernels address a chunk by its offset into the bank, the same
for every objective, so no pointer table is passed or rebuilt). Per call:

- ``gram()``: one op -> the float64 ``[S, K, K]`` Gram and ``found_inf``, both on the device.
  Every product of two fp32/bf16/fp16 values is exact in float64 and the sums cannot overflow,
  so the Gram of 1e-30 .. 1e20 gradients is right to float64 rounding and ``found_inf`` (decided
  on the device, no host read) is raised only by a real NaN/Inf. (fp64 gradients: accumulated in
  fp64, so an overflow beyond ~1e154 reads as non-finite.)
- ``weights()``: Gram -> ``fb.policy_weights`` (float64, on the device).
- ``combine_into(out)`` / ``combine_into_grads()``: one op writing sum_k w[seg, k] g_k into a
  flat buffer laid out like a bank row (the parameters' ``.grad`` are views of it); weights are
  rounded once to the math type (beyond fp32's range they saturate, as in the list API).
- ``adamw_step(...)``: one op, AdamW on the combination (flat moments, a parameter pointer
  table built once, per-step values read from device memory: the per-parameter step counts,
  the live mask and the ``[G, 5]`` (lr, weight_decay, beta1, beta2, eps) table).

Nothing here reads the device, so a planned step can be captured in a CUDA graph and compiled
with ``torch.compile(fullgraph=True)``. Storage changes are noticed on every call: the bank's
address, shape, dtype and device, and every parameter's address, dtype, device and size and every
``.grad`` view (object and address), compared in one C++ loop (``TensorStamp``: about a
microsecond at 448 tensors; a Python loop when the extension is not loaded, e.g. torch backend
only). A moved bank is re-addressed (the table holds offsets only; a new
device gets the table copied once), a changed shape raises; a moved parameter (``p.data = ...``,
``module.to()``, ``load_state_dict(assign=True)``) gets its address rewritten into the pointer
table in place; a dtype change raises before anything is written; a ``.grad`` that is no longer
its view (``zero_grad``, or ``Module._apply`` swapping ``grad.data``) is re-attached.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from fused_balance import _extension
from fused_balance._dtypes import SUPPORTED_DTYPES
from fused_balance._grad_slots import tensor_stamp
from fused_balance.backends import resolve_backend
from fused_balance.policies import check_policy_args, gram_statistics, resolve_policy, solve
from fused_balance.solvers import rounding_of

__all__ = ["BalancePlan", "PlanResult", "PLAN_CHUNK_ELEMS", "BANK_ALIGN_BYTES", "row_offsets"]

# multi_tensor.h: kChunkElems (a chunk never spans two parameters; partial sums per chunk are
# reduced in table order, so results do not depend on the thread or SM count).
PLAN_CHUNK_ELEMS = 1 << 15
_COLUMNS = 6  # multi_tensor.h: PlanColumn
_GROUP_COLUMN = 5  # multi_tensor.h: kColGroup
# The kernels' 128-bit accesses (cuda_launch.cuh: Pack16) need every stream 16-byte aligned at a
# chunk's start and a row stride of whole 16-byte packs; a GradBank lays its rows out so.
BANK_ALIGN_BYTES = 16


def row_offsets(numels, itemsize: int | None = None) -> list[int]:
    """The P + 1 offsets of parameters laid in a bank row: parameter i occupies
    ``[offsets[i], offsets[i] + numels[i])`` and its slot runs to ``offsets[i + 1]``, the rest of
    the slot being zero padding; ``offsets[-1]`` is the row length. ``itemsize`` (bytes of the
    dtype): every slot is rounded up to BANK_ALIGN_BYTES (so every parameter and the row stride
    are 16-byte aligned); None: packed end to end (no padding)."""
    align = 1 if itemsize is None else max(1, BANK_ALIGN_BYTES // int(itemsize))
    offsets = [0]
    for n in numels:
        offsets.append(offsets[-1] + -(-int(n) // align) * align)
    return offsets


def _host_to(host: torch.Tensor, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """A host-built table on ``device``: written into ``out`` in place when it has the same shape
    and device (a captured CUDA graph keeps reading ``out``), else a new tensor; to a GPU from
    pinned memory without blocking (no host synchronisation)."""
    device = torch.device(device)
    if device.type == "cuda":
        host = host.pin_memory()
    if out is not None and out.shape == host.shape and out.device == device:
        return out.copy_(host, non_blocking=True)
    return host.to(device, non_blocking=True)


@dataclass
class PlanResult:
    """One planned balancing pass; every field is a tensor on the bank's device."""

    gram: torch.Tensor       # [S, K, K] float64
    weights: torch.Tensor    # [S, K] float64 (the kernels round them once to the math type)
    branch: torch.Tensor     # [S] long
    found_inf: torch.Tensor  # 0-dim bool: a gradient held NaN/Inf (nothing was written)

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(norms [S, K], cosines [S, K, K]) from the Gram (a few small ops, no sync)."""
        return gram_statistics(self.gram)


def _segment_list(segments, P: int) -> tuple[list[int], int]:
    from fused_balance._validate import check_segments
    return check_segments(segments, P)


class BalancePlan:
    """A reusable balanced step over a ``[K, N]`` gradient bank (see the module docstring).

    bank: a GradBank (``.buffer`` [K, N], ``.numels``, ``.offsets``, ``.params``) or a ``[K, N]``
    tensor with ``numels`` (P ints, the parameters' sizes) and optionally ``offsets`` (P + 1 ints,
    see ``row_offsets``: parameter i at ``offsets[i]``, its slot up to ``offsets[i + 1]``; the
    padding of a slot must hold zeros, as a GradBank's does: the Gram reads it and the combination
    writes zeros there; default: packed end to end). The plan's flat buffers (``.grad``, AdamW
    moments) follow the same offsets. ``params``: the P
    parameters (needed by ``combine_into_grads`` and ``adamw_step``; a GradBank brings its own).
    segments: None, "tensor" or P segment ids. groups: P hyper-parameter group ids (AdamW).
    policy, tau, rescale, magnitude: the policy and its options (see ``fb.policy_weights``).
    backend: whose bank ops run the passes (None: the default of ``fb.use_backend``; "auto": the
    fastest with bank ops on the bank's device), resolved once (``self.backend``: the module).
    """

    def __init__(self, bank, segments=None, *, numels=None, offsets=None, params=None, policy: str = "pareto_lora",
                 tau: float = 5.0, rescale: str | float | None = None, groups=None, backend: str | None = None,
                 magnitude=None):
        if isinstance(bank, torch.Tensor):
            if numels is None:
                raise TypeError("a bank tensor needs numels= (the P parameter sizes of a row)")
            self._source = None
            buffer = bank
        else:
            buffer = getattr(bank, "buffer", None)
            if not isinstance(buffer, torch.Tensor):
                raise TypeError(f"bank must be a GradBank or a [K, N] tensor, got {type(bank).__name__}")
            self._source = bank
            numels = bank.numels if numels is None else numels
            offsets = getattr(bank, "offsets", None) if offsets is None else offsets
            params = bank.params if params is None else params
        if buffer.dim() != 2 or buffer.shape[0] < 1:
            raise ValueError(f"the bank must be [K, N] with K >= 1, got shape {tuple(buffer.shape)}")
        if buffer.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"the bank has dtype {buffer.dtype}; supported: {SUPPORTED_DTYPES}")
        if buffer.stride(1) != 1:
            raise ValueError("the bank's rows must be contiguous")
        numels = [int(n) for n in numels]
        if not numels or any(n < 0 for n in numels):
            raise ValueError("numels must list at least one non-negative parameter size")
        self.offsets = self._check_offsets(numels, offsets, buffer.shape[1])
        self.numels = numels
        self.num_objectives = int(buffer.shape[0])
        P = len(numels)
        self.segment_ids, self.num_segments = _segment_list(segments, P)
        self.rescale = check_policy_args(policy, tau, rescale, magnitude)
        self.policy, self.tau, self.magnitude = policy, float(tau), magnitude
        # resolved once: weights() solves with it and validates nothing per call
        self._policy_fn = resolve_policy(policy, tau=self.tau, rescale=self.rescale, magnitude=magnitude,
                                         rounding=rounding_of(torch.float64))
        if params is not None:
            params = list(params)
            if len(params) != P:
                raise ValueError(f"{len(params)} parameters for {P} sizes")
            for i, (p, n) in enumerate(zip(params, numels)):
                if not isinstance(p, torch.Tensor) or p.numel() != n:
                    raise ValueError(f"parameter {i} does not have the {n} elements of its bank range")
        self.params = params
        self.groups = self._check_groups(groups, P)
        self.backend = resolve_backend(backend, buffer.device, bank_ops=True)
        if self.backend.name == "cpp":  # its ops live in the extension: built now (first use), and
            _extension.load()  # the storage checks below then run in C++
        self._buffer = buffer
        self._build_table(buffer.device)
        self._stamp = self._buffer_stamp(buffer)
        self._grad_flat: torch.Tensor | None = None
        self._grad_views: list | None = None
        self._scratch_flat: torch.Tensor | None = None  # combine_into_grads(accumulate=True)
        self._param_ptrs: torch.Tensor | None = None
        # [P] bool on the device: which parameters adamw_step updates (set_live rewrites it in place)
        self._live = torch.ones(P, dtype=torch.bool, device=buffer.device) if params is not None else None
        self._live_list = [True] * P  # the same on the host
        self._watch = tensor_stamp(params) if params is not None else None

    # -- construction -----------------------------------------------------------------------
    @staticmethod
    def _check_offsets(numels: list, offsets, row: int) -> list[int]:
        """P + 1 offsets (None: packed), each parameter inside its slot, the slots in order and in
        the row."""
        if offsets is None:
            offsets = row_offsets(numels)
        else:
            offsets = list(offsets)
            if len(offsets) != len(numels) + 1 or any(isinstance(o, bool) or not isinstance(o, numbers.Integral)
                                                      for o in offsets):
                raise ValueError(f"offsets must be {len(numels) + 1} ints (P + 1), got {offsets!r}")
            offsets = [int(o) for o in offsets]
            if offsets[0] < 0 or any(a + n > b for a, n, b in zip(offsets, numels, offsets[1:])):
                raise ValueError("offsets must start at >= 0 and give each parameter its numels elements "
                                 "before the next one's offset")
        if offsets[-1] > row:
            raise ValueError(f"the parameters need {offsets[-1]} elements per row, the bank has {row}")
        return offsets

    @staticmethod
    def _check_groups(groups, P: int) -> list[int]:
        if groups is None:
            return [0] * P
        groups = list(groups)
        if len(groups) != P or any(isinstance(g, bool) or not isinstance(g, numbers.Integral) or g < 0
                                   for g in groups):
            raise ValueError(f"groups must be {P} non-negative ints (one per parameter)")
        return [int(g) for g in groups]

    def _build_table(self, device) -> None:
        """Two tables, built on the host once and copied to the device once, segment by segment
        (so a segment's partial sums are reduced in table order):

        - ranges (Gram, combine): each run of parameters of one segment whose slots (parameter and
          zero padding) lie end to end in the bank, cut into chunks of at most PLAN_CHUNK_ELEMS; a
          chunk may span many small parameters, so the work per call grows with the segments and
          the elements, not P. With a GradBank's offsets every chunk starts 16-byte aligned.
        - chunks (AdamW): per parameter, with the parameter's index, offset and group.
        """
        by_segment: list[list[int]] = [[] for _ in range(self.num_segments)]
        for p, s in enumerate(self.segment_ids):
            by_segment[s].append(p)
        ranges, range_offsets, chunks = [], [0], []
        for s, members in enumerate(by_segment):
            run_start = run_end = None
            for p in members + [None]:
                if p is not None and self.numels[p] == 0:
                    continue
                if p is not None and run_end == self.offsets[p]:  # the slots touch: one run
                    run_end = self.offsets[p + 1]
                    continue
                if run_start is not None:
                    for start in range(run_start, run_end, PLAN_CHUNK_ELEMS):
                        ranges.append((start, min(PLAN_CHUNK_ELEMS, run_end - start), s, 0, 0, 0))
                if p is not None:
                    run_start, run_end = self.offsets[p], self.offsets[p + 1]
            range_offsets.append(len(ranges))
            for p in members:
                n, base = self.numels[p], self.offsets[p]
                for start in range(0, n, PLAN_CHUNK_ELEMS):
                    chunks.append((base + start, min(PLAN_CHUNK_ELEMS, n - start), s, p, start, self.groups[p]))
        self.num_groups = max(self.groups) + 1
        self._tables_stream = None  # new tables: not yet marked as read by any stream
        self._ranges = torch.tensor(ranges, dtype=torch.long).reshape(-1, _COLUMNS).to(device)
        self._seg_offsets = torch.tensor(range_offsets, dtype=torch.long).to(device)
        self._chunks = torch.tensor(chunks, dtype=torch.long).reshape(-1, _COLUMNS).to(device)
        self._chunk_params = [c[3] for c in chunks]  # host copy of the param column (set_groups)

    def set_groups(self, groups) -> None:
        """Hyper-parameter group of every parameter (AdamW). Only the AdamW table's group column
        changes: it is rewritten in place (from pinned memory on a GPU, without blocking), so a
        captured step reads the new groups. Refused while a CUDA graph is being captured."""
        groups = self._check_groups(groups, len(self.numels))
        if groups == self.groups:
            return
        device = self._buffer.device
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("BalancePlan.set_groups during CUDA graph capture: set the groups (or take "
                               "one eager step) before capturing")
        self.groups = groups
        self.num_groups = max(groups) + 1
        column = torch.tensor([groups[p] for p in self._chunk_params], dtype=torch.long)
        _host_to(column, device, out=self._chunks[:, _GROUP_COLUMN])

    @staticmethod
    def _buffer_stamp(buffer: torch.Tensor) -> tuple:
        return (buffer.data_ptr(), tuple(buffer.shape), buffer.stride(0), buffer.dtype, buffer.device)

    # -- storage checks (O(1) per call) -----------------------------------------------------
    @property
    def buffer(self) -> torch.Tensor:
        """The bank, re-read from the GradBank (which may have reallocated it) and checked."""
        buffer = self._source.buffer if self._source is not None else self._buffer
        if torch.compiler.is_compiling():  # traced once; the guards of the compiled graph hold
            return buffer
        if buffer is not self._buffer or buffer.data_ptr() != self._stamp[0]:
            self._rebind(buffer)
        return buffer

    def _rebind(self, buffer: torch.Tensor) -> None:
        old = self._stamp
        new = self._buffer_stamp(buffer)
        if new[1] != old[1] or new[3] != old[3]:
            raise RuntimeError(f"the gradient bank changed shape or dtype (from {old[1]} {old[3]} to "
                               f"{new[1]} {new[3]}): build a new BalancePlan")
        if buffer.stride(1) != 1:
            raise RuntimeError("the gradient bank's rows are no longer contiguous: build a new BalancePlan")
        if new[4] != old[4]:  # moved to another device: the table follows (once)
            self._chunks = self._chunks.to(new[4])
            self._ranges = self._ranges.to(new[4])
            self._seg_offsets = self._seg_offsets.to(new[4])
            self._tables_stream = None
            self._grad_flat = self._grad_views = None
            self._param_ptrs = None
            self._live = None if self._live is None else self._live.to(new[4])
        self._buffer, self._stamp = buffer, new

    def _buffer_for_op(self) -> torch.Tensor:
        """The checked bank for an op; on a GPU the device tables are first marked as read by
        the current stream (once per stream), so a table replaced later (a move to another
        device) is not handed to another allocation while a kernel on that stream may read it."""
        buffer = self.buffer
        if not buffer.is_cuda or torch.compiler.is_compiling():
            return buffer
        stream = torch.cuda.current_stream(buffer.device)
        if stream != self._tables_stream:
            for table in (self._ranges, self._seg_offsets, self._chunks, self._param_ptrs, self._live):
                if table is not None:
                    table.record_stream(stream)
            self._tables_stream = stream
        return buffer

    def check_all(self) -> None:
        """Re-read every parameter's address into the pointer table and re-attach every
        ``.grad`` view now (every call does the same when something changed)."""
        self.buffer  # noqa: B018 (the property checks)
        if self._param_ptrs is not None:
            self.param_pointers(refresh=True)
        if self._grad_views is not None:
            self.attach_grads()

    # -- the passes --------------------------------------------------------------------------
    def gram(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(G [S, K, K] float64, found_inf 0-dim bool), one op, no host read."""
        return self.backend.bank_gram(self._buffer_for_op(), self._ranges, self._seg_offsets, self.num_segments)

    def weights(self, gram: tuple[torch.Tensor, torch.Tensor] | None = None) -> PlanResult:
        """Gram -> the policy's weights, all on the device. ``gram``: the (G, found_inf) to solve
        instead of this plan's own, e.g. the sum of every rank's ``gram()`` partials when each
        rank holds shards of the gradients (``fused_balance.distributed.all_reduce_gram_``)."""
        G, found_inf = self.gram() if gram is None else gram
        w, branch = solve(G, self._policy_fn, self.policy)
        return PlanResult(G, w, branch, found_inf)

    def combine_into(self, out: torch.Tensor, weights: torch.Tensor, skip: torch.Tensor | None = None) -> None:
        """out[start:end] = sum_k weights[seg, k] * bank[k, start:end] for every chunk; ``out``
        is a flat buffer laid out like a bank row. Nothing is written when ``skip`` holds True."""
        self._check_weights(weights)
        self.backend.bank_combine_into(self._buffer_for_op(), weights, self._ranges, out, skip)

    def _check_weights(self, weights: torch.Tensor) -> None:
        """The kernels index weights[segment] and hyper[group] from the table: O(1) shape checks
        here, for every device (the CPU op also checks each chunk; the CUDA kernels assert)."""
        if torch.compiler.is_compiling():
            return
        if not isinstance(weights, torch.Tensor) or tuple(weights.shape) != (self.num_segments, self.num_objectives):
            raise ValueError(f"weights must be [{self.num_segments}, {self.num_objectives}] (segments x objectives) "
                             f"for this plan, got {tuple(getattr(weights, 'shape', ()))}")

    # -- .grad as views of one flat buffer ---------------------------------------------------
    def attach_grads(self) -> torch.Tensor:
        """Point every parameter's ``.grad`` at its view of one flat buffer (laid out like a
        bank row), allocated once; returns the buffer."""
        if self.params is None:
            raise RuntimeError("this plan was built without params: combine_into_grads needs them")
        buffer = self.buffer
        # the per-parameter check only on the first call and after the stamp saw a parameter change
        # (address, dtype, device or size: one C++ loop), so a step stays O(1) in Python
        if self._grad_flat is None or torch.compiler.is_compiling() or self._watch.changed():
            for p in self.params:
                if p.dtype != buffer.dtype or p.device != buffer.device:
                    raise TypeError(f"combine_into_grads needs the parameters in the bank's dtype and device "
                                    f"({buffer.dtype}, {buffer.device}), got {p.dtype} on {p.device}")
        if self._grad_flat is None:
            self._grad_flat = torch.zeros(self.offsets[-1], dtype=buffer.dtype, device=buffer.device)
            self._grad_views = self.views(self._grad_flat)
            self._watch.expect_grads(self._grad_views)
        moved = self._watch.attach_grads()  # one C++ loop
        if moved:  # Module._apply swapped the data of these view objects: new views of the buffer
            fresh = self.views(self._grad_flat)
            for i in moved:
                self._grad_views[i] = fresh[i]
            self._watch.expect_grads(self._grad_views)
            self._watch.attach_grads()
        return self._grad_flat

    def set_live(self, live, *, keep_dead_grads: bool = False) -> None:
        """Which parameters take a ``.grad`` view and are updated by ``adamw_step`` (P bools;
        None: all). The others keep their values, moments and step counts, and their ``.grad`` is
        left as it is, e.g. None for tensors no objective reached, which an optimizer then skips,
        except that one still holding this plan's view gets None (the view would hold a zero
        combination an optimizer would step), or, with ``keep_dead_grads``, a copy of what it
        holds (its gradient kept, like after a backward that did not reach it). Their
        combination is still written into the flat buffer (zeros), unread."""
        live = [] if live is None else [bool(x) for x in live]
        if live and len(live) != len(self.numels):
            raise ValueError(f"live must hold {len(self.numels)} flags, got {len(live)}")
        if self.params is None:
            raise RuntimeError("this plan was built without params: set_live needs them")
        if self._grad_views is not None and live:
            for p, view, alive in zip(self.params, self._grad_views, live):
                if not alive and p.grad is view:
                    p.grad = view.clone() if keep_dead_grads else None
        self._watch.set_live([] if all(live) else live)
        self._live_list = live or [True] * len(self.numels)
        live = _host_to(torch.tensor(self._live_list, dtype=torch.bool), self._buffer.device, out=self._live)
        if live is not self._live:  # a new table: not yet marked as read by any stream
            self._live, self._tables_stream = live, None

    @property
    def live(self) -> list:
        """The P live flags on the host (``set_live`` replaces the list, never changes it)."""
        return self._live_list

    def grads_attached(self) -> bool:
        """Whether every (live) parameter's ``.grad`` is its view of the flat buffer (object and
        address: one C++ loop)."""
        return self._grad_views is not None and self._watch.grads_are_views()

    def grads_state(self) -> str:
        """The live parameters' ``.grad`` in one C++ loop: ``"views"`` (every one is its view of
        the flat buffer), ``"none"`` (every one is None) or ``"mixed"``."""
        return ("views", "none", "mixed")[self._watch.grads_state()]

    def clear_grads(self) -> None:
        """``.grad = None`` for every live parameter (one C++ loop), e.g. to take back the views
        a skipped step attached."""
        self._watch.clear_grads()

    def combine_into_grads(self, result: PlanResult | None = None, *, accumulate: bool = False) -> PlanResult:
        """Gram -> weights -> the combination written into the live parameters' ``.grad`` (views
        of one flat buffer, attached on first use and whenever a parameter's ``.grad`` is no
        longer its view, e.g. after ``zero_grad(set_to_none=True)``). ``accumulate``: added to
        the ``.grad`` a live parameter already holds, like ``loss.backward()`` (one flat add
        while every ``.grad`` is its view; a user's own ``.grad`` tensor is added to in place;
        a None one gets its view). Nothing is added or written when a gradient holds NaN/Inf
        (``found_inf``), but views attached in place of None are left in place (holding zeros
        when accumulating): take them back with ``clear_grads`` after reading ``found_inf``."""
        if result is None:
            result = self.weights()
        if not accumulate:
            # attach again (and check the parameters) when a view was dropped or a parameter
            # changed behind the plan (``p.data = x.double()`` keeps the old .grad view)
            if torch.compiler.is_compiling() or not self.grads_attached() or self._watch.changed():
                self.attach_grads()
            self.combine_into(self._grad_flat, result.weights, result.found_inf)
            return result
        state = self.grads_state()
        if state == "none":  # nothing to add to: the plain write
            return self.combine_into_grads(result)
        if state == "views":  # one flat add of the combination (zero on found_inf)
            if self._scratch_flat is None or self._scratch_flat.shape != self._grad_flat.shape:
                self._scratch_flat = torch.empty_like(self._grad_flat)
            self._scratch_flat.zero_()
            self.combine_into(self._scratch_flat, result.weights, result.found_inf)
            self._grad_flat.add_(self._scratch_flat)
            return result
        # mixed: the combination into the flat buffer, then each live parameter's own .grad
        held = [p.grad for p in self.params]
        flat = self.attach_grads()
        flat.zero_()
        self.combine_into(flat, result.weights, result.found_inf)
        for p, grad, view, alive in zip(self.params, held, self._grad_views, self._live_list):
            if not alive:
                continue
            if grad is not None and grad is not view:
                p.grad = grad.add_(view)
        return result

    # -- fused AdamW -------------------------------------------------------------------------
    def param_pointers(self, *, refresh: bool = False) -> torch.Tensor:
        """[P] int64 addresses of the parameters on the device, rewritten (in place, so a
        captured CUDA graph reads the new ones) whenever any parameter moved: ``p.data = ...``,
        ``module.to()``, ``load_state_dict(assign=True)``. A parameter that changed dtype,
        device or size raises before anything is written."""
        if self.params is None:
            raise RuntimeError("this plan was built without params: adamw_step needs them")
        if torch.compiler.is_compiling():
            return self._param_ptrs
        if self._param_ptrs is None or refresh or self._watch.changed():
            device, dtype = self._buffer.device, self.params[0].dtype
            for i, (p, n) in enumerate(zip(self.params, self.numels)):
                if p.device != device or p.dtype != dtype or not p.is_contiguous() or p.numel() != n:
                    raise TypeError(f"adamw_step needs contiguous parameters of one dtype on the bank's "
                                    f"device, each of its planned size; parameter {i} is {p.dtype} "
                                    f"{tuple(p.shape)} on {p.device} (the plan has {n} elements)")
            ptrs = _host_to(torch.tensor([p.data_ptr() for p in self.params], dtype=torch.long), device,
                            out=self._param_ptrs)
            if ptrs is not self._param_ptrs:  # a new table: not yet marked as read by any stream
                self._param_ptrs, self._tables_stream = ptrs, None
            self._watch.record()
        return self._param_ptrs

    def adamw_step(self, weights: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                   hyper: torch.Tensor, step: torch.Tensor, skip: torch.Tensor | None = None) -> None:
        """AdamW (torch.optim.AdamW semantics) on the combination, in one op: ``exp_avg`` /
        ``exp_avg_sq`` are flat buffers laid out like a bank row (parameters' dtype), ``hyper``
        a float64 ``[G, 5]`` table (lr, weight_decay, beta1, beta2, eps per group), ``step`` a
        float32 ``[P]`` tensor: each parameter's steps taken so far, incremented by the op where
        it steps. Only the live parameters (``set_live``) are updated: the others keep their
        values, moments and counts, like torch's AdamW skips a parameter whose ``.grad`` is None.
        All read on the device, so a captured step replays with the current values. The
        parameters are written through the pointer table (not visible to torch.compile)."""
        ptrs = self.param_pointers()
        self._check_weights(weights)
        if not torch.compiler.is_compiling() and (hyper.dim() != 2 or hyper.shape[0] < self.num_groups):
            raise ValueError(f"hyper must hold a row for each of the plan's {self.num_groups} parameter group(s), "
                             f"got shape {tuple(hyper.shape)}")
        if not torch.compiler.is_compiling() and self.params[0].dtype != exp_avg.dtype:
            # the kernel writes the parameters as the moments' dtype: refuse, never corrupt
            raise TypeError(f"the parameters are {self.params[0].dtype} but the moments {exp_avg.dtype} "
                            "(parameters converted since the state was made?)")
        self.backend.bank_adamw_(self._buffer_for_op(), weights, self._chunks, ptrs, exp_avg, exp_avg_sq, hyper,
                                 step, skip, self._live, params=self.params)

    def new_adamw_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zeroed flat (exp_avg, exp_avg_sq) in the parameters' dtype and zero ``[P]`` step counts."""
        if self.params is None:
            raise RuntimeError("this plan was built without params")
        device, dtype = self._buffer.device, self.params[0].dtype
        n = self.offsets[-1]
        return (torch.zeros(n, dtype=dtype, device=device), torch.zeros(n, dtype=dtype, device=device),
                torch.zeros(len(self.numels), dtype=torch.float32, device=device))

    @staticmethod
    def hyper_table(rows, device, out: torch.Tensor | None = None) -> torch.Tensor:
        """The ``[G, 5]`` float64 table from (lr, weight_decay, beta1, beta2, eps) rows; written
        into ``out`` in place when it has that shape (a captured step keeps reading ``out``).
        To a GPU it goes from pinned memory without blocking: no host synchronisation."""
        return _host_to(torch.tensor([[float(x) for x in r] for r in rows], dtype=torch.float64), device, out)

    def views(self, flat: torch.Tensor) -> list:
        """Per-parameter views (parameter shapes) of a flat buffer laid out like a bank row."""
        shapes = [p.shape for p in self.params] if self.params is not None else [(n,) for n in self.numels]
        return [flat[a:a + n].view(s) for a, n, s in zip(self.offsets, self.numels, shapes)]
