"""Launching a ``@triton.jit`` kernel with less host work than ``kernel[grid](...)``.

``JITFunction.run`` binds every argument, computes its specialisation and cache key, checks globals and
builds launch metadata on each call: about 20 us of Python per launch, more than a Q-Former-sized kernel
runs on a GPU. :class:`Launcher` keeps, per kernel, the compiled kernel for each key it has seen and
launches it directly (``CompiledKernel[grid](*args)``, the same entry ``JITFunction.run`` ends in, with
the same argument order in Triton 3.6 to 3.9); a new key goes through ``kernel[grid](...)`` once, which
compiles or finds the kernel in Triton's own cache.

The key holds everything Triton specialises on and more: the device (of the first argument, a tensor),
each tensor's dtype and whether its address is a multiple of 16, every other argument's value, the
constexprs and launch options. Two calls with one key are therefore bound alike by Triton, and the kernel
compiled for the first is the one Triton would pick for the second. Kernels take their constexprs last
(after every runtime argument). ``clear()`` forgets every kernel (a new Triton driver, a test's stand-in).
"""

from __future__ import annotations

import torch

_MAX_KEYS = 4096  # per kernel; shapes and strides take a handful of values per run


def cdiv(a: int, b: int) -> int:
    """Ceiling division of ints (``triton.cdiv`` is a constexpr function: microseconds per host call)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class Launcher:
    def __init__(self, kernel):
        self.kernel = kernel
        params = getattr(kernel, "params", None)  # None under the interpreter: every call goes through kernel[grid]
        flags = [p.is_constexpr for p in params or ()]
        if flags != sorted(flags):
            raise ValueError(f"{kernel.__name__}: constexpr parameters must come after every runtime parameter")
        self.names = None if params is None else [p.name for p in params if p.is_constexpr]  # in parameter order
        self.compiled: dict[tuple, tuple] = {}  # key -> (compiled kernel, its launcher for that grid)

    def clear(self) -> None:
        self.compiled.clear()

    def kernels(self) -> list:
        """The compiled kernels kept so far (``triton.compiler.CompiledKernel``), one per key."""
        return [compiled for compiled, _ in self.compiled.values()]

    def __call__(self, grid: tuple[int, ...], *args, **kwargs) -> None:
        """Launch on ``grid`` with the runtime ``args`` (in parameter order), the constexprs by name and any
        launch options (``num_warps``, ``num_stages``) as ``kernel[grid](...)`` takes them."""
        if self.names is None:
            self.kernel[grid](*args, **kwargs)
            return
        consts = tuple(kwargs[name] for name in self.names)
        key = (
            args[0].device,  # a kernel is loaded per device
            grid,
            tuple((a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a for a in args),
            tuple(kwargs.items()),
        )
        hit = self.compiled.get(key)
        if hit is not None:
            hit[1](*args, *consts)
            return
        compiled = self.kernel[grid](*args, **kwargs)
        if len(self.compiled) >= _MAX_KEYS:
            self.compiled.clear()
        self.compiled[key] = (compiled, compiled[grid + (1,) * (3 - len(grid))])
