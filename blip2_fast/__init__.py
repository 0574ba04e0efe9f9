"""blip2-fast: BLIP-2 Q-Former training on fused kernels, held to a plain PyTorch reference.

Names are imported on first use, so ``import blip2_fast`` stays cheap (no transformers)
for kernel processes that only need the attention or FFN code.
"""

import importlib

_EXPORTS = {
    "MaskKind": "blip2_fast.attention",
    "attention": "blip2_fast.attention",
    "attention_ref": "blip2_fast.attention",
    "QFormerConfig": "blip2_fast.config",
    "VisionConfig": "blip2_fast.config",
    "ImageContext": "blip2_fast.qformer",
    "KVCache": "blip2_fast.qformer",
    "QFormer": "blip2_fast.qformer",
    "QueryOutput": "blip2_fast.qformer",
    "load_checkpoint": "blip2_fast.checkpoint",
    "load_lavis": "blip2_fast.checkpoint",
    "load_qformer": "blip2_fast.checkpoint",
    "load_transformers": "blip2_fast.checkpoint",
    "save_qformer": "blip2_fast.checkpoint",
    "Blip2Stage1": "blip2_fast.stage1",
    "Blip2Stage2": "blip2_fast.stage2",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'blip2_fast' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
