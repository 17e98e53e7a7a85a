"""The training demo (`fused-balance train`, `make demo`): vanilla LoRA vs Pareto-LoRA on a tiny
unified text+image model with synthetic caption <-> picture data."""

__all__ = ["add_arguments", "main"]


def __getattr__(name):  # lazy, so `python -m fused_balance.demo.run` does not import run twice
    if name in __all__:
        from fused_balance.demo import run
        return getattr(run, name)
    raise AttributeError(name)
