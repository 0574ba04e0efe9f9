"""Fused Triton kernels, installed as ``blip2_fast.kernels``.

One kernel family per file: jit kernels -> launcher -> ``torch.autograd.Function``
-> functional API with the same signature as its reference twin in ``blip2_fast``.
"""
