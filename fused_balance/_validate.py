"""Input checks of the public API: one place, clear errors naming the offending index.

Every public entry validates ALL of its arguments before its first write, so a bad argument
never leaves a half-updated result behind.

The per-tensor checks (gradients, segment ids, written tensors) first go through the C++
screens of the extension when it is loaded (csrc/list_checks.cpp, ~50 ns per tensor): a screen
either vouches that every check below passes or hands over to these Python checks, which raise
the error (or accept an unusual valid input). Nothing is cached: every call checks every tensor.
"""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Sequence

import torch

from fused_balance import _extension
from fused_balance._dtypes import SUPPORTED_DTYPES, accumulate_dtype


@dataclass(frozen=True)
class Problem:
    """Validated gradients: ``flat[k * P + p]`` is objective k's gradient of tensor p."""

    flat: list
    num_objectives: int
    num_tensors: int
    segment_ids: list
    num_segments: int
    requires_grad: bool = True  # some gradient requires grad (a differentiable Gram/combine)

    @property
    def device(self) -> torch.device:
        return self.flat[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.flat[0].dtype

    @property
    def accumulate_dtype(self) -> torch.dtype:
        return accumulate_dtype(self.dtype)

    def grad_name(self, i: int) -> str:
        """The user-facing name of flat[i]."""
        return f"grads[{i // self.num_tensors}][{i % self.num_tensors}]"


def _as_tensor_list(seq, what: str) -> list:
    if isinstance(seq, torch.Tensor):
        raise TypeError(f"{what} must be a sequence of tensors, got a single Tensor; wrap it in a list")
    try:
        items = list(seq)
    except TypeError:
        raise TypeError(f"{what} must be a sequence of tensors, got {type(seq).__name__}") from None
    return items


def _is_dtensor(t: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _check_plain_tensor(t, name: str) -> None:
    """A dense tensor; subclasses (Parameter, ...) are fine, DTensors are not (the kernels need
    the local shard)."""
    if type(t) is not torch.Tensor:  # the common case skips the isinstance checks
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} is {type(t).__name__}, not a Tensor")
        if _is_dtensor(t):
            raise TypeError(f"{name} is a DTensor: pass its local shard (.to_local()) with "
                            "distributed='sharded' and the process group")
    if t.layout != torch.strided:
        raise TypeError(f"{name} has layout {t.layout}; only dense (strided) tensors are supported")


def check_grads(grads) -> tuple[list, int, int, bool]:
    """K sequences of P tensors -> (flat objective-major list, K, P, any requires grad)."""
    native = _extension.loaded()
    if native is not None:
        screened = native.screen_grads(grads)
        if screened is not None:
            return screened
    per_objective = _as_tensor_list(grads, "grads")
    if not per_objective:
        raise ValueError("grads is empty: expected K >= 1 sequences of gradients")
    lists = [_as_tensor_list(g, f"grads[{k}]") for k, g in enumerate(per_objective)]
    P = len(lists[0])
    if P == 0:
        raise ValueError("grads[0] is empty: expected at least one tensor per objective")
    for k, lst in enumerate(lists):
        if len(lst) != P:
            raise ValueError(f"grads[{k}] has {len(lst)} tensors but grads[0] has {P}: every objective "
                             "needs one gradient per tensor")
    first = lists[0][0]
    _check_plain_tensor(first, "grads[0][0]")
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"grads[0][0] has dtype {first.dtype}; supported: {SUPPORTED_DTYPES}")
    strided = torch.strided
    for k, lst in enumerate(lists):
        for p, t in enumerate(lst):
            if type(t) is not torch.Tensor or t.layout is not strided:  # cheap common case
                _check_plain_tensor(t, f"grads[{k}][{p}]")
            if t.device != first.device:
                raise ValueError(f"grads[{k}][{p}] is on {t.device} but grads[0][0] is on {first.device}")
            if t.dtype != first.dtype:
                raise TypeError(f"grads[{k}][{p}] has dtype {t.dtype} but grads[0][0] has {first.dtype}: "
                                "all gradients must share one dtype")
            if t.shape != lists[0][p].shape:
                raise ValueError(f"grads[{k}][{p}] has shape {tuple(t.shape)} but grads[0][{p}] has "
                                 f"{tuple(lists[0][p].shape)}")
    flat = [t for lst in lists for t in lst]
    return flat, len(lists), P, any(t.requires_grad for t in flat)


def check_segments(segments, num_tensors: int) -> tuple[list, int]:
    """None | "global" | "tensor" | P segment ids -> (python list of ids, S)."""
    if segments is None or (isinstance(segments, str) and segments == "global"):
        return [0] * num_tensors, 1
    if isinstance(segments, str):
        if segments == "tensor":
            return list(range(num_tensors)), num_tensors
        raise ValueError(f"segments={segments!r}: use None/'global', 'tensor' or a sequence of P ids")
    if isinstance(segments, torch.Tensor):
        if segments.dtype.is_floating_point or segments.dtype.is_complex or segments.dtype == torch.bool:
            raise TypeError(f"segment ids must be integers, got a {segments.dtype} tensor")
        if segments.dim() != 1:
            raise ValueError(f"segment ids must be 1-D, got shape {tuple(segments.shape)}")
        ids = segments.tolist()
    else:
        try:
            ids = list(segments)
        except TypeError:
            raise TypeError(f"segments must be None, 'global', 'tensor' or a sequence of ints, got "
                            f"{type(segments).__name__}") from None
    native = _extension.loaded()
    if native is not None:
        screened = native.screen_segments(ids, num_tensors)
        if screened is not None:
            return screened
    if len(ids) != num_tensors:
        raise ValueError(f"segments has {len(ids)} ids but there are {num_tensors} tensors")
    for p, s in enumerate(ids):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise TypeError(f"segments[{p}] = {s!r} is not an int")
        if s < 0:
            raise ValueError(f"segments[{p}] = {s} is negative")
    ids = [operator.index(s) for s in ids]
    S = max(ids) + 1
    used = set(ids)
    if len(used) < S:  # the first gap is found within len(used) + 1 steps, however large S is
        missing = next(s for s in range(S) if s not in used)
        raise ValueError(f"segment ids must cover 0..{S - 1} without gaps; segment {missing} has no tensor")
    return ids, S


def check_problem(grads, segments) -> Problem:
    flat, K, P, requires_grad = check_grads(grads)
    ids, S = check_segments(segments, P)
    return Problem(flat, K, P, ids, S, requires_grad)


def check_weights(weights, problem: Problem, name: str = "weights") -> torch.Tensor:
    """[S, K] float weights on the gradients' device -> the accumulate dtype."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor of shape [S, K], got {type(weights).__name__}")
    S, K = problem.num_segments, problem.num_objectives
    if not weights.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {weights.dtype}")
    if weights.device != problem.device:
        raise ValueError(f"{name} is on {weights.device} but the gradients are on {problem.device}")
    if weights.dim() == 1 and S == 1:
        weights = weights.unsqueeze(0)
    if tuple(weights.shape) != (S, K):
        raise ValueError(f"{name} has shape {tuple(weights.shape)}, expected [S={S}, K={K}] "
                         f"(S segments, K objectives)")
    return weights.to(dtype=problem.accumulate_dtype)


def check_written(written: Sequence, problem: Problem) -> list:
    """(name, tensors) pairs of tensors written in place -> their lists, each checked by
    ``check_out`` and all together by ``check_no_overlap`` against each other and the gradients."""
    native = _extension.loaded()
    if native is not None:
        screened = native.screen_written([tensors for _, tensors in written], problem.flat, problem.num_tensors)
        if screened is not None:
            return screened
    checked = [check_out(tensors, problem, name) for name, tensors in written]
    check_no_overlap([(name, tensors, indexed(name)) for (name, _), tensors in zip(written, checked)],
                     [("grads", problem.flat, problem.grad_name)])
    return checked


def check_out(out, problem: Problem, name: str = "out") -> list:
    """P tensors matching the gradients' shapes, dtype and device (checked for aliasing by
    ``check_no_overlap``)."""
    outs = _as_tensor_list(out, name)
    P = problem.num_tensors
    if len(outs) != P:
        raise ValueError(f"{name} has {len(outs)} tensors, expected {P}")
    for p, o in enumerate(outs):
        ref = problem.flat[p]
        _check_plain_tensor(o, f"{name}[{p}]")
        if o.shape != ref.shape:
            raise ValueError(f"{name}[{p}] has shape {tuple(o.shape)}, expected {tuple(ref.shape)}")
        if o.dtype != ref.dtype:
            raise TypeError(f"{name}[{p}] has dtype {o.dtype}, expected {ref.dtype}")
        if o.device != ref.device:
            raise ValueError(f"{name}[{p}] is on {o.device}, expected {ref.device}")
    return outs


def _byte_interval(t: torch.Tensor):
    """[first byte, one past the last byte) that ``t`` can touch, or None when it has none."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    start = t.data_ptr()
    item = t.element_size()
    if t.is_contiguous():
        return start, start + t.numel() * item
    lo = hi = 0
    for size, stride in zip(t.shape, t.stride()):
        if stride >= 0:
            hi += (size - 1) * stride
        else:
            lo += (size - 1) * stride
    return start + lo * item, start + (hi + 1) * item


def check_no_overlap(written: Sequence, read: Sequence = ()) -> None:
    """Raise if a tensor written in place shares memory with any other argument tensor.

    ``written`` / ``read``: (name, tensors, namer) triples, namer(i) naming tensors[i]. Reads may
    overlap each other (the same gradient twice is fine); a write that overlaps anything would
    corrupt the in-place result (or read half-updated data), so it is refused up front.

    Cost: one storage lookup per tensor (~1 us); byte ranges are compared only among tensors
    that share a storage with a written tensor. The test is on byte ranges, so exotic
    interleaved views of one buffer (x[0::2] and x[1::2]) are refused too."""
    by_storage: dict = {}
    for name, tensors, namer in written:
        for i, t in enumerate(tensors):
            by_storage.setdefault((t.device, t.untyped_storage().data_ptr()), []).append((t, True, namer, i))
    shared = {key for key, items in by_storage.items() if len(items) > 1}
    for name, tensors, namer in read:
        for i, t in enumerate(tensors):
            key = (t.device, t.untyped_storage().data_ptr())
            items = by_storage.get(key)
            if items is not None:
                items.append((t, False, namer, i))
                shared.add(key)
    for key in shared:
        _check_ranges(by_storage[key])


def _check_ranges(items) -> None:
    """Sweep the byte ranges of tensors of one storage in address order: an overlap shows as a
    start below the largest end seen so far (kept separately for written tensors)."""
    spans = []
    for t, is_write, namer, i in items:
        interval = _byte_interval(t)
        if interval is not None:
            spans.append((interval[0], interval[1], is_write, namer, i))
    spans.sort(key=lambda s: s[0])
    last_any = last_write = None
    for span in spans:
        start, end, is_write, namer, i = span
        culprit = None
        if last_write is not None and start < last_write[1]:
            culprit = last_write
        elif is_write and last_any is not None and start < last_any[1]:
            culprit = last_any
        if culprit is not None:
            a, b = culprit[3](culprit[4]), namer(i)
            raise ValueError(f"{b} shares memory with {a}: an in-place result must not alias "
                             "another argument (pass distinct tensors)")
        if last_any is None or end > last_any[1]:
            last_any = span
        if is_write and (last_write is None or end > last_write[1]):
            last_write = span


def indexed(name: str):
    return lambda i: f"{name}[{i}]"


def check_real(value, name: str, *, low=None, high=None, low_open=False, high_open=False,
               allow_inf=False) -> float:
    """A real number (not bool, not a string or tensor) inside the given bounds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if math.isnan(value) or (math.isinf(value) and not allow_inf):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value < low or (low_open and value == low)):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and (value > high or (high_open and value == high)):
        raise ValueError(f"{name} must be {'<' if high_open else '<='} {high}, got {value}")
    return value


def per_tensor_floats(value, num_tensors: int, name: str) -> list:
    """One non-negative finite float for all tensors, or one per tensor."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return [check_real(value, name, low=0.0)] * num_tensors
    if isinstance(value, (str, bytes, torch.Tensor)) or not isinstance(value, Sequence):
        raise TypeError(f"{name} must be a float or a sequence of {num_tensors} floats (one per "
                        f"tensor), got {type(value).__name__}")
    if len(value) != num_tensors:
        raise ValueError(f"{name} has {len(value)} values, expected one per tensor ({num_tensors})")
    return [check_real(v, f"{name}[{p}]", low=0.0) for p, v in enumerate(value)]


def check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 1:
        raise ValueError(f"step must be an int >= 1 (bias correction), got {step!r}")
    return int(step)


def check_skip(skip, device: torch.device):
    """None, or a one-element bool tensor on the gradients' device -> shape [1]."""
    if skip is None:
        return None
    if not isinstance(skip, torch.Tensor) or skip.numel() != 1:
        raise TypeError("skip must be None or a one-element bool tensor (e.g. ParetoResult.found_inf)")
    if skip.dtype != torch.bool:
        raise TypeError(f"skip must be a bool tensor, got {skip.dtype}")
    if skip.device != device:
        raise ValueError(f"skip is on {skip.device} but the gradients are on {device}")
    return skip.reshape(1)


def check_gram(G) -> torch.Tensor:
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a Tensor [S, K, K] or [K, K], got {type(G).__name__}")
    if not G.dtype.is_floating_point:
        raise TypeError(f"G must be floating point, got {G.dtype}")
    if G.dim() == 2:
        G = G.unsqueeze(0)
    if G.dim() != 3 or G.shape[1] != G.shape[2] or G.shape[1] == 0:
        raise ValueError(f"G must have shape [S, K, K] with K >= 1, got {tuple(G.shape)}")
    return G


def check_active(active, G: torch.Tensor) -> torch.Tensor | None:
    """None, or a bool mask [S, K] (or [K] for one segment) on G's device."""
    if active is None:
        return None
    S, K = G.shape[0], G.shape[1]
    if not isinstance(active, torch.Tensor):
        raise TypeError(f"active must be a bool Tensor [S, K], got {type(active).__name__}")
    if active.dtype != torch.bool:
        raise TypeError(f"active must be a bool tensor, got {active.dtype}")
    if active.device != G.device:
        raise ValueError(f"active is on {active.device} but G is on {G.device}")
    if active.dim() == 1 and S == 1:
        active = active.unsqueeze(0)
    if tuple(active.shape) != (S, K):
        raise ValueError(f"active has shape {tuple(active.shape)}, expected [S={S}, K={K}]")
    return active
