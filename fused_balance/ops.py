"""The Python side of the fused_balance ops: schemas, fake kernels, autograd, backend adapters.

Two op families implement the same four list ops (gram, combine, combine_into, balanced_adamw_):
the C++/CUDA kernels of csrc/ (prefix ``""``; schemas in the TORCH_LIBRARY block of
csrc/ops_cpu.cpp, which names this module as the ops' Python part, built on first use by
``fused_balance._extension``) and the Triton kernels of kernels/ (prefix ``"triton_"``; schemas
defined here by ``define_family`` from the same strings, ``LIST_OP_SCHEMAS``; a conformance test
compares the two). Every family gets from this module, written once:

- the fake (meta) kernels, so the ops trace under ``torch.compile``;
- the autograd formulas, written with the family's own ops:

  gram:    dL/dg_k,p = sum_l (dG[s,k,l] + dG[s,l,k]) g_l,p       -> one combine per objective k
  combine: dL/dg_k,p = w[s,k] dout_p                              -> a combine with K = 1
           dL/dw[s,k] = sum_{p in s} <dout_p, g_k,p>               -> row 0 of a gram over [dout, g]

- the backend adapter (``ListOps``): the functions of the backend contract
  (fused_balance.backends) as calls of the family's ops.

The C++ library also holds the plan ops (bank_gram, bank_combine_into, bank_adamw_: one [K, N]
bank and a chunk table built once, used by fused_balance.plan.BalancePlan; no autograd) and the
policy solve (policy_weights); their fake kernels are here too. The functions ``gram`` ...
``balanced_adamw_`` and ``bank_gram`` ... ``bank_adamw_`` of this module are the ``cpp``
backend's (fused_balance.backends.cpp).
"""
from __future__ import annotations

import functools
import os
import shutil
import threading
from typing import Callable

import torch

from fused_balance import _extension
from fused_balance._dtypes import accumulate_dtype

__all__ = ["LIST_OP_SCHEMAS", "define_family", "ListOps", "availability", "gram", "combine", "combine_into", "balanced_adamw_", "bank_gram", "bank_combine_into",
           "bank_adamw_", "policy_op_available", "cpu_isa",
           "set_cpu_isa"]

NAMESPACE = "fused_balance"
_lock = threading.RLock()  # registrations nest (the C++ parts register the list ops' parts)
_registered = False
_cpu_availability: tuple[bool, str] | None = None


# ------------------------------------------------------------------------------ the list ops
LIST_OP_SCHEMAS = {
    "gram": "(Tensor[] grads, int num_objectives, int[] segment_ids, int num_segments) -> Tensor",
    "combine": "(Tensor[] grads, Tensor weights, int[] segment_ids) -> Tensor[]",
    "combine_into": ("(Tensor[] grads, Tensor weights, int[] segment_ids, Tensor(a!)[] out, "
                     "Tensor? skip) -> ()"),
    "balanced_adamw_": ("(Tensor[] grads, Tensor weights, int[] segment_ids, Tensor(a!)[] params, "
                        "Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, float[] lrs, "
                        "float[] weight_decays, float beta1, float beta2, float eps, int step, "
                        "Tensor? skip) -> ()"),
}

_family_defined: set[str] = set()
_family_registered: set[str] = set()


def qualified_name(prefix: str, op: str) -> str:
    return f"{NAMESPACE}::{prefix}{op}"


def define_family(prefix: str) -> None:
    """Define the four ops of a Python-implemented family (once per process) and register their
    fake kernels and autograd. The implementations are added per op by the family's modules."""
    with _lock:
        if prefix in _family_defined:
            return
        for op, schema in LIST_OP_SCHEMAS.items():
            torch.library.define(qualified_name(prefix, op), schema)
        _family_defined.add(prefix)
    register_python_parts(prefix)


# --------------------------------------------------------------------------------- fake kernels
def _gram_fake(grads, num_objectives, segment_ids, num_segments):
    return grads[0].new_empty((num_segments, num_objectives, num_objectives),
                              dtype=accumulate_dtype(grads[0].dtype))


def _combine_fake(grads, weights, segment_ids):
    P = len(grads) // weights.shape[1]
    return [torch.empty_like(g, memory_format=torch.contiguous_format) for g in grads[:P]]


def _in_place_fake(*args):
    return None


# -------------------------------------------------------------------------------------- autograd
def _autograd(family):
    """(gram setup, gram backward, combine setup, combine backward) over the ops of ``family``."""

    def gram_setup_context(ctx, inputs, output):
        grads, num_objectives, segment_ids, num_segments = inputs
        ctx.num_objectives = num_objectives
        ctx.segment_ids = list(segment_ids)
        ctx.save_for_backward(*grads)

    def gram_backward(ctx, grad_gram):
        grads = list(ctx.saved_tensors)
        sym = grad_gram + grad_gram.transpose(1, 2)  # [S, K, K]
        grad_grads = []
        for k in range(ctx.num_objectives):
            grad_grads.extend(family().combine(grads, sym[:, k, :].contiguous(), ctx.segment_ids))
        return grad_grads, None, None, None

    def combine_setup_context(ctx, inputs, output):
        grads, weights, segment_ids = inputs
        ctx.segment_ids = list(segment_ids)
        ctx.save_for_backward(weights, *grads)

    def combine_backward(ctx, grad_outs):
        weights, *grads = ctx.saved_tensors
        S, K = weights.shape
        douts = [d if d is not None else torch.zeros_like(grads[p]) for p, d in enumerate(grad_outs)]
        grad_grads = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_grads = []
            for k in range(K):
                grad_grads.extend(family().combine(douts, weights[:, k:k + 1].contiguous(),
                                                   ctx.segment_ids))
        if ctx.needs_input_grad[1]:
            G = family().gram(douts + list(grads), K + 1, ctx.segment_ids, S)
            grad_weights = G[:, 0, 1:].to(weights.dtype)
        return grad_grads, grad_weights, None

    return gram_setup_context, gram_backward, combine_setup_context, combine_backward


class _Family:
    """The ops of one prefix, resolved once (OpOverloadPackets, as torch.ops.fused_balance.X)."""

    def __init__(self, prefix: str):
        ns = getattr(torch.ops, NAMESPACE)
        for op in LIST_OP_SCHEMAS:
            setattr(self, op, getattr(ns, prefix + op))


@functools.cache
def _family(prefix: str) -> _Family:
    return _Family(prefix)


def register_python_parts(prefix: str) -> None:
    """Fake kernels and autograd for the family ``prefix``, once per process (its ops must be
    defined: for the C++ family, after the extension is loaded)."""
    with _lock:
        if prefix in _family_registered:
            return
        name = lambda op: qualified_name(prefix, op)  # noqa: E731
        torch.library.register_fake(name("gram"))(_gram_fake)
        torch.library.register_fake(name("combine"))(_combine_fake)
        torch.library.register_fake(name("combine_into"))(_in_place_fake)
        torch.library.register_fake(name("balanced_adamw_"))(_in_place_fake)
        gram_setup, gram_backward, combine_setup, combine_backward = _autograd(functools.partial(_family, prefix))
        torch.library.register_autograd(name("gram"), gram_backward, setup_context=gram_setup)
        torch.library.register_autograd(name("combine"), combine_backward, setup_context=combine_setup)
        _family_registered.add(prefix)


# ------------------------------------------------------------------------------- backend adapter
def _ids(segment_ids) -> list:
    """The backend contract's list[int] as is (the API validated it), anything else converted."""
    return segment_ids if type(segment_ids) is list else [int(s) for s in segment_ids]


def _check_objectives(num_objectives, weights) -> None:
    if weights.dim() != 2 or weights.shape[1] != num_objectives:
        raise ValueError(f"weights must be [S, {num_objectives}], got shape {tuple(weights.shape)}")


class ListOps:
    """The backend contract's gram / combine / combine_into / balanced_adamw_ over the ops of one
    family; ``load()`` makes the family's ops callable (builds or imports them) and is called on
    every use, so it must be cheap once done."""

    def __init__(self, prefix: str, load: Callable[[], None]):
        self._load = load
        self._family = functools.partial(_family, prefix)

    def _ops(self) -> _Family:
        self._load()
        return self._family()

    def gram(self, flat, num_objectives, segment_ids, num_segments):
        return self._ops().gram(list(flat), int(num_objectives), _ids(segment_ids), int(num_segments))

    def combine(self, flat, num_objectives, weights, segment_ids):
        _check_objectives(num_objectives, weights)
        return list(self._ops().combine(list(flat), weights, _ids(segment_ids)))

    def combine_into(self, flat, num_objectives, weights, segment_ids, out, skip):
        _check_objectives(num_objectives, weights)
        ops = self._ops()
        with torch.no_grad():  # an optimizer-side write
            ops.combine_into(list(flat), weights, _ids(segment_ids), list(out), skip)

    def balanced_adamw_(self, flat, num_objectives, weights, segment_ids, params, exp_avgs,
                        exp_avg_sqs, lrs, weight_decays, beta1, beta2, eps, step, skip):
        _check_objectives(num_objectives, weights)
        ops = self._ops()
        with torch.no_grad():
            ops.balanced_adamw_(list(flat), weights, _ids(segment_ids), list(params),
                                list(exp_avgs), list(exp_avg_sqs), [float(x) for x in lrs],
                                [float(x) for x in weight_decays], float(beta1), float(beta2),
                                float(eps), int(step), skip)


# ------------------------------------------------------------------------------ registration
def _ops_defined() -> bool:
    try:
        getattr(torch.ops.fused_balance, "gram")
    except (AttributeError, RuntimeError):
        return False
    return True


def _bank_gram_fake(bank, chunks, seg_offsets, num_segments):
    K = bank.shape[0]
    return (bank.new_empty((num_segments, K, K), dtype=torch.float64), bank.new_empty((), dtype=torch.bool))


def _bank_combine_into_fake(bank, weights, chunks, out, skip):
    return None


def _bank_adamw_fake(bank, weights, chunks, param_ptrs, exp_avg, exp_avg_sq, hyper, step, skip, live=None):
    return None


def _policy_weights_fake(gram, policy, tau, rescale, rounding, active, magnitude=-1):
    S, K = gram.shape[0], gram.shape[1]
    return gram.new_empty((S, K)), gram.new_empty((S,), dtype=torch.long)


def _register_cpp_python_parts() -> None:
    """Fake kernels and autograd of the C++ ops, once per process (after the library is loaded)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        ns = NAMESPACE + "::"
        register_python_parts("")
        torch.library.register_fake(ns + "bank_gram")(_bank_gram_fake)
        torch.library.register_fake(ns + "bank_combine_into")(_bank_combine_into_fake)
        torch.library.register_fake(ns + "bank_adamw_")(_bank_adamw_fake)
        torch.library.register_fake(ns + "policy_weights")(_policy_weights_fake)
        _registered = True


def _ops():
    """torch.ops.fused_balance, with the extension built/loaded and the Python parts registered."""
    _extension.load()
    _register_cpp_python_parts()
    return torch.ops.fused_balance


# The C++ library names this module as its Python part: if it was loaded first (e.g. by
# _extension.load() alone), importing this module completes the registration.
if _ops_defined():
    _register_cpp_python_parts()


def policy_op_available(device_type: str) -> bool:
    """Whether the policy solve op is loaded (never builds) with a kernel for ``device_type``."""
    if not _ops_defined():
        return False
    _register_cpp_python_parts()
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key("fused_balance::policy_weights",
                                                              device_type.upper())
    except RuntimeError:  # no such op or dispatch key
        return False


# ----------------------------------------------------------------------------------- backend
def availability(device: torch.device) -> tuple[bool, str]:
    global _cpu_availability
    device = torch.device(device)
    if device.type == "cpu":
        if _cpu_availability is not None:
            return _cpu_availability
        if _extension.is_built():
            answer = (True, "C++ CPU kernels (built)")
        else:
            compiler = os.environ.get("CXX", "c++")
            if shutil.which(compiler) is None:
                return False, f"no C++ compiler ({compiler!r}) to build the extension"
            if shutil.which("ninja") is None and not _ninja_module_available():
                return False, "ninja is not installed (pip install ninja)"
            answer = (True, "C++ CPU kernels (built on first use, a few minutes)")
        _cpu_availability = answer
        return answer
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA GPU"
        if _extension.is_built():
            info = _extension.build_info()
            if info["cuda_compiled"]:
                return True, "CUDA kernels (built)"
            return False, f"the extension has no CUDA kernels: {info['cuda_reason']}"
        spec = _extension._build_spec()
        if spec.cuda:
            return True, "CUDA kernels (built on first use, a few minutes)"
        return False, f"no CUDA kernels can be built: {spec.cuda_reason}"
    return False, f"no kernels for device type {device.type!r}"


def _ninja_module_available() -> bool:
    from torch.utils.cpp_extension import is_ninja_available

    return is_ninja_available()


_LIST_OPS = ListOps("", _ops)
gram, combine, combine_into, balanced_adamw_ = (
    _LIST_OPS.gram, _LIST_OPS.combine, _LIST_OPS.combine_into, _LIST_OPS.balanced_adamw_)


# ------------------------------------------------------------------------------- plan ops
# BalancePlan's ops (fused_balance.plan): the [K, N] bank and a chunk table built once; the bank
# functions of the backend contract (fused_balance.backends). OpOverloads resolved once, so a
# planned step pays no lookup and traces under torch.compile.
_bank_ops = None


def _bank() -> tuple:
    """(bank_gram, bank_combine_into, bank_adamw_) of the extension (built on first use)."""
    global _bank_ops
    if _bank_ops is None:
        ops = _ops()
        _bank_ops = (ops.bank_gram.default, ops.bank_combine_into.default, ops.bank_adamw_.default)
    return _bank_ops


def bank_gram(bank, chunks, seg_offsets, num_segments):
    return _bank()[0](bank, chunks, seg_offsets, num_segments)


def bank_combine_into(bank, weights, chunks, out, skip):
    _bank()[1](bank, weights, chunks, out, skip)


def bank_adamw_(bank, weights, chunks, param_ptrs, exp_avg, exp_avg_sq, hyper, step, skip, live, *, params=None):
    """The parameters are written through ``param_ptrs`` (``params`` is not read)."""
    _bank()[2](bank, weights, chunks, param_ptrs, exp_avg, exp_avg_sq, hyper, step, skip, live)


# ------------------------------------------------------------------------- CPU kernel path
def cpu_isa() -> str:
    """The CPU kernel path in use ('default', 'avx2' or 'avx512'); builds the extension if needed."""
    return _extension.load().cpu_isa()


def set_cpu_isa(name: str) -> str:
    """Force the CPU kernel path ('default', 'avx2', 'avx512', or 'auto'); returns the one in use.
    Raises ValueError for a path this CPU or build cannot run."""
    return _extension.load().set_cpu_isa(name)
