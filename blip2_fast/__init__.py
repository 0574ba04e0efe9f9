"""blip2-fast: BLIP-2 Q-Former training on fused kernels, held to a plain PyTorch reference."""

from blip2_fast.attention import MaskKind, attention, attention_ref
from blip2_fast.checkpoint import load_checkpoint, load_lavis, load_qformer, load_transformers, save_qformer
from blip2_fast.config import QFormerConfig, VisionConfig
from blip2_fast.qformer import ImageContext, KVCache, QFormer, QueryOutput

__all__ = [
    "ImageContext",
    "KVCache",
    "MaskKind",
    "QFormer",
    "QFormerConfig",
    "QueryOutput",
    "VisionConfig",
    "attention",
    "attention_ref",
    "load_checkpoint",
    "load_lavis",
    "load_qformer",
    "load_transformers",
    "save_qformer",
]
