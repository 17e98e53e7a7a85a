"""Dtype rules shared by every backend."""
import torch

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reductions accumulate in fp32, or fp64 for fp64 inputs (docs/design.md)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
