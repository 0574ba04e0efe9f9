"""Reference building blocks of a Q-Former layer (plain PyTorch, the spec).

Each block owns its weights and, for the ``triton`` backend, hands them to the
fused kernel; otherwise it runs the eager arithmetic below, which is BERT's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def residual_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    norm_weight: torch.Tensor,
    norm_bias: torch.Tensor,
    eps: float,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """LayerNorm(residual + dropout(x @ weight.T + bias)).

    x: (..., K); residual: (..., N); weight: (N, K); bias, norm_weight, norm_bias: (N,).
    """
    y = F.dropout(F.linear(x, weight, bias), dropout_p)
    return F.layer_norm(y + residual, (residual.shape[-1],), norm_weight, norm_bias, eps)


def ffn_ref(
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
) -> torch.Tensor:
    """LayerNorm(x + dropout(GELU(x @ up.T + up_b) @ down.T + down_b)), ``chunk_size`` rows at a time.

    x: (B, L, H); up_weight: (I, H); up_bias: (I,); down_weight: (H, I); down_bias,
    norm_weight, norm_bias: (H,). Chunks run along L, as BERT's
    ``chunk_size_feed_forward`` does; 0 means one chunk.
    """

    def block(rows: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(F.linear(rows, up_weight, up_bias))
        return residual_norm_ref(hidden, rows, down_weight, down_bias, norm_weight, norm_bias, eps, dropout_p)

    if chunk_size <= 0 or x.shape[1] <= chunk_size:
        return block(x)
    return torch.cat([block(part) for part in x.split(chunk_size, dim=1)], dim=1)


class ResidualNorm(nn.Module):
    """dense + bias + dropout + residual + LayerNorm (BERT's SelfOutput / Output)."""

    def __init__(self, in_features: int, out_features: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)
        self.norm = nn.LayerNorm(out_features, eps=eps)
        self.dropout = dropout

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor, backend: str = "reference", seed: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``seed``: the triton kernel's dropout seed, drawn with the pass's others (None: it draws its own)."""
        p = self.dropout if self.training else 0.0
        args = (x, residual, self.dense.weight, self.dense.bias, self.norm.weight, self.norm.bias, self.norm.eps, p)
        if backend == "triton":
            from blip2_fast.kernels.ffn import residual_norm

            return residual_norm(*args, seed=seed)
        return residual_norm_ref(*args)


class FeedForward(nn.Module):
    """Linear -> GELU(erf) -> Linear -> dropout -> residual -> LayerNorm, chunked along the sequence."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        eps: float,
        dropout: float,
        chunk_size: int = 0,
        recompute: bool = True,
    ):
        super().__init__()
        self.up = nn.Linear(hidden_size, intermediate_size)
        self.down = nn.Linear(intermediate_size, hidden_size)
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = dropout
        self.chunk_size = chunk_size
        self.recompute = recompute  # triton backend only: see QFormerConfig.ffn_recompute

    def forward(self, x: torch.Tensor, backend: str = "reference", seed: torch.Tensor | None = None) -> torch.Tensor:
        """``seed`` as in :meth:`ResidualNorm.forward`."""
        p = self.dropout if self.training else 0.0
        args = (
            x,
            self.up.weight,
            self.up.bias,
            self.down.weight,
            self.down.bias,
            self.norm.weight,
            self.norm.bias,
            self.norm.eps,
            p,
            self.chunk_size,
        )
        if backend == "triton":
            from blip2_fast.kernels.ffn import ffn

            return ffn(*args, recompute=self.recompute, seed=seed)
        return ffn_ref(*args)
