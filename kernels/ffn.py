"""Fused FFN and residual LayerNorm for the Q-Former (forward and backward).

Two ops, each the twin of a reference in :mod:`blip2_fast.layers` with the same
positional signature:

* :func:`ffn` = ``ffn_ref``: LayerNorm(x + dropout(GELU(x @ up.T + up_b) @ down.T + down_b)).
* :func:`residual_norm` = ``residual_norm_ref``: LayerNorm(residual + dropout(x @ W.T + b)).

Design: the matrix products stay on cuBLAS (``torch.matmul``); everything between
and after them is a fused Triton epilogue:

* ``_bias_gelu_fwd_kernel``: bias + GELU(erf) on the (rows, I) up projection.
* ``_gelu_fwd_bwd_kernel``: in the backward, GELU(u + b) and GELU'(u + b) * grad
  from one read of the recomputed u.
* ``_res_norm_fwd_kernel``: bias + dropout + residual + LayerNorm, saving the
  pre-norm sum and fp32 (mean, rstd) per row, as one (2, rows) tensor.
* ``_res_norm_bwd_kernel``: LayerNorm backward + dropout backward, giving the
  residual grad and the dense-output grad in one pass, plus per-program partial
  sums of the LayerNorm weight/bias and dense bias grads (reduced by torch).

Memory: the FFN saves only its input rows (the caller's tensor when contiguous, else the
copy the forward reads, such as that of x[:, :32]), the pre-norm sum and two fp32 per
row, about 20% of what eager autograd keeps (measured at B=4, L=67, 768/3072, fp32). The 4H-wide activation is computed
``chunk_size`` sequence positions at a time (all rows at once for 0) and
recomputed the same way in the backward, so at most one chunk of it is alive at a
time. ``recompute=False`` trades memory back for speed: it keeps the (rows, 4H)
pre-activation and the backward skips the ``x @ up.T`` GEMM.

Dropout uses Triton's counter-based RNG: the keep decision of element (row, col)
is ``tl.rand(seed, row * N + col) >= p`` (the seed read from a device tensor) with the row counted over the whole
flattened input, so it does not depend on the chunking and the backward
regenerates it instead of storing a mask. ``return_mask=True`` returns the mask
(for tests).

Supported: fp32, fp16, bf16 (all arguments one dtype; under ``torch.autocast``
as eager code runs there: GEMMs in the autocast dtype, the residual sum and
LayerNorm in fp32, an fp32 output; LayerNorm statistics and all epilogue
arithmetic in fp32 always); hidden sizes up to 8192 (masked
blocks; the configs for 384, 768 and 1024 are the ones compiled ahead of time for
sm_80/sm_90 in the tests, see :func:`kernel_configs`); rows * hidden < 2**31 (the
RNG counter is 32-bit).
Inputs may be non-contiguous views such as ``x[:, :32]`` (the query rows of a
Q-Former sequence): cuBLAS and the kernels want (rows, H) rows, so the FFN copies
them to that layout once in the forward and keeps the copy for the backward (H wide,
small next to the GEMMs; one launch fewer than copying again there). The backward
returns grads for every tensor argument.
"""

from __future__ import annotations

import functools
import operator
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from blip2_fast.kernels.attention import dropout_seed
from blip2_fast.kernels.launch import Launcher, Plan, Plans, cdiv, fast_apply, next_power_of_2

__all__ = ["ffn", "residual_norm", "FFNFunction", "ResidualNormFunction", "kernel_configs"]

MAX_HIDDEN = 8192

# The interpreter runs programs one after another in numpy, paying per program: there, tiles hold more
# rows (the per-row arithmetic is the same, only the grid changes). GPU configs are the ones below.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------- jit kernels


@triton.jit
def _gelu_erf(x):
    return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _grouped_rows(rows, seq, stride_b, n_cols):
    """Element offset of each row of a tensor read as groups of ``seq`` rows ``stride_b`` elements apart (a
    (B, S, N) view with contiguous rows; one group when contiguous)."""
    return (rows // seq).to(tl.int64) * stride_b + (rows % seq) * n_cols


@triton.jit
def _bias_gelu_fwd_kernel(u_ptr, bias_ptr, out_ptr, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = GELU(u + bias); u, out: (n_rows, n_cols) contiguous."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    # fp32 right after the load: the interpreter mishandles bf16 arithmetic, and GELU wants fp32 anyway.
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, _gelu_erf(u + b[None, :]).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_fwd_bwd_kernel(
    u_ptr, bias_ptr, grad_ptr, act_ptr, du_ptr, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr
):
    """act = GELU(u + bias) and du = grad * GELU'(u + bias) in one pass; act may alias u, du may alias grad.

    The backward needs both (act for the down-projection weight grad, du for the rest): one read of u serves both.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(bias_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    x = u + b[None, :]
    cdf = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476))
    pdf = tl.exp(-0.5 * x * x) * 0.3989422804014327  # 1 / sqrt(2 pi)
    tl.store(act_ptr + offs, (x * cdf).to(act_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (g * (cdf + x * pdf)).to(du_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _res_norm_fwd_kernel(
    y_ptr,  # (R, N) dense output without bias
    bias_ptr,  # (N,)
    res_ptr,  # (R, N) rows, in groups of res_seq rows res_stride_b elements apart (a (B, S, N) view's layout)
    w_ptr,  # (N,) LayerNorm weight
    b_ptr,  # (N,) LayerNorm bias
    out_ptr,  # (R, N)
    sum_ptr,  # (R, N) pre-norm sum, saved for the backward
    stats_ptr,  # (2, R) fp32: mean, rstd
    mask_ptr,  # (R, N) int8 keep mask, written only when STORE_MASK
    n_rows,
    n_cols,
    res_seq,
    res_stride_b,
    eps,
    seed_ptr,  # (1,) int64: the dropout seed, read on the device
    p,
    scale,
    HAS_DROPOUT: tl.constexpr,
    STORE_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    mask = (rows[:, None] < n_rows) & col_ok[None, :]
    # int32 offsets: the launcher checks rows * cols < 2**31, which the RNG counter needs anyway.
    offs = rows[:, None] * n_cols + cols[None, :]
    z = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    z += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_DROPOUT:
        keep = tl.rand(tl.load(seed_ptr), offs) >= p
        z = tl.where(keep, z * scale, 0.0)
        if STORE_MASK:
            tl.store(mask_ptr + offs, keep.to(tl.int8), mask=mask)
    r_offs = _grouped_rows(rows, res_seq, res_stride_b, n_cols)[:, None] + cols[None, :]
    s = z + tl.load(res_ptr + r_offs, mask=mask, other=0.0).to(tl.float32)
    s_st = s.to(sum_ptr.dtype.element_ty)
    tl.store(sum_ptr + offs, s_st, mask=mask)
    # Statistics from the stored (rounded) sum so the backward, which reloads it, sees the same numbers.
    s = tl.where(mask, s_st.to(tl.float32), 0.0)
    mean = tl.sum(s, axis=1) / n_cols
    xc = tl.where(mask, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    row_ok = rows < n_rows
    tl.store(stats_ptr + rows, mean, mask=row_ok)
    tl.store(stats_ptr + n_rows + rows, rstd, mask=row_ok)


@triton.jit
def _res_norm_bwd_kernel(
    dout_ptr,  # (R, N) rows, in groups of dout_seq rows dout_stride_b elements apart (a (B, S, N) view's layout)
    sum_ptr,  # (R, N)
    stats_ptr,  # (2, R) fp32: mean, rstd
    w_ptr,
    dres_ptr,  # (R, N) grad of the pre-norm sum = grad of the residual
    dz_ptr,  # (R, N) grad of the dense output (after dropout backward)
    part_ptr,  # (3, P, N) fp32 partial grads, one row per program: LayerNorm weight, LayerNorm bias, dense bias
    n_rows,
    n_cols,
    rows_per_prog,
    dout_seq,
    dout_stride_b,
    seed_ptr,
    p,
    scale,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dbias_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, n_rows)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]
        d_offs = _grouped_rows(rows, dout_seq, dout_stride_b, n_cols)[:, None] + cols[None, :]
        dout = tl.load(dout_ptr + d_offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(sum_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(stats_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(stats_ptr + n_rows + rows, mask=row_ok, other=0.0)
        xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        dxhat = dout * w[None, :]
        c1 = tl.sum(dxhat * xhat, axis=1) / n_cols
        c2 = tl.sum(dxhat, axis=1) / n_cols
        ds = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
        tl.store(dres_ptr + offs, ds.to(dres_ptr.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            keep = tl.rand(tl.load(seed_ptr), offs) >= p
            dz = tl.where(keep, ds * scale, 0.0)
        else:
            dz = ds
        tl.store(dz_ptr + offs, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        dw_acc += dout * xhat
        db_acc += dout
        dbias_acc += dz
    n_prog = tl.num_programs(0)
    tl.store(part_ptr + pid * n_cols + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    tl.store(part_ptr + (n_prog + pid) * n_cols + cols, tl.sum(db_acc, axis=0), mask=col_ok)
    tl.store(part_ptr + (2 * n_prog + pid) * n_cols + cols, tl.sum(dbias_acc, axis=0), mask=col_ok)


@triton.jit
def _sum_parts_kernel(part_ptr, out_ptr, n_parts, n_cols, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """out[g, :] = sum over p of part[g, p, :] for g in 0..2: fp32 sums stored in out's dtype (the grads' own),
    so the backward's weight grads cost one launch rather than a reduction and a cast."""
    g = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        ps = p0 + tl.arange(0, BLOCK_P)
        mask = (ps[:, None] < n_parts) & col_ok[None, :]
        acc += tl.sum(tl.load(part_ptr + (g * n_parts + ps[:, None]) * n_cols + cols[None, :], mask=mask, other=0.0), 0)
    tl.store(out_ptr + g * n_cols + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


# ----------------------------------------------------------------------------- configs

# The partial-sum reduction: 16 partial rows x 256 columns per step, one program per 256 columns and sum.
SUM_BLOCK_P = 16
SUM_BLOCK_N = 256
SUM_NUM_WARPS = 4
_SUM_OPTIONS = {"BLOCK_P": SUM_BLOCK_P, "BLOCK_N": SUM_BLOCK_N, "num_warps": SUM_NUM_WARPS}

# Elementwise tiles: 2048 elements per program, wide along the contiguous axis: 40-64 registers per thread
# on sm_80/sm_90, where 4096 took up to 134 (low occupancy for a memory-bound op).
EW_BLOCK_R = 8
EW_BLOCK_C = 256
EW_NUM_WARPS = 4
_EW_BLOCK_R = 128 if _INTERPRET else EW_BLOCK_R


def _norm_config(n_cols: int, interpret: bool = _INTERPRET) -> dict[str, int]:
    """Row-norm tile: whole rows (LayerNorm needs them), 2048+ elements and 8+ elements per thread.

    Every hidden size up to 1024 shares the 1024-wide block (masked), so one compiled config per dtype
    covers 384, 768 and 1024. The backward's register use grows with the tile: 2048 elements on 8 warps
    take ~100 registers per thread; 4096 on 4 warps took 253 and 8192 on 4 warps spilled 1.5 KB (sm_80).
    """
    block_n = max(1024, next_power_of_2(n_cols))
    block_m = max(1, (32768 if interpret else 2048) // block_n)
    num_warps = 8 if block_n <= 4096 else 16
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "num_warps": num_warps}


_HIDDEN_SIZES = (384, 768, 1024)  # MiniLM init, BERT-base, ViT-L-sized Q-Formers


def kernel_configs() -> list[tuple[object, dict[str, str], dict[str, object], int, tuple[str, ...]]]:
    """Every (kernel, signature, constexprs, num_warps, aligned args) the launchers use for hidden 384/768/1024.

    Used by the AOT test to compile each one for sm_80 and sm_90. Those hidden and intermediate sizes are
    multiples of 16 and torch allocations are 16-byte aligned, so a launch gets Triton's divisibility
    specialisation on every pointer and on ``n_cols``: ``aligned`` lists them.
    """
    out = []
    # (dense side, LayerNorm side) dtypes: one dtype, or autocast's half-precision GEMM output beside an fp32
    # residual stream; the elementwise GELU kernels see the dense dtype alone
    for dense, norm in (("fp32", "fp32"), ("fp16", "fp16"), ("bf16", "bf16"), ("fp16", "fp32"), ("bf16", "fp32")):
        ptr, nptr = f"*{dense}", f"*{norm}"
        ew = {"BLOCK_R": EW_BLOCK_R, "BLOCK_C": EW_BLOCK_C}
        if dense == norm:
            sum_consts = {"BLOCK_P": SUM_BLOCK_P, "BLOCK_N": SUM_BLOCK_N}
            sum_sig = {"part_ptr": "*fp32", "out_ptr": ptr, "n_parts": "i32", "n_cols": "i32"}
            out.append((_sum_parts_kernel, sum_sig | {k: "constexpr" for k in sum_consts}, sum_consts, SUM_NUM_WARPS))
            out.append(
                (
                    _bias_gelu_fwd_kernel,
                    {"u_ptr": ptr, "bias_ptr": ptr, "out_ptr": ptr, "n_rows": "i32", "n_cols": "i32"}
                    | {k: "constexpr" for k in ew},
                    ew,
                    EW_NUM_WARPS,
                )
            )
            out.append(
                (
                    _gelu_fwd_bwd_kernel,
                    {"u_ptr": ptr, "bias_ptr": ptr, "grad_ptr": ptr, "act_ptr": ptr, "du_ptr": ptr}
                    | {"n_rows": "i32", "n_cols": "i32"}
                    | {k: "constexpr" for k in ew},
                    ew,
                    EW_NUM_WARPS,
                )
            )
        for block_n in sorted({_norm_config(h, interpret=False)["BLOCK_N"] for h in _HIDDEN_SIZES}):
            cfg = _norm_config(block_n, interpret=False)
            tile = {"BLOCK_M": cfg["BLOCK_M"], "BLOCK_N": cfg["BLOCK_N"]}
            # (HAS_DROPOUT, STORE_MASK): eval, training, and the debug path that returns the mask.
            for dropout, store_mask in ((False, False), (True, False), (True, True)):
                fwd_sig = {
                    "y_ptr": ptr,
                    "bias_ptr": ptr,
                    "res_ptr": nptr,
                    "w_ptr": nptr,
                    "b_ptr": nptr,
                    "out_ptr": nptr,
                    "sum_ptr": nptr,
                    "stats_ptr": "*fp32",
                    "mask_ptr": "*i8",
                    "n_rows": "i32",
                    "n_cols": "i32",
                    "res_seq": "i32",
                    "res_stride_b": "i32",
                    "eps": "fp32",
                    "seed_ptr": "*i64",
                    "p": "fp32",
                    "scale": "fp32",
                    "HAS_DROPOUT": "constexpr",
                    "STORE_MASK": "constexpr",
                    "BLOCK_M": "constexpr",
                    "BLOCK_N": "constexpr",
                }
                out.append(
                    (
                        _res_norm_fwd_kernel,
                        fwd_sig,
                        {"HAS_DROPOUT": dropout, "STORE_MASK": store_mask} | tile,
                        cfg["num_warps"],
                    )
                )
                bwd_sig = {
                    "dout_ptr": nptr,
                    "sum_ptr": nptr,
                    "stats_ptr": "*fp32",
                    "w_ptr": nptr,
                    "dres_ptr": nptr,
                    "dz_ptr": ptr,
                    "part_ptr": "*fp32",
                    "n_rows": "i32",
                    "n_cols": "i32",
                    "rows_per_prog": "i32",
                    "dout_seq": "i32",
                    "dout_stride_b": "i32",
                    "seed_ptr": "*i64",
                    "p": "fp32",
                    "scale": "fp32",
                    "HAS_DROPOUT": "constexpr",
                    "BLOCK_M": "constexpr",
                    "BLOCK_N": "constexpr",
                }
                if not store_mask:
                    out.append((_res_norm_bwd_kernel, bwd_sig, {"HAS_DROPOUT": dropout} | tile, cfg["num_warps"]))
    return [(k, sig, const, warps, _aligned(sig)) for k, sig, const, warps in out]


def _aligned(signature: dict[str, str]) -> tuple[str, ...]:
    return tuple(name for name, ty in signature.items() if ty.startswith("*") or name == "n_cols")


# ----------------------------------------------------------------------------- launchers
# Each op validates its arguments once per signature (shapes, dtypes, devices, flags) and passes that
# signature's Plan down as ``sig``: with it, a launch is keyed by the plan alone (see launch.Launcher.launch),
# which the op passes only when every pointer it hands the kernels is 16-byte aligned (else ``sig`` is
# None and the launcher builds its own key). Grids and launch options are computed once per shape.

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_BIAS_GELU = Launcher(_bias_gelu_fwd_kernel)
_GELU_FWD_BWD = Launcher(_gelu_fwd_bwd_kernel)
_RES_NORM_FWD = Launcher(_res_norm_fwd_kernel)
_RES_NORM_BWD = Launcher(_res_norm_bwd_kernel)
_SUM_PARTS = Launcher(_sum_parts_kernel)
_LAUNCH_PARAMS = Plans()  # (what, shape, flags) -> (grid, options) or the backward's partition


# Each *_launch helper is called only when the plan ``sig`` (if any) lacks its result, and stores it there.


def _launch_params(sig, name: str, key: tuple, make):
    """``make()``, computed once per ``key`` and kept on the plan ``sig`` as ``name``."""
    hit = _LAUNCH_PARAMS.get(key)
    if hit is None:
        hit = _LAUNCH_PARAMS.remember(key, make())
    if sig is not None:
        setattr(sig, name, hit)
    return hit


def _ew_launch(rows: int, cols: int, sig=None) -> tuple[tuple[int, int], dict]:
    def make():
        options = {"BLOCK_R": _EW_BLOCK_R, "BLOCK_C": EW_BLOCK_C, "num_warps": EW_NUM_WARPS}
        return (cdiv(rows, _EW_BLOCK_R), cdiv(cols, EW_BLOCK_C)), options

    return _launch_params(sig, "ew", ("ew", rows, cols), make)


def _norm_fwd_launch(rows: int, cols: int, dropout: bool, store_mask: bool, sig=None) -> tuple[tuple[int], dict]:
    def make():
        cfg = _norm_config(cols)
        return (cdiv(rows, cfg["BLOCK_M"]),), {"HAS_DROPOUT": dropout, "STORE_MASK": store_mask and dropout, **cfg}

    return _launch_params(sig, "norm_fwd", ("norm fwd", rows, cols, dropout, store_mask), make)


def _norm_bwd_launch(rows: int, cols: int, dropout: bool, device: torch.device, sig=None) -> tuple[int, int, dict]:
    """(programs, rows per program, options): each program reduces its rows' weight grads to one partial row."""

    def make():
        cfg = _norm_config(cols)
        block_m = cfg["BLOCK_M"]
        n_prog = max(1, min(_num_programs(device), cdiv(rows, block_m)))
        rows_per_prog = cdiv(cdiv(rows, n_prog), block_m) * block_m
        return cdiv(rows, rows_per_prog), rows_per_prog, {"HAS_DROPOUT": dropout, **cfg}

    return _launch_params(sig, "norm_bwd", ("norm bwd", rows, cols, dropout, device), make)


def bias_gelu(u: torch.Tensor, bias: torch.Tensor, out: torch.Tensor | None = None, sig=None) -> torch.Tensor:
    """GELU(u + bias) for a contiguous (..., I) ``u``; ``out`` may be ``u`` itself."""
    cols = u.shape[-1]
    rows = u.numel() // cols
    out = torch.empty_like(u) if out is None else out
    grid, options = getattr(sig, "ew", None) or _ew_launch(rows, cols, sig)
    _BIAS_GELU.launch(sig, grid, (u, bias, out, rows, cols), options)
    return out


def gelu_forward_backward_(
    u: torch.Tensor, bias: torch.Tensor, grad: torch.Tensor, act: torch.Tensor, sig=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(GELU(u + bias) into ``act``, grad * GELU'(u + bias) into ``grad``), all contiguous (..., I); ``act`` may
    be ``u``."""
    cols = grad.shape[-1]
    rows = grad.numel() // cols
    grid, options = getattr(sig, "ew", None) or _ew_launch(rows, cols, sig)
    _GELU_FWD_BWD.launch(sig, grid, (u, bias, grad, act, grad, rows, cols), options)
    return act, grad


_NO_MASK: dict[torch.device, torch.Tensor] = {}  # the int8 pointer a launch that stores no mask passes


def _rows_of(t: torch.Tensor, rows: int, sig) -> tuple[torch.Tensor, int, int, object]:
    """(t, rows per group, elements between groups, the launch key) for a kernel reading t's rows
    (``_grouped_rows``): a contiguous t is one group; a (B, S, N) view with contiguous rows (a slice along S, as a
    concatenation's backward hands out) is read in place, under a key that adds its layout to the plan ``sig``;
    anything else is copied to contiguous rows first."""
    if t.dim() == 3 and not t.is_contiguous() and t.stride(2) == 1 and t.stride(1) == t.shape[2]:
        return t, t.shape[1], t.stride(0), None if sig is None else (sig, t.shape[1], t.stride(0))
    return t.contiguous(), rows, 0, sig


def res_norm_forward(
    y: torch.Tensor,
    bias: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    dropout_p: float,
    seed: torch.Tensor,
    store_mask: bool = False,
    sig=None,
    y_is_scratch: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """LayerNorm(residual + dropout(y + bias)) for a contiguous (..., N) ``y`` and a ``residual`` of its shape (read
    in place when :func:`_rows_of` allows): (out, pre-norm sum, stats, mask), the first two contiguous in the
    residual's dtype, stats (2, rows) fp32: each row's mean and 1 / std. With ``y_is_scratch`` the sum is written
    over ``y`` where their dtypes agree (each element is read before it is written)."""
    cols = y.shape[-1]
    rows = y.numel() // cols
    has_dropout = dropout_p > 0.0
    grid, options = getattr(sig, "norm_fwd", None) or _norm_fwd_launch(rows, cols, has_dropout, store_mask, sig)
    residual, seq, stride_b, key = _rows_of(residual, rows, sig)
    # in the residual's dtype: under autocast the dense output is half precision, the residual stream fp32
    out = torch.empty_like(y, dtype=residual.dtype)
    pre = y if y_is_scratch and y.dtype == residual.dtype else torch.empty_like(y, dtype=residual.dtype)
    stats = torch.empty((2, rows), device=y.device, dtype=torch.float32)
    if options["STORE_MASK"]:
        keep = torch.empty(residual.shape, device=y.device, dtype=torch.int8)
    else:  # never written
        keep = _NO_MASK.get(y.device)
        if keep is None:
            keep = _NO_MASK.setdefault(y.device, torch.empty(1, device=y.device, dtype=torch.int8))
    args = (
        y, bias, residual, norm_weight, norm_bias, out, pre, stats, keep, rows, cols, seq, stride_b, eps,
        seed if has_dropout else stats,  # without dropout the pointer is never read
        dropout_p, 1.0 / (1.0 - dropout_p),
    )  # fmt: skip
    _RES_NORM_FWD.launch(key, grid, args, options)
    mask = None
    if store_mask:
        mask = keep.bool() if has_dropout else torch.ones(residual.shape, dtype=torch.bool, device=y.device)
    return out, pre, stats, mask


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) * 4
    return 8  # the interpreter runs programs one after another: few, long programs are fastest there


def res_norm_backward(
    dout: torch.Tensor,
    pre: torch.Tensor,
    stats: torch.Tensor,
    norm_weight: torch.Tensor,
    dropout_p: float,
    seed: torch.Tensor,
    dense_dtype: torch.dtype | None = None,
    sig=None,
    sum_dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad of residual, grad of dense output, (3, N) ``sum_dtype``: LayerNorm weight, LayerNorm bias and dense bias
    grads), for a (..., N) ``dout`` (see :func:`_rows_of`) and a contiguous ``pre``; the first two are shaped like
    ``pre``.

    The residual's grad takes the pre-norm sum's dtype; the dense output's takes ``dense_dtype`` (default the same).
    The three sums accumulate in fp32 whatever ``sum_dtype`` is.
    """
    cols = pre.shape[-1]
    rows = pre.numel() // cols
    has_dropout = dropout_p > 0.0
    n_prog, rows_per_prog, options = getattr(sig, "norm_bwd", None) or _norm_bwd_launch(
        rows, cols, has_dropout, pre.device, sig
    )
    dres = torch.empty_like(pre)
    dz = torch.empty_like(pre, dtype=dense_dtype or pre.dtype)
    # the three partial sums in one buffer, reduced by one launch into the grads' dtype
    parts = torch.empty((3, n_prog, cols), device=pre.device, dtype=torch.float32)
    dout, seq, stride_b, key = _rows_of(dout, rows, sig)
    args = (
        dout, pre, stats, norm_weight, dres, dz, parts, rows, cols, rows_per_prog, seq, stride_b,
        seed if has_dropout else stats, dropout_p, 1.0 / (1.0 - dropout_p),
    )  # fmt: skip
    _RES_NORM_BWD.launch(key, (n_prog,), args, options)
    sums = torch.empty((3, cols), device=pre.device, dtype=sum_dtype)
    _SUM_PARTS.launch(sig, (cdiv(cols, SUM_BLOCK_N), 3), (parts, sums, n_prog, cols), _SUM_OPTIONS)
    return dres, dz, sums


# ----------------------------------------------------------------------------- validation


def _check_vec(name: str, t: torch.Tensor, n: int, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, torch.Tensor) or t.shape != (n,):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must have shape ({n},), got {shape}")
    _check_dtype_device(name, t, dtype, device)


def _check_dtype_device(name: str, t: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype} like the input, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like the input, got {t.device}")


def _check_common(x: torch.Tensor, hidden: int, eps: float, dropout_p: float) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("x must be a tensor of shape (..., features) with at least 2 dims")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x must have at least one row and one feature, got shape {tuple(x.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not eps > 0.0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size must be at most {MAX_HIDDEN} (one row per block), got {hidden}")
    if x.numel() // x.shape[-1] * hidden >= 2**31:
        raise ValueError(f"rows * hidden must be < 2**31 (32-bit RNG counter), got {x.numel() // x.shape[-1]} rows")


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype of ``x``'s device, or None outside ``torch.autocast``."""
    if not torch._C._is_any_autocast_enabled():  # one C call on the common path
        return None
    if not isinstance(x, torch.Tensor) or not torch.is_autocast_enabled(x.device.type):
        return None
    return torch.get_autocast_dtype(x.device.type)


def _cast(dtype: torch.dtype, *tensors):
    """Each tensor in ``dtype`` (a differentiable cast: fp32 masters get their grads); anything else as is."""
    return [t.to(dtype) if isinstance(t, torch.Tensor) else t for t in tensors]


def _new_seed(seed: int | torch.Tensor | None, dropout_p: float, device: torch.device) -> torch.Tensor | None:
    # Without dropout nothing is drawn (None): eval passes leave the generator as the reference path does.
    return dropout_seed(seed, device) if dropout_p > 0.0 else None


# ----------------------------------------------------------------------------- forward and backward
# One implementation of each op's two halves, run by a torch.autograd.Function in eager mode (the least host
# work per call) and by custom ops under torch.compile (opaque to Dynamo, with fake shapes: no graph break).
# ``sig`` is the op's validated signature (launches keyed by it) or None.


def _res_norm_fwd(x, residual, weight, bias, norm_weight, norm_bias, eps, dropout_p, seed, store_mask, sig=None):
    """(out shaped like residual, mask or None, pre-norm sum shaped like residual, (2, rows) fp32 mean and rstd)."""
    y = F.linear(x, weight)  # cuBLAS, (..., N); bias, dropout, residual and LayerNorm fused below
    out, pre, stats, mask = res_norm_forward(
        y, bias, residual, norm_weight, norm_bias, eps, dropout_p, seed, store_mask, sig, y_is_scratch=True
    )
    return out, mask, pre, stats


def _sum_dtype(dtypes: tuple[torch.dtype, ...]) -> torch.dtype:
    """The dtype the backward's (3, N) sums are stored in: the grads' own when they share one, else fp32."""
    return dtypes[0] if dtypes[0] == dtypes[1] == dtypes[2] else torch.float32


def _cast_rows(rows: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> list[torch.Tensor]:
    """Row i of ``rows`` in ``dtypes[i]`` (rows already in a shared dtype are views, nothing is cast)."""
    if dtypes[0] == dtypes[1] == dtypes[2]:
        return rows.to(dtypes[0]).unbind()
    return [row.to(dtype) for row, dtype in zip(rows, dtypes, strict=True)]


def _grad_key(dout: torch.Tensor, sig):
    """``sig`` if the incoming grad's address keeps every kernel pointer aligned, else None."""
    return sig if sig is not None and not dout.data_ptr() & 15 else None


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(..., N) -> (rows, N)."""
    return t.reshape(-1, t.shape[-1])


def _res_norm_bwd(dout, x, weight, pre, stats, norm_weight, dropout_p, seed, need, sig=None, sum_dtype=torch.float32):
    """Grads of (x, residual, weight) and the (3, N) ``sum_dtype`` grads of (norm_weight, norm_bias, bias), for
    :func:`_cast_rows`; GEMMs whose grad ``need`` lacks are skipped."""
    sig = _grad_key(dout, sig)
    dres, dz, sums = res_norm_backward(dout, pre, stats, norm_weight, dropout_p, seed, x.dtype, sig, sum_dtype)
    dx = dz @ weight if need[0] else None
    dw = _flat(dz).t() @ _flat(x) if need[2] else None
    return dx, dres, dw, sums


def _chunk_rows(x: torch.Tensor, chunk_size: int) -> int:
    """chunk_size counts sequence positions, as in BERT: a chunk is batch * chunk_size rows (0: all rows)."""
    rows, seq_len = x.numel() // x.shape[-1], x.shape[-2]
    return rows if chunk_size <= 0 or chunk_size >= seq_len else (rows // seq_len) * chunk_size


def _ffn_fwd(
    x, up_w, up_b, down_w, down_b, norm_w, norm_b, eps, dropout_p, chunk_size, seed, store_mask, recompute, sig=None
):
    """(out, mask or None, pre-norm sum, stats, kept pre-activation or None, chunk rows); out, mask and the
    sum shaped like x, the pre-activation like x with I features."""
    x = x.contiguous()  # the residual the norm kernel reads
    # the GEMMs' copy: under autocast x is the fp32 residual, the weights half precision
    xg = x if x.dtype == up_w.dtype else x.to(up_w.dtype)
    rows = x.numel() // x.shape[-1]
    chunk_rows = _chunk_rows(x, chunk_size) if sig is None else sig.chunk_rows
    kept = None
    if chunk_rows >= rows:  # one chunk
        u = F.linear(xg, up_w)
        if recompute:
            act = bias_gelu(u, up_b, out=u, sig=sig)  # in place: nothing 4H wide outlives the forward
        else:
            kept, act = u, bias_gelu(u, up_b, sig=sig)  # the pre-activation is kept for the backward
        y = F.linear(act, down_w)
        del act, u
    else:
        sig = None  # chunk views: their alignment is not the signature's
        # Without recompute the pre-activation is kept for the backward, saving one GEMM there.
        if not recompute:
            kept = torch.empty((*x.shape[:-1], up_w.shape[0]), device=x.device, dtype=xg.dtype)
        y = torch.empty_like(xg)
        xg2, y2 = _flat(xg), _flat(y)
        for r0 in range(0, rows, chunk_rows):
            xc = xg2[r0 : r0 + chunk_rows]
            if kept is None:
                u = xc @ up_w.t()
                act = bias_gelu(u, up_b, out=u)  # in place: with recompute nothing 4H wide outlives the chunk
            else:
                u = torch.matmul(xc, up_w.t(), out=_flat(kept)[r0 : r0 + chunk_rows])
                act = bias_gelu(u, up_b)
            torch.matmul(act, down_w.t(), out=y2[r0 : r0 + chunk_rows])
            del act, u
    out, pre, stats, mask = res_norm_forward(
        y, down_b, x, norm_w, norm_b, eps, dropout_p, seed, store_mask, sig, y_is_scratch=True
    )
    return out, mask, pre, stats, kept, chunk_rows


def _ffn_bwd(
    dout, x, up_w, up_b, down_w, norm_w, pre, stats, kept, dropout_p, seed, chunk_rows, sig=None,
    sum_dtype=torch.float32,
):  # fmt: skip
    """Grads of (x, up_w, up_b, down_w) and the (3, N) ``sum_dtype`` grads of (norm_w, norm_b, down_b), for
    :func:`_cast_rows`."""
    xg = x.contiguous()
    xg = xg if xg.dtype == up_w.dtype else xg.to(up_w.dtype)
    rows = xg.numel() // xg.shape[-1]
    single = chunk_rows >= rows
    sig = _grad_key(dout, sig if single else None)
    # LayerNorm + dropout backward does not need the 4H activation: one launch over all rows.
    dres, dz, sums = res_norm_backward(dout, pre, stats, norm_w, dropout_p, seed, xg.dtype, sig, sum_dtype)
    if single:  # each grad straight in its dtype (the bias's reduction accumulates in fp32)
        u = F.linear(xg, up_w) if kept is None else kept
        # The recomputed u is overwritten by the activation; a kept one belongs to the graph (retain_graph).
        act, du = gelu_forward_backward_(u, up_b, dz @ down_w, u if kept is None else torch.empty_like(u), sig)
        du2 = _flat(du)
        d_down_w, d_up_w, d_up_b = _flat(dz).t() @ _flat(act), du2.t() @ _flat(xg), du2.sum(0, dtype=up_b.dtype)
        dx = _flat(dres)  # dx = residual grad + grad through the up projection, accumulated in place
        if dx.dtype == du.dtype:
            dx.addmm_(du2, up_w)
        else:  # autocast: an fp32 residual grad, half-precision GEMMs
            dx += du2 @ up_w
        return dres, d_up_w, d_up_b, d_down_w, sums
    # weight grads summed over chunks in fp32, so fp16/bf16 chunking does not add rounding per chunk
    d_down_w = torch.zeros(down_w.shape, device=xg.device, dtype=torch.float32)
    d_up_w = torch.zeros(up_w.shape, device=xg.device, dtype=torch.float32)
    d_up_b = torch.zeros(up_b.shape, device=xg.device, dtype=torch.float32)
    xg2, dz2, dx = _flat(xg), _flat(dz), _flat(dres)
    for r0 in range(0, rows, chunk_rows):
        xc = xg2[r0 : r0 + chunk_rows]
        dzc = dz2[r0 : r0 + chunk_rows]
        u = xc @ up_w.t() if kept is None else _flat(kept)[r0 : r0 + chunk_rows]
        act, du = gelu_forward_backward_(u, up_b, dzc @ down_w, u if kept is None else torch.empty_like(u))
        del u
        d_down_w += (dzc.t() @ act).float()
        d_up_w += (du.t() @ xc).float()
        d_up_b += du.sum(0, dtype=torch.float32)
        del act
        if dx.dtype == du.dtype:
            dx[r0 : r0 + chunk_rows].addmm_(du, up_w)
        else:
            dx[r0 : r0 + chunk_rows] += du @ up_w
        del du
    return dres, d_up_w.to(up_w.dtype), d_up_b.to(up_b.dtype), d_down_w.to(down_w.dtype), sums


# ----------------------------------------------------------------------------- autograd (eager)


class ResidualNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, norm_weight, norm_bias, eps, dropout_p, seed, store_mask, sig):
        out, mask, pre, stats = _res_norm_fwd(
            x, residual, weight, bias, norm_weight, norm_bias, eps, dropout_p, seed, store_mask, sig
        )
        ctx.save_for_backward(x, weight, norm_weight, pre, stats)  # x, not its copy: views keep sharing storage
        ctx.cfg = (dropout_p, seed, (norm_weight.dtype, norm_bias.dtype, bias.dtype), sig)
        if mask is not None:
            ctx.mark_non_differentiable(mask)
        return out, mask

    @staticmethod
    def backward(ctx, dout, _dmask):
        x, weight, norm_weight, pre, stats = ctx.saved_tensors
        dropout_p, seed, dtypes, sig = ctx.cfg
        dx, dres, dw, sums = _res_norm_bwd(
            dout, x, weight, pre, stats, norm_weight, dropout_p, seed, ctx.needs_input_grad, sig, _sum_dtype(dtypes)
        )
        dnw, dnb, db = _cast_rows(sums, dtypes)
        return dx, dres, dw, db, dnw, dnb, None, None, None, None, None


class FFNFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x, up_w, up_b, down_w, down_b, norm_w, norm_b, eps, dropout_p, chunk_size, seed, store_mask, recompute,
        sig,
    ):  # fmt: skip
        # the rows the kernels read: x itself when contiguous, else one copy (of a view such as x[:, :32]),
        # kept for the backward rather than made again there
        x = x.contiguous()
        out, mask, pre, stats, kept, chunk_rows = _ffn_fwd(
            x, up_w, up_b, down_w, down_b, norm_w, norm_b, eps, dropout_p, chunk_size, seed, store_mask, recompute,
            sig,
        )  # fmt: skip
        ctx.save_for_backward(x, up_w, up_b, down_w, norm_w, pre, stats, kept)
        ctx.cfg = (dropout_p, seed, chunk_rows, (norm_w.dtype, norm_b.dtype, down_b.dtype), sig)
        if mask is not None:
            ctx.mark_non_differentiable(mask)
        return out, mask

    @staticmethod
    def backward(ctx, dout, _dmask):
        x, up_w, up_b, down_w, norm_w, pre, stats, kept = ctx.saved_tensors
        dropout_p, seed, chunk_rows, dtypes, sig = ctx.cfg
        dx, d_up_w, d_up_b, d_down_w, sums = _ffn_bwd(
            dout, x, up_w, up_b, down_w, norm_w, pre, stats, kept, dropout_p, seed, chunk_rows, sig, _sum_dtype(dtypes)
        )
        dnw, dnb, d_down_b = _cast_rows(sums, dtypes)
        return dx, d_up_w, d_up_b, d_down_w, d_down_b, dnw, dnb, None, None, None, None, None, None, None


_apply_residual_norm = fast_apply(ResidualNormFunction)
_apply_ffn = fast_apply(FFNFunction)


# ----------------------------------------------------------------------------- custom ops (torch.compile)
# Tensors only cross the op boundary: an absent seed or kept activation travels as an empty tensor, dtypes as
# the dtype of a tensor that has it.


def _maybe(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


def _present(t: torch.Tensor) -> torch.Tensor | None:
    return t if t.numel() else None


@torch.library.custom_op("blip2_fast::residual_norm_fwd", mutates_args=())
def _res_norm_fwd_op(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
    norm_bias: torch.Tensor, seed: torch.Tensor, eps: float, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    out, _, pre, stats = _res_norm_fwd(
        x, residual, weight, bias, norm_weight, norm_bias, eps, dropout_p, _present(seed), False
    )
    return out, pre, stats


@_res_norm_fwd_op.register_fake
def _(x, residual, weight, bias, norm_weight, norm_bias, seed, eps, dropout_p):
    stats = residual.new_empty((2, residual.numel() // residual.shape[-1]), dtype=torch.float32)
    return residual.new_empty(residual.shape), residual.new_empty(residual.shape), stats


@torch.library.custom_op("blip2_fast::residual_norm_bwd", mutates_args=())
def _res_norm_bwd_op(
    dout: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, norm_weight: torch.Tensor,
    norm_bias: torch.Tensor, pre: torch.Tensor, stats: torch.Tensor, seed: torch.Tensor, dropout_p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return _res_norm_bwd(dout, x, weight, pre, stats, norm_weight, dropout_p, _present(seed), (True, True, True))


@_res_norm_bwd_op.register_fake
def _(dout, x, weight, bias, norm_weight, norm_bias, pre, stats, seed, dropout_p):
    sums = pre.new_empty(3, pre.shape[-1], dtype=torch.float32)
    return x.new_empty(x.shape), dout.new_empty(dout.shape), weight.new_empty(weight.shape), sums


def _res_norm_setup(ctx, inputs, output):
    x, _, weight, bias, norm_weight, norm_bias, seed, _, dropout_p = inputs
    ctx.save_for_backward(x, weight, bias, norm_weight, norm_bias, *output[1:], seed)
    ctx.dropout_p = dropout_p


def _res_norm_op_backward(ctx, dout, _dpre, _dstats):
    x, weight, bias, norm_weight, norm_bias, pre, stats, seed = ctx.saved_tensors
    dx, dres, dw, sums = _res_norm_bwd_op(
        dout, x, weight, bias, norm_weight, norm_bias, pre, stats, seed, ctx.dropout_p
    )
    dnw, dnb, db = _cast_rows(sums, (norm_weight.dtype, norm_bias.dtype, bias.dtype))
    return dx, dres, dw, db, dnw, dnb, None, None, None


_res_norm_fwd_op.register_autograd(_res_norm_op_backward, setup_context=_res_norm_setup)


@torch.library.custom_op("blip2_fast::ffn_fwd", mutates_args=())
def _ffn_fwd_op(
    x: torch.Tensor, up_w: torch.Tensor, up_b: torch.Tensor, down_w: torch.Tensor, down_b: torch.Tensor,
    norm_w: torch.Tensor, norm_b: torch.Tensor, seed: torch.Tensor, eps: float, dropout_p: float, chunk_size: int,
    recompute: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    out, _, pre, stats, kept, _ = _ffn_fwd(
        x, up_w, up_b, down_w, down_b, norm_w, norm_b, eps, dropout_p, chunk_size, _present(seed), False, recompute
    )
    return out, pre, stats, _maybe(kept, up_w)


@_ffn_fwd_op.register_fake
def _(x, up_w, up_b, down_w, down_b, norm_w, norm_b, seed, eps, dropout_p, chunk_size, recompute):
    stats = x.new_empty((2, x.numel() // x.shape[-1]), dtype=torch.float32)
    kept = up_w.new_empty(0) if recompute else up_w.new_empty((*x.shape[:-1], up_w.shape[0]))
    return x.new_empty(x.shape), x.new_empty(x.shape), stats, kept


@torch.library.custom_op("blip2_fast::ffn_bwd", mutates_args=())
def _ffn_bwd_op(
    dout: torch.Tensor, x: torch.Tensor, up_w: torch.Tensor, up_b: torch.Tensor, down_w: torch.Tensor,
    down_b: torch.Tensor, norm_w: torch.Tensor, norm_b: torch.Tensor, pre: torch.Tensor, stats: torch.Tensor,
    kept: torch.Tensor, seed: torch.Tensor, dropout_p: float, chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    return _ffn_bwd(
        dout, x, up_w, up_b, down_w, norm_w, pre, stats, _present(kept), dropout_p, _present(seed),
        _chunk_rows(x, chunk_size),
    )  # fmt: skip


@_ffn_bwd_op.register_fake
def _(dout, x, up_w, up_b, down_w, down_b, norm_w, norm_b, pre, stats, kept, seed, dropout_p, chunk_size):
    sums = pre.new_empty(3, pre.shape[-1], dtype=torch.float32)
    return (*(t.new_empty(t.shape) for t in (x, up_w, up_b, down_w)), sums)


def _ffn_setup(ctx, inputs, output):
    x, up_w, up_b, down_w, down_b, norm_w, norm_b, seed, _, dropout_p, chunk_size, _ = inputs
    ctx.save_for_backward(x, up_w, up_b, down_w, down_b, norm_w, norm_b, *output[1:], seed)
    ctx.args = (dropout_p, chunk_size)


def _ffn_op_backward(ctx, dout, *_):
    x, up_w, up_b, down_w, down_b, norm_w, norm_b, pre, stats, kept, seed = ctx.saved_tensors
    *grads, sums = _ffn_bwd_op(dout, x, up_w, up_b, down_w, down_b, norm_w, norm_b, pre, stats, kept, seed, *ctx.args)
    dnw, dnb, d_down_b = _cast_rows(sums, (norm_w.dtype, norm_b.dtype, down_b.dtype))
    return (*grads, d_down_b, dnw, dnb, None, None, None, None, None)


_ffn_fwd_op.register_autograd(_ffn_op_backward, setup_context=_ffn_setup)


# ----------------------------------------------------------------------------- functional API
# Arguments are validated once per signature (each tensor's shape, dtype and device, and the scalars); a
# call whose signature passed before only builds it (about 2 us), so the eager path costs little more host
# time than the launches themselves.

_VALIDATED = Plans()  # signature -> its Plan, for signatures whose arguments passed validation


_SHAPE_DTYPE_DEVICE = operator.attrgetter("shape", "dtype", "device")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def _signature(op: str, tensors: tuple, *scalars) -> tuple | None:
    try:
        return (op, *map(_SHAPE_DTYPE_DEVICE, tensors), *scalars)
    except AttributeError:  # not all tensors: validation names the argument
        return None


def _all_aligned(*tensors: torch.Tensor) -> bool:
    """Every tensor's address is a multiple of 16 bytes (what the signature-keyed launches assume)."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return not bits & 15


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(map(_REQUIRES_GRAD, tensors))


def _check_residual_norm(x, residual, weight, bias, norm_weight, norm_bias, eps, dropout_p, amp) -> None:
    _check_common(x, residual.shape[-1] if isinstance(residual, torch.Tensor) else 0, eps, dropout_p)
    if not isinstance(residual, torch.Tensor) or residual.shape[:-1] != x.shape[:-1]:
        got = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
        raise ValueError(f"residual must have shape {tuple(x.shape[:-1])} + (N,), got {got}")
    n, k = residual.shape[-1], x.shape[-1]
    _check_dtype_device("residual", residual, x.dtype if amp is None else torch.float32, x.device)
    if not isinstance(weight, torch.Tensor) or weight.shape != (n, k):
        raise ValueError(f"weight must have shape (N, K) = ({n}, {k}), got {tuple(weight.shape)}")
    _check_dtype_device("weight", weight, x.dtype, x.device)
    _check_vec("bias", bias, n, x.dtype, x.device)
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        _check_vec(name, t, n, residual.dtype, x.device)


def residual_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
    *,
    seed: int | torch.Tensor | None = None,
    return_mask: bool = False,
):
    """Fused ``residual_norm_ref``: LayerNorm(residual + dropout(x @ weight.T + bias)).

    Every tensor has one dtype (fp32, fp16 or bf16), except under ``torch.autocast``,
    which is followed as eager code runs under it: the dense layer (``x``, ``weight``,
    ``bias``) in the autocast dtype, the residual sum and LayerNorm in fp32, and an
    fp32 output.

    x: (..., K); residual: (..., N) with the same leading dims; weight: (N, K);
    bias, norm_weight, norm_bias: (N,). ``seed`` fixes the dropout pattern: an int, or an
    int64 tensor on x's device whose first element is read (drawn from torch's generator
    when None). With ``return_mask`` returns (out, keep mask).
    """
    amp = _autocast_dtype(x)
    if amp is not None:
        x, weight, bias = _cast(amp, x, weight, bias)
        residual, norm_weight, norm_bias = _cast(torch.float32, residual, norm_weight, norm_bias)
    tensors = (x, residual, weight, bias, norm_weight, norm_bias)
    if torch.compiler.is_compiling():
        if return_mask:
            raise ValueError("return_mask is an eager-only debug keyword")
        _check_residual_norm(*tensors, eps, dropout_p, amp)
        eps, dropout_p = float(eps), float(dropout_p)
        seed_t = _maybe(_new_seed(seed, dropout_p, x.device), x)
        with torch.autocast(x.device.type, enabled=False):
            return _res_norm_fwd_op(*tensors, seed_t, eps, dropout_p)[0]
    sig = _signature("residual_norm", tensors, eps, dropout_p, bool(return_mask))
    plan = _VALIDATED.get(sig)
    if plan is None:
        _check_residual_norm(*tensors, eps, dropout_p, amp)
        plan = _VALIDATED.remember(sig, Plan())
    eps, dropout_p = float(eps), float(dropout_p)
    seed_t = _new_seed(seed, dropout_p, x.device)
    if not _all_aligned(bias, residual, norm_weight, norm_bias, x if seed_t is None else seed_t):
        plan = None
    args = (*tensors, eps, dropout_p, seed_t, return_mask, plan)
    if amp is not None:  # the casts above are autocast's; inside, every op runs in its arguments' dtypes
        with torch.autocast(x.device.type, enabled=False):
            out, mask = _apply_residual_norm(*args) if _needs_grad(*tensors) else _res_norm_fwd(*args)[:2]
    else:
        out, mask = _apply_residual_norm(*args) if _needs_grad(*tensors) else _res_norm_fwd(*args)[:2]
    return (out, mask) if return_mask else out


def _check_ffn(x, up_weight, up_bias, down_weight, down_bias, norm_weight, norm_bias, eps, dropout_p, chunk_size, amp):
    hidden = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() else 0
    _check_common(x, hidden, eps, dropout_p)
    dense_dtype = amp or x.dtype
    if not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"chunk_size must be an int >= 0 (0 = one chunk), got {chunk_size!r}")
    if not isinstance(up_weight, torch.Tensor) or up_weight.dim() != 2 or up_weight.shape[1] != hidden:
        got = tuple(up_weight.shape) if isinstance(up_weight, torch.Tensor) else type(up_weight).__name__
        raise ValueError(f"up_weight must have shape (I, H) with H = {hidden}, got {got}")
    inter = up_weight.shape[0]
    _check_dtype_device("up_weight", up_weight, dense_dtype, x.device)
    if not isinstance(down_weight, torch.Tensor) or down_weight.shape != (hidden, inter):
        got = tuple(down_weight.shape) if isinstance(down_weight, torch.Tensor) else type(down_weight).__name__
        raise ValueError(f"down_weight must have shape (H, I) = ({hidden}, {inter}), got {got}")
    _check_dtype_device("down_weight", down_weight, dense_dtype, x.device)
    _check_vec("up_bias", up_bias, inter, dense_dtype, x.device)
    _check_vec("down_bias", down_bias, hidden, dense_dtype, x.device)
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        _check_vec(name, t, hidden, x.dtype, x.device)


def ffn(
    x: torch.Tensor,
    up_weight: torch.Tensor,
    up_bias: torch.Tensor,
    down_weight: torch.Tensor,
    down_bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
    chunk_size: int = 0,
    *,
    seed: int | torch.Tensor | None = None,
    return_mask: bool = False,
    recompute: bool = True,
):
    """Fused, chunked ``ffn_ref``: LayerNorm(x + dropout(GELU(x @ up.T + up_b) @ down.T + down_b)).

    x: (B, L, H) (any (..., H) works; chunks then count rows of the leading dim
    product); up_weight: (I, H); up_bias: (I,); down_weight: (H, I); down_bias,
    norm_weight, norm_bias: (H,). ``chunk_size`` sequence positions per chunk of
    the 4H-wide activation, 0 for one chunk. ``seed`` / ``return_mask`` as in
    :func:`residual_norm`. ``recompute=False`` keeps the (rows, I) pre-activation
    for the backward instead of recomputing ``x @ up.T`` there: one GEMM less, 4H
    more saved per token. Dtypes as in :func:`residual_norm`: under autocast the two
    dense layers run in the autocast dtype, ``x`` as the residual and LayerNorm in fp32.
    """
    amp = _autocast_dtype(x)
    if amp is not None:
        up_weight, up_bias, down_weight, down_bias = _cast(amp, up_weight, up_bias, down_weight, down_bias)
        x, norm_weight, norm_bias = _cast(torch.float32, x, norm_weight, norm_bias)
    tensors = (x, up_weight, up_bias, down_weight, down_bias, norm_weight, norm_bias)
    recompute = bool(recompute)
    if torch.compiler.is_compiling():
        if return_mask:
            raise ValueError("return_mask is an eager-only debug keyword")
        _check_ffn(*tensors, eps, dropout_p, chunk_size, amp)
        eps, dropout_p = float(eps), float(dropout_p)
        seed_t = _maybe(_new_seed(seed, dropout_p, x.device), x)
        with torch.autocast(x.device.type, enabled=False):
            return _ffn_fwd_op(*tensors, seed_t, eps, dropout_p, chunk_size, recompute)[0]
    sig = _signature("ffn", tensors, eps, dropout_p, chunk_size, bool(return_mask), recompute)
    plan = _VALIDATED.get(sig)
    if plan is None:
        _check_ffn(*tensors, eps, dropout_p, chunk_size, amp)
        plan = _VALIDATED.remember(sig, Plan(chunk_rows=_chunk_rows(x, chunk_size)))
    eps, dropout_p = float(eps), float(dropout_p)
    seed_t = _new_seed(seed, dropout_p, x.device)
    if not _all_aligned(x, up_bias, down_bias, norm_weight, norm_bias, x if seed_t is None else seed_t):
        plan = None
    args = (*tensors, eps, dropout_p, chunk_size, seed_t, return_mask, recompute, plan)
    if amp is not None:  # the casts above are autocast's; inside, every op runs in its arguments' dtypes
        with torch.autocast(x.device.type, enabled=False):
            out, mask = _apply_ffn(*args) if _needs_grad(*tensors) else _ffn_fwd(*args)[:2]
    else:
        out, mask = _apply_ffn(*args) if _needs_grad(*tensors) else _ffn_fwd(*args)[:2]
    return (out, mask) if return_mask else out
