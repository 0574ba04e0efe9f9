"""The GPU check script, where there is no GPU: it stops at once, with one clear line and exit status 2."""

import json
import re
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


def test_a_spent_time_budget_skips_the_rest_and_the_json_keeps_what_was_measured(tmp_path):
    # what gpu_check.sh relies on: pytest-benchmark writes its JSON only when a run ends normally
    out = tmp_path / "ffn.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench_ffn.py", "-k", "eager", "--benchmark-only", "--quick", "-p",
         "no:cacheprovider", "--time-budget", "0", f"--benchmark-json={out}", "-rs"],
        cwd=SCRIPT.parent, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    measured = json.loads(out.read_text())["benchmarks"]
    assert len(measured) == 1  # the budget starts with the first test: 0 s lets exactly that one run (-k: all could)
    assert re.search(r"SKIPPED \[\d+\] .*not measured: the run's --time-budget of 0 s was spent", proc.stdout)
