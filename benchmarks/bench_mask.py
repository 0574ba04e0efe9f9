"""Mask paths: the Q-Former's self-attention over [32 queries ; 35 text] for each mask kind.

Forward, backward alone (over a graph kept from one forward) and forward +
backward; without padding and with ragged text lengths. FLOP counts are the
dense-equivalent 4 * B * H * Lq * Lk * D per forward (backward 2.5x): masked-out
blocks a kernel skips still count, so kernels that skip work show as higher TFLOP/s.
"""

from __future__ import annotations

import pytest
from benchutil import (
    DTYPE_NAMES,
    N_QUERY,
    N_TEXT,
    PASS_FLOPS,
    attention_flops,
    measure,
    pass_fn,
    qkv,
    ragged_padding,
    require_backend,
)

from blip2_fast.attention import MaskKind, attention


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "padded"])
@pytest.mark.parametrize("which", list(PASS_FLOPS))
@pytest.mark.parametrize("mask_kind", list(MaskKind), ids=[k.name.lower() for k in MaskKind])
def test_self_attention(benchmark, request, rounds, backend, dtype, attn_batch, mask_kind, which, padded):
    require_backend(request, backend, backward=which != "fwd")
    L = N_QUERY + N_TEXT
    q, k, v = qkv(attn_batch, L, L, dtype, grad=which != "fwd")
    padding = ragged_padding(attn_batch, L, N_QUERY) if padded else None

    def call():
        return attention(q, k, v, mask_kind=mask_kind, n_query=N_QUERY, key_padding=padding, backend=backend)

    pad = "padded" if padded else "dense"
    case = f"self-attn {mask_kind.name.lower()} {which} {pad} B={attn_batch} {DTYPE_NAMES[dtype]}"
    measure(
        benchmark,
        pass_fn(call, (q, k, v), which),
        case=case,
        backend=backend,
        rounds=rounds,
        flops=attention_flops(attn_batch, L, L) * PASS_FLOPS[which],
        graph=which == "fwd",
        memory_of=call if which != "fwd" else None,
    )
