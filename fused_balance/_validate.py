"""Input checks of the public API: one place, clear errors naming the offending index."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fused_balance._dtypes import SUPPORTED_DTYPES, accumulate_dtype


@dataclass(frozen=True)
class Problem:
    """Validated gradients: ``flat[k * P + p]`` is objective k's gradient of tensor p."""

    flat: list
    num_objectives: int
    num_tensors: int
    segment_ids: list
    num_segments: int

    @property
    def device(self) -> torch.device:
        return self.flat[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.flat[0].dtype

    @property
    def accumulate_dtype(self) -> torch.dtype:
        return accumulate_dtype(self.dtype)


def _as_tensor_list(seq, what: str) -> list:
    if isinstance(seq, torch.Tensor):
        raise TypeError(f"{what} must be a sequence of tensors, got a single Tensor; wrap it in a list")
    try:
        items = list(seq)
    except TypeError:
        raise TypeError(f"{what} must be a sequence of tensors, got {type(seq).__name__}") from None
    return items


def check_grads(grads) -> tuple[list, int, int]:
    """K sequences of P tensors -> (flat objective-major list, K, P)."""
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
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"grads[0][0] is {type(first).__name__}, not a Tensor")
    if first.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"grads[0][0] has dtype {first.dtype}; supported: {SUPPORTED_DTYPES}")
    for k, lst in enumerate(lists):
        for p, t in enumerate(lst):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"grads[{k}][{p}] is {type(t).__name__}, not a Tensor")
            if t.device != first.device:
                raise ValueError(f"grads[{k}][{p}] is on {t.device} but grads[0][0] is on {first.device}")
            if t.dtype != first.dtype:
                raise TypeError(f"grads[{k}][{p}] has dtype {t.dtype} but grads[0][0] has {first.dtype}: "
                                "all gradients must share one dtype")
            if t.shape != lists[0][p].shape:
                raise ValueError(f"grads[{k}][{p}] has shape {tuple(t.shape)} but grads[0][{p}] has "
                                 f"{tuple(lists[0][p].shape)}")
    return [t for lst in lists for t in lst], len(lists), P


def check_segments(segments, num_tensors: int) -> tuple[list, int]:
    """None | "global" | "tensor" | P segment ids -> (python list of ids, S)."""
    if segments is None or (isinstance(segments, str) and segments == "global"):
        return [0] * num_tensors, 1
    if isinstance(segments, str):
        if segments == "tensor":
            return list(range(num_tensors)), num_tensors
        raise ValueError(f"segments={segments!r}: use None/'global', 'tensor' or a sequence of P ids")
    if isinstance(segments, torch.Tensor):
        if segments.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
            raise TypeError(f"segment ids must be integers, got a {segments.dtype} tensor")
        if segments.dim() != 1:
            raise ValueError(f"segment ids must be 1-D, got shape {tuple(segments.shape)}")
        ids = segments.tolist()
    else:
        ids = list(segments)
    if len(ids) != num_tensors:
        raise ValueError(f"segments has {len(ids)} ids but there are {num_tensors} tensors")
    for p, s in enumerate(ids):
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"segments[{p}] = {s!r} is not an int")
        if s < 0:
            raise ValueError(f"segments[{p}] = {s} is negative")
    S = max(ids) + 1
    used = set(ids)
    missing = [s for s in range(S) if s not in used]
    if missing:
        raise ValueError(f"segment ids must cover 0..{S - 1} without gaps; segment {missing[0]} has no tensor")
    return ids, S


def check_problem(grads, segments) -> Problem:
    flat, K, P = check_grads(grads)
    ids, S = check_segments(segments, P)
    return Problem(flat, K, P, ids, S)


def check_weights(weights, problem: Problem, name: str = "weights") -> torch.Tensor:
    """[S, K] float weights, moved to the gradients' device and accumulate dtype."""
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor of shape [S, K], got {type(weights).__name__}")
    S, K = problem.num_segments, problem.num_objectives
    if weights.dim() == 1 and S == 1:
        weights = weights.unsqueeze(0)
    if tuple(weights.shape) != (S, K):
        raise ValueError(f"{name} has shape {tuple(weights.shape)}, expected [S={S}, K={K}]")
    if not weights.dtype.is_floating_point:
        raise TypeError(f"{name} must be floating point, got {weights.dtype}")
    return weights.to(device=problem.device, dtype=problem.accumulate_dtype)


def check_out(out, problem: Problem, name: str = "out") -> list:
    outs = _as_tensor_list(out, name)
    P = problem.num_tensors
    if len(outs) != P:
        raise ValueError(f"{name} has {len(outs)} tensors, expected {P}")
    for p, o in enumerate(outs):
        ref = problem.flat[p]
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"{name}[{p}] is {type(o).__name__}, not a Tensor")
        if o.shape != ref.shape:
            raise ValueError(f"{name}[{p}] has shape {tuple(o.shape)}, expected {tuple(ref.shape)}")
        if o.dtype != ref.dtype:
            raise TypeError(f"{name}[{p}] has dtype {o.dtype}, expected {ref.dtype}")
        if o.device != ref.device:
            raise ValueError(f"{name}[{p}] is on {o.device}, expected {ref.device}")
    return outs


def per_tensor_floats(value, num_tensors: int, name: str) -> list:
    if isinstance(value, (int, float)):
        return [float(value)] * num_tensors
    values = [float(v) for v in value]
    if len(values) != num_tensors:
        raise ValueError(f"{name} has {len(values)} values, expected one per tensor ({num_tensors})")
    return values


def check_gram(G) -> torch.Tensor:
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a Tensor [S, K, K] or [K, K], got {type(G).__name__}")
    if G.dim() == 2:
        G = G.unsqueeze(0)
    if G.dim() != 3 or G.shape[1] != G.shape[2] or G.shape[1] == 0:
        raise ValueError(f"G must have shape [S, K, K] with K >= 1, got {tuple(G.shape)}")
    if not G.dtype.is_floating_point:
        raise TypeError(f"G must be floating point, got {G.dtype}")
    return G


def check_sequence_len(seq: Sequence, n: int, name: str) -> None:
    if len(seq) != n:
        raise ValueError(f"{name} has {len(seq)} entries, expected {n}")
