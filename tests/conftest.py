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


@pytest.fixture
def make_run_folder():
    """Write a small untrained stage-1 run folder as training leaves it; returns its Q-Former and ViT."""
    import yaml
    from safetensors.torch import save_file

    from blip2_fast.checkpoint import save_qformer
    from blip2_fast.config import QFormerConfig, VisionConfig
    from blip2_fast.qformer import QFormer
    from blip2_fast.train import load_config
    from blip2_fast.vision import ImageEncoder

    def make(folder, *overrides: tuple[str, str]):
        config = load_config(None, [("model.vision", '{"preset": "tiny", "image_size": 32}'), *overrides])
        vision = ImageEncoder(VisionConfig.from_dict(config.model.vision))
        vision.reset_parameters()
        qformer = QFormer(QFormerConfig.preset("tiny", encoder_width=vision.config.hidden_size, vocab_size=30524))
        folder.mkdir(parents=True, exist_ok=True)
        save_qformer(qformer, folder / "model.safetensors")
        save_file(vision.state_dict(), str(folder / "vision.safetensors"))
        (folder / "config.yaml").write_text(yaml.safe_dump(config.to_dict()))
        return qformer.eval(), vision

    return make
