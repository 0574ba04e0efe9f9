import os

# The Triton interpreter runs kernels on CPU tensors; it must be chosen before triton is imported.
if not os.environ.get("BLIP2_FAST_GPU_TESTS"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def kernel_device():
    """CUDA as the default device when the GPU check runs the kernel tests for real (see kernel_device.py)."""
    from kernel_device import DEVICE

    previous = torch.get_default_device()
    torch.set_default_device(DEVICE)
    yield DEVICE
    torch.set_default_device(previous)
