"""The ``cpp`` backend: the C++ CPU and CUDA kernels of csrc/ as torch.ops.fused_balance.*
(registration, fake kernels and autograd live in ``fused_balance.ops``)."""
from fused_balance.ops import (availability, balanced_adamw_, bank_adamw_, bank_combine_into,  # noqa: F401
                               bank_gram, combine, combine_into, gram)

name = "cpp"
