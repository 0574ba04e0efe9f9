"""Fused Triton kernels, installed as ``blip2_fast.kernels``.

One kernel family per file: jit kernels -> launcher -> ``torch.autograd.Function``
-> functional API with the same signature as its reference twin in ``blip2_fast``.
"""

if __name__ == "kernels":
    # Imported as a top-level ``kernels``: a process (DeepSpeed's launcher, say) has the repository root on
    # sys.path. That name belongs to PyPI's hub-kernels package, which transformers imports: load it in
    # this module's place, found on sys.path without the root, or fail as a missing module would.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None or _spec.loader is None:
        raise ModuleNotFoundError(
            f"No module named 'kernels' ({_root}/kernels is blip2_fast.kernels, not a top-level package)",
            name="kernels",
        )
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # what the import statement returns, as for any module replacing itself
    _spec.loader.exec_module(_module)
