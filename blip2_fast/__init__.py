"""blip2-fast: BLIP-2 Q-Former training on fused kernels, held to a plain PyTorch reference.

Names are imported on first use, so ``import blip2_fast`` stays cheap (no transformers)
for kernel processes that only need the attention or FFN code.
"""

import importlib
import os
import sys


def _leave_checkout_root_off_sys_path() -> None:
    """Take a source checkout's root off ``sys.path``, where its ``kernels/`` would shadow PyPI's ``kernels``.

    transformers imports the PyPI package ``kernels``; our top-level ``kernels/`` folder installs only as
    ``blip2_fast.kernels``. ``python -m ...`` and ``python -m pytest`` from the root put the root first on
    ``sys.path`` all the same, so every process that imports this package drops it here, before anything
    imports transformers. The installed package (editable or not) never needs the root on the path.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(root, "pyproject.toml")) and os.path.isfile(os.path.join(root, "kernels", "aot.py")):
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]


_leave_checkout_root_off_sys_path()

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
