"""Backend registry: one contract (``Backend``), several implementations, one module each.

- ``torch_reference`` (name "torch"): plain PyTorch per tensor, the oracle (fused_balance.reference).
- ``cpp``: the C++ CPU / CUDA kernels of csrc/ (registration and autograd: fused_balance.ops).
- ``triton``: the Triton kernels of kernels/ (GPU; CPU under TRITON_INTERPRET=1).

A backend module is a thin adapter: it names itself (``name``) and re-exports the functions of
its implementation. ``resolve_backend`` returns the module itself, so ``.name`` says which one ran.

Every backend receives inputs that the public API (``fused_balance.api``) has already validated
and normalised, so backends never re-check user input:

- ``flat``: the K*P gradient tensors, objective-major (``flat[k * P + p]`` is objective k's
  gradient for tensor p). For a fixed p all K tensors share shape; all tensors share one dtype
  (fp32, fp64, bf16 or fp16) and one device. They may be non-contiguous.
- ``num_objectives``: K.
- ``segment_ids``: a Python ``list[int]`` of length P with values in ``[0, num_segments)``.
- ``weights``: a ``[S, K]`` tensor on the gradients' device, fp64 for fp64 gradients else fp32.
- ``out``: P tensors of the gradients' shapes and dtype on their device (may be non-contiguous).
- ``skip``: ``None`` or a one-element bool tensor on the gradients' device; when it holds True
  the in-place operation must leave every output untouched (read on the device: no host sync).

Methods (all of them required):

- ``gram(flat, K, segment_ids, S) -> Tensor[S, K, K]`` (fp32, or fp64 for fp64 input),
  differentiable w.r.t. ``flat``.
- ``combine(flat, K, weights, segment_ids) -> list[Tensor]`` (P new tensors, input dtype),
  differentiable w.r.t. ``flat`` and ``weights``.
- ``combine_into(flat, K, weights, segment_ids, out, skip) -> None``: in place, not differentiable.
- ``balanced_adamw_(flat, K, weights, segment_ids, params, exp_avgs, exp_avg_sqs, lrs,
  weight_decays, beta1, beta2, eps, step, skip) -> None``: AdamW (decoupled weight decay,
  bias correction with ``step`` >= 1) on the combined gradient d_p = sum_k w[seg(p), k] g_k,p,
  without materialising d; ``lrs``/``weight_decays`` are per-tensor Python float lists.
- ``availability(device) -> (bool, reason)``: can it run on tensors of that device here.

The policy solve is not a backend method: it runs on the small ``[S, K, K]`` Gram whichever
backend made it (``fb.policy_weights``: one native op when the extension is loaded, else torch).

Kernel backends expose their kernels as ops with the four schemas of ``fused_balance.ops``
(``LIST_OP_SCHEMAS``, the C++ ops' own), and take the fake kernels, autograd and these functions
from there (``ops.define_family``, ``ops.ListOps``).

Bank ops (BalancePlan's engine; every backend that has them runs a plan, ``bank_backends``): one
``[K, N]`` bank (row k: objective k's gradients of all P parameters at the plan's offsets, a
GradBank's 16-byte aligned with zero padding between them; rows contiguous)
and an int64 ``[C, 6]`` chunk table built once by ``fused_balance.BalancePlan`` (columns: start in
the row, length <= PLAN_CHUNK_ELEMS, segment, parameter, offset in the parameter, group; the
Gram's and combine's table holds ranges, AdamW's one row per parameter chunk). Exactly the C++
ops' semantics (csrc/bank_cpu.cpp); no host read, so a planned step can be captured:

- ``bank_gram(bank, chunks, seg_offsets, num_segments) -> (G [S, K, K] float64, found_inf)``:
  every product and sum in float64 (so ``found_inf``, a 0-dim bool on the device, is raised only
  by a real NaN/Inf); ``seg_offsets`` [S + 1]: the table's chunks grouped by segment.
- ``bank_combine_into(bank, weights, chunks, out, skip)``: ``out[c] = sum_k w[seg, k] bank[k, c]``
  for every covered column c of the flat ``out`` (bank dtype), in the accumulate dtype in
  objective order, the ``[S, K]`` weights rounded once to it (saturating at fp32's range for
  non-fp64 banks); nothing written when ``skip`` holds True.
- ``bank_adamw_(bank, weights, chunks, param_ptrs, exp_avg, exp_avg_sq, hyper, step, skip, live,
  *, params)``: AdamW on that combination. ``exp_avg`` / ``exp_avg_sq``: flat, laid out like a
  bank row, in the parameters' dtype; ``hyper``: float64 ``[G, 5]`` (lr, weight_decay, beta1,
  beta2, eps per group); ``step``: float32 ``[P]`` steps taken so far, incremented where
  stepped; ``live``: None or bool ``[P]``, the parameters updated; ``param_ptrs``: int64 ``[P]``
  addresses of the P contiguous parameters, rewritten in place by the plan whenever one moved;
  ``params``: those P tensors, for backends that cannot write through addresses (the cpp and
  triton backends ignore it). Constants computed in float64 as Python does and rounded once.

A backend module without them (``BANK_OPS_MISSING``: why) cannot run a plan.

Low-precision AdamW rounding rule (every backend): the combined gradient is accumulated in the
accumulate dtype and rounded to the gradients' dtype, then AdamW runs in the parameters'
accumulate dtype; m and v are bitwise equal across backends on the same device.
"""
from __future__ import annotations

import importlib
from typing import Protocol, Sequence, runtime_checkable

import torch

__all__ = ["Backend", "available_backends", "bank_backends", "bank_ops_missing", "use_backend", "current_backend", "get_backend", "resolve_backend",
           "backend_report", "check_backend_choice", "BACKEND_NAMES"]

BACKEND_NAMES = ("torch", "cpp", "triton")
# Fastest first, per device type: what `auto` tries.
_AUTO_ORDER = {"cpu": ("cpp", "torch"), "cuda": ("triton", "cpp", "torch")}
_MODULES = {
    "torch": "fused_balance.backends.torch_reference",
    "cpp": "fused_balance.backends.cpp",
    "triton": "fused_balance.backends.triton",
}


@runtime_checkable
class Backend(Protocol):
    """What every backend provides (argument conventions above). A module satisfies it."""

    name: str

    def availability(self, device: torch.device) -> tuple[bool, str]: ...

    def gram(self, flat: Sequence[torch.Tensor], num_objectives: int, segment_ids: list[int],
             num_segments: int) -> torch.Tensor: ...

    def combine(self, flat: Sequence[torch.Tensor], num_objectives: int, weights: torch.Tensor,
                segment_ids: list[int]) -> list[torch.Tensor]: ...

    def combine_into(self, flat: Sequence[torch.Tensor], num_objectives: int, weights: torch.Tensor,
                     segment_ids: list[int], out: Sequence[torch.Tensor],
                     skip: torch.Tensor | None) -> None: ...

    def balanced_adamw_(self, flat: Sequence[torch.Tensor], num_objectives: int, weights: torch.Tensor,
                        segment_ids: list[int], params: Sequence[torch.Tensor],
                        exp_avgs: Sequence[torch.Tensor], exp_avg_sqs: Sequence[torch.Tensor],
                        lrs: list[float], weight_decays: list[float], beta1: float, beta2: float,
                        eps: float, step: int, skip: torch.Tensor | None) -> None: ...


BANK_FUNCTIONS = ("bank_gram", "bank_combine_into", "bank_adamw_")


def bank_ops_missing(backend) -> str | None:
    """None when the backend module provides the bank ops (above), else why not."""
    if all(hasattr(backend, f) for f in BANK_FUNCTIONS):
        return None
    return getattr(backend, "BANK_OPS_MISSING", None) or f"backend {backend.name!r} has no bank ops"


_default = {"name": "auto"}


_cache: dict[str, object] = {}  # name -> the imported module, or the exception importing it raised


def get_backend(name: str) -> Backend:
    """The backend module ``name`` (imported lazily). Raises ValueError for unknown names and
    RuntimeError (with the reason) when it cannot be imported."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKEND_NAMES} or 'auto'")
    if name not in _cache:
        try:
            _cache[name] = importlib.import_module(_MODULES[name])
        except Exception as exc:  # a missing compiler or Triton must not break the others
            _cache[name] = exc
    entry = _cache[name]
    if isinstance(entry, Exception):
        raise RuntimeError(f"backend {name!r} cannot be loaded: {entry}") from entry
    return entry


def availability(name: str, device: torch.device | str = "cpu") -> tuple[bool, str]:
    """(can backend ``name`` run on ``device`` here, why). Never raises for a broken backend."""
    try:
        module = get_backend(name)
    except RuntimeError as exc:
        return False, str(exc)
    try:
        return module.availability(torch.device(device))
    except Exception as exc:  # e.g. the C++ sources missing from an install: report, don't break the others
        return False, f"backend {name!r} cannot check its availability: {type(exc).__name__}: {exc}"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run on tensors of ``device`` on this machine."""
    return [n for n in BACKEND_NAMES if availability(n, device)[0]]


def bank_backends(device: torch.device | str = "cpu") -> list[str]:
    """Names of the backends that can run a BalancePlan (bank ops) on tensors of ``device`` here."""
    return [n for n in available_backends(device) if bank_ops_missing(get_backend(n)) is None]


def check_backend_choice(name, device: torch.device | str, *, bank_ops: bool = False) -> None:
    """A user's ``backend=`` argument checked at construction (not halfway through a first step):
    None, 'auto', or a backend that runs on ``device`` here (and has bank ops with ``bank_ops``)."""
    if name is not None and not isinstance(name, str):
        raise TypeError(f"backend must be a backend name or None, got {type(name).__name__}")
    if name in (None, "auto"):
        return
    device = torch.device(device)
    if name not in available_backends(device):
        raise ValueError(f"backend {name!r} cannot run on {device.type} tensors here; available: "
                         f"{available_backends(device)} (or None / 'auto')")
    missing = bank_ops_missing(get_backend(name)) if bank_ops else None
    if missing:
        raise ValueError(f"backend {name!r} cannot run a BalancePlan: {missing}; choose one of "
                         f"{bank_backends(device)} (or None / 'auto')")


def backend_report() -> dict[str, dict[str, tuple[bool, str]]]:
    """For every backend and device type: (available, reason). Used by `fused-balance info`."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return {n: {d: availability(n, d) for d in devices} for n in BACKEND_NAMES}


def use_backend(name: str) -> None:
    """Set the process-wide default backend ('auto', 'torch', 'cpp' or 'triton')."""
    if name != "auto":
        get_backend(name)  # fail now, not at the first call
    _default["name"] = name


def current_backend() -> str:
    return _default["name"]


def resolve_backend(name: str | None, device: torch.device, *, bank_ops: bool = False) -> Backend:
    """The backend (a module with a ``name``) to run on ``device``: ``name`` (None means the default set by
    use_backend), with 'auto' picking the fastest one available for the device type. ``bank_ops``:
    one that provides the bank ops (a BalancePlan's)."""
    name = name or _default["name"]
    if name == "auto":
        for candidate in _AUTO_ORDER.get(device.type, ("torch",)):
            ok, _ = availability(candidate, device)
            if ok and not (bank_ops and bank_ops_missing(get_backend(candidate))):
                return get_backend(candidate)
        return get_backend("torch")
    ok, reason = availability(name, device)
    if not ok:
        raise RuntimeError(f"backend {name!r} cannot run on {device.type} tensors here: {reason}")
    backend = get_backend(name)
    missing = bank_ops_missing(backend) if bank_ops else None
    if missing:
        raise RuntimeError(f"backend {name!r} cannot run a BalancePlan: {missing}; choose one of "
                           f"{bank_backends(device)} (or None / 'auto')")
    return backend


