"""The ``triton`` backend: the fused multi-tensor Triton kernels of kernels/ (the ops
torch.ops.fused_balance.triton_*, with the C++ ops' schemas; an import failure of Triton is
reported by ``availability``)."""
from fused_balance.kernels.backend import (availability, balanced_adamw_, combine,  # noqa: F401
                                           combine_into, describe, gram)

name = "triton"
