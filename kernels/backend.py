"""The ``triton`` backend: fused multi-tensor Triton kernels behind the contract of
``fused_balance.backends`` (same semantics as ``fused_balance.reference``).

Every stage is one launch over all tensors (the Gram two: partials, then a fixed-order segment
sum), driven by a device table of data pointers and a chunk plan (``pointer_table.py``).

The kernels are exposed as ``torch.library.custom_op`` ops (``fused_balance::triton_gram``,
``triton_combine``, ``triton_combine_into``, ``triton_balanced_adamw``) with fake kernels and
autograd for gram and combine, so ``torch.compile(fullgraph=True)`` traces through them without a
graph break. Not ``torch.library.triton_op``: that traces the op's body with fake tensors (to
decompose it into the graph), and a pointer table needs the real ``data_ptr()`` of every tensor,
which fake and functional tensors refuse. An opaque custom op builds the table at run time.
"""
from __future__ import annotations

import os

import torch

try:
    import triton

    from . import adamw as _adamw  # noqa: F401  (registers fused_balance::triton_balanced_adamw)
    from . import combine as _combine
    from . import common as _common
    from . import gram as _gram  # noqa: F401  (registers fused_balance::triton_gram)
    _IMPORT_ERROR: Exception | None = None
except Exception as exc:  # no Triton (or a broken one): report it through availability()
    _IMPORT_ERROR = exc

__all__ = ["availability", "describe", "gram", "combine", "combine_into", "balanced_adamw_"]

_NO_GPU = "Triton needs a GPU; set TRITON_INTERPRET=1 to run the interpreter on CPU"


def availability(device) -> tuple[bool, str]:
    device = torch.device(device)
    if _IMPORT_ERROR is not None:
        return False, f"Triton cannot be imported: {_IMPORT_ERROR}"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return False, _NO_GPU
        if not _common.INTERPRETED:
            return False, ("TRITON_INTERPRET=1 was set after the Triton kernels were compiled; "
                           "set it before importing fused_balance")
        return True, "Triton interpreter (slow, for tests)"
    if device.type == "cuda":
        if _common.INTERPRETED:
            return False, ("the Triton kernels were loaded under TRITON_INTERPRET=1, which runs "
                           "CPU tensors only")
        if not torch.cuda.is_available():
            return False, "no CUDA device visible to torch"
        index = device.index if device.index is not None else torch.cuda.current_device()
        return True, f"Triton {triton.__version__} on {torch.cuda.get_device_name(index)}"
    return False, f"Triton kernels do not run on {device.type} tensors"


def describe() -> str:
    """One line for `fused-balance info`."""
    if _IMPORT_ERROR is not None:
        return f"triton: not importable ({_IMPORT_ERROR})"
    parts = [f"triton {triton.__version__}"]
    if _common.INTERPRETED:
        parts.append("interpreter (TRITON_INTERPRET=1): CPU tensors only, slow")
    elif torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        parts.append(f"GPU {torch.cuda.get_device_name()} (sm_{major}{minor})")
        parts.append("autotuning " + ("on" if _common.autotune_enabled() else
                                      "off (FUSED_BALANCE_TRITON_AUTOTUNE=0)"))
    else:
        parts.append("no GPU (set TRITON_INTERPRET=1 for the CPU interpreter)")
    return "; ".join(parts)


def _check_loaded():
    if _IMPORT_ERROR is not None:
        raise RuntimeError(f"the triton backend cannot run: {_IMPORT_ERROR}") from _IMPORT_ERROR


def gram(flat, num_objectives, segment_ids, num_segments):
    _check_loaded()
    return torch.ops.fused_balance.triton_gram(list(flat), num_objectives, list(segment_ids),
                                               num_segments)


def combine(flat, num_objectives, weights, segment_ids):
    _check_loaded()
    buffer = torch.ops.fused_balance.triton_combine(list(flat), num_objectives, weights,
                                                    list(segment_ids))
    P = len(flat) // num_objectives
    return _combine.split_flat_output(buffer, flat[:P], 1)


def combine_into(flat, num_objectives, weights, segment_ids, out, skip):
    _check_loaded()
    with torch.no_grad():  # an optimizer-side write, as in the reference
        torch.ops.fused_balance.triton_combine_into(list(flat), num_objectives, weights,
                                                    list(segment_ids), list(out), skip)


def balanced_adamw_(flat, num_objectives, weights, segment_ids, params, exp_avgs, exp_avg_sqs,
                    lrs, weight_decays, beta1, beta2, eps, step, skip):
    _check_loaded()
    P = len(params)
    lrs = [float(x) for x in lrs] if isinstance(lrs, (list, tuple)) else [float(lrs)] * P
    weight_decays = ([float(x) for x in weight_decays] if isinstance(weight_decays, (list, tuple))
                     else [float(weight_decays)] * P)
    with torch.no_grad():
        torch.ops.fused_balance.triton_balanced_adamw(
            list(flat), num_objectives, weights, list(segment_ids), list(params), list(exp_avgs),
            list(exp_avg_sqs), lrs, weight_decays, float(beta1), float(beta2), float(eps),
            float(step), skip)
