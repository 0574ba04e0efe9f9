"""Host cost of a call without a GPU: Triton's real sm_90 compile, only the final C launch stubbed, meta tensors.

At the Q-Former's sizes a GPU step waits on the host (Python, the dispatcher, each
launch's argument handling). That host side runs the same on a CPU-only machine
once four things stand in for CUDA (``bench_host.py`` uses them):

1. :class:`StandInDriver` replaces Triton's active driver. It is Triton's own
   ``CudaDriver`` with constant answers where CUDA would be asked: target
   ``GPUTarget("cuda", 90, 32)``, device 0, stream 0, H200 device properties.
   Kernels really compile for sm_90 (ptxas from the triton wheel; cached on disk),
   ``JITFunction.run`` binds, specialises, looks up and launches them as on a GPU,
   and the launcher is Triton's ``CudaLauncher`` with its Python ``__call__``
   intact: only ``launch`` itself, the C function that would convert the
   arguments and call ``cuLaunchKernelEx``, is a counter (:data:`LAUNCHES`).
   ``load_binary`` returns a dummy module and function (the kernel's name).
2. Tensors live on the ``meta`` device: shapes, strides, dtypes and autograd
   as on CUDA, no memory and no arithmetic.
3. :class:`MetaLikeCuda` makes meta ops cost what a CUDA op costs on the host
   before its launch. torch (2.13 here) routes most meta ops through Python
   reference implementations (``torch._meta_registrations``: an ``add`` takes
   ~200 us there, a ``layer_norm`` ~700 us), which would drown every eager
   twin; inside the context those Python meta kernels are unregistered, so each
   op runs its C++ meta function (the shape and dtype logic a CUDA kernel runs
   before launching, then the allocation). The few ops reached here that have
   no C++ meta kernel get a short Python one that only allocates the outputs
   (:data:`LEAN_META_OPS`); the flash / memory-efficient attention kernels keep
   torch's own meta functions, which do just that (:data:`TORCH_META_KEPT`).
   Everything is put back on exit.
4. :func:`sdpa_as_on_cuda`: ``F.scaled_dot_product_attention`` picks its kernel
   through a per-device stub that meta lacks, so on meta it always runs the
   math decomposition; this replays what its C++ body runs on an sm_90 GPU.

What the figures leave out, on both sides alike: the driver's launch itself
(Triton's C launcher, or the ATen CUDA kernel's ``cudaLaunchKernel``; a few
microseconds each: see ``launches`` and ``aten_ops`` per call), the difference
between the CUDA caching allocator and meta allocations, the device queries
Triton makes per launch (constants here), and the hand-off to the autograd
engine's CUDA device thread in a backward. A Python meta function costs 6-17 us
here against about 1 us for a C++ one (``meta_python_ops`` counts them per call,
nearly all on the twins' side), and the sdpa replay's Python glue a few us more
than the C++ it replays.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import os
import platform
import statistics
import time
import types
from collections.abc import Callable, Iterator

import torch
import torch.utils._pytree
from torch.utils._python_dispatch import TorchDispatchMode

# ---------------------------------------------------------------------------------------------------------------------
# the stand-in Triton driver

H200_PROPERTIES = {
    "max_shared_mem": 232448,  # bytes per block, opt-in (sm_90)
    "max_num_regs": 65536,
    "multiprocessor_count": 132,
    "warpSize": 32,
    "sm_clock_rate": 1980000,
    "mem_clock_rate": 3201000,
    "mem_bus_width": 6144,
}
TARGET_ARCH = 90

LAUNCHES: collections.Counter[str] = collections.Counter()  # kernel name -> stubbed launches


def _stub_launch(gridX, gridY, gridZ, stream, function, *rest) -> None:
    """Stands in for ``cuda_utils.launch`` (C): counts the launch by kernel name (``function`` is its name here)."""
    LAUNCHES[function] += 1


def triton_problem() -> str | None:
    """Why the stand-in cannot run here (None when it can)."""
    if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false"):
        return (
            "TRITON_INTERPRET=1 is set (--triton-interpret): the host benchmark times the compiled launch path, "
            "which the interpreter replaces"
        )
    try:
        import triton  # noqa: F401
        from triton.backends.nvidia import driver as _nv  # noqa: F401
        from triton.backends.nvidia.driver import CudaLauncher  # noqa: F401
    except Exception as exc:
        return f"triton's CUDA backend does not import: {type(exc).__name__}: {exc}"
    return None


def _make_driver():
    """Build the stand-in driver class (deferred: triton's CUDA backend must import first)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.driver import CudaDriver, CudaLauncher, wrap_handle_tensordesc

    class StubLauncher(CudaLauncher):
        """Triton's CUDA launcher with the per-call Python as shipped; set-up without the C helpers it builds
        once per kernel (argument annotations, signature metadata), ``launch`` the counter."""

        def __init__(self, src, metadata):
            try:  # Triton 3.9's sanitizer switch; 3.6 has none
                from triton._instrumentation import is_enabled

                self.gsan_enabled = is_enabled(metadata, "gsan")
            except ImportError:
                pass
            self.arg_annotations = None
            self.kernel_signature = None
            self.num_ctas = getattr(metadata, "num_ctas", 1)
            signature = dict(src.signature.items())
            self.launch = wrap_handle_tensordesc(_stub_launch, signature, getattr(metadata, "tensordesc_meta", None))
            self.global_scratch_size = metadata.global_scratch_size
            self.global_scratch_align = metadata.global_scratch_align
            self.profile_scratch_size = metadata.profile_scratch_size
            self.profile_scratch_align = metadata.profile_scratch_align
            self.launch_cooperative_grid = metadata.launch_cooperative_grid
            self.launch_pdl = metadata.launch_pdl

    class StandInUtils:
        """``CudaUtils`` without libcuda: constant device answers, dummy binaries."""

        def load_binary(self, name, kernel, shared, device):
            # (module, function, n_regs, n_spills, n_max_threads); the function handle is the kernel's name
            return 1, name, 0, 0, 1024

        def unload_module(self, module) -> None:
            pass

        def get_device_properties(self, device) -> dict:
            return dict(H200_PROPERTIES)

        def get_device_capability(self, device) -> tuple[int, int]:
            return divmod(TARGET_ARCH, 10)

        def get_current_device(self) -> int:
            return 0

        def set_current_device(self, device) -> None:
            pass

        def get_default_stream(self, device) -> int:
            return 0

        def is_stream_capturing(self, stream) -> bool:
            return False

        launch = staticmethod(_stub_launch)

    class StandInDeviceInterface:
        """What Triton asks of ``torch.cuda`` outside a launch (benchmarking, autotuning), answered for device 0."""

        @staticmethod
        def current_device() -> int:
            return 0

        @staticmethod
        def device_count() -> int:
            return 1

        @staticmethod
        def is_available() -> bool:
            return True

        @staticmethod
        def synchronize(device=None) -> None:
            pass

        @staticmethod
        def get_device_capability(device=None) -> tuple[int, int]:
            return divmod(TARGET_ARCH, 10)

    class StandInDriver(CudaDriver):
        def __init__(self):  # no CudaUtils (it compiles a module against libcuda), no torch.cuda queries
            self.utils = StandInUtils()
            self.launcher_cls = StubLauncher
            self.get_device_capability = lambda device=None: divmod(TARGET_ARCH, 10)
            self.get_current_stream = lambda device=None: 0
            self.get_current_device = lambda: 0
            self.set_current_device = lambda device: None

        def get_current_target(self):
            return GPUTarget("cuda", TARGET_ARCH, 32)

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_device_interface(self):
            return StandInDeviceInterface

        @staticmethod
        def is_active():
            return True

    return StandInDriver


def _jit_functions(*modules: types.ModuleType) -> list:
    from triton.runtime.jit import JITFunction

    return [obj for mod in modules for obj in vars(mod).values() if isinstance(obj, JITFunction)]


def _launchers(*modules: types.ModuleType) -> list:
    from blip2_fast.kernels.launch import Launcher

    return [obj for mod in modules for obj in vars(mod).values() if isinstance(obj, Launcher)]


@contextlib.contextmanager
def stand_in_driver(*kernel_modules: types.ModuleType) -> Iterator[object]:
    """Make the stand-in Triton's active driver; every JIT kernel of ``kernel_modules`` gets a fresh per-device
    cache for the time, and every ``Launcher`` and op plan starts and ends empty (a kernel compiled and bound for the
    stand-in never reaches a real launch, and a real one compiled earlier is not reused here). Restores both
    on exit."""
    from triton.runtime import driver

    stand_in = _make_driver()()
    previous = driver._active  # None until something asked: restoring None keeps it lazy
    kernels = _jit_functions(*kernel_modules)
    caches = {id(fn): fn.device_caches for fn in kernels}
    for fn in kernels:
        fn.device_caches = collections.defaultdict(fn.create_binder)
    from blip2_fast.kernels.launch import clear_all

    clear_all()  # kept kernels, direct launches and plans belong to one driver: none cross over
    driver.set_active(stand_in)
    try:
        yield stand_in
    finally:
        clear_all()
        for fn in kernels:
            for kernel_cache, *_ in fn.device_caches.values():
                for compiled in kernel_cache.values():
                    compiled.module = None  # a dummy handle: nothing for a real driver to unload
            fn.device_caches = caches[id(fn)]
        driver._active = previous


# ---------------------------------------------------------------------------------------------------------------------
# meta ops at the host cost of CUDA ops


def _lean_native_layer_norm(x, normalized_shape, weight, bias, eps):
    # as layer_norm_cuda allocates: the output like x, fp32 mean / rstd (accumulate type) per row
    stat = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    axis = x.dim() - len(normalized_shape)
    shape = tuple(x.shape[:axis]) + (1,) * len(normalized_shape)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty(shape, dtype=stat, device=x.device),
        torch.empty(shape, dtype=stat, device=x.device),
    )


def _lean_native_layer_norm_backward(grad_out, x, normalized_shape, mean, rstd, weight, bias, output_mask):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format) if output_mask[0] else None,
        torch.empty_like(weight) if output_mask[1] and weight is not None else None,
        torch.empty_like(bias) if output_mask[2] and bias is not None else None,
    )


def _broadcast(*shapes: torch.Size) -> list[int]:
    # shapes assumed broadcastable (the op's callers ensure it); torch.broadcast_shapes is a slow Python reference
    out = [1] * max(len(s) for s in shapes)
    for shape in shapes:
        for i, size in enumerate(shape, len(out) - len(shape)):
            if size != 1:
                out[i] = size
    return out


def _lean_where(condition, self, other):
    shape = _broadcast(condition.shape, self.shape, other.shape)
    return torch.empty(shape, dtype=torch.result_type(self, other), device=condition.device)


_FLASH = torch.ops.aten._scaled_dot_product_flash_attention.default
_EFFICIENT = torch.ops.aten._scaled_dot_product_efficient_attention.default
_MEM_EFF_ALIGNMENT = 8


def sdpa_as_on_cuda(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """``F.scaled_dot_product_attention`` as it runs on CUDA, for meta tensors.

    Its C++ body (aten/src/ATen/native/transformers/attention.cpp) asks a per-device stub which kernel to use,
    and meta has none, so on meta it always decomposes into the math path (~20 ops). This replays, from Python,
    what that body does on an sm_90 GPU for the Q-Former's bf16, head-dim-64 inputs, where the default order is
    flash, memory-efficient, math, cuDNN: without a mask, ``_scaled_dot_product_flash_attention``; with a bool mask,
    its conversion to an additive one (``where`` against a ``scalar_tensor(-inf)``), the padding of the mask's
    last dim to a multiple of 8 (``pad`` + slice) and its expansion, then
    ``_scaled_dot_product_efficient_attention``. The Python glue costs a little more than the C++ it replays.
    """
    if attn_mask is None:
        return _FLASH(query, key, value, dropout_p, is_causal, False, scale=scale)[0]
    if attn_mask.dtype == torch.bool:
        neg_inf = torch.scalar_tensor(float("-inf"), dtype=query.dtype, device=attn_mask.device)
        attn_mask = torch.where(attn_mask, 0.0, neg_inf)
    strides = attn_mask.stride()
    if attn_mask.stride(-1) != 1 or any(s % _MEM_EFF_ALIGNMENT for s in strides[:-1]):
        last = attn_mask.shape[-1]
        attn_mask = torch.nn.functional.pad(attn_mask, (0, _MEM_EFF_ALIGNMENT - last % _MEM_EFF_ALIGNMENT))[..., :last]
    attn_mask = attn_mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    lse = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
    return _EFFICIENT(query, key, value, attn_mask, lse, dropout_p, is_causal, scale=scale)[0]


# ops without a C++ meta kernel that the benchmarked calls reach, and what runs for them inside MetaLikeCuda
LEAN_META_OPS: dict[str, Callable] = {
    "native_layer_norm": _lean_native_layer_norm,
    "native_layer_norm_backward": _lean_native_layer_norm_backward,
    "where.self": _lean_where,
}
# ops whose own torch meta function only allocates the outputs: kept
TORCH_META_KEPT = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_efficient_attention_backward",
)


def _op(name: str):
    packet, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, packet), overload or "default")


class MetaLikeCuda:
    """Context: meta ops run their C++ meta kernels (see the module docstring); restores torch's on exit."""

    def __enter__(self) -> MetaLikeCuda:
        import torch._meta_registrations as registrations

        self._registrations = registrations
        torch_lib = registrations._meta_lib_dont_use_me_use_register_meta
        # every Python meta kernel torch registered there, to put back on exit (the op's Python meta function)
        self._saved: list[tuple[object, Callable]] = []
        unknown = []
        for key in sorted(torch_lib._op_impls):
            op = _op(key.split("/")[1])
            fn = op.py_kernels.get(torch._C.DispatchKey.Meta)
            if fn is None:
                unknown.append(key)
            else:
                self._saved.append((op, fn))
        if unknown:  # nothing changed yet: refuse rather than lose registrations
            raise RuntimeError(f"torch's meta kernels of {unknown[:5]} cannot be saved; this torch is not supported")
        by_op = dict(self._saved)
        torch_lib._destroy()
        try:
            self._lib = torch.library.Library("aten", "IMPL", "Meta")
            for name, fn in LEAN_META_OPS.items():
                self._lib.impl(_op(name), fn)
            for name in TORCH_META_KEPT:
                self._lib.impl(_op(name), by_op[_op(name)])
        except BaseException:
            self._restore()
            raise
        self.python_meta_ops = set(LEAN_META_OPS) | set(TORCH_META_KEPT)
        return self

    def __exit__(self, *exc) -> None:
        self._lib._destroy()
        self._restore()

    def _restore(self) -> None:
        lib = torch.library.Library("aten", "IMPL", "Meta")
        for op, fn in self._saved:
            lib.impl(op, fn)
        self._registrations._meta_lib_dont_use_me_use_register_meta = lib


def op_name(op) -> str:
    """The aten op and its overload, as in "add.Tensor" (none for the default overload: "mm")."""
    return op.name().removeprefix("aten::")


# ---------------------------------------------------------------------------------------------------------------------
# counting what a call does

# allocations and ops that decide something on the host: no kernel on a GPU
_NO_KERNEL = {
    "empty.memory_format",
    "empty_strided",
    "empty_like",
    "empty_permuted",
    "new_empty",
    "new_empty_strided",
    "_fused_sdp_choice",
    "detach",
    "alias",
    "lift_fresh",
    "_unsafe_view",
    "sym_size.int",
    "sym_stride.int",
    "sym_numel",
}


class _OpCounter(TorchDispatchMode):
    """Counts aten ops below autograd: ``device`` ops (not views, not allocations) and host (CPU tensor) ops."""

    def __init__(self):
        super().__init__()
        self.device_ops: collections.Counter[str] = collections.Counter()
        self.host_ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = op_name(func)
        if not (func.is_view or name in _NO_KERNEL):
            tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            if tensors:
                on_device = any(t.device.type != "cpu" for t in tensors)
            else:  # a factory: where it allocates
                device = (kwargs or {}).get("device")
                on_device = device is not None and torch.device(device).type != "cpu"
            (self.device_ops if on_device else self.host_ops)[name] += 1
        return func(*args, **(kwargs or {}))


def count_call(fn: Callable[[], object]) -> dict[str, object]:
    """One call of ``fn``: stubbed Triton launches per kernel, and aten ops (a proxy for the CUDA kernels
    eager code launches: every op that is neither a view nor an allocation, on the device's tensors)."""
    LAUNCHES.clear()
    counter = _OpCounter()
    with counter:
        fn()
    launches = dict(LAUNCHES)
    LAUNCHES.clear()
    return {
        "launches": sum(launches.values()),
        "launch_kernels": launches,
        "aten_ops": sum(counter.device_ops.values()),
        "aten_op_names": dict(counter.device_ops),
        "host_aten_ops": dict(counter.host_ops),
    }


# ---------------------------------------------------------------------------------------------------------------------
# timing


def calls_per_round(fn: Callable[[], object], round_s: float = 2e-3) -> int:
    """Calls that fill about ``round_s`` (timer resolution and loop cost vanish next to them)."""
    start = time.perf_counter()
    n = 0
    while n < 3 or time.perf_counter() - start < 0.02:
        fn()
        n += 1
    per_call = (time.perf_counter() - start) / n
    return max(1, min(1000, math.ceil(round_s / per_call)))


def interleaved_ratio(fused: Callable[[], object], twin: Callable[[], object], rounds: int = 31) -> dict[str, float]:
    """Alternating rounds of ``fused`` and ``twin``: the median of the per-pair time ratios (fused / twin), and
    each side's median per-call time in us. A shared CPU's load drifts; pairs of adjacent rounds see about the same."""
    n_fused, n_twin = calls_per_round(fused), calls_per_round(twin)
    ratios, fused_us, twin_us = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(n_fused):
            fused()
        mid = time.perf_counter()
        for _ in range(n_twin):
            twin()
        end = time.perf_counter()
        fused_us.append((mid - start) / n_fused * 1e6)
        twin_us.append((end - mid) / n_twin * 1e6)
        ratios.append(fused_us[-1] / twin_us[-1])
    return {
        "ratio": statistics.median(ratios),
        "fused_us": statistics.median(fused_us),
        "twin_us": statistics.median(twin_us),
    }


@functools.cache
def cpu_name() -> str:
    """The host's CPU, as benchutil names a CPU device: what the figures are measured on, GPU or not."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        pass
    return f"cpu: {model or platform.processor() or platform.machine()} x{os.cpu_count()}"
