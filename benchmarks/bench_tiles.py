"""Tile sizes of the triton attention kernels at the Q-Former's shapes: the data for choosing
``kernels/attention.py``'s ``FWD_CONFIGS`` / ``BWD_CONFIGS``.

Each candidate (rows x keys per tile, warps, pipeline stages) runs every kernel of one pass through
``attention(..., config=...)``, on the two shapes that dominate a stage-1 step: the multimodal-causal
self-attention over 32 queries + 35 padded text tokens, and the cross-attention of 32 queries over 257
image tokens. Results are listed as backend ``tiles <m>x<n> w<warps> s<stages>``, ``shipped`` marking
the configs the launchers pick today. A candidate that does not compile on this GPU (shared memory,
registers) is skipped with Triton's reason. GPU only: on CPU the interpreter says nothing about tiles.
"""

from __future__ import annotations

import pytest
from benchutil import (
    CUDA,
    DTYPE_NAMES,
    HEAD_DIM,
    N_IMAGE,
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

from blip2_fast.attention import MaskKind

CANDIDATES = [(32, 32, 4, 1), (32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2)]
SHAPES = {  # name: (mask kind, rows, keys, padded)
    "self-attn multimodal_causal padded": (MaskKind.MULTIMODAL_CAUSAL, N_QUERY + N_TEXT, N_QUERY + N_TEXT, True),
    f"cross-attn {N_QUERY}x{N_IMAGE}": (MaskKind.BIDIRECTIONAL, N_QUERY, N_IMAGE, False),
}


@pytest.mark.parametrize("tiles", CANDIDATES, ids=["{}x{}w{}s{}".format(*c) for c in CANDIDATES])
@pytest.mark.parametrize("which", ["bwd", "fwd"])  # the backward first: the larger gap to sdpa
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention_tiles(benchmark, request, rounds, dtype, attn_batch, shape, which, tiles):
    if not CUDA:
        pytest.skip("tile sizes: GPU only (the interpreter measures nothing about them)")
    require_backend(request, "triton", backward=which != "fwd")
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from blip2_fast.kernels.attention import AttnConfig, attention, bwd_configs, fwd_config

    mask_kind, rows, keys, padded = SHAPES[shape]
    config = AttnConfig(*tiles)
    shipped = config == fwd_config(rows, HEAD_DIM) if which == "fwd" else config in bwd_configs(HEAD_DIM, dtype)
    q, k, v = qkv(attn_batch, rows, keys, dtype, grad=which != "fwd")
    padding = ragged_padding(attn_batch, keys, N_QUERY) if padded else None

    def call():
        return attention(q, k, v, mask_kind=mask_kind, n_query=N_QUERY, key_padding=padding, config=config)

    try:
        fn = pass_fn(call, (q, k, v), which)
        fn()
    except (OutOfResources, CompilationError) as exc:  # too much shared memory, or registers: not for this GPU
        pytest.skip(f"tiles {config} do not run here: {type(exc).__name__}: {str(exc)[:200]}")
    measure(
        benchmark,
        fn,
        case=f"tiles {shape} {which} B={attn_batch} {DTYPE_NAMES[dtype]}",
        backend="tiles {}x{} w{} s{}".format(*tiles) + (" (shipped)" if shipped else ""),
        rounds=rounds,
        flops=attention_flops(attn_batch, rows, keys) * PASS_FLOPS[which],
        graph=which == "fwd",
    )
