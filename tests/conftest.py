import os

# The Triton interpreter runs kernels on CPU tensors; it must be chosen before triton is imported.
if not os.environ.get("BLIP2_FAST_GPU_TESTS"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Before any test module imports transformers: importing blip2_fast takes the repository root off
# sys.path, where kernels/ would shadow PyPI's `kernels` (blip2_fast/__init__.py).
import blip2_fast  # noqa: E402, F401


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """What runs cache (the default stage-2 LLM) goes to a folder of this session, never the user's cache."""
    os.environ["BLIP2_FAST_CACHE"] = str(tmp_path_factory.mktemp("blip2_fast_cache"))


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


@pytest.fixture(scope="session")
def hf_retrieval_folder(tmp_path_factory):
    """A random transformers retrieval model over the real WordPiece vocabulary, saved with its tokenizer."""
    from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2VisionConfig

    from blip2_fast.text import load_tokenizer

    from random_weights import randomize

    tokenizer = load_tokenizer()
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=56,
            patch_size=14,
        ).to_dict(),
        qformer_config=Blip2QFormerConfig(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=80,
            vocab_size=len(tokenizer), max_position_embeddings=40, cross_attention_frequency=1,
            use_qformer_text_input=True,
        ).to_dict(),
        num_query_tokens=5,
        image_text_hidden_size=24,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("hf_retrieval")
    randomize(Blip2ForImageTextRetrieval(config)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
