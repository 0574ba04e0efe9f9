"""Where ``import kernels`` resolves inside a subprocess, seen after the process's own code has run.

``probe_env(folder)`` returns an environment whose Python processes (launcher children included) load a
``sitecustomize`` from ``folder``. At exit, with ``sys.path`` as the entry point left it, it prints one
line: ``import-probe: ok <origin of kernels>`` (what ``import kernels``, as transformers' BLIP-2 modeling
does it, finds or found) or ``import-probe: error <exception>``. It only looks the module up: importing
torch-based modules while the interpreter shuts down fails on its own. ``assert_unshadowed(output)``
reads those lines back.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_SITECUSTOMIZE = """
import atexit, sys


def _probe():
    try:
        import importlib.util

        spec = importlib.util.find_spec("kernels")
        line = f"ok {spec.origin if spec else None}"
    except BaseException as e:
        line = f"error {type(e).__name__}: {e}".replace("\\n", " ")
    sys.stderr.write(f"\\nimport-probe: {line}\\n")
    sys.stderr.flush()


atexit.register(_probe)
"""


def probe_env(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    bin_dir = str(Path(sys.executable).parent)  # this environment's console scripts (pytest, deepspeed)
    return {**os.environ, "PYTHONPATH": path, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def assert_unshadowed(output: str) -> None:
    """Every Python process behind ``output`` found ``kernels`` outside the repository's kernels/ folder."""
    results = re.findall(r"^import-probe: (.*)$", output, flags=re.MULTILINE)
    assert results, "no process reported where `kernels` resolves:\n" + output[-3000:]
    for line in results:
        assert line.startswith("ok "), line
        assert not line.removeprefix("ok ").startswith(str(ROOT / "kernels")), line
