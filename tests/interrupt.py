"""A training command stopped as a cluster stops a job: SIGTERM to its whole process group (launcher,
ranks and data-loader workers alike), once its metrics show that it is training."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path


def logged_steps(metrics: Path) -> list[int]:
    if not metrics.is_file():
        return []
    with metrics.open() as f:  # rewritten whole by a rename: never half-written
        return [int(r["step"]) for r in csv.DictReader(f) if r.get("loss")]


def sigterm_once_training(command: list[str], metrics: Path, *, steps: int = 2, timeout: float = 600, **popen):
    """Run ``command`` in a session of its own, SIGTERM its process group once ``metrics`` (a metrics.csv)
    holds ``steps`` steps, and return the finished process with its output (``stdout``, ``stderr``)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # pipes could fill up
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True, start_new_session=True, **popen)
        deadline = time.monotonic() + timeout  # a bound on a hung run, not part of any verdict
        while len(logged_steps(metrics)) < steps and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        out.seek(0)
        err.seek(0)
        proc.stdout, proc.stderr = out.read(), err.read()
    return proc
