"""Q-Former attention: one functional API, several backends.

Every attention in the Q-Former is described the same way: a query block ``q``
attends over a key block ``k``/``v`` whose first ``n_query`` positions hold the
learned query tokens and the rest hold text (or, for cross-attention, image
tokens). Row ``i`` of ``q`` sits at key position ``i + Lk - Lq`` (rows are
aligned to the end of the keys), which lets one rule serve a full pass
(``Lq == Lk``), ITG over a query cache (``Lq = text``, ``Lk = 32 + text``) and
token-by-token decoding (``Lq = 1``).

What a row may see is given by a :class:`MaskKind` plus key padding, never a
dense mask (only :func:`attention_ref` builds one, to define the numbers):

============================  ==================  ==============================
mask kind                     query rows see      text rows see
============================  ==================  ==============================
``UNIMODAL`` (ITC)            queries             text
``BIDIRECTIONAL`` (ITM, x-attn)  everything       everything
``MULTIMODAL_CAUSAL`` (ITG)   queries             queries + text at or before it
============================  ==================  ==============================

Padded keys are never seen. A row that sees no key at all (a padded text row
under UNIMODAL with no valid text) outputs zeros.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


class MaskKind(enum.IntEnum):
    UNIMODAL = 0
    BIDIRECTIONAL = 1
    MULTIMODAL_CAUSAL = 2


BACKENDS = ("auto", "reference", "sdpa", "flex", "xformers", "triton")

# What "auto" runs, per device type: the fastest path measured there. On an H100 (benchmarks/results/
# h100-80gb-hbm3-20261127-0954.md) sdpa's stage-1 step beat triton's (median 166.6 vs 188.0 ms, B=32, bf16):
# the fused kernels' host cost outweighs their GPU time at Q-Former sizes. Revisit with each GPU result.
AUTO_BACKEND = {"cuda": "sdpa", "cpu": "sdpa"}


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend that runs on ``device``: ``name`` itself, or what ``auto`` picks there (sdpa elsewhere)."""
    check_backend(name)
    return AUTO_BACKEND.get(device.type, "sdpa") if name == "auto" else name


def key_valid_mask(
    batch: int,
    n_keys: int,
    key_padding: torch.Tensor | None,
    key_lengths: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor | None:
    """(B, Lk) bool, True where a key may be attended; None when nothing is padded."""
    if key_padding is not None and key_lengths is not None:
        raise ValueError("give key_padding or key_lengths, not both")
    if key_padding is not None:
        if key_padding.dtype != torch.bool:
            raise ValueError(f"key_padding must be a bool tensor (True = may attend), got dtype {key_padding.dtype}")
        if key_padding.shape != (batch, n_keys):
            raise ValueError(f"key_padding must have shape (B, Lk) = {(batch, n_keys)}, got {tuple(key_padding.shape)}")
        return key_padding
    if key_lengths is not None:
        if key_lengths.shape != (batch,) or key_lengths.is_floating_point():
            raise ValueError(
                f"key_lengths must be an integer tensor of shape (B,) = ({batch},), "
                f"got {key_lengths.dtype} {tuple(key_lengths.shape)}"
            )
        return torch.arange(n_keys, device=device)[None, :] < key_lengths[:, None]
    return None


def dense_mask(
    mask_kind: MaskKind,
    n_query: int,
    n_rows: int,
    n_keys: int,
    key_valid: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """(B or 1, 1, Lq, Lk) bool, True = may attend. The definition every kernel implements."""
    row = torch.arange(n_rows, device=device)[:, None] + (n_keys - n_rows)  # key position of each row
    col = torch.arange(n_keys, device=device)[None, :]
    row_is_query, col_is_query = row < n_query, col < n_query
    if mask_kind == MaskKind.BIDIRECTIONAL:
        allowed = torch.ones(n_rows, n_keys, dtype=torch.bool, device=device)
    elif mask_kind == MaskKind.UNIMODAL:
        allowed = row_is_query == col_is_query
    elif mask_kind == MaskKind.MULTIMODAL_CAUSAL:
        allowed = torch.where(row_is_query, col_is_query, col_is_query | (col <= row))
    else:
        raise ValueError(f"unknown mask kind {mask_kind!r}")
    allowed = allowed[None, None]
    if key_valid is not None:
        allowed = allowed & key_valid[:, None, None, :]
    return allowed


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_query: int, mask_kind: MaskKind) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, L, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, H and D")
    if q.shape[2] > k.shape[2] and mask_kind != MaskKind.BIDIRECTIONAL:
        # rows are aligned to the end of the keys; only BIDIRECTIONAL (cross-attention) ignores positions
        raise ValueError(f"{mask_kind.name} needs Lq <= Lk: q has {q.shape[2]} rows, k has {k.shape[2]} keys")
    if not 0 <= n_query <= k.shape[2]:
        raise ValueError(f"n_query must lie in [0, Lk={k.shape[2]}], got {n_query}")


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask_kind: MaskKind,
    n_query: int = 0,
    key_padding: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Eager attention, the spec.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); key_padding: (B, Lk) bool, True = may
    attend; key_lengths: (B,) int, keys at or past it are padding. dropout_mask:
    (B, H, Lq, Lk) bool keep-mask, used instead of drawing one (for kernel
    parity). Returns (B, H, Lq, D) in q's dtype; softmax in fp32.
    """
    _check_qkv(q, k, v, n_query, mask_kind)
    B, _, Lq, D = q.shape
    Lk = k.shape[2]
    valid = key_valid_mask(B, Lk, key_padding, key_lengths, q.device)
    allowed = dense_mask(mask_kind, n_query, Lq, Lk, valid, q.device)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows that see nothing -> zeros
    if dropout_mask is not None:
        probs = probs * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        probs = F.dropout(probs, dropout_p)
    return torch.matmul(probs, v.float()).to(q.dtype)


def attention_sdpa(
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
    """PyTorch SDPA given a dense boolean mask (SDPA has no way to take a mask kind)."""
    _check_qkv(q, k, v, n_query, mask_kind)
    B, _, Lq, _ = q.shape
    Lk = k.shape[2]
    valid = key_valid_mask(B, Lk, key_padding, key_lengths, q.device)
    trivial = mask_kind == MaskKind.BIDIRECTIONAL and valid is None
    allowed = None if trivial else dense_mask(mask_kind, n_query, Lq, Lk, valid, q.device)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scale)
    if allowed is not None:
        # SDPA returns NaN for rows that see nothing; the spec says zeros.
        out = out.masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    return out


AttentionFn = Callable[..., torch.Tensor]


def get_attention(backend: str) -> AttentionFn:
    """The one place a backend name becomes an attention implementation (``auto``: see :func:`resolve_backend`)."""
    if check_backend(backend) == "auto":
        raise ValueError("backend 'auto' depends on the device: resolve it first with resolve_backend(name, device)")
    if backend == "reference":
        return attention_ref
    if backend == "sdpa":
        return attention_sdpa
    if backend == "flex":
        from blip2_fast.kernels.flex import attention_flex

        return attention_flex
    if backend == "xformers":
        from blip2_fast.kernels.xformers import attention_xformers

        return attention_xformers
    from blip2_fast.kernels.attention import attention as attention_triton

    return attention_triton


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
    backend: str = "reference",
    dropout_seed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked attention with the backend chosen by name; see the module docstring.

    ``dropout_seed`` (triton only; the others draw from torch's generator as they go): a seed tensor from
    :func:`dropout_seeds`, so that a pass draws every seed it needs in one launch.

    Under ``triton``, attention with nothing to mask (BIDIRECTIONAL, no padding: cross-attention to the
    image tokens, an unpadded matching pass) runs sdpa, whose FlashAttention kernel needs no mask there:
    on an H100 it took a third of the triton kernel's time for 32 queries x 257 image tokens, and a third of
    its host cost per call. The fused kernels serve every attention a mask shapes.
    """
    name = resolve_backend(backend, q.device)
    if name == "triton" and mask_kind == MaskKind.BIDIRECTIONAL and key_padding is None and key_lengths is None:
        name = "sdpa"
    fn = get_attention(name)
    seed = {"seed": dropout_seed} if name == "triton" and dropout_seed is not None else {}
    return fn(
        q,
        k,
        v,
        mask_kind=mask_kind,
        n_query=n_query,
        key_padding=key_padding,
        key_lengths=key_lengths,
        dropout_p=dropout_p,
        **seed,
    )


def dropout_seeds(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """``n`` dropout seeds for the triton kernels, drawn on ``device`` from torch's generator in one launch.

    Each is a (2,) int64 view whose first element the kernels read, 16 bytes apart (the alignment their
    launches are specialised for)."""
    return torch.randint(0, 2**31 - 1, (n, 2), device=device).unbind(0)
