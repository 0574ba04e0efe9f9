"""The Q-Former masks through xformers' ``memory_efficient_attention``.

xformers describes masks with attn-bias classes. Where one of them is exactly a
Q-Former mask it is used (no bias for BIDIRECTIONAL without padding; the
bottom-right-aligned causal mask for MULTIMODAL_CAUSAL with no query tokens);
the masks with a query block and key padding have no class, so they go in as
an additive bias tensor (0 / -inf), built once per call and shared by the heads.

xformers takes (B, L, H, D) tensors: the (B, H, L, D) views the Q-Former makes
are transposed back without a copy. Rows that see no key output zeros (the
spec), where xformers would give NaN. xformers has no CPU wheel, so this file
is exercised only on GPU machines that have it.
"""

from __future__ import annotations

import math

import torch

from blip2_fast.attention import MaskKind, _check_qkv, dense_mask, key_valid_mask


def _ops():
    try:
        import xformers.ops as xops
    except ImportError as exc:  # pragma: no cover - depends on the machine
        raise ImportError(
            "the xformers backend needs the xformers package (pip install 'blip2-fast[xformers]')"
        ) from exc
    return xops


def attn_bias_for(
    mask_kind: MaskKind,
    n_query: int,
    n_rows: int,
    n_keys: int,
    heads: int,
    valid: torch.Tensor | None,
    dtype: torch.dtype,
    device: torch.device,
):
    """The attn-bias for this mask: None, an xformers bias class, or a (B, H, Lq, Lk) additive tensor."""
    if valid is None and mask_kind == MaskKind.BIDIRECTIONAL:
        return None
    if valid is None and mask_kind == MaskKind.MULTIMODAL_CAUSAL and n_query == 0:
        from xformers.ops.fmha.attn_bias import LowerTriangularFromBottomRightMask

        return LowerTriangularFromBottomRightMask()
    allowed = dense_mask(mask_kind, n_query, n_rows, n_keys, valid, device)[:, 0]  # (B or 1, Lq, Lk)
    # xformers wants the bias rows 16-byte aligned: allocate a padded last dim, then view the Lk columns
    padded = (n_keys + 7) // 8 * 8
    bias = torch.zeros(allowed.shape[0], n_rows, padded, dtype=dtype, device=device)[..., :n_keys]
    bias.masked_fill_(~allowed, float("-inf"))
    return bias[:, None].expand(-1, heads, -1, -1)


def attention_xformers(
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
) -> torch.Tensor:
    """xformers memory-efficient attention; same arguments and numbers as ``attention_ref``.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); key_padding: (B, Lk) bool, True = may
    attend; key_lengths: (B,) int. Returns (B, H, Lq, D).
    """
    mask_kind = MaskKind(mask_kind)
    _check_qkv(q, k, v, n_query, mask_kind)
    xops = _ops()
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    valid = key_valid_mask(B, Lk, key_padding, key_lengths, q.device)
    bias = attn_bias_for(mask_kind, n_query, Lq, Lk, H, valid, q.dtype, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias, p=dropout_p, scale=scale
    ).transpose(1, 2)  # (B, H, Lq, D)
    if isinstance(bias, torch.Tensor):
        sees_nothing = ~dense_mask(mask_kind, n_query, Lq, Lk, valid, q.device).any(-1, keepdim=True)
        out = out.masked_fill(sees_nothing, 0.0)
    return out
