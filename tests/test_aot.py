"""Ahead-of-time compilation for sm_80 / sm_90 on a CPU-only machine, and its resource report."""

import pytest

from blip2_fast.kernels import aot
from blip2_fast.kernels.ffn import EW_BLOCK_C, EW_BLOCK_R, _bias_gelu_fwd_kernel, kernel_configs

ARCHS = (80, 90)

_SIG = {"u_ptr": "*fp16", "bias_ptr": "*fp16", "out_ptr": "*fp16", "n_rows": "i32", "n_cols": "i32"}
_SIG |= {"BLOCK_R": "constexpr", "BLOCK_C": "constexpr"}


@pytest.fixture(scope="module")
def shipped():
    """Every kernel config the FFN launchers use on a GPU, compiled for sm_80 and sm_90 in one child process."""
    jobs = [
        aot.AOTJob.of(k, sig, const, arch, warps, aligned=aligned)
        for k, sig, const, warps, aligned in kernel_configs()
        for arch in ARCHS
    ]
    return list(zip(jobs, aot.compile_many(jobs), strict=True))


def test_every_shipped_ffn_config_compiles_without_spills(shipped):
    dtypes = {dict(job.signature)[next(iter(dict(job.signature)))] for job, _ in shipped}
    assert dtypes == {"*fp32", "*fp16", "*bf16"}
    assert {job.name for job, _ in shipped} == {
        "_bias_gelu_fwd_kernel",
        "_gelu_fwd_bwd_kernel",
        "_res_norm_fwd_kernel",
        "_res_norm_bwd_kernel",
        "_sum_parts_kernel",
    }
    bad = [(job, res) for job, res in shipped if res.spills or res.local_bytes or res.registers >= 255]
    assert not bad, "spills / local memory / register cap:\n" + "\n".join(f"{j}: {r}" for j, r in bad)
    for job, res in shipped:
        # Triton's dynamic shared memory for the row reductions stays far below the 48 KiB default limit.
        assert res.shared_bytes < 48 * 1024, (job, res)


@pytest.mark.parametrize("arch", ARCHS)
def test_compiles_and_reports_resources(arch, shipped):
    # The same config as a shipped one: answered from the per-process cache the fixture filled.
    aligned = [n for n, ty in _SIG.items() if ty.startswith("*")] + ["n_cols"]
    consts = {"BLOCK_R": EW_BLOCK_R, "BLOCK_C": EW_BLOCK_C}
    res = aot.compile_for_arch(_bias_gelu_fwd_kernel, _SIG, consts, arch=arch, num_warps=4, aligned=aligned)
    assert any(r is res for _, r in shipped)
    assert res.name == "_bias_gelu_fwd_kernel" and res.arch == arch and res.num_warps == 4
    # An elementwise kernel needs some registers, far from the 255 limit, and no local memory.
    assert 8 <= res.registers <= 128
    assert res.local_bytes == 0 and not res.spills


def test_compile_error_is_clear():
    # A non-power-of-two block is rejected by tl.arange when lowering for the GPU.
    with pytest.raises(aot.AOTCompileError, match=r"_bias_gelu_fwd_kernel for sm_90 failed to compile"):
        aot.compile_for_arch(_bias_gelu_fwd_kernel, _SIG, {"BLOCK_R": 16, "BLOCK_C": 100}, arch=90)


def test_bad_arguments():
    with pytest.raises(ValueError, match="arch must be one of"):
        aot.compile_for_arch(_bias_gelu_fwd_kernel, _SIG, {"BLOCK_R": 16, "BLOCK_C": 256}, arch=75)
    with pytest.raises(ValueError, match="expected a @triton.jit kernel"):
        aot.compile_for_arch(print, _SIG, {}, arch=90)
    with pytest.raises(ValueError, match="must appear in the signature"):
        aot.compile_for_arch(_bias_gelu_fwd_kernel, _SIG, {"NOPE": 1}, arch=90)


def test_parsers():
    usage = """
Resource usage:
 Common:
  GLOBAL:0
 Function k:
  REG:40 STACK:16 SHARED:128 LOCAL:16 CONSTANT[0]:392 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    assert aot.parse_resource_usage(usage) == {"registers": 40, "stack": 16, "shared": 128, "local": 16}
    log = (
        "ptxas info    : Function properties for k\n"
        "    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads\n"
    )
    assert aot.parse_spills(log) == (12, 8)
    with pytest.raises(aot.AOTCompileError):
        aot.parse_spills("nothing here")
