"""Launching a ``@triton.jit`` kernel with less host work than ``kernel[grid](...)``.

``JITFunction.run`` binds every argument, computes its specialisation and cache key, checks globals and
builds launch metadata on each call: about 20 us of Python per launch, more than a Q-Former-sized kernel
runs on a GPU. :class:`Launcher` keeps, per kernel, the compiled kernel for each key it has seen and a
*direct launch* for it: a closure that calls Triton's C launcher with exactly the arguments Triton's own
path (``CompiledKernel[grid]`` and ``CudaLauncher.__call__``) would pass, without the Python around it.
A new key goes through ``kernel[grid](...)`` once, which compiles or finds the kernel in Triton's own
cache (and launches it).

Two ways in:

- ``launcher(grid, *args, **options)`` builds the key itself: the device (of the first argument, a
  tensor), each tensor's dtype and whether its address is a multiple of 16, every other argument's value,
  the constexprs and launch options. Two calls with one key are therefore bound alike by Triton.
- ``launcher.launch(key, grid, args, options)`` takes the caller's key, for callers that already hold
  one that fixes all of that (an op's validated plan: shapes, dtypes, devices, flags, and the alignment of
  every pointer it passes), so a call costs one dict lookup besides the launch.

Kernels take their constexprs last (after every runtime argument). ``clear()`` forgets every kernel (a new
Triton driver, a test's stand-in); :class:`Plans` caches are cleared with them by :func:`clear_all`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

_MAX_KEYS = 4096  # per kernel; shapes and strides take a handful of values per run

_CACHES: list = []  # every Launcher and Plans, for clear_all()


def cdiv(a: int, b: int) -> int:
    """Ceiling division of ints (``triton.cdiv`` is a constexpr function: microseconds per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def clear_all() -> None:
    """Forget every compiled kernel, direct launch and plan (a new Triton driver is about to be used)."""
    for cache in _CACHES:
        cache.clear()


class Plan:
    """The token of a validated call signature: launches are keyed by it (hashed by identity, so a lookup costs
    no hashing of the signature itself), and it carries what was computed once for that signature."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


class Plans(dict):
    """An op's per-signature plans (validated shapes, tile configs, launch keys), cleared with the launchers."""

    def __init__(self):
        super().__init__()
        _CACHES.append(self)

    def remember(self, key, plan):
        if len(self) >= _MAX_KEYS:
            self.clear()
        self[key] = plan
        return plan


class Launcher:
    def __init__(self, kernel):
        self.kernel = kernel
        params = getattr(kernel, "params", None)  # None under the interpreter: every call goes through kernel[grid]
        flags = [p.is_constexpr for p in params or ()]
        if flags != sorted(flags):
            raise ValueError(f"{kernel.__name__}: constexpr parameters must come after every runtime parameter")
        self.names = None if params is None else [p.name for p in params if p.is_constexpr]  # in parameter order
        self.compiled: dict = {}  # key -> compiled kernel
        self.direct: dict = {}  # key -> its direct launch on the key's grid
        _CACHES.append(self)

    def clear(self) -> None:
        self.compiled.clear()
        self.direct.clear()

    def kernels(self) -> list:
        """The compiled kernels kept so far (``triton.compiler.CompiledKernel``), one per key."""
        return list(self.compiled.values())

    def __call__(self, grid: tuple[int, ...], *args, **options) -> None:
        """Launch on ``grid`` with the runtime ``args`` (in parameter order), the constexprs by name and any
        launch options (``num_warps``, ``num_stages``) as ``kernel[grid](...)`` takes them."""
        if self.names is None:
            self.kernel[grid](*args, **options)
            return
        key = (
            args[0].device,  # a kernel is loaded per device
            grid,
            tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args),
            tuple(options.items()),
        )
        self.launch(key, grid, args, options)

    def launch(self, key, grid: tuple[int, ...], args: tuple, options: dict) -> None:
        """Launch under the caller's ``key``, which must fix ``grid``, ``options`` and everything Triton
        specialises ``args`` on (device, dtypes, 16-byte alignment of each pointer, the int values); with
        ``key`` None the launcher builds its own, as a call does."""
        if key is None:
            self(grid, *args, **options)
            return
        direct = self.direct.get(key)
        if direct is not None:
            direct(*args)
            return
        if self.names is None:
            self.kernel[grid](*args, **options)
            return
        compiled = self.kernel[grid](*args, **options)
        if len(self.direct) >= _MAX_KEYS:
            self.clear()
        self.compiled[key] = compiled
        self.direct[key] = direct_launch(compiled, grid, tuple(options[name] for name in self.names))


# ---------------------------------------------------------------------------------------------------------------------
# the direct launch


def _launch_layout() -> str | None:
    """Which argument list Triton's C ``launch`` takes in the installed Triton (None: not one we know)."""
    try:
        import triton
        from triton.backends.nvidia.driver import CudaLauncher  # noqa: F401
    except Exception:
        return None
    version = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if version == (3, 6):
        return "3.6"
    if version == (3, 9):
        return "3.9"
    return None


_LAYOUT = _launch_layout()


def direct_launch(compiled, grid: tuple[int, ...], consts: tuple) -> Callable[..., None]:
    """A function of the kernel's runtime arguments that launches ``compiled`` on ``grid`` (constexprs
    ``consts``) with the arguments ``compiled[grid](*args, *consts)`` hands Triton's C launcher.

    What that path computes per call and is constant here is computed once. Its launch hooks (Triton's
    ``knobs.runtime`` chains, empty unless a profiler adds one) and the launch metadata built for them go
    as None while the chains are empty, which the C launcher reads as "call nothing", as it does an empty
    chain; a call while a hook is set takes Triton's own path, and so does every call of a kernel that
    needs scratch memory, or of a launcher this module does not know."""
    from triton import knobs
    from triton.runtime import driver

    try:
        from triton.knobs import HookChain
    except ImportError:
        HookChain = None

    gx, gy, gz = grid3 = (*grid, 1, 1)[:3]
    runner = compiled[grid3]
    run = compiled.run

    def triton_path(*args):
        runner(*args, *consts)

    try:
        from triton.backends.nvidia.driver import CudaLauncher
    except Exception:
        return triton_path
    if (
        _LAYOUT is None
        or not isinstance(run, CudaLauncher)
        or run.global_scratch_size
        or run.profile_scratch_size
        or getattr(run, "gsan_enabled", False)
    ):
        return triton_path
    launch, function, metadata = run.launch, compiled.function, compiled.packed_metadata
    coop, pdl = run.launch_cooperative_grid, run.launch_pdl
    hooks = knobs.runtime

    def idle(hook) -> bool:
        return hook is None or (type(hook) is HookChain and not hook.calls)

    current_device, current_stream = driver.active.get_current_device, driver.active.get_current_stream

    if _LAYOUT == "3.9":
        annotations, signature = run.arg_annotations, run.kernel_signature

        def direct(*args):
            if not (idle(hooks.launch_enter_hook) and idle(hooks.launch_exit_hook)):
                triton_path(*args)
                return
            stream = current_stream(current_device())
            launch(gx, gy, gz, stream, function, coop, pdl, metadata, None, None, None, None, None,
                   annotations, signature, (*args, *consts))  # fmt: skip

    else:  # 3.6

        def direct(*args):
            if not (idle(hooks.launch_enter_hook) and idle(hooks.launch_exit_hook)):
                triton_path(*args)
                return
            stream = current_stream(current_device())
            launch(gx, gy, gz, stream, function, coop, pdl, None, None, metadata, None, None, None, *args, *consts)

    return direct


# ---------------------------------------------------------------------------------------------------------------------
# autograd.Function.apply without its Python wrapper

_C_APPLY = torch._C._FunctionBase.__dict__.get("apply")


def fast_apply(function: type[torch.autograd.Function]) -> Callable:
    """``function.apply`` entering torch's C implementation directly, for a Function whose ``forward`` takes
    ``ctx`` and positional arguments only: the Python ``apply`` adds default-argument binding (for
    ``setup_context`` Functions) and the unwrapping of tensors that escaped a finished functorch transform
    (such a tensor has no storage, so it fails at the kernel's first ``data_ptr``). Under an active functorch
    transform the full ``apply`` runs."""
    if _C_APPLY is None:
        return function.apply
    c_apply = _C_APPLY.__get__(None, function)
    full_apply = function.apply
    transforms_active = torch._C._are_functorch_transforms_active

    def apply(*args):
        return full_apply(*args) if transforms_active() else c_apply(*args)

    return apply
