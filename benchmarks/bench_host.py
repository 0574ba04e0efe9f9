"""Host cost per call of each fused op against its eager twin, on any CPU (``host`` group).

At the Q-Former's sizes a GPU mostly waits for the host: what a call costs in
Python, the dispatcher and launch-argument handling decides the step time. Here
that cost is timed without a GPU (see ``hostcost.py``): Triton compiles every
kernel for sm_90 for real, a stand-in driver stubs only the final C launch, and
tensors live on the ``meta`` device, whose ops run their C++ meta functions (the
host work of a CUDA op before its launch).

Cross-attention has no case: with nothing to mask, the triton backend runs it on sdpa itself
(``blip2_fast.attention.attention``). Twins: attention against ``sdpa`` (the Q-Former's sdpa backend: dense bool mask,
the choice CUDA would make between flash and memory-efficient attention), the FFN
and the residual LayerNorm block against their eager references
(``blip2_fast.layers.ffn_ref`` / ``residual_norm_ref``). BLIP-2 sizes: batch 32,
12 heads x 64, [32 queries ; 35 text] = 67 tokens, hidden 768,
FFN 3072, bf16, dropout 0.1 as in training (the one-token decode is inference).

A pass is one forward, or forward + ``torch.autograd.grad`` over the op's inputs
(as bench_ffn.py times it). Each result records ``ms`` (median per call over the
pytest-benchmark rounds; ``host_us`` the same in us, ``min_us`` the fastest), the
Triton ``launches`` per call (counted at the stub, by kernel in ``launch_kernels``),
``aten_ops`` per call (aten ops below autograd that are neither views nor
allocations: a proxy for the CUDA kernels torch launches, cuBLAS GEMMs included;
by op in ``aten_op_names``) and ``meta_python_ops``, the ops of the call that ran a
Python meta function where torch has no C++ one (6-17 us each here, against about
1 us for a C++ meta op). The fused result also holds ``ratio`` = fused host time /
twin host time, the median over alternating rounds of both calls (a shared CPU's
load drifts between two tests; the goal is at most 1.0), ``ratio_of_medians``
from the two results, and the twin's ``aten_ops`` as ``twin_aten_ops``.

What is patched while this module runs, and why it leaves the timed path as it is
(module attributes, restored afterwards; ``hostcost`` describes the driver and meta stand-ins):

- ``blip2_fast.attention.F``: ``torch.nn.functional`` with ``scaled_dot_product_attention``
  replaced by ``hostcost.sdpa_as_on_cuda``, the ops its C++ body runs on CUDA
  (on meta it would always take the math decomposition); the sdpa backend's own
  Python (mask building, the zeroing of rows that see nothing) runs as shipped.
- ``kernels.attention._check_inputs``: the same code object, run with globals in
  which ``_INTERPRET`` is True, so its ``device.type != "cuda"`` test lets meta
  tensors through; every other check runs as shipped.
- ``kernels.ffn._autocast_dtype``, ``ffn``, ``residual_norm``: the same code
  objects, with a ``torch`` whose ``autocast`` / ``is_autocast_enabled`` /
  ``get_autocast_dtype`` take the device type "meta" for "cuda" (torch rejects
  autocast on meta); each call asks what it asks on a GPU.
- ``kernels.ffn._num_programs``: the CUDA branch with a cached SM count of 132
  (an H200) instead of ``torch.cuda.get_device_properties``.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
import types
from collections.abc import Callable

import hostcost
import pytest
import torch
from benchutil import environment

import blip2_fast.attention as battn
from blip2_fast.attention import MaskKind
from blip2_fast.layers import ffn_ref, residual_norm_ref

B, HEADS, HEAD_DIM, N_QUERY, N_TEXT = 32, 12, 64, 32, 35
L = N_QUERY + N_TEXT
HIDDEN, INTERMEDIATE, EPS, DROPOUT = 768, 3072, 1e-12, 0.1
DTYPE = torch.bfloat16
META = torch.device("meta")
ROUNDS = {True: 25, False: 60}  # --quick or not; each round ~2 ms of calls

# ---------------------------------------------------------------------------------------------------------------------
# cases


@dataclasses.dataclass(frozen=True)
class Case:
    key: str  # test id
    name: str  # the op and its shape
    op: str  # "attention", "ffn", "residual-norm"
    twin: str  # the eager twin's backend name
    passes: tuple[str, ...]
    params: dict


ATTN = "attention"
CASES = [
    Case("unimodal", f"self-attn unimodal Lq={L} Lk={L}", ATTN, "sdpa", ("fwd", "fwd+bwd"),
         dict(rows=L, keys=L, mask_kind=MaskKind.UNIMODAL, n_query=N_QUERY, padded=False, dropout=DROPOUT)),
    Case("bidirectional-padded", f"self-attn bidirectional padded Lq={L} Lk={L}", ATTN, "sdpa", ("fwd", "fwd+bwd"),
         dict(rows=L, keys=L, mask_kind=MaskKind.BIDIRECTIONAL, n_query=N_QUERY, padded=True, dropout=DROPOUT)),
    Case("multimodal-causal", f"self-attn multimodal-causal Lq={L} Lk={L}", ATTN, "sdpa", ("fwd", "fwd+bwd"),
         dict(rows=L, keys=L, mask_kind=MaskKind.MULTIMODAL_CAUSAL, n_query=N_QUERY, padded=False, dropout=DROPOUT)),
    Case("itg-cache-padded", f"itg over query cache padded Lq={N_TEXT} Lk={L}", ATTN, "sdpa", ("fwd", "fwd+bwd"),
         dict(rows=N_TEXT, keys=L, mask_kind=MaskKind.MULTIMODAL_CAUSAL, n_query=N_QUERY, padded=True,
              dropout=DROPOUT)),
    Case("decode", f"decode one token Lq=1 Lk={L} eval", ATTN, "sdpa", ("fwd",),
         dict(rows=1, keys=L, mask_kind=MaskKind.MULTIMODAL_CAUSAL, n_query=N_QUERY, padded=False, dropout=0.0)),
    Case("ffn", f"ffn {HIDDEN}x{INTERMEDIATE} rows={B * N_QUERY}", "ffn", "eager", ("fwd", "fwd+bwd"), {}),
    Case("residual-norm", f"residual-norm {HIDDEN} rows={B * N_QUERY}", "residual-norm", "eager",
         ("fwd", "fwd+bwd"), {}),
]  # fmt: skip
PARAMS = [(case, which) for case in CASES for which in case.passes]


def case_label(case: Case, which: str) -> str:
    return f"host {case.name} {which} B={B} bf16"


def _heads(rows: int, grad: bool) -> torch.Tensor:
    """(B, H, rows, D) as the Q-Former makes it: a (B, rows, H, D) tensor seen heads-first."""
    return torch.empty(B, rows, HEADS, HEAD_DIM, device=META, dtype=DTYPE).transpose(1, 2).requires_grad_(grad)


def _padding(keys: int) -> torch.Tensor:
    return torch.empty(B, keys, device=META, dtype=torch.bool)


def build(case: Case, impl: str, which: str) -> Callable[[], object]:
    """The call to time: one forward, or forward + backward (autograd.grad over the op's inputs)."""
    grad = which != "fwd"
    if case.op == ATTN:
        p = case.params
        q, k, v = _heads(p["rows"], grad), _heads(p["keys"], grad), _heads(p["keys"], grad)
        padding = _padding(p["keys"]) if p["padded"] else None
        backend = "triton" if impl == "triton" else case.twin

        def call():
            return battn.attention(
                q, k, v, mask_kind=p["mask_kind"], n_query=p["n_query"], key_padding=padding,
                dropout_p=p["dropout"], backend=backend,
            )  # fmt: skip

        inputs = [q, k, v]
        out_grad = _heads(p["rows"], False).detach()
    else:
        x = torch.empty(B, N_QUERY, HIDDEN, device=META, dtype=DTYPE, requires_grad=grad)

        def param(*shape):
            return torch.empty(*shape, device=META, dtype=DTYPE, requires_grad=grad)

        if case.op == "ffn":
            args = (x, param(INTERMEDIATE, HIDDEN), param(INTERMEDIATE), param(HIDDEN, INTERMEDIATE), param(HIDDEN),
                    param(HIDDEN), param(HIDDEN), EPS, DROPOUT)  # fmt: skip
            kffn = importlib.import_module("blip2_fast.kernels.ffn")
            call = (lambda: kffn.ffn(*args)) if impl == "triton" else (lambda: ffn_ref(*args))
            inputs = [a for a in args if isinstance(a, torch.Tensor)]
        else:
            residual = torch.empty(B, N_QUERY, HIDDEN, device=META, dtype=DTYPE, requires_grad=grad)
            args = (x, residual, param(HIDDEN, HIDDEN), param(HIDDEN), param(HIDDEN), param(HIDDEN), EPS, DROPOUT)
            kffn = importlib.import_module("blip2_fast.kernels.ffn")
            call = (lambda: kffn.residual_norm(*args)) if impl == "triton" else (lambda: residual_norm_ref(*args))
            inputs = [a for a in args if isinstance(a, torch.Tensor)]
        out_grad = torch.empty(B, N_QUERY, HIDDEN, device=META, dtype=DTYPE)
    if not grad:
        return call
    return lambda: torch.autograd.grad(call(), inputs, out_grad)


# ---------------------------------------------------------------------------------------------------------------------
# set-up: stand-in driver, meta ops at CUDA cost, the narrow patches


def _with_globals(fn: types.FunctionType, **overrides: object) -> types.FunctionType:
    """``fn``'s own code object over a copy of its module globals with ``overrides``."""
    env = dict(fn.__globals__, **overrides)
    new = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__ = fn.__kwdefaults__
    new.__dict__.update(fn.__dict__)
    return new


def _torch_autocast_meta_as_cuda() -> types.ModuleType:
    """``torch`` as a module whose autocast entry points read device type "meta" as "cuda"."""
    proxy = types.ModuleType("torch")
    proxy.__dict__.update(torch.__dict__)

    def cuda(device_type: str) -> str:
        return "cuda" if device_type == "meta" else device_type

    def autocast(device_type: str, *args, **kwargs) -> torch.autocast:
        return torch.autocast(cuda(device_type), *args, **kwargs)

    def is_autocast_enabled(device_type: str | None = None) -> bool:
        return torch.is_autocast_enabled() if device_type is None else torch.is_autocast_enabled(cuda(device_type))

    def get_autocast_dtype(device_type: str) -> torch.dtype:
        return torch.get_autocast_dtype(cuda(device_type))

    proxy.autocast = autocast
    proxy.is_autocast_enabled = is_autocast_enabled
    proxy.get_autocast_dtype = get_autocast_dtype
    return proxy


_H200_SMS = hostcost.H200_PROPERTIES["multiprocessor_count"]


@functools.cache
def _sm_count(index: int) -> int:  # cached per device, as kernels.ffn._sm_count is
    return _H200_SMS


def _num_programs(device: torch.device) -> int:
    """kernels.ffn._num_programs' CUDA branch, with device 0 an H200."""
    return _sm_count(device.index if device.index is not None else 0) * 4


@dataclasses.dataclass
class HostEnv:
    quick: bool
    meta: hostcost.MetaLikeCuda
    twin_us: dict[str, float] = dataclasses.field(default_factory=dict)
    rows: list[dict] = dataclasses.field(default_factory=list)


@pytest.fixture(scope="module")
def host(request: pytest.FixtureRequest):
    problem = hostcost.triton_problem()
    if problem:
        pytest.skip(f"host benchmark: {problem}")
    try:
        kattn = importlib.import_module("blip2_fast.kernels.attention")
        kffn = importlib.import_module("blip2_fast.kernels.ffn")
    except Exception as exc:
        pytest.skip(f"host benchmark: the kernels do not import: {type(exc).__name__}: {exc}")
    meta_torch = _torch_autocast_meta_as_cuda()
    functional = types.ModuleType(torch.nn.functional.__name__)
    functional.__dict__.update(vars(torch.nn.functional), scaled_dot_product_attention=hostcost.sdpa_as_on_cuda)
    patches = [
        (battn, "F", lambda f: functional),
        (kattn, "_check_inputs", lambda f: _with_globals(f, _INTERPRET=True)),
        (kffn, "_autocast_dtype", lambda f: _with_globals(f, torch=meta_torch)),
        (kffn, "ffn", lambda f: _with_globals(f, torch=meta_torch)),
        (kffn, "residual_norm", lambda f: _with_globals(f, torch=meta_torch)),
        (kffn, "_num_programs", lambda f: _num_programs),
    ]
    missing = [f"{mod.__name__}.{name}" for mod, name, _ in patches if getattr(mod, name, None) is None]
    if missing:
        pytest.fail(f"host benchmark: patch targets gone from the kernels: {', '.join(missing)} (update bench_host.py)")
    saved = []
    try:
        for mod, name, make in patches:
            original = getattr(mod, name)
            try:
                replacement = make(original)
            except Exception as exc:
                pytest.fail(f"host benchmark: cannot stand {mod.__name__}.{name} in for CUDA: {exc!r}")
            saved.append((mod, name, original))
            setattr(mod, name, replacement)
        with hostcost.stand_in_driver(kattn, kffn), hostcost.MetaLikeCuda() as meta:
            env = HostEnv(quick=bool(request.config.getoption("quick")), meta=meta)
            request.config.pluginmanager.register(_Summary(env), "bench_host_summary")
            yield env
    finally:
        for mod, name, original in saved:
            setattr(mod, name, original)


class _Summary:
    """A plugin printing this module's figures as one markdown table in the terminal summary."""

    def __init__(self, env: HostEnv):
        self.env = env

    def pytest_terminal_summary(self, terminalreporter) -> None:
        rows = [r for r in self.env.rows if r["impl"] == "triton"]
        if not rows:
            return
        terminalreporter.write_sep("-", "host cost per call (bench_host.py)")
        for line in summary_lines(rows):
            terminalreporter.write_line(line)


def summary_lines(rows: list[dict]) -> list[str]:
    """Markdown table of the fused results (their extra_info): host us per call against the twin's."""
    lines = [
        f"{rows[0]['device']}, torch {rows[0]['torch']}, triton {rows[0]['triton']}; Triton compiled for sm_90, "
        "C launch stubbed, meta tensors; median per call; ratio = triton / twin from interleaved rounds",
        "",
        "| op | pass | triton us | twin | twin us | ratio | ratio of medians | triton launches + aten ops "
        "| twin aten ops |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        twin_us = r.get("twin_host_us") or r["interleaved_us"][r["twin"]]
        medians = "" if r.get("ratio_of_medians") is None else f"{r['ratio_of_medians']:.2f}"
        lines.append(
            f"| {r['name']} | {r['which']} | {r['host_us']:.0f} | {r['twin']} | {twin_us:.0f} | {r['ratio']:.2f} | "
            f"{medians} | "
            f"{r['launches']} + {r['aten_ops']} | {r['twin_aten_ops']} |"
        )
    return lines


# ---------------------------------------------------------------------------------------------------------------------
# the benchmark


@pytest.mark.parametrize("impl", ["twin", "triton"])
@pytest.mark.parametrize(("case", "which"), PARAMS, ids=[f"{c.key}-{w}" for c, w in PARAMS])
def test_host(benchmark, host: HostEnv, case: Case, which: str, impl: str):
    fn = build(case, impl, which)
    label = case_label(case, which)
    backend = "triton" if impl == "triton" else case.twin
    for _ in range(3):  # the first call compiles (cached on disk afterwards) and binds; none of it is timed
        fn()
    counts = hostcost.count_call(fn)
    if impl == "triton" and counts["launches"] == 0:
        pytest.fail(f"{label}: the triton call reached no (stubbed) Triton launch")
    python_meta = sum(n for op, n in counts["aten_op_names"].items() if op in host.meta.python_meta_ops)
    iterations = hostcost.calls_per_round(fn)
    benchmark.group = label
    benchmark.pedantic(fn, rounds=ROUNDS[host.quick], iterations=iterations, warmup_rounds=2)
    stats = benchmark.stats.stats
    us = stats.median * 1e6
    info = benchmark.extra_info
    info.update(environment())
    info.update(
        device=hostcost.cpu_name(),  # the figures are the host's (environment() names the GPU where there is one)
        case=label,
        backend=backend,
        ms=us / 1e3,
        host_us=us,
        min_us=stats.min * 1e6,
        timing="host only: median per call over pytest-benchmark rounds; meta tensors, Triton launch stubbed",
        target="sm_90 (stand-in Triton driver: real compile, C launch stubbed)",
        iterations=iterations,
        twin=case.twin,
        meta_python_ops=python_meta,
        **counts,
    )
    if impl == "twin":
        host.twin_us[label] = us
    else:
        # the ratio from alternating rounds of both calls (a shared CPU's load drifts between two tests)
        twin_fn = build(case, "twin", which)
        for _ in range(2):
            twin_fn()
        pair = hostcost.interleaved_ratio(fn, twin_fn)
        twin_counts = hostcost.count_call(twin_fn)
        info.update(
            ratio=pair["ratio"],
            ratio_of=f"triton host time / {case.twin} host time (median over interleaved rounds)",
            interleaved_us={"triton": pair["fused_us"], case.twin: pair["twin_us"]},
            twin_host_us=host.twin_us.get(label),
            ratio_of_medians=us / host.twin_us[label] if label in host.twin_us else None,
            twin_aten_ops=twin_counts["aten_ops"],
        )
    host.rows.append(dict(info, name=case.name, which=which, impl=impl))
    assert math.isfinite(us)
