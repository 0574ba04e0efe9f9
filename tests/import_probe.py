"""What ``import kernels`` gives inside a subprocess, seen after the process's own code has run.

``probe_env(folder)`` returns an environment whose Python processes (launcher children included) load a
``sitecustomize`` from ``folder``. At exit, with ``sys.path`` as the entry point left it, it imports
``kernels`` as transformers' BLIP-2 modeling does, in a fresh interpreter given that path (importing
torch-based modules while an interpreter shuts down fails on its own), and prints one line:
``import-probe: ok <file of the module> <whether it has CUDAProperties>`` or ``import-probe: error <why>``.
``assert_unshadowed(output)`` reads those lines back.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, sys
sys.path[:] = json.loads(sys.argv[1])
import kernels
print(kernels.__file__, hasattr(kernels, "CUDAProperties"))
"""

_SITECUSTOMIZE = f"""
import atexit, os, sys

_CHILD = {_CHILD!r}


def _probe():
    import json, subprocess

    env = dict(os.environ, IMPORT_PROBE_CHILD="1")
    cmd = [sys.executable, "-c", _CHILD, json.dumps(sys.path)]
    child = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if child.returncode == 0:
        line = "ok " + child.stdout.strip()
    else:
        line = "error " + (child.stderr.strip().splitlines() or ["?"])[-1]
    sys.stderr.write("\\nimport-probe: " + line + "\\n")
    sys.stderr.flush()


if not os.environ.get("IMPORT_PROBE_CHILD"):
    atexit.register(_probe)
"""


def probe_env(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    path = os.pathsep.join(p for p in (str(folder), os.environ.get("PYTHONPATH", "")) if p)
    bin_dir = str(Path(sys.executable).parent)  # this environment's console scripts (pytest, deepspeed)
    return {**os.environ, "PYTHONPATH": path, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def assert_unshadowed(output: str) -> None:
    """Every Python process behind ``output`` imports PyPI's ``kernels``, not the repository's kernels/ folder."""
    results = re.findall(r"^import-probe: (.*)$", output, flags=re.MULTILINE)
    assert results, "no process reported what `import kernels` gives:\n" + output[-3000:]
    for line in results:
        assert line.startswith("ok ") and line.endswith(" True"), line  # PyPI's package, with its API
        assert not line.removeprefix("ok ").startswith(str(ROOT / "kernels")), line
