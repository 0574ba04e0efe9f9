"""Cross-attention: 32 query rows over 257 image tokens (EVA ViT-g at 224 px), no mask."""

from __future__ import annotations

import pytest
from benchutil import (
    DTYPE_NAMES,
    HEAD_DIM,
    N_IMAGE,
    N_QUERY,
    PASS_FLOPS,
    attention_flops,
    measure,
    pass_fn,
    qkv,
    require_backend,
)

from blip2_fast.attention import MaskKind, attention


@pytest.mark.parametrize("which", ["fwd", "fwd+bwd"])
def test_cross_attention(benchmark, request, rounds, backend, dtype, attn_batch, which):
    require_backend(request, backend, backward=which != "fwd")
    q, k, v = qkv(attn_batch, N_QUERY, N_IMAGE, dtype, grad=which != "fwd")

    def call():
        return attention(q, k, v, mask_kind=MaskKind.BIDIRECTIONAL, backend=backend)

    measure(
        benchmark,
        pass_fn(call, (q, k, v), which),
        case=f"cross-attn {N_QUERY}x{N_IMAGE} d{HEAD_DIM} {which} B={attn_batch} {DTYPE_NAMES[dtype]}",
        backend=backend,
        rounds=rounds,
        flops=attention_flops(attn_batch, N_QUERY, N_IMAGE) * PASS_FLOPS[which],
        graph=which == "fwd",
        memory_of=call if which != "fwd" else None,
    )
