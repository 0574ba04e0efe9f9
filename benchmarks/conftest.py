"""Shared set-up of the benchmark suite: size sets, backend availability, timing and what every result records.

Run with ``pytest benchmarks/ --benchmark-only`` (the project's ``addopts`` skip
benchmarks otherwise). ``--quick`` picks the small size set; on CPU the Triton
backend runs only under ``--triton-interpret`` (Triton's CPU interpreter: slow,
and it says nothing about speed). Every backend that cannot run is skipped with
its reason, visible in the ``-ra`` summary.

What each result's ``extra_info`` holds: ``backend`` (or implementation),
``case`` (what is compared across backends), the timing used for ratios
(``ms``: CUDA-event median on a GPU, the fastest pytest-benchmark round on CPU),
``cuda_graph_ms`` for GPU calls under 1 ms (their kernels alone), ``tflops`` or ``gbps`` where
they mean something, ``peak_mem_bytes`` (CUDA allocator peak) or
``saved_for_backward_bytes`` (activations autograd keeps, on any device), the
device name and the torch/triton versions.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton reads TRITON_INTERPRET when it is first imported, which importing blip2_fast already does:
# the choice is made here, from the command line, before benchutil is imported.
INTERPRET = "--triton-interpret" in sys.argv or os.environ.get("BLIP2_FAST_BENCH_INTERPRET") == "1"
if INTERPRET and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from benchutil import BACKENDS, CUDA, DTYPE_NAMES, sizes  # noqa: E402

_FIRST_TEST = pytest.StashKey[float]()  # when the first test began


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("blip2-fast benchmarks")
    group.addoption("--quick", action="store_true", help="small size set (CPU: the whole suite in under 5 minutes)")
    group.addoption(
        "--triton-interpret",
        action="store_true",
        default=os.environ.get("BLIP2_FAST_BENCH_INTERPRET") == "1",
        help="on CPU, include the triton backend through TRITON_INTERPRET=1 (env BLIP2_FAST_BENCH_INTERPRET=1)",
    )
    group.addoption(
        "--time-budget",
        type=float,
        metavar="SECONDS",
        help="skip, with that reason, every test that would start more than SECONDS after the first: the run still "
        "ends normally and writes --benchmark-json (one stopped by a signal writes nothing)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("triton_interpret") and not CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        raise pytest.UsageError("--triton-interpret: pass it on the command line (or set BLIP2_FAST_BENCH_INTERPRET=1)")
    if CUDA and os.environ.get("TRITON_INTERPRET") == "1":
        raise pytest.UsageError("TRITON_INTERPRET=1 is set on a CUDA machine: GPU timings would be meaningless")


def pytest_runtest_setup(item: pytest.Item) -> None:
    budget = item.config.getoption("time_budget")
    now = time.monotonic()
    if budget is not None and now - item.config.stash.setdefault(_FIRST_TEST, now) > budget:
        pytest.skip(f"not measured: the run's --time-budget of {budget:g} s was spent")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrise the shared axes by name, from the size set chosen on the command line."""
    s = sizes(metafunc.config)
    axes: dict[str, tuple] = {
        "backend": BACKENDS,
        "dtype": s.dtypes,
        "attn_batch": s.attn_batch,
        "ffn_batch": s.ffn_batch,
        "decode_batch": s.decode_batch,
        "decode_tokens": s.decode_tokens,
        "e2e_batch": s.e2e_batch,
    }
    for name, values in axes.items():
        if name in metafunc.fixturenames:
            ids = [DTYPE_NAMES[v] if isinstance(v, torch.dtype) else f"{name.split('_')[-1]}{v}" for v in values]
            if name == "backend":
                ids = list(values)
            metafunc.parametrize(name, values, ids=ids)


@pytest.fixture
def rounds(request: pytest.FixtureRequest) -> int:
    return sizes(request.config).rounds


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    """Collect ``bench_*.py`` (pytest's default pattern is ``test_*.py``); files named on the command line
    are collected by pytest itself."""
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
