"""The ``triton`` backend: fused multi-tensor Triton kernels behind the contract of
``fused_balance.backends`` (same semantics as ``fused_balance.reference``).

Every stage is one launch over all tensors (the Gram two: partials, then a fixed-order segment
sum), driven by a device table of data pointers and a chunk plan (``pointer_table.py``).

The kernels are the ops ``fused_balance::triton_gram``, ``triton_combine``, ``triton_combine_into``
and ``triton_balanced_adamw_``, with the C++ ops' schemas, fake kernels and autograd
(fused_balance.ops), so ``torch.compile(fullgraph=True)`` traces through them without a
graph break. Not ``torch.library.triton_op``: that traces the op's body with fake tensors (to
decompose it into the graph), and a pointer table needs the real ``data_ptr()`` of every tensor,
which fake and functional tensors refuse. An opaque op builds the table at run time.
"""
from __future__ import annotations

import os

import torch

from fused_balance.ops import ListOps

try:
    import triton

    from . import adamw as _adamw  # noqa: F401  (implements fused_balance::triton_balanced_adamw_)
    from . import combine as _combine  # noqa: F401  (triton_combine, triton_combine_into)
    from . import common as _common
    from . import gram as _gram  # noqa: F401  (triton_gram)
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


_LIST_OPS = ListOps("triton_", _check_loaded)
gram, combine, combine_into, balanced_adamw_ = (
    _LIST_OPS.gram, _LIST_OPS.combine, _LIST_OPS.combine_into, _LIST_OPS.balanced_adamw_)
