"""Every documented way of running the project, from the repository root, leaves PyPI's ``kernels`` unshadowed.

The top-level ``kernels/`` folder installs as ``blip2_fast.kernels``; were the repository root on
``sys.path``, ``import kernels`` (which transformers' BLIP-2 modeling does) would find it instead of the
PyPI package. The pytest runs collect test files that import transformers' BLIP-2 modeling; the launcher's
training step is checked by ``test_default_run.py`` with the same probe.
"""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from import_probe import ROOT, assert_unshadowed, probe_env

PY = sys.executable
PYTEST = str(Path(PY).with_name("pytest"))

ENTRY_POINTS = {
    "python -m pytest": [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                         "tests/test_transformers_parity.py"],
    "pytest": [PYTEST, "-q", "-p", "no:cacheprovider", "--collect-only", "tests/test_transformers_parity.py"],
    "pytest benchmarks": [PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", "benchmarks/"],
    "script train.py": [PY, "blip2_fast/train.py", "--stage", "1", "--help"],
    "script train.py stage 2": [PY, "blip2_fast/train.py", "--stage", "2", "--help"],
    "-m blip2_fast.train": [PY, "-m", "blip2_fast.train", "--help"],
    "-m blip2_fast.evaluate": [PY, "-m", "blip2_fast.evaluate", "--help"],
    "-m blip2_fast.evaluate_stage2": [PY, "-m", "blip2_fast.evaluate_stage2", "--help"],
    "script report.py": [PY, "benchmarks/report.py", "--help"],
    "script cpu_figure.py": [PY, "benchmarks/cpu_figure.py", "--help"],
    # what DeepSpeed's launcher process (python -m deepspeed.launcher.launch) or a user's script has
    "root first on sys.path": [PY, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import transformers"],
}  # fmt: skip


def test_pypi_kernels_is_installed():
    """The entry-point checks mean something only beside the real package (transformers 5.25+ pulls it)."""
    assert importlib.metadata.version("kernels")


@pytest.mark.parametrize("mode", list(ENTRY_POINTS))
def test_entry_point_finds_pypi_kernels(mode, tmp_path):
    proc = subprocess.run(
        ENTRY_POINTS[mode], cwd=ROOT, env=probe_env(tmp_path), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_unshadowed(proc.stdout + proc.stderr)


def test_without_pypi_kernels_the_folder_is_still_no_top_level_package():
    """No site-packages (python -S): ``import kernels`` from the root fails as a missing module, naming the folder."""
    proc = subprocess.run([PY, "-S", "-c", "import kernels"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "ModuleNotFoundError: No module named 'kernels'" in proc.stderr and "is blip2_fast.kernels" in proc.stderr
