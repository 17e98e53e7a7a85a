"""The ``torch`` backend's bank ops: BalancePlan's three ops in plain PyTorch, with the C++ ops'
semantics (csrc/bank_cpu.cpp; the contract is in ``fused_balance.backends``):

- ``bank_gram``: float64 Gram per segment (products and sums in float64, so only a real NaN/Inf
  makes it non-finite) and ``found_inf``;
- ``bank_combine_into``: sum_k w[seg, k] g_k in the accumulate dtype, each product and sum
  rounded in objective order (as the C++ ``combine_element``), weights rounded once to that
  dtype (saturating at fp32's range);
- ``bank_adamw_``: AdamW on the combination with the low-precision rounding rule, per-parameter
  step counts, a live mask and a ``[G, 5]`` hyper table; the moments are bitwise the C++ ones.

Registered as the custom ops ``fused_balance::torch_bank_*`` (with fake kernels), so a
TorchDispatchMode sees which bank op ran and ``torch.compile`` traces a planned step.

What a call needs from a chunk table (the bank columns of each segment, each column's segment
and parameter) is read from it once and cached on the table tensor and its version (``set_groups``
rewrites the group column in place): the first call with a new table reads it to the host (warm
up before capturing a CUDA graph); later calls do O(S) (Gram) or O(K) (combine, AdamW) tensor
ops, O(1) bounds checks and no host read. The parameters (AdamW) are read and written through
``params``; their flat views are cached on the pointer table, which the plan rewrites (in place)
whenever a parameter moved.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy
import torch
from torch.utils.weak import WeakTensorKeyDictionary

from fused_balance._dtypes import accumulate_dtype

__all__ = ["bank_gram", "bank_combine_into", "bank_adamw_"]

# multi_tensor.h's PlanColumn (fused_balance.plan builds the tables)
_START, _LENGTH, _SEGMENT, _PARAM, _PARAM_OFFSET, _GROUP = range(6)
_FLOAT_MAX = torch.finfo(torch.float32).max


class _Positions:
    """Positions along a flat axis: a slice when they run end to end (no copy), else an index."""

    def __init__(self, positions: torch.Tensor, device):
        n = positions.numel()
        first = int(positions[0]) if n else 0
        if torch.equal(positions, torch.arange(first, first + n)):
            self.slice, self.index = slice(first, first + n), None
        else:
            self.slice, self.index = None, positions.to(device)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """x[..., positions]"""
        return x[..., self.slice] if self.index is None else x.index_select(-1, self.index)

    def put_(self, x: torch.Tensor, values: torch.Tensor) -> None:
        """x[positions] = values (x one-dimensional)"""
        if self.index is None:
            x[self.slice].copy_(values)
        else:
            x.index_copy_(0, self.index, values)


def _chunk_positions(rows: torch.Tensor) -> torch.Tensor:
    """The elements start .. start + length - 1 of every chunk, in table order (host)."""
    if rows.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(int(a), int(a) + int(n)) for a, n in rows.tolist()])


@dataclass
class _Table:
    """A chunk table read once: the covered bank columns, their segment and parameter."""

    version: int
    columns: _Positions                 # every chunk's bank columns, in table order
    column_segment: torch.Tensor        # [n] long on the device
    column_param: torch.Tensor          # [n] long on the device
    param_group: torch.Tensor           # [num_params] long on the device: each parameter's group
    segment_columns: list               # (segment, _Positions) for every segment with a chunk
    end: int                            # one past the last column (checked against the bank row)
    num_segments: int                   # one past the largest segment id
    num_params: int                     # one past the largest parameter index
    num_groups: int                     # one past the largest group
    host: torch.Tensor                  # the table itself (for the parameter positions)


_tables = WeakTensorKeyDictionary()     # chunk table -> _Table
_param_layouts = WeakTensorKeyDictionary()  # param_ptrs -> _ParamLayout
_param_positions = WeakTensorKeyDictionary()  # chunk table -> (_ParamLayout, table version, _Positions)


def _table(op: str, chunks: torch.Tensor) -> _Table:
    cached = _tables.get(chunks)
    if cached is not None and cached.version == chunks._version:
        return cached
    if chunks.dtype != torch.long or chunks.dim() != 2 or chunks.shape[1] != 6:
        raise ValueError(f"fused_balance::{op}: chunks must be an int64 [C, 6] table (build it with "
                         "fused_balance.BalancePlan)")
    host = chunks.detach().cpu()
    start, length, segment, param, offset, group = host.unbind(1)
    if host.shape[0] and not (bool((start >= 0).all()) and bool((length >= 1).all()) and bool((segment >= 0).all())
                              and bool((param >= 0).all()) and bool((offset >= 0).all())
                              and bool((group >= 0).all())):
        raise ValueError(f"fused_balance::{op}: a chunk of the table is out of range (negative start, segment, "
                         "parameter, offset or group, or an empty chunk)")
    positions = _chunk_positions(host[:, [_START, _LENGTH]])
    repeat = lambda column: torch.repeat_interleave(column, length).to(chunks.device)  # noqa: E731
    segments = {}
    for s in segment.unique().tolist():
        segments[s] = _Positions(_chunk_positions(host[segment == s][:, [_START, _LENGTH]]), chunks.device)
    num_params = int(param.max()) + 1 if host.shape[0] else 0
    param_group = torch.zeros(num_params, dtype=torch.long)
    param_group[param] = group
    table = _Table(chunks._version, _Positions(positions, chunks.device), repeat(segment), repeat(param),
                   param_group.to(chunks.device), sorted(segments.items()), int((start + length).max()) if host.shape[0] else 0,
                   int(segment.max()) + 1 if host.shape[0] else 0, num_params,
                   int(group.max()) + 1 if host.shape[0] else 0, host)
    _tables[chunks] = table
    return table


def _check_bank(op: str, bank: torch.Tensor, table: _Table) -> None:
    if bank.dim() != 2 or bank.shape[0] < 1 or bank.stride(1) != 1:
        raise ValueError(f"fused_balance::{op}: bank must be a [K, N] tensor with contiguous rows, got shape "
                         f"{tuple(bank.shape)}")
    if table.end > bank.shape[1]:
        raise ValueError(f"fused_balance::{op}: the table reaches element {table.end} of a bank row of "
                         f"{bank.shape[1]} elements")


def _check_weights(op: str, weights: torch.Tensor, bank: torch.Tensor, table: _Table) -> None:
    if weights.dim() != 2 or weights.shape[1] != bank.shape[0] or weights.shape[0] < table.num_segments:
        raise ValueError(f"fused_balance::{op}: weights must be [S, {bank.shape[0]}] with a row for each of the "
                         f"table's {table.num_segments} segment(s), got {tuple(weights.shape)}")


def _check_flat(op: str, what: str, t: torch.Tensor, bank: torch.Tensor) -> None:
    if not t.is_contiguous() or t.numel() < bank.shape[1] or t.device != bank.device:
        raise ValueError(f"fused_balance::{op}: {what} must be a contiguous buffer of at least {bank.shape[1]} "
                         f"elements on {bank.device}, got {tuple(t.shape)} on {t.device}")


def _combination(bank: torch.Tensor, weights: torch.Tensor, table: _Table) -> torch.Tensor:
    """d = w[seg, 0] g_0 + w[seg, 1] g_1 + ... over the table's columns, every product and sum
    rounded in the accumulate dtype; the weights rounded once to it (saturating beyond fp32)."""
    acc = accumulate_dtype(bank.dtype)
    w = weights.to(torch.float64)
    if acc != torch.float64:
        w = w.clamp(-_FLOAT_MAX, _FLOAT_MAX)
    per_column = w.to(acc).index_select(0, table.column_segment)  # [n, K]
    g = table.columns.take(bank)
    d = g[0].to(acc) * per_column[:, 0]
    for k in range(1, bank.shape[0]):
        d = d + g[k].to(acc) * per_column[:, k]
    return d


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded square root, as the C++ kernels' ``sqrt_rn``: torch's CPU sqrt (MKL's
    vector math) may be one ulp off. fp32 through float64 (exact after the final rounding); fp64
    on a CPU through NumPy (the hardware instruction); GPU sqrt is correctly rounded."""
    if x.dtype != torch.float64:
        return x.to(torch.float64).sqrt().to(x.dtype)
    if x.device.type == "cpu":
        return torch.from_numpy(numpy.sqrt(x.contiguous().numpy()))
    return x.sqrt()


# ----------------------------------------------------------------------------------------- ops
@torch.library.custom_op("fused_balance::torch_bank_gram", mutates_args=())
def _gram_op(bank: torch.Tensor, chunks: torch.Tensor, seg_offsets: torch.Tensor,
             num_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    op = "bank_gram"
    table = _table(op, chunks)
    _check_bank(op, bank, table)
    if seg_offsets.numel() != num_segments + 1 or table.num_segments > num_segments:
        raise ValueError(f"fused_balance::{op}: seg_offsets must hold S + 1 = {num_segments + 1} offsets and "
                         f"the table's segments must be < {num_segments}")
    K = bank.shape[0]
    G = torch.zeros(num_segments, K, K, dtype=torch.float64, device=bank.device)
    for s, columns in table.segment_columns:
        g = columns.take(bank).to(torch.float64)
        G[s] = g @ g.T
    return G, ~torch.isfinite(G).all()


@_gram_op.register_fake
def _(bank, chunks, seg_offsets, num_segments):
    K = bank.shape[0]
    return bank.new_empty((num_segments, K, K), dtype=torch.float64), bank.new_empty((), dtype=torch.bool)


@torch.library.custom_op("fused_balance::torch_bank_combine_into", mutates_args=("out",))
def _combine_into_op(bank: torch.Tensor, weights: torch.Tensor, chunks: torch.Tensor, out: torch.Tensor,
                     skip: Optional[torch.Tensor]) -> None:
    op = "bank_combine_into"
    table = _table(op, chunks)
    _check_bank(op, bank, table)
    _check_weights(op, weights, bank, table)
    _check_flat(op, "out", out, bank)
    if out.dtype != bank.dtype:
        raise TypeError(f"fused_balance::{op}: out has dtype {out.dtype}, the bank {bank.dtype}")
    d = _combination(bank, weights, table).to(out.dtype)
    if skip is not None:  # decided on the device: the old values written back
        d = torch.where(skip.reshape(()), table.columns.take(out), d)
    table.columns.put_(out, d)


@_combine_into_op.register_fake
def _(bank, weights, chunks, out, skip):
    return None


@dataclass
class _ParamLayout:
    """The parameters laid end to end: flat views (written back after an AdamW step)."""

    version: int                        # of the pointer table it was made for
    dtype: torch.dtype
    views: list
    numels: list
    starts: list                        # P + 1 offsets


def _param_layout(param_ptrs: torch.Tensor, params: list, dtype: torch.dtype) -> _ParamLayout:
    """The parameters' layout, checked and cached on the pointer table and its version (the
    plan rewrites the table in place whenever a parameter moved)."""
    cached = _param_layouts.get(param_ptrs)
    if cached is not None and cached.version == param_ptrs._version and len(cached.views) == len(params) \
            and cached.dtype == dtype:
        return cached
    bad = [i for i, p in enumerate(params) if p.dtype != dtype or not p.is_contiguous()]
    if bad:
        raise TypeError(f"fused_balance::bank_adamw_: parameter {bad[0]} is {params[bad[0]].dtype}"
                        f"{'' if params[bad[0]].is_contiguous() else ' and not contiguous'}; the parameters must "
                        f"be contiguous and of the moments' dtype {dtype}")
    views = [p.detach().view(-1) for p in params]
    starts = [0]
    for v in views:
        starts.append(starts[-1] + v.numel())
    layout = _ParamLayout(param_ptrs._version, dtype, views, [v.numel() for v in views], starts)
    _param_layouts[param_ptrs] = layout
    return layout


def _positions_in_params(chunks: torch.Tensor, table: _Table, layout: _ParamLayout) -> _Positions:
    """Where every table column lies in the parameters laid end to end (once per table and layout)."""
    cached = _param_positions.get(chunks)
    if cached is not None and cached[0] is layout and cached[1] == table.version:
        return cached[2]
    numels, starts = layout.numels, layout.starts
    host = table.host
    if host.shape[0] and bool((host[:, _PARAM_OFFSET] + host[:, _LENGTH]
                               > torch.tensor(numels)[host[:, _PARAM]]).any()):
        raise ValueError("fused_balance::bank_adamw_: a chunk of the table runs past the end of its parameter")
    first = torch.tensor(starts[:-1], dtype=torch.long)[host[:, _PARAM]] + host[:, _PARAM_OFFSET]
    positions = _Positions(_chunk_positions(torch.stack([first, host[:, _LENGTH]], 1)), chunks.device)
    _param_positions[chunks] = (layout, table.version, positions)  # one layout per table at a time
    return positions


@torch.library.custom_op("fused_balance::torch_bank_adamw_",
                         mutates_args=("exp_avg", "exp_avg_sq", "step", "params"))
def _adamw_op(bank: torch.Tensor, weights: torch.Tensor, chunks: torch.Tensor, param_ptrs: torch.Tensor,
              exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, hyper: torch.Tensor, step: torch.Tensor,
              skip: Optional[torch.Tensor], live: Optional[torch.Tensor], params: list[torch.Tensor]) -> None:
    op = "bank_adamw_"
    table = _table(op, chunks)
    _check_bank(op, bank, table)
    _check_weights(op, weights, bank, table)
    P = param_ptrs.numel()
    _check_flat(op, "exp_avg", exp_avg, bank)
    _check_flat(op, "exp_avg_sq", exp_avg_sq, bank)
    if len(params) != P or table.num_params > P or step.numel() != P or step.dtype != torch.float32 \
            or (live is not None and (live.numel() != P or live.dtype != torch.bool)):
        raise ValueError(f"fused_balance::{op}: params, step (float32) and live (bool) must hold one entry per "
                         f"parameter of param_ptrs ({P}), covering the table's {table.num_params}")
    if hyper.dtype != torch.float64 or hyper.dim() != 2 or hyper.shape[1] != 5 or hyper.shape[0] < table.num_groups:
        raise ValueError(f"fused_balance::{op}: hyper must be a float64 [G, 5] table with a row for each of the "
                         f"table's {table.num_groups} group(s), got {tuple(hyper.shape)} {hyper.dtype}")
    pdtype = exp_avg.dtype
    if exp_avg_sq.dtype != pdtype:
        raise TypeError(f"fused_balance::{op}: exp_avg is {pdtype}, exp_avg_sq {exp_avg_sq.dtype}")
    layout = _param_layout(param_ptrs, params, pdtype)
    group = table.param_group
    if P > table.num_params:  # parameters the table does not name: their constants are never read
        group = torch.cat([group, group.new_zeros(P - table.num_params)])
    math = accumulate_dtype(pdtype)
    with torch.no_grad():
        # The constants per parameter, in float64 as Python computes them, rounded once (multi_tensor.h)
        lr, decay, beta1, beta2, eps = hyper.index_select(0, group).unbind(1)
        t = step.to(torch.long).add(1).to(torch.float64)  # the step about to be taken
        consts = torch.stack([1.0 - lr * decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2,
                              1.0 - torch.pow(beta2, t), eps, lr / (1.0 - torch.pow(beta1, t))], 1).to(math)
        c_decay, c_b1, c_1mb1, c_b2, c_1mb2, c_bc2, c_eps, c_step = \
            consts.index_select(0, table.column_param).unbind(1)
        d = _combination(bank, weights, table)
        if bank.element_size() == 2:  # a 16-bit combination is rounded to its dtype first
            d = d.to(bank.dtype).to(d.dtype)
        d = d.to(math)
        flat_params = torch.cat(layout.views) if layout.views else bank.new_zeros(0, dtype=pdtype)
        in_params = _positions_in_params(chunks, table, layout)
        p_old, m_old, v_old = in_params.take(flat_params), table.columns.take(exp_avg), table.columns.take(exp_avg_sq)
        p = p_old.to(math) * c_decay
        m = m_old.to(math) * c_b1 + d * c_1mb1
        v = v_old.to(math) * c_b2 + (d * c_1mb2) * d
        p = p - (c_step * m) / (_sqrt_rn(v / c_bc2) + c_eps)
        stepped = torch.ones(P, dtype=torch.bool, device=step.device) if live is None else live.clone()
        if skip is not None:
            stepped &= ~skip.reshape(())
        keep = stepped.index_select(0, table.column_param)
        in_params.put_(flat_params, torch.where(keep, p.to(pdtype), p_old))
        table.columns.put_(exp_avg, torch.where(keep, m.to(pdtype), m_old))
        table.columns.put_(exp_avg_sq, torch.where(keep, v.to(pdtype), v_old))
        if layout.views:
            torch._foreach_copy_(layout.views, list(flat_params.split(layout.numels)))
        step.add_(stepped.to(step.dtype))


@_adamw_op.register_fake
def _(bank, weights, chunks, param_ptrs, exp_avg, exp_avg_sq, hyper, step, skip, live, params):
    return None


# ------------------------------------------------------------------------- the backend's functions
def bank_gram(bank, chunks, seg_offsets, num_segments):
    """(G [S, K, K] float64, found_inf 0-dim bool) of the bank's columns, per segment."""
    return _gram_op(bank, chunks, seg_offsets, int(num_segments))


def bank_combine_into(bank, weights, chunks, out, skip):
    """out[chunk columns] = sum_k w[seg, k] bank[k, columns]; nothing written when skip holds True."""
    _combine_into_op(bank, weights, chunks, out, skip)


def bank_adamw_(bank, weights, chunks, param_ptrs, exp_avg, exp_avg_sq, hyper, step, skip, live, *, params):
    """AdamW on the combination; ``params``: the P parameters ``param_ptrs`` points at."""
    _adamw_op(bank, weights, chunks, param_ptrs, exp_avg, exp_avg_sq, hyper, step, skip, live, list(params))
