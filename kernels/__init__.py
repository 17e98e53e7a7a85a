"""Triton kernels of fused_balance (installed as ``fused_balance.kernels``).

``backend`` is the module behind ``backend="triton"``; ``gram``, ``combine`` and ``adamw`` hold one
op each (kernel, launch, custom-op and autograd registration); ``pointer_table`` builds and caches
the device tables that let one launch cover many tensors. Import ``backend`` (not this package) to
load Triton: on CPU set TRITON_INTERPRET=1 before that import.
"""
