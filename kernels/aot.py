"""Ahead-of-time compilation of Triton kernels for real GPUs, on a machine without one.

``triton.compile`` lowers a ``@triton.jit`` kernel to PTX and a cubin for a chosen
CUDA arch with no driver present; ``cuobjdump`` and ``ptxas`` (shipped inside the
triton wheel) then report what the kernel costs on the device: registers, shared
memory, local memory and register spills. This is how kernel configs are checked
for sm_80 (A100) and sm_90 (H100) in CPU-only CI.

Under ``TRITON_INTERPRET=1`` every ``@triton.jit`` function is an interpreter
object that the compiler cannot lower (nested jit helpers included), so there the
compilation runs in a child Python without that variable, importing the kernel by
module and name: kernels must be module-level names of an importable module.

    res = compile_for_arch(_my_kernel, {"x_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024}, arch=90)
    assert res.spill_stores == 0
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

SUPPORTED_ARCHS = (80, 90)


class AOTCompileError(RuntimeError):
    """A kernel did not compile (or its resources could not be read) for the requested arch."""


@dataclasses.dataclass(frozen=True)
class KernelResources:
    """Per-thread and per-block device resources of one compiled kernel config."""

    name: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int  # per thread
    shared_bytes: int  # per block: static + the dynamic shared memory Triton requests at launch
    local_bytes: int  # per thread local memory (stack frame, spills live here)
    spill_stores: int  # bytes, as reported by ptxas -v
    spill_loads: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    def ctas_per_sm(self) -> int:
        """Resident blocks per SM, the tightest of registers, shared memory, warps and the block limit
        (sm_80 and sm_90: 64K registers, 64 warps, 32 blocks; 164 KB / 228 KB shared per SM)."""
        threads = 32 * self.num_warps
        by_regs = 65536 // max(1, self.registers * threads)
        smem = (164 if self.arch == 80 else 228) * 1024
        by_smem = smem // self.shared_bytes if self.shared_bytes else 32
        return min(by_regs, by_smem, 64 // self.num_warps, 32)


@dataclasses.dataclass(frozen=True)
class AOTJob:
    """One kernel config to compile: the kernel by module and name, so a child process can import it."""

    module: str
    name: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    arch: int
    num_warps: int = 4
    num_stages: int = 2
    aligned: tuple[str, ...] = ()  # args a launch sees as multiples of 16 (pointers, sizes): Triton specialises on it

    @classmethod
    def of(
        cls,
        kernel: Any,
        signature: dict[str, str],
        constexprs: dict[str, Any],
        arch: int,
        num_warps: int = 4,
        num_stages: int = 2,
        aligned: Sequence[str] = (),
    ) -> AOTJob:
        fn = getattr(kernel, "fn", None)
        if fn is None or not callable(fn):
            raise ValueError(f"expected a @triton.jit kernel, got {type(kernel).__name__}")
        if arch not in SUPPORTED_ARCHS:
            raise ValueError(f"arch must be one of {SUPPORTED_ARCHS} (compute capability x10), got {arch!r}")
        if not isinstance(signature, dict) or not signature:
            raise ValueError("signature must be a non-empty dict {arg name: triton type such as '*fp32', 'i32'}")
        for key, value in constexprs.items():
            if not isinstance(value, (bool, int, float, str)):
                raise ValueError(f"constexpr {key!r} must be a bool, int, float or str, got {type(value).__name__}")
            if signature.get(key) != "constexpr":
                raise ValueError(f"constexpr {key!r} must appear in the signature as 'constexpr'")
        for name in aligned:
            if signature.get(name, "constexpr") == "constexpr":
                raise ValueError(f"aligned arg {name!r} must be a non-constexpr argument in the signature")
        return cls(
            module=fn.__module__,
            name=fn.__name__,
            signature=tuple(signature.items()),
            constexprs=tuple(constexprs.items()),
            arch=arch,
            num_warps=num_warps,
            num_stages=num_stages,
            aligned=tuple(aligned),
        )


def _bin_dir() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _ptxas_path(arch: int) -> str:
    # Triton emits PTX for the ptxas it compiles with (a newer one from sm_90 on): ask it which.
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            return get_ptxas(arch).path
        except TypeError:  # older triton: one ptxas for every arch
            return get_ptxas().path
    except ImportError:
        return os.path.join(_bin_dir(), "ptxas")


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SPILL_RE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_resource_usage(text: str) -> dict[str, int]:
    """Parse ``cuobjdump --dump-resource-usage`` output of a single-kernel cubin."""
    match = _RES_RE.search(text)
    if match is None:
        raise AOTCompileError(f"no 'REG:.. STACK:.. SHARED:.. LOCAL:..' line in cuobjdump output:\n{text}")
    reg, stack, shared, local = (int(g) for g in match.groups())
    return {"registers": reg, "stack": stack, "shared": shared, "local": local}


def parse_spills(text: str) -> tuple[int, int]:
    """Parse ``ptxas -v`` output into (spill store bytes, spill load bytes), summed over functions."""
    found = _SPILL_RE.findall(text)
    if not found:
        raise AOTCompileError(f"no spill report in ptxas -v output:\n{text}")
    return sum(int(s) for s, _ in found), sum(int(l) for _, l in found)


@contextlib.contextmanager
def _ptxas_log_knob():
    try:
        from triton import knobs

        nvidia = knobs.nvidia
        old = nvidia.dump_ptxas_log
    except (ImportError, AttributeError):
        yield
        return
    nvidia.dump_ptxas_log = True
    try:
        yield
    finally:
        nvidia.dump_ptxas_log = old


def _compile_here(job: AOTJob) -> KernelResources:
    """Compile in this process; needs real ``JITFunction`` objects (no interpreter)."""
    import triton
    from triton.backends.compiler import GPUTarget

    module = importlib.import_module(job.module)
    kernel = getattr(module, job.name)
    target_name = f"{job.module}.{job.name} for sm_{job.arch}"
    log = io.StringIO()
    try:
        attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in job.aligned}
        src = triton.compiler.ASTSource(
            fn=kernel, signature=dict(job.signature), constexprs=dict(job.constexprs), attrs=attrs
        )
        # Triton runs ptxas -v itself; with this knob it prints the log (spill counts included) to stdout.
        with _ptxas_log_knob(), contextlib.redirect_stdout(log):
            compiled = triton.compile(
                src,
                target=GPUTarget("cuda", job.arch, 32),
                options={"num_warps": job.num_warps, "num_stages": job.num_stages},
            )
    except Exception as exc:  # the compiler raises many types; the caller wants one
        raise AOTCompileError(f"{target_name} failed to compile: {type(exc).__name__}: {exc}") from exc

    return resources_of(compiled, job.name, job.arch, job.num_warps, job.num_stages, log.getvalue())


def resources_of(
    compiled: Any, name: str, arch: int, num_warps: int, num_stages: int, ptxas_log: str = ""
) -> KernelResources:
    """Resources of a compiled kernel (``triton.compile``'s, or one the runtime compiled and launched):
    cuobjdump on its cubin, spills from ``ptxas_log`` or, without one, from ptxas rerun on its PTX."""
    target_name = f"{name} for sm_{arch}"
    bin_dir = _bin_dir()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run(
            [os.path.join(bin_dir, "cuobjdump"), "--dump-resource-usage", cubin], capture_output=True, text=True
        )
        if usage.returncode != 0:
            raise AOTCompileError(f"cuobjdump failed on {target_name}: {usage.stderr}")
        res = parse_resource_usage(usage.stdout)
        if _SPILL_RE.search(ptxas_log):
            spill_stores, spill_loads = parse_spills(ptxas_log)
        else:
            # A cache hit (or a triton without the knob) ran no ptxas: rerun it on the same PTX and arch.
            ptx = os.path.join(tmp, "k.ptx")
            with open(ptx, "w") as f:
                f.write(compiled.asm["ptx"])
            gpu_name = f"sm_{arch}{'a' if arch >= 90 else ''}"
            ptxas = subprocess.run(
                [_ptxas_path(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu_name}", ptx, "-o", cubin],
                capture_output=True,
                text=True,
            )
            if ptxas.returncode != 0:
                raise AOTCompileError(f"ptxas failed on {target_name}: {ptxas.stderr}")
            spill_stores, spill_loads = parse_spills(ptxas.stdout + ptxas.stderr)

    return KernelResources(
        name=name,
        arch=arch,
        num_warps=num_warps,
        num_stages=num_stages,
        registers=res["registers"],
        shared_bytes=res["shared"] + int(compiled.metadata.shared),
        local_bytes=res["local"],
        spill_stores=spill_stores,
        spill_loads=spill_loads,
    )


def _compile_in_child(jobs: Sequence[AOTJob]) -> list[KernelResources]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [*sys.path, env.get("PYTHONPATH", "")] if p)
    payload = json.dumps([dataclasses.asdict(j) for j in jobs])
    proc = subprocess.run(
        [sys.executable, "-c", "from blip2_fast.kernels.aot import _child_main; _child_main()"],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
    )
    if proc.returncode != 0:
        raise AOTCompileError(f"AOT compile child failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    if "error" in out:
        raise AOTCompileError(out["error"])
    return [KernelResources(**r) for r in out["results"]]


def _child_main() -> None:
    jobs = [
        AOTJob(
            module=j["module"],
            name=j["name"],
            signature=tuple(tuple(x) for x in j["signature"]),
            constexprs=tuple(tuple(x) for x in j["constexprs"]),
            arch=j["arch"],
            num_warps=j["num_warps"],
            num_stages=j["num_stages"],
            aligned=tuple(j["aligned"]),
        )
        for j in json.loads(sys.stdin.read())
    ]
    try:
        results = [dataclasses.asdict(_compile_here(j)) for j in jobs]
    except AOTCompileError as exc:
        print(json.dumps({"error": str(exc)}))
        return
    print(json.dumps({"results": results}))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_CACHE: dict[AOTJob, KernelResources] = {}


def compile_many(jobs: Sequence[AOTJob]) -> list[KernelResources]:
    """Compile several configs (cached per process); under the interpreter the missing ones share one child
    process, since starting Python with torch and triton costs seconds."""
    missing = list(dict.fromkeys(j for j in jobs if j not in _CACHE))
    if missing:
        results = _compile_in_child(missing) if _interpreting() else [_compile_here(j) for j in missing]
        _CACHE.update(zip(missing, results, strict=True))
    return [_CACHE[j] for j in jobs]


def compile_for_arch(
    kernel: Any,
    signature: dict[str, str],
    constexprs: dict[str, Any],
    arch: int,
    num_warps: int = 4,
    num_stages: int = 2,
    aligned: Sequence[str] = (),
) -> KernelResources:
    """Compile ``kernel`` for ``sm_<arch>`` and report its resources.

    ``signature`` maps every argument name to a Triton type (``"*fp16"``, ``"i32"``,
    ``"fp32"``, ``"constexpr"``); ``constexprs`` gives the value of each constexpr.
    ``aligned`` names the arguments a real launch passes as multiples of 16 (16-byte
    aligned pointers, sizes such as 768), which Triton compiles a specialised kernel for.
    Raises :class:`AOTCompileError` when the kernel does not compile.
    """
    return compile_many([AOTJob.of(kernel, signature, constexprs, arch, num_warps, num_stages, aligned)])[0]
