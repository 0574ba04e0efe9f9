"""Where the kernel tests run.

By default on CPU tensors under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET). With
BLIP2_FAST_GPU_TESTS=1 on a CUDA machine (benchmarks/gpu_check.sh) the same tests run the compiled kernels:
a module that uses the ``kernel_device`` fixture makes CUDA the default device, and draws its random inputs
from ``generator``, which lives on that device.
"""

import os

import torch

ON_GPU = bool(os.environ.get("BLIP2_FAST_GPU_TESTS")) and torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def generator(seed: int) -> torch.Generator:
    return torch.Generator(DEVICE).manual_seed(seed)
