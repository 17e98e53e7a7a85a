"""The ``torch`` backend: plain PyTorch per tensor (``fused_balance.reference``), the tests' oracle;
its bank ops (BalancePlan's) are ``fused_balance.reference_bank``."""
from fused_balance.reference import (availability, balanced_adamw_, combine, combine_into,  # noqa: F401
                                     gram)
from fused_balance.reference_bank import bank_adamw_, bank_combine_into, bank_gram  # noqa: F401

name = "torch"
