"""The ``triton`` backend: the fused multi-tensor Triton kernels of kernels/ (the ops
torch.ops.fused_balance.triton_*, with the C++ ops' schemas; an import failure of Triton is
reported by ``availability``). Its bank ops (BalancePlan's) come from ``fused_balance.kernels.bank``
when that module is there; without it the backend has none (``BANK_OPS_MISSING`` says why) and a
plan asked for ``backend="triton"`` raises."""
import importlib

from fused_balance.kernels.backend import (availability, balanced_adamw_, combine,  # noqa: F401
                                           combine_into, describe, gram)

name = "triton"

try:
    _bank_kernels = importlib.import_module("fused_balance.kernels.bank")
    BANK_OPS_MISSING = None
except Exception as exc:  # a missing Triton must not break the list ops' backend
    missing = isinstance(exc, ModuleNotFoundError) and exc.name == "fused_balance.kernels.bank"
    BANK_OPS_MISSING = ("the Triton bank kernels (fused_balance.kernels.bank) are not part of this build yet"
                        if missing else f"the Triton bank kernels cannot be imported: {type(exc).__name__}: {exc}")

if BANK_OPS_MISSING is None:  # the registered ops (a dispatch recorder and torch.compile see them)
    _bank_ops = _bank_kernels.plan_ops()
    bank_gram = _bank_ops["gram"]
    bank_combine_into = _bank_ops["combine_into"]

    def bank_adamw_(bank, weights, chunks, param_ptrs, exp_avg, exp_avg_sq, hyper, step, skip, live, *,
                    params=None):
        """The parameters are written through ``param_ptrs`` (``params`` is not read)."""
        _bank_ops["adamw_"](bank, weights, chunks, param_ptrs, exp_avg, exp_avg_sq, hyper, step, skip, live)
