"""The ``torch`` backend: plain PyTorch per tensor (``fused_balance.reference``), the tests' oracle."""
from fused_balance.reference import (availability, balanced_adamw_, combine, combine_into,  # noqa: F401
                                     gram)

name = "torch"
