"""FFN of a Q-Former layer (768 -> 3072 -> 768, GELU, dropout, residual, LayerNorm): fused vs eager.

Implementations: ``eager`` (one chunk), ``eager-chunked`` (BERT's
``chunk_size_feed_forward``, 8 rows at a time: less activation memory, more
launches) and ``triton`` (the fused kernel, ``FeedForward(..., backend="triton")``).
Time and memory: the CUDA allocator peak on a GPU, the bytes autograd keeps for
backward on any device. Training mode (dropout 0.1), as in stage 1.
"""

from __future__ import annotations

import pytest
import torch
from benchutil import DEVICE, DTYPE_NAMES, N_QUERY, measure, require_module

from blip2_fast.layers import FeedForward, ResidualNorm

HIDDEN, INTERMEDIATE, EPS, DROPOUT, CHUNK = 768, 3072, 1e-12, 0.1, 8
IMPLS = {"eager": ("reference", 0), "eager-chunked": ("reference", CHUNK), "triton": ("triton", 0)}
PASS_FLOPS = {"fwd": 1.0, "fwd+bwd": 3.0}


def rows_input(batch: int, dtype: torch.dtype, grad: bool) -> torch.Tensor:
    return torch.randn(batch, N_QUERY, HIDDEN, device=DEVICE, dtype=dtype).requires_grad_(grad)


def timed_pass(call, x: torch.Tensor, params: list[torch.Tensor], which: str):
    if which == "fwd":
        return call
    inputs = [x, *params]
    return lambda: torch.autograd.grad(call().float().square().mean(), inputs)


@pytest.mark.parametrize("which", list(PASS_FLOPS))
@pytest.mark.parametrize("impl", list(IMPLS))
def test_ffn(benchmark, request, rounds, impl, dtype, ffn_batch, which):
    backend, chunk = IMPLS[impl]
    if backend == "triton":
        require_module(request, "blip2_fast.kernels.ffn", "triton FFN")
    ffn = FeedForward(HIDDEN, INTERMEDIATE, EPS, DROPOUT, chunk_size=chunk).to(DEVICE, dtype).train()
    x = rows_input(ffn_batch, dtype, grad=which != "fwd")
    params = list(ffn.parameters())

    def call():
        return ffn(x, backend)

    rows = ffn_batch * N_QUERY
    with torch.set_grad_enabled(which != "fwd"):
        measure(
            benchmark,
            timed_pass(call, x, params, which),
            case=f"ffn {HIDDEN}x{INTERMEDIATE} {which} rows={rows} {DTYPE_NAMES[dtype]}",
            backend=impl,
            rounds=rounds,
            flops=4.0 * rows * HIDDEN * INTERMEDIATE * PASS_FLOPS[which],
            graph=which == "fwd",
            memory_of=call if which != "fwd" else None,
        )


@pytest.mark.parametrize("which", list(PASS_FLOPS))
@pytest.mark.parametrize("impl", ["eager", "triton"])
def test_residual_norm(benchmark, request, rounds, impl, dtype, ffn_batch, which):
    """The attention output block: dense 768 -> 768 + dropout + residual + LayerNorm."""
    backend = "triton" if impl == "triton" else "reference"
    if backend == "triton":
        require_module(request, "blip2_fast.kernels.ffn", "triton residual_norm")
    block = ResidualNorm(HIDDEN, HIDDEN, EPS, DROPOUT).to(DEVICE, dtype).train()
    x = rows_input(ffn_batch, dtype, grad=which != "fwd")
    residual = rows_input(ffn_batch, dtype, grad=False)
    params = list(block.parameters())

    def call():
        return block(x, residual, backend)

    rows = ffn_batch * N_QUERY
    with torch.set_grad_enabled(which != "fwd"):
        measure(
            benchmark,
            timed_pass(call, x, params, which),
            case=f"residual-norm {HIDDEN} {which} rows={rows} {DTYPE_NAMES[dtype]}",
            backend=impl,
            rounds=rounds,
            flops=2.0 * rows * HIDDEN * HIDDEN * (1.0 if which == "fwd" else 3.0),
            graph=which == "fwd",
            memory_of=call if which != "fwd" else None,
        )
