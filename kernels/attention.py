"""Fused masked attention for the Q-Former (Triton), forward and backward.

One kernel family serves every attention of the Q-Former:

- masked self-attention under the three mask kinds (``MASK_KIND`` is a
  compile-time switch: UNIMODAL, BIDIRECTIONAL, MULTIMODAL_CAUSAL);
- cross-attention of the query rows to the image tokens (BIDIRECTIONAL, any
  number of keys, also fewer keys than rows);
- the KV-cache path (``Lq < Lk``): rows are aligned to the end of the keys, so
  ITG over [cached query K/V ; text K/V] and one-token decoding are the same
  kernel, and the backward sends gradients into the cached K/V.

Key padding comes in as per-sequence lengths or a (B, Lk) bool vector; no dense
mask and no score matrix is ever written to memory. Tiles a mask hides
entirely are never visited: under UNIMODAL query tiles stop at the last query
key and text tiles start at the first text key; under MULTIMODAL_CAUSAL text
tiles stop at the diagonal; past the last valid key nothing is read.

The backward takes one launch for up to 128 keys in 16-bit (``_attn_bwd_short_kernel``: one program per
batch and head holds every key, so dQ needs no second pass and dK/dV no atomics), else three (the softmax's
row term, dK/dV per key tile, dQ per row tile): ``short_bwd_config`` chooses, by shape and dtype.

Numerics: scores, the online softmax and the accumulators are fp32 (base-2
exponentials with the scale folded in); the forward saves the log-sum-exp per
row and the backward recomputes the probabilities from it. Rows that see no key
output zeros and get zero gradients. Attention dropout draws a counter-based
Philox number per (batch, head, row, key) from ``seed``, so the backward
regenerates the same keep-mask without storing it; ``return_dropout_mask=True``
returns that mask for testing against :func:`blip2_fast.attention.attention_ref`.

Supported: head dims up to 128 (16, 32, 64, 128 natively; others are padded to
the next power of two), fp32 / fp16 / bf16, any strides (the heads-transposed
views the Q-Former produces are read in place). fp32 inputs use IEEE fp32 dot
products (no TF32), so fp32 parity is tight.
"""

from __future__ import annotations

import collections
import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from blip2_fast.attention import MaskKind, _check_qkv, key_valid_mask
from blip2_fast.kernels.launch import Launcher, Plan, Plans, cdiv, fast_apply, next_power_of_2

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() not in ("", "0", "false")

# KEY_PAD modes
_PAD_NONE, _PAD_LENGTHS, _PAD_VECTOR = 0, 1, 2


# ---------------------------------------------------------------------------------------------------------------------
# jit helpers


@triton.jit
def _tile_mask(pos, cols, n_query, kv_end, pad_row, stride_pn, MASK_KIND: tl.constexpr, KEY_PAD: tl.constexpr):
    """(BLOCK_M, BLOCK_N) True = may attend; ``pos`` is each row's key position. Mirrors ``dense_mask``."""
    ok = (cols < kv_end)[None, :]
    if KEY_PAD == 2:
        valid = tl.load(pad_row + cols * stride_pn, mask=cols < kv_end, other=0)
        ok = ok & (valid != 0)[None, :]
    if MASK_KIND == 0:  # UNIMODAL: queries see queries, text sees text
        ok = ok & ((pos[:, None] < n_query) == (cols[None, :] < n_query))
    elif MASK_KIND == 2:  # MULTIMODAL_CAUSAL
        # for a query row (pos < n_query), col <= pos already implies col < n_query: the text rule serves both
        ok = ok & ((cols[None, :] < n_query) | (cols[None, :] <= pos[:, None]))
    return ok


@triton.jit
def _key_range(pos_lo, pos_hi, n_query, kv_end, MASK_KIND: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles [lo, hi) that rows at key positions [pos_lo, pos_hi] can see at all."""
    lo = kv_end * 0
    hi = kv_end
    if MASK_KIND == 0:
        if pos_hi < n_query:
            hi = tl.minimum(hi, n_query)
        elif pos_lo >= n_query:
            lo = (n_query // BLOCK_N) * BLOCK_N
    elif MASK_KIND == 2:
        if pos_hi < n_query:
            hi = tl.minimum(hi, n_query)
        else:
            hi = tl.minimum(hi, pos_hi + 1)
    return lo, hi


@triton.jit
def _row_range(col_lo, col_hi, n_query, n_rows, offset, MASK_KIND: tl.constexpr, BLOCK_M: tl.constexpr):
    """Row tiles [lo, hi) that can see any key in [col_lo, col_hi] (row i sits at key position i + offset)."""
    lo = n_rows * 0
    hi = n_rows
    if MASK_KIND == 0:
        if col_hi < n_query:
            hi = tl.minimum(tl.maximum(n_query - offset, 0), n_rows)
        elif col_lo >= n_query:
            lo = (tl.maximum(n_query - offset, 0) // BLOCK_M) * BLOCK_M
    elif MASK_KIND == 2:
        if col_lo >= n_query:
            lo = (tl.maximum(col_lo - offset, 0) // BLOCK_M) * BLOCK_M
    return lo, hi


@triton.jit
def _dropout_keep(seed, bh, rows, cols, n_rows, n_keys, dropout_p):
    """Keep-mask of one tile: one Philox draw per (batch*head, row, key), the same in forward, backward and debug.

    ``seed`` is loaded from a device tensor: no host draw, nothing specialised on it, and a CUDA graph replays
    with whatever seed the step wrote there."""
    offs = (bh.to(tl.int64) * n_rows + rows[:, None]) * n_keys + cols[None, :]
    return tl.rand(seed, offs) >= dropout_p


@triton.jit
def _grad_tile(
    q, do, k, v, lse, rows, cols, offset, n_rows, n_keys, n_query, kv_end, pad_row, stride_pn,
    seed_ptr, bh, dropout_p, qk_scale,
    MASK_KIND: tl.constexpr, KEY_PAD: tl.constexpr, DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """One (rows, keys) tile of the backward, recomputed from the forward's log-sum-exp: the probabilities P,
    P as dropout kept them (for dV) and dP (as dropout scaled it); dS = P * (dP - delta) is the caller's."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    ok = _tile_mask(rows + offset, cols, n_query, kv_end, pad_row, stride_pn, MASK_KIND, KEY_PAD)
    p = tl.where(ok, tl.math.exp2(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if DROPOUT:
        keep = _dropout_keep(tl.load(seed_ptr), bh, rows, cols, n_rows, n_keys, dropout_p)
        p_drop = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    else:
        p_drop = p
    return p, p_drop, dp


# ---------------------------------------------------------------------------------------------------------------------
# kernels


@triton.jit(do_not_specialize=["n_rows", "n_keys", "n_query"])
def _attn_fwd_kernel(
    Q, K, V, O, LSE, LENS, PAD,
    SEED, dropout_p, qk_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_pb, stride_pn,
    n_heads, n_rows, n_keys, n_query,
    HEAD_DIM: tl.constexpr, MASK_KIND: tl.constexpr, KEY_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offset = n_keys - n_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    dim_ok = dims < HEAD_DIM

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    if UPCAST:  # the interpreter reads bf16 wrong unless cast straight after the load
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    pad_row = PAD + b * stride_pb

    kv_end = n_keys
    if KEY_PAD != 0:
        kv_end = tl.minimum(tl.maximum(tl.load(LENS + b), 0), n_keys)
    pos_lo = pid_m * BLOCK_M + offset
    pos_hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_rows) - 1 + offset
    lo, hi = _key_range(pos_lo, pos_hi, n_query, kv_end, MASK_KIND, BLOCK_N)
    pos = rows + offset

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kv_mask = (cols < kv_end)[:, None] & dim_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(_tile_mask(pos, cols, n_query, kv_end, pad_row, stride_pn, MASK_KIND, KEY_PAD), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing visible yet keeps m = -inf; exponentiate against 0 there to avoid inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(tl.load(SEED), bh, rows, cols, n_rows, n_keys, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    tl.store(
        O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :] * stride_od,
        out.to(O.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )
    # +inf for rows that see nothing: the backward's exp2(s - lse) is then 0 there
    lse = tl.where(seen, m_i + tl.math.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    tl.store(LSE + bh.to(tl.int64) * n_rows + rows, lse, mask=row_ok)


@triton.jit(do_not_specialize=["n_rows"])
def _attn_bwd_delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    n_heads, n_rows,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij (also with dropout), the softmax backward's row term."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    mask = (rows < n_rows)[:, None] & (dims < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :] * stride_od, mask=mask)
    do = tl.load(DO + b * stride_db + h * stride_dh + rows[:, None] * stride_dm + dims[None, :] * stride_dd, mask=mask)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + bh.to(tl.int64) * n_rows + rows, delta, mask=rows < n_rows)


@triton.jit(do_not_specialize=["n_rows", "n_keys", "n_query"])
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, LENS, PAD,
    SEED, dropout_p, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_pb, stride_pn,
    n_heads, n_rows, n_keys, n_query,
    HEAD_DIM: tl.constexpr, MASK_KIND: tl.constexpr, KEY_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One key tile per program: dK and dV summed over the row tiles that can see it."""
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offset = n_keys - n_rows
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    pad_row = PAD + b * stride_pb

    kv_end = n_keys
    if KEY_PAD != 0:
        kv_end = tl.minimum(tl.maximum(tl.load(LENS + b), 0), n_keys)
    kv_mask = (cols < kv_end)[:, None] & dim_ok[None, :]
    k = tl.load(
        K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + dims[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + dims[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    col_lo = pid_n * BLOCK_N
    col_hi = tl.minimum(col_lo + BLOCK_N, kv_end) - 1
    lo, hi = _row_range(col_lo, col_hi, n_query, n_rows, offset, MASK_KIND, BLOCK_M)
    if col_lo >= kv_end:  # a tile of padding: nobody sees it, its gradients are zero
        hi = lo

    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_db + h * stride_dh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        q_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qm + dims[None, :] * stride_qd, mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dm + dims[None, :] * stride_dd, mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(LSE + bh.to(tl.int64) * n_rows + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + bh.to(tl.int64) * n_rows + rows, mask=row_ok, other=0.0)
        p, p_drop, dp = _grad_tile(
            q, do, k, v, lse, rows, cols, offset, n_rows, n_keys, n_query, kv_end, pad_row, stride_pn,
            SEED, bh, dropout_p, qk_scale, MASK_KIND, KEY_PAD, DROPOUT, DOT_PRECISION,
        )  # fmt: skip
        dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)

    dk = dk * sm_scale
    tl.store(
        DK + b * stride_dkb + h * stride_dkh + cols[:, None] * stride_dkn + dims[None, :] * stride_dkd,
        dk.to(DK.dtype.element_ty),
        mask=(cols < n_keys)[:, None] & dim_ok[None, :],
    )
    tl.store(
        DV + b * stride_dvb + h * stride_dvh + cols[:, None] * stride_dvn + dims[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=(cols < n_keys)[:, None] & dim_ok[None, :],
    )


@triton.jit(do_not_specialize=["n_rows", "n_keys", "n_query"])
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, LENS, PAD,
    SEED, dropout_p, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_pb, stride_pn,
    n_heads, n_rows, n_keys, n_query,
    HEAD_DIM: tl.constexpr, MASK_KIND: tl.constexpr, KEY_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One row tile per program: dQ over the key tiles it can see (the forward's tile range)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offset = n_keys - n_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    dim_ok = dims < HEAD_DIM
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
        mask=q_mask,
        other=0.0,
    )
    do = tl.load(
        DO + b * stride_db + h * stride_dh + rows[:, None] * stride_dm + dims[None, :] * stride_dd,
        mask=q_mask,
        other=0.0,
    )
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + bh.to(tl.int64) * n_rows + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bh.to(tl.int64) * n_rows + rows, mask=row_ok, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    pad_row = PAD + b * stride_pb

    kv_end = n_keys
    if KEY_PAD != 0:
        kv_end = tl.minimum(tl.maximum(tl.load(LENS + b), 0), n_keys)
    pos_lo = pid_m * BLOCK_M + offset
    pos_hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, n_rows) - 1 + offset
    lo, hi = _key_range(pos_lo, pos_hi, n_query, kv_end, MASK_KIND, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        kv_mask = (cols < kv_end)[:, None] & dim_ok[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + dims[None, :] * stride_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_vn + dims[None, :] * stride_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        p, _, dp = _grad_tile(
            q, do, k, v, lse, rows, cols, offset, n_rows, n_keys, n_query, kv_end, pad_row, stride_pn,
            SEED, bh, dropout_p, qk_scale, MASK_KIND, KEY_PAD, DROPOUT, DOT_PRECISION,
        )  # fmt: skip
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq = dq * sm_scale
    tl.store(
        DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqm + dims[None, :] * stride_dqd,
        dq.to(DQ.dtype.element_ty),
        mask=q_mask,
    )


@triton.jit(do_not_specialize=["n_rows", "n_keys", "n_query"])
def _attn_bwd_short_kernel(
    Q, K, V, O, DO, DQ, DK, DV, LSE, LENS, PAD,
    SEED, dropout_p, qk_scale, sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_pb, stride_pn,
    n_heads, n_rows, n_keys, n_query,
    HEAD_DIM: tl.constexpr, MASK_KIND: tl.constexpr, KEY_PAD: tl.constexpr, DROPOUT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One program per (batch, head) holding all its keys (n_keys <= BLOCK_N): dQ, dK and dV in one pass over
    the row tiles, the softmax's row term from O and dO on the way, no atomics (no other program has these keys)."""
    bh = tl.program_id(1)
    b = (bh // n_heads).to(tl.int64)
    h = (bh % n_heads).to(tl.int64)
    offset = n_keys - n_rows
    cols = tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < HEAD_DIM
    pad_row = PAD + b * stride_pb
    kv_end = n_keys
    if KEY_PAD != 0:
        kv_end = tl.minimum(tl.maximum(tl.load(LENS + b), 0), n_keys)
    kv_mask = (cols < kv_end)[:, None] & dim_ok[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + cols[:, None] * stride_kn + dims[None, :] * stride_kd,
                mask=kv_mask, other=0.0)  # fmt: skip
    v = tl.load(V + b * stride_vb + h * stride_vh + cols[:, None] * stride_vn + dims[None, :] * stride_vd,
                mask=kv_mask, other=0.0)  # fmt: skip
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    q_base = Q + b * stride_qb + h * stride_qh
    o_base = O + b * stride_ob + h * stride_oh
    do_base = DO + b * stride_db + h * stride_dh
    dq_base = DQ + b * stride_dqb + h * stride_dqh
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, n_rows, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        q_mask = row_ok[:, None] & dim_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qm + dims[None, :] * stride_qd, mask=q_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dm + dims[None, :] * stride_dd, mask=q_mask, other=0.0)
        o = tl.load(o_base + rows[:, None] * stride_om + dims[None, :] * stride_od, mask=q_mask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
            o = o.to(tl.float32)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)  # sum_j P_ij dP_ij, also with dropout
        lse = tl.load(LSE + bh.to(tl.int64) * n_rows + rows, mask=row_ok, other=float("inf"))
        p, p_drop, dp = _grad_tile(
            q, do, k, v, lse, rows, cols, offset, n_rows, n_keys, n_query, kv_end, pad_row, stride_pn,
            SEED, bh, dropout_p, qk_scale, MASK_KIND, KEY_PAD, DROPOUT, DOT_PRECISION,
        )  # fmt: skip
        dv += tl.dot(tl.trans(p_drop.to(do.dtype)), do, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
        dq = tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION) * sm_scale
        tl.store(dq_base + rows[:, None] * stride_dqm + dims[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
                 mask=q_mask)  # fmt: skip
    dk = dk * sm_scale
    store = (cols < n_keys)[:, None] & dim_ok[None, :]
    tl.store(DK + b * stride_dkb + h * stride_dkh + cols[:, None] * stride_dkn + dims[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=store)  # fmt: skip
    tl.store(DV + b * stride_dvb + h * stride_dvh + cols[:, None] * stride_dvn + dims[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=store)  # fmt: skip


@triton.jit(do_not_specialize=["n_rows", "n_keys"])
def _dropout_mask_kernel(
    MASK, SEED, dropout_p, n_rows, n_keys, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr
):  # fmt: skip
    """Writes the keep-mask the attention kernels draw for ``seed`` (debug and tests only)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    base = MASK + bh.to(tl.int64) * n_rows * n_keys
    for start in range(0, n_keys, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(tl.load(SEED), bh, rows, cols, n_rows, n_keys, dropout_p)
        tl.store(
            base + rows[:, None] * n_keys + cols[None, :],
            keep.to(tl.int8),
            mask=(rows < n_rows)[:, None] & (cols < n_keys)[None, :],
        )


# ---------------------------------------------------------------------------------------------------------------------
# configs


@dataclass(frozen=True)
class AttnConfig:
    """Tile sizes and launch parameters of one kernel; ``BLOCK_D`` follows the head dim."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# The Q-Former's sequences are short (32 queries + ~35 text, 257 image tokens): 32-wide tiles line up with the 32
# query tokens, so UNIMODAL and MULTIMODAL_CAUSAL skip whole tiles, and waste little on the odd tail. A one-row
# decode step uses 16-row tiles (tl.dot's minimum). Head dim 128 takes 8 warps: with 4 the backward (and the fp32
# forward) run out of registers and spill; so does the fp32 dK/dV kernel past head dim 32 (``bwd_configs``). Every
# choice compiles for sm_80 and sm_90 without spills, on Triton 3.6 to 3.9 (test suite).
FWD_CONFIGS = {
    "decode": AttnConfig(16, 32, 4, 2),
    "default": AttnConfig(32, 32, 4, 2),
    "d128": AttnConfig(32, 32, 8, 2),
}
BWD_CONFIGS = {
    "default": AttnConfig(32, 32, 4, 1),
    "d128": AttnConfig(32, 32, 8, 1),
    "fp32_dkdv_d128": AttnConfig(16, 32, 8, 1),
}


# The short-sequence backward (``_attn_bwd_short_kernel``): one program per (batch, head) with all of its keys in one
# tile, so dQ, dK and dV take one launch instead of three and Q, dO are read once. Up to 128 keys: every
# self-attention of the Q-Former (67 at 32 queries + 35 text) and ITG over the query cache; cross-attention to 257
# image tokens keeps the tiled kernels, as does head dim 128 past 64 keys. 16-bit only: with IEEE fp32 dot products
# a whole key range needs more registers than there are (sm_80 and sm_90 spill at every tile size). 16-row tiles
# and 8 warps: 32-row tiles spill on Triton 3.6 at head dim 32. No spills on sm_80 / sm_90, Triton 3.6 to 3.9.
SHORT_BWD_MAX_KEYS = 128
SHORT_BWD_DTYPES = (torch.float16, torch.bfloat16)


def short_bwd_config(n_keys: int, head_dim: int, dtype: torch.dtype) -> AttnConfig | None:
    """The short-sequence backward's config, or None where the tiled kernels serve."""
    block_n = max(16, next_power_of_2(n_keys))
    if n_keys > SHORT_BWD_MAX_KEYS or dtype not in SHORT_BWD_DTYPES or (head_dim > 64 and block_n > 64):
        return None
    return AttnConfig(16, block_n, 8, 1)


_DELTA_BLOCK_M = 64
_MASK_BLOCK_M, _MASK_BLOCK_N = 32, 64


def fwd_config(n_rows: int, head_dim: int) -> AttnConfig:
    if n_rows <= 16:
        return FWD_CONFIGS["decode"]
    return FWD_CONFIGS["d128" if head_dim > 64 else "default"]


def bwd_configs(head_dim: int, dtype: torch.dtype) -> tuple[AttnConfig, AttnConfig]:
    """(dK/dV, dQ) configs. In fp32 the dK/dV kernel keeps two fp32 accumulators beside IEEE dot products: past
    head dim 32 it needs 8 warps (with 4, Triton 3.6 spills), while the dQ kernel spills with 8 and fits in 4;
    at head dim 128 it also takes 16-row tiles (Triton 3.7 and 3.8 spill with 32)."""
    fp32 = dtype == torch.float32
    if head_dim > 64:
        return BWD_CONFIGS["fp32_dkdv_d128" if fp32 else "d128"], BWD_CONFIGS["d128"]
    if fp32 and head_dim > 32:
        return BWD_CONFIGS["d128"], BWD_CONFIGS["default"]
    return BWD_CONFIGS["default"], BWD_CONFIGS["default"]


# ---------------------------------------------------------------------------------------------------------------------
# launchers

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_FWD = Launcher(_attn_fwd_kernel)
_DELTA = Launcher(_attn_bwd_delta_kernel)
_DKDV = Launcher(_attn_bwd_dkdv_kernel)
_DQ = Launcher(_attn_bwd_dq_kernel)
_SHORT_BWD = Launcher(_attn_bwd_short_kernel)
_DROPOUT_MASK = Launcher(_dropout_mask_kernel)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2), t.stride(3)


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"q, k, v must share one dtype of float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    if q.shape[3] > 128:
        raise ValueError(f"head dim must be at most 128 for the triton backend, got {q.shape[3]}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got device {q.device}")


_LENGTHS_CACHE_SIZE = 8
_vector_lengths: collections.OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = collections.OrderedDict()


def _last_valid_plus_one(key_padding: torch.Tensor) -> torch.Tensor:
    """(B,) int32: one past each sequence's last valid key; it bounds the key loop so a padded tail is never read.

    Every layer of a Q-Former pass gets the same padding tensor, so the result is cached per tensor (and
    version, so an in-place change is seen) instead of being recomputed by three small launches per layer.
    """
    key = (id(key_padding), key_padding._version, key_padding.device)
    hit = _vector_lengths.get(key)
    if hit is not None and hit[0] is key_padding:
        return hit[1]
    lengths = _lengths_of(key_padding)
    _vector_lengths[key] = (key_padding, lengths)
    while len(_vector_lengths) > _LENGTHS_CACHE_SIZE:
        _vector_lengths.popitem(last=False)
    return lengths


def _padding_args(
    q: torch.Tensor,
    n_keys: int,
    key_padding: torch.Tensor | None,
    key_lengths: torch.Tensor | None,
    validate: bool = True,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(KEY_PAD mode, lengths (B,) int32, padding (B, Lk) uint8); where unused, ``q`` stands in (never read).
    ``validate=False`` for arguments whose signature passed before."""
    B = q.shape[0]
    if key_padding is not None:
        if validate:
            key_valid_mask(B, n_keys, key_padding, key_lengths, q.device)  # validates; computes nothing for a vector
            if key_padding.device != q.device:
                raise ValueError(f"key_padding must be on {q.device}, got {key_padding.device}")
        # under torch.compile the per-tensor cache would be a guard on object identity: compute it in the graph;
        # and there a cast, since torch 2.11's inductor cannot lower a bool tensor viewed as uint8
        if torch.compiler.is_compiling():
            return _PAD_VECTOR, _lengths_of(key_padding), key_padding.to(torch.uint8)
        return _PAD_VECTOR, _last_valid_plus_one(key_padding), key_padding.view(torch.uint8)
    if key_lengths is not None:
        if validate:
            if key_lengths.shape != (B,) or key_lengths.is_floating_point() or key_lengths.dtype == torch.bool:
                raise ValueError(
                    f"key_lengths must be an integer tensor of shape (B,) = ({B},), "
                    f"got {key_lengths.dtype} {tuple(key_lengths.shape)}"
                )
            if key_lengths.device != q.device:
                raise ValueError(f"key_lengths must be on {q.device}, got {key_lengths.device}")
        return _PAD_LENGTHS, key_lengths.to(torch.int32), q  # clamped to [0, Lk] in the kernels
    return _PAD_NONE, q, q


def _lengths_of(key_padding: torch.Tensor) -> torch.Tensor:
    """(B,) int32: one past each sequence's last valid key."""
    idx = torch.arange(1, key_padding.shape[1] + 1, device=key_padding.device, dtype=torch.int32)
    return (key_padding.to(torch.int32) * idx).amax(dim=1).to(torch.int32)


def _pad_strides(key_pad: int, padding: torch.Tensor) -> tuple[int, int]:
    return (padding.stride(0), padding.stride(1)) if key_pad == _PAD_VECTOR else (0, 0)


def _common_constexprs(q: torch.Tensor, mask_kind: int, key_pad: int, dropout: bool) -> dict:
    D = q.shape[3]
    return dict(
        HEAD_DIM=D,
        MASK_KIND=int(mask_kind),
        KEY_PAD=key_pad,
        DROPOUT=dropout,
        UPCAST=_INTERPRET and q.dtype == torch.bfloat16,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_D=max(16, next_power_of_2(D)),
    )


# Per-signature launch plans: grid, the int arguments (strides, sizes) and the options of each kernel, computed
# once for a validated signature (``sig``, see :func:`attention`), whose launches are then keyed by it alone.
_FWD_PLANS = Plans()
_BWD_PLANS = Plans()


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_kind: int,
    n_query: int,
    pad: tuple[int, torch.Tensor, torch.Tensor],
    dropout_p: float,
    seed: torch.Tensor,
    scale: float,
    config: AttnConfig | None = None,
    sig=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs the forward kernel. Returns out (B, H, Lq, D), laid out (B, Lq, H, D) in memory, and lse (B, H, Lq).

    ``pad`` is what :func:`_padding_args` returns; ``seed`` a (1,) int64 tensor on q's device (read only with
    dropout); ``sig`` the validated signature of the call (None: the launcher keys each launch itself)."""
    B, H, Lq, D = q.shape
    key_pad, lengths, padding = pad
    # (B, Lq, H, D) storage: the caller's transpose(1, 2).reshape(B, Lq, H * D) is then free
    out = torch.empty((B, Lq, H, D), dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty((B, H, Lq), dtype=torch.float32, device=q.device)
    plan = None if sig is None else _FWD_PLANS.get(sig)
    if plan is None:
        Lk = k.shape[2]
        cfg = config or fwd_config(Lq, D)
        ints = (
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_pad_strides(key_pad, padding),
            H, Lq, Lk, n_query,
        )  # fmt: skip
        options = dict(
            **_common_constexprs(q, mask_kind, key_pad, dropout_p > 0.0),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        plan = ((cdiv(Lq, cfg.block_m), B * H), ints, options)
        if sig is not None:
            _FWD_PLANS.remember(sig, plan)
    grid, ints, options = plan
    _FWD.launch(sig, grid, (q, k, v, out, lse, lengths, padding, seed, dropout_p, scale * LOG2E, *ints), options)
    return out, lse


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    B, H, L, D = t.shape
    return torch.empty((B, L, H, D), dtype=t.dtype, device=t.device).transpose(1, 2)


def _bwd_plan(q, k, v, do, out, dq, dk, dv, mask_kind, n_query, key_pad, padding, dropout_p, config) -> tuple:
    """The backward's launches (grid, int arguments, options): one of the short-sequence kernel, or the tiled
    kernels' three (delta, dK/dV, dQ). A ``config`` given (tests) takes the tiled kernels with its tiles."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    spb, spn = _pad_strides(key_pad, padding)
    consts = _common_constexprs(q, mask_kind, key_pad, dropout_p > 0.0)
    sizes = (H, Lq, Lk, n_query)
    short = None if config else short_bwd_config(Lk, D, q.dtype)
    if short is not None:
        ints = (
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(do), *_strides(dq), *_strides(dk),
            *_strides(dv), spb, spn, *sizes,
        )  # fmt: skip
        options = dict(**consts, BLOCK_M=short.block_m, BLOCK_N=short.block_n,
                       num_warps=short.num_warps, num_stages=short.num_stages)  # fmt: skip
        return (((1, B * H), ints, options),)
    dkdv_cfg, dq_cfg = (config, config) if config else bwd_configs(D, q.dtype)
    delta = (
        (cdiv(Lq, _DELTA_BLOCK_M), B * H),
        (*_strides(out), *_strides(do), H, Lq),
        dict(HEAD_DIM=D, BLOCK_M=_DELTA_BLOCK_M, BLOCK_D=consts["BLOCK_D"]),
    )
    dkdv = (
        (cdiv(Lk, dkdv_cfg.block_n), B * H),
        (*_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dk), *_strides(dv), spb, spn,
         *sizes),
        dict(**consts, BLOCK_M=dkdv_cfg.block_m, BLOCK_N=dkdv_cfg.block_n,
             num_warps=dkdv_cfg.num_warps, num_stages=dkdv_cfg.num_stages),
    )  # fmt: skip
    dq = (
        (cdiv(Lq, dq_cfg.block_m), B * H),
        (*_strides(q), *_strides(k), *_strides(v), *_strides(do), *_strides(dq), spb, spn, *sizes),
        dict(**consts, BLOCK_M=dq_cfg.block_m, BLOCK_N=dq_cfg.block_n,
             num_warps=dq_cfg.num_warps, num_stages=dq_cfg.num_stages),
    )  # fmt: skip
    return delta, dkdv, dq


def attention_backward(
    do: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    mask_kind: int,
    n_query: int,
    pad: tuple[int, torch.Tensor, torch.Tensor],
    dropout_p: float,
    seed: torch.Tensor,
    scale: float,
    config: AttnConfig | None = None,
    sig=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dQ, dK, dV from the saved output and log-sum-exp, each (B, H, L, D) over (B, L, H, D) storage. ``sig`` as in
    :func:`attention_forward` (the incoming grad's strides and alignment are added to it here)."""
    key_pad, lengths, padding = pad
    if sig is not None:
        sig = (sig, do.stride()) if not do.data_ptr() & 15 else None
    # (B, L, H, D) storage seen heads-first, as the Q-Former's projections lay out q, k, v: the grad of their
    # transpose-and-view is then a view too (no copy per input), whatever the inputs' own strides
    dq, dk, dv = (_heads_first(t) for t in (q, k, v))
    plan = None if sig is None else _BWD_PLANS.get(sig)
    if plan is None:
        plan = _bwd_plan(q, k, v, do, out, dq, dk, dv, mask_kind, n_query, key_pad, padding, dropout_p, config)
        if sig is not None:
            _BWD_PLANS.remember(sig, plan)
    common = (seed, dropout_p, scale * LOG2E, scale)
    if len(plan) == 1:  # the short-sequence kernel
        ((grid, ints, options),) = plan
        _SHORT_BWD.launch(sig, grid, (q, k, v, out, do, dq, dk, dv, lse, lengths, padding, *common, *ints), options)
        return dq, dk, dv
    (delta_grid, delta_ints, delta_opts), (dkdv_grid, dkdv_ints, dkdv_opts), (dq_grid, dq_ints, dq_opts) = plan
    delta = torch.empty(lse.shape, dtype=torch.float32, device=q.device)
    _DELTA.launch(sig, delta_grid, (out, do, delta, *delta_ints), delta_opts)
    _DKDV.launch(sig, dkdv_grid, (q, k, v, do, dk, dv, lse, delta, lengths, padding, *common, *dkdv_ints), dkdv_opts)
    _DQ.launch(sig, dq_grid, (q, k, v, do, dq, lse, delta, lengths, padding, *common, *dq_ints), dq_opts)
    return dq, dk, dv


def dropout_keep_mask(
    batch: int, heads: int, n_rows: int, n_keys: int, dropout_p: float, seed: torch.Tensor, device: torch.device
) -> torch.Tensor:
    """(B, H, Lq, Lk) bool: the keep-mask the kernels draw for ``seed`` and ``dropout_p``."""
    mask = torch.empty(batch, heads, n_rows, n_keys, dtype=torch.int8, device=device)
    _DROPOUT_MASK(
        (cdiv(n_rows, _MASK_BLOCK_M), batch * heads),
        mask,
        seed,
        dropout_p,
        n_rows,
        n_keys,
        BLOCK_M=_MASK_BLOCK_M,
        BLOCK_N=_MASK_BLOCK_N,
    )
    return mask.bool()


_SEED_LIKE: dict[torch.device, torch.Tensor] = {}


def dropout_seed(seed: int | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The int64 seed tensor the kernels read (its first element): drawn on ``device`` from torch's generator
    there (no host sync; repeatable under ``torch.manual_seed``; restored by ``torch.utils.checkpoint``, which
    stashes the RNG states, so a recomputed forward drops the same elements), ``seed`` itself as a tensor, or one
    drawn beforehand (``blip2_fast.attention.dropout_seeds``: a whole pass's in one launch)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() < 1 or seed.device != device:
            raise ValueError(
                f"a seed tensor must be int64 with at least one element on {device}, got {seed.dtype} "
                f"{tuple(seed.shape)} on {seed.device}"
            )
        return seed
    if seed is None:
        like = _SEED_LIKE.get(device)
        if like is None:
            like = _SEED_LIKE.setdefault(device, torch.empty(1, dtype=torch.int64, device=device))
        return torch.randint_like(like, 2**31 - 1)  # the cheapest call that draws one (the template is never written)
    if not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
    return torch.full((1,), seed, dtype=torch.int64, device=device)


# ---------------------------------------------------------------------------------------------------------------------
# autograd: a torch.autograd.Function in eager mode (the least host work per call), the same launchers as
# custom ops under torch.compile (opaque to Dynamo, with fake shapes: no graph break, CUDA graphs capture them)


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask_kind, n_query, pad, dropout_p, seed, scale, config, sig):
        out, lse = attention_forward(q, k, v, mask_kind, n_query, pad, dropout_p, seed, scale, config, sig)
        ctx.save_for_backward(q, k, v, out, lse, pad[1], pad[2], seed)
        ctx.args = (mask_kind, n_query, pad[0], dropout_p, scale, config, sig)
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse, lengths, padding, seed = ctx.saved_tensors
        mask_kind, n_query, key_pad, dropout_p, scale, config, sig = ctx.args
        pad = (key_pad, lengths, padding)
        dq, dk, dv = attention_backward(
            do, q, k, v, out, lse, mask_kind, n_query, pad, dropout_p, seed, scale, config, sig
        )
        return dq, dk, dv, None, None, None, None, None, None, None, None


_apply_attention = fast_apply(AttentionFunction)


@torch.library.custom_op("blip2_fast::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, padding: torch.Tensor,
    seed: torch.Tensor, mask_kind: int, n_query: int, key_pad: int, dropout_p: float, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return attention_forward(q, k, v, mask_kind, n_query, (key_pad, lengths, padding), dropout_p, seed, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, lengths, padding, seed, mask_kind, n_query, key_pad, dropout_p, scale):
    B, H, Lq, D = q.shape
    out = q.new_empty(B, Lq, H, D).transpose(1, 2)
    return out, q.new_empty(B, H, Lq, dtype=torch.float32)


@torch.library.custom_op("blip2_fast::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    lengths: torch.Tensor, padding: torch.Tensor, seed: torch.Tensor,
    mask_kind: int, n_query: int, key_pad: int, dropout_p: float, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    pad = (key_pad, lengths, padding)
    return attention_backward(do, q, k, v, out, lse, mask_kind, n_query, pad, dropout_p, seed, scale)


@_attention_bwd_op.register_fake
def _(do, q, k, v, out, lse, lengths, padding, seed, mask_kind, n_query, key_pad, dropout_p, scale):
    return _heads_first(q), _heads_first(k), _heads_first(v)


def _attention_op_setup(ctx, inputs, output):
    q, k, v, lengths, padding, seed, *ctx.args = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], lengths, padding, seed)


def _attention_op_backward(ctx, do, _dlse):
    q, k, v, out, lse, lengths, padding, seed = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(do, q, k, v, out, lse, lengths, padding, seed, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attention_fwd_op.register_autograd(_attention_op_backward, setup_context=_attention_op_setup)


_VALIDATED = Plans()  # signature -> its Plan, for attention calls whose arguments passed validation


def _signature_of(q, k, v, key_padding, key_lengths) -> tuple | None:
    """What validation and the launch plans depend on: each tensor's shape, strides, dtype and device."""
    try:
        return (
            q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
            v.shape, v.stride(), v.dtype, v.device,
            None if key_padding is None else (key_padding.shape, key_padding.stride(), key_padding.dtype,
                                              key_padding.device),
            None if key_lengths is None else (key_lengths.shape, key_lengths.dtype, key_lengths.device),
        )  # fmt: skip
    except AttributeError:  # not all tensors: validation names the argument
        return None


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask_kind: MaskKind,
    n_query: int = 0,
    key_padding: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
    seed: int | torch.Tensor | None = None,
    return_dropout_mask: bool = False,
    config: AttnConfig | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor | None]:
    """Fused masked attention; same arguments and numbers as :func:`blip2_fast.attention.attention_ref`.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); key_padding: (B, Lk) bool, True = may
    attend; key_lengths: (B,) int. Returns (B, H, Lq, D) in q's dtype.

    ``seed`` fixes the dropout draw: an int, or an int64 tensor on q's device whose first
    element is read (a pass's seeds drawn at once); otherwise one is drawn on q's device from
    torch's generator, so ``torch.manual_seed`` makes runs repeatable. Debug-only keywords:
    ``return_dropout_mask`` also returns the (B, H, Lq, Lk) bool keep-mask used
    (None when ``dropout_p == 0``); ``config`` overrides the tile sizes of all kernels.
    Under ``torch.compile`` the kernels run as the custom ops ``blip2_fast::attention_fwd`` / ``_bwd``
    (the debug keywords ``return_dropout_mask`` and ``config`` are eager-only).
    """
    mask_kind = mask_kind if isinstance(mask_kind, MaskKind) else MaskKind(mask_kind)  # torch 2.11 cannot trace Enum()
    compiling = torch.compiler.is_compiling()
    sig = None if compiling or config is not None else _signature_of(q, k, v, key_padding, key_lengths)
    if sig is not None:
        sig = (sig, mask_kind, n_query, dropout_p, scale)
    plan = _VALIDATED.get(sig)
    if plan is None:
        _check_qkv(q, k, v, n_query, mask_kind)
        _check_inputs(q, k, v)
        if not 0.0 <= dropout_p < 1.0:
            raise ValueError(f"dropout_p must lie in [0, 1), got {dropout_p}")
        if config is not None and (config.block_m < 16 or config.block_n < 16):
            raise ValueError(f"config tiles must be at least 16 x 16 (tl.dot), got {config}")
        _padding_args(q, k.shape[2], key_padding, key_lengths)  # validates
        if sig is not None:
            plan = _VALIDATED.remember(sig, Plan())
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    pad = _padding_args(q, Lk, key_padding, key_lengths, validate=False)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dropout_p = float(dropout_p)
    seed_t = dropout_seed(seed, q.device) if dropout_p > 0.0 else q  # q stands in: no dropout, never read
    if Lq == 0 or Lk == 0 or B * H == 0:
        # nothing to attend (or no row): zeros, still connected to the inputs so autograd sees them used
        out = q.new_zeros(q.shape) + 0.0 * (q.sum() + k.sum() + v.sum())
    elif compiling:
        if return_dropout_mask or config is not None:
            raise ValueError("return_dropout_mask and config are eager-only debug keywords")
        key_pad, lengths, padding = pad
        out = _attention_fwd_op(q, k, v, lengths, padding, seed_t, int(mask_kind), n_query, key_pad, dropout_p, scale)[
            0
        ]
    else:
        pointers = q.data_ptr() | k.data_ptr() | v.data_ptr() | pad[1].data_ptr() | pad[2].data_ptr()
        pointers |= seed_t.data_ptr()
        if pointers & 15:
            plan = None  # a pointer off 16-byte alignment: the launcher keys by each argument
        args = (q, k, v, mask_kind, n_query, pad, dropout_p, seed_t, scale, config, plan)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out = _apply_attention(*args)
        else:
            out = attention_forward(*args)[0]
    if not return_dropout_mask:
        return out
    mask = dropout_keep_mask(B, H, Lq, Lk, dropout_p, seed_t, q.device) if dropout_p > 0.0 else None
    return out, mask


# ---------------------------------------------------------------------------------------------------------------------
# ahead-of-time compile list

_FLOAT_ARGS = ("dropout_p", "qk_scale", "sm_scale")
_AOT_HEAD_DIMS = (32, 64, 128)


def _signature(kernel, ptr_types: dict[str, str], constexprs: dict) -> dict[str, str]:
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in ptr_types:
            sig[name] = "*" + ptr_types[name]
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


def kernel_configs() -> list[tuple[object, dict[str, str], dict, int, int]]:
    """Every (kernel, signature, constexprs, num_warps, num_stages) the launchers ship, for the AOT check.

    The forward choices (``fwd_config``) are compiled at the largest head dim each serves, the backward ones
    (``bwd_configs``, which depend on the head dim in fp32) at 32, 64 and 128; all in the heaviest variant
    (MULTIMODAL_CAUSAL, a key-padding vector, dropout): smaller head dims, the other mask kinds and padding modes
    only shrink the tiles or drop code. bf16 stands for fp16 (same tile types); fp32 runs IEEE
    dot products and is listed on its own.
    """
    heavy = dict(MASK_KIND=int(MaskKind.MULTIMODAL_CAUSAL), KEY_PAD=_PAD_VECTOR, DROPOUT=True, UPCAST=False)
    out = []
    for dt, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        ptrs = {n: dt for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
        ptrs |= dict(LSE="fp32", DELTA="fp32", LENS="i32", PAD="u8", SEED="i64")
        dot = "ieee" if dt == "fp32" else "tf32"
        jobs = [(_attn_fwd_kernel, fwd_config(n_rows, d), d) for n_rows, d in ((1, 128), (67, 64), (67, 128))]
        for d in _AOT_HEAD_DIMS:
            dkdv_cfg, dq_cfg = bwd_configs(d, dtype)
            jobs += [(_attn_bwd_dkdv_kernel, dkdv_cfg, d), (_attn_bwd_dq_kernel, dq_cfg, d)]
            # the most keys it takes at each head dim: fewer only shrink the tiles
            short = short_bwd_config(64 if d > 64 else 128, d, dtype)
            jobs += [(_attn_bwd_short_kernel, short, d)] if short else []
        for kernel, cfg, d in dict.fromkeys(jobs):
            consts = dict(heavy, HEAD_DIM=d, BLOCK_D=d, DOT_PRECISION=dot, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
            out.append((kernel, _signature(kernel, ptrs, consts), consts, cfg.num_warps, cfg.num_stages))
        consts = dict(HEAD_DIM=128, BLOCK_M=_DELTA_BLOCK_M, BLOCK_D=128)
        out.append((_attn_bwd_delta_kernel, _signature(_attn_bwd_delta_kernel, ptrs, consts), consts, 4, 1))
    consts = dict(BLOCK_M=_MASK_BLOCK_M, BLOCK_N=_MASK_BLOCK_N)
    out.append(
        (_dropout_mask_kernel, _signature(_dropout_mask_kernel, {"MASK": "i8", "SEED": "i64"}, consts), consts, 4, 1)
    )
    return out
