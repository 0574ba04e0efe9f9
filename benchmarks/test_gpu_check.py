"""The GPU check script, where there is no GPU: it stops at once, with one clear line and exit status 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("gpu_check.sh")


def run_check(python: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "PYTHON": python}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)


def test_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the check would run")
def test_without_a_gpu_it_stops_with_a_reason():
    proc = run_check(sys.executable)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    reason = "no CUDA device: torch.cuda.is_available() is False (this check needs a GPU)"
    assert proc.stderr.strip() == f"gpu_check: {reason}"
    assert proc.stdout == ""


def test_a_python_without_torch_is_named(tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'torch'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    proc = run_check(str(fake))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"gpu_check: torch does not import or hangs under {fake}: ModuleNotFoundError")
