"""Helpers shared by the benchmark files: size sets, backend availability, timing, recorded metadata."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import platform
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch._functorch.config

from blip2_fast import QFormerConfig

ROOT = Path(__file__).resolve().parents[1]
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# Below this a call's host side (Python, launches) can outlast its kernels, and CUDA events then time the host:
# such calls are also timed replayed from a CUDA graph, which is the kernels' own time.
GRAPH_THRESHOLD_MS = 1.0
# do_bench repeats a call for about this long: a call over a tenth of it gets fewer than 10 samples there, and
# is timed by the median of its synchronised pytest-benchmark rounds instead
DO_BENCH_REP_MS = 50

# "bwd" times the backward alone by re-running it over one kept graph (retain_graph). A compiled backward
# (flex's) that donates its saved buffers can run only once per graph, so donation is off for every compile
# of the suite, set before the first (older torch has no such option and donates nothing).
if hasattr(torch._functorch.config, "donated_buffer"):
    torch._functorch.config.donated_buffer = False


def make_kernels_importable() -> None:
    """Kernels live in the top-level ``kernels/`` but import as ``blip2_fast.kernels`` (pyproject's package-dir).

    An (editable) install provides that mapping; a bare checkout does not, so the
    repository root joins ``blip2_fast``'s search path and ``kernels/`` resolves
    as its subpackage.
    """
    import blip2_fast

    if importlib.util.find_spec("blip2_fast.kernels") is None and (ROOT / "kernels" / "__init__.py").is_file():
        blip2_fast.__path__.append(str(ROOT))


make_kernels_importable()


@dataclasses.dataclass(frozen=True)
class Sizes:
    """One size set. Q-Former shapes are fixed (32 queries, 35 text tokens, 12 heads x 64, 257 image tokens)."""

    dtypes: tuple[torch.dtype, ...]
    attn_batch: tuple[int, ...]  # mask paths and cross-attention
    ffn_batch: tuple[int, ...]  # rows = batch * 32 query tokens
    decode_batch: tuple[int, ...]
    decode_tokens: tuple[int, ...]  # tokens generated per call
    e2e_batch: tuple[int, ...]  # stage-1 step and Q-Former forward
    rounds: int  # pytest-benchmark rounds per measurement
    # QFormerConfig preset of the whole-model groups (end to end, captioning), and a layer count
    # overriding the preset's: a BLIP-2-sized stage-1 step takes ~20 s on 2 idle CPU cores
    model_preset: str = "blip2"
    model_layers: int | None = None

    @property
    def model_label(self) -> str:
        return self.model_preset + (f"-{self.model_layers}L" if self.model_layers else "")

    def qformer_config(self, **overrides: object) -> QFormerConfig:
        if self.model_layers:
            overrides["num_hidden_layers"] = self.model_layers
        return QFormerConfig.preset(self.model_preset, **overrides)


SIZE_SETS = {
    ("cpu", True): Sizes(
        (torch.float32,), (2,), (2,), (2,), (1, 8), (2,), rounds=5, model_preset="minilm", model_layers=2
    ),
    ("cpu", False): Sizes((torch.float32,), (8,), (8,), (4,), (1, 8, 32), (4,), rounds=5),
    # the stage-1 step at B=32 and at LAVIS's 100 images per GPU
    ("cuda", True): Sizes((torch.bfloat16,), (64,), (64,), (16,), (1, 32), (32, 100), rounds=10),
    ("cuda", False): Sizes(
        (torch.bfloat16, torch.float16), (8, 64, 256), (8, 64, 256), (1, 16), (1, 8, 32), (32, 128), rounds=20
    ),
}

BACKENDS = ("reference", "sdpa", "flex", "xformers", "triton")
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def sizes(config: pytest.Config) -> Sizes:
    return SIZE_SETS[(DEVICE.type, bool(config.getoption("quick")))]


# ------------------------------------------------------------------ backends


def _backend_problem(name: str, *, backward: bool, interpret: bool) -> str | None:
    """Why ``name`` cannot run here (None when it can)."""
    if name in ("reference", "sdpa"):
        return None
    if name == "triton" and not CUDA and not interpret:
        return "triton on CPU runs only in the interpreter: pass --triton-interpret (it measures nothing about speed)"
    if name == "xformers" and not CUDA:
        return "xformers has no CPU kernels"
    if name == "flex" and not CUDA and backward:
        return "flex attention on CPU is benchmarked forward only"
    module = {"flex": "blip2_fast.kernels.flex", "xformers": "blip2_fast.kernels.xformers"}.get(
        name, "blip2_fast.kernels.attention"
    )
    # the xformers backend imports xformers itself only when called
    modules = [module, "xformers.ops"] if name == "xformers" else [module]
    for mod in modules:
        try:
            importlib.import_module(mod)
        except Exception as exc:  # any import failure is a reason to report, not to hide
            return f"{mod} does not import: {type(exc).__name__}: {exc}"
    return None


def require_backend(request: pytest.FixtureRequest, name: str, *, backward: bool = False) -> None:
    """Skip, with the reason, when the attention backend ``name`` cannot run on this machine."""
    problem = _backend_problem(name, backward=backward, interpret=request.config.getoption("triton_interpret"))
    if problem:
        pytest.skip(f"{name}: {problem}")


def require_module(request: pytest.FixtureRequest, module: str, what: str) -> None:
    if not CUDA and not request.config.getoption("triton_interpret"):
        pytest.skip(f"{what}: Triton on CPU runs only in the interpreter: pass --triton-interpret")
    try:
        importlib.import_module(module)
    except Exception as exc:
        pytest.skip(f"{what}: {module} does not import: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------ measurement


def device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model or platform.processor() or platform.machine()} x{os.cpu_count()}"


def environment() -> dict[str, object]:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # triton is optional on CPU
        triton_version = None
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        # other processes on a shared CPU distort timings: keep the load next to them
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def saved_for_backward_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the tensors autograd keeps for backward during one call of ``fn`` (views of one storage count once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def measure(
    benchmark,
    fn: Callable[[], object],
    *,
    case: str,
    backend: str,
    rounds: int,
    flops: float | None = None,
    nbytes: float | None = None,
    graph: bool = False,
    memory_of: Callable[[], object] | None = None,
    warmup: int | None = None,
    **extra: object,
) -> float:
    """Time ``fn`` (warm-up first, synchronised) and record the result; returns the time in ms used for ratios.

    ``flops`` / ``nbytes`` per call give TFLOP/s / GB/s. ``graph`` allows a CUDA
    graph figure when the call is shorter than ``GRAPH_THRESHOLD_MS`` (``fn`` must be capturable).
    ``memory_of`` is the call whose saved-for-backward bytes are recorded.
    """
    info = benchmark.extra_info
    info.update(environment())
    info.update(case=case, backend=backend, **extra)
    benchmark.group = case
    warmup = warmup if warmup is not None else (2 if CUDA else 1)
    for _ in range(warmup):  # compile / autotune / allocator warm-up, outside any timing
        fn()
    sync()
    if memory_of is not None:
        info["saved_for_backward_bytes"] = saved_for_backward_bytes(memory_of)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        info["peak_mem_bytes"] = torch.cuda.max_memory_allocated() - base

        from triton.testing import do_bench

        ms = float(do_bench(fn, warmup=10, rep=DO_BENCH_REP_MS, return_mode="median"))
        info["cuda_event_ms"] = ms
        if graph and ms < GRAPH_THRESHOLD_MS:
            try:
                from triton.testing import do_bench_cudagraph

                info["cuda_graph_ms"] = float(do_bench_cudagraph(fn, rep=20, return_mode="median"))
            except Exception as exc:  # capture fails for some paths (CPU syncs, allocations): say so
                info["cuda_graph_error"] = f"{type(exc).__name__}: {exc}"[:200]

    def timed() -> None:
        fn()
        sync()

    benchmark.pedantic(timed, rounds=rounds, iterations=1)
    # CPU: the fastest round, as timeit advises: other processes on a shared machine only ever add time
    ms = info.get("cuda_event_ms") or benchmark.stats.stats.min * 1e3
    if CUDA and ms > DO_BENCH_REP_MS / 10:
        ms = benchmark.stats.stats.median * 1e3
        info["timing"] = f"median of {rounds} synchronised rounds (do_bench had fewer than 10 samples)"
    info["ms"] = ms
    if flops:
        info["tflops"] = flops / (ms * 1e-3) / 1e12
    if nbytes:
        info["gbps"] = nbytes / (ms * 1e-3) / 1e9
    return ms


# ------------------------------------------------------------------ attention inputs (Q-Former shapes)

N_QUERY, N_TEXT, HEADS, HEAD_DIM, N_IMAGE = 32, 35, 12, 64, 257
PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def qkv(batch: int, rows: int, keys: int, dtype: torch.dtype, grad: bool) -> tuple[torch.Tensor, ...]:
    shapes = ((batch, HEADS, rows, HEAD_DIM), (batch, HEADS, keys, HEAD_DIM), (batch, HEADS, keys, HEAD_DIM))
    return tuple(torch.randn(s, device=DEVICE, dtype=dtype).requires_grad_(grad) for s in shapes)


def ragged_padding(batch: int, n_keys: int, n_fixed: int) -> torch.Tensor:
    """(B, Lk) bool: the first ``n_fixed`` keys are always real, the rest end at a random length (at least 1)."""
    lengths = torch.randint(1, n_keys - n_fixed + 1, (batch,), device=DEVICE) + n_fixed
    lengths[0] = n_keys  # one full row, as in a real batch padded to its longest caption
    return torch.arange(n_keys, device=DEVICE)[None, :] < lengths[:, None]


def pass_fn(call, inputs: tuple[torch.Tensor, ...], which: str):
    """The callable to time for one pass: forward, backward over a kept graph, or both."""
    if which == "fwd":
        return call
    out = call()
    grad = torch.randn_like(out)
    if which == "bwd":
        return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)
    return lambda: torch.autograd.grad(call(), inputs, grad)


def attention_flops(batch: int, rows: int, keys: int) -> float:
    return 4.0 * batch * HEADS * rows * keys * HEAD_DIM
