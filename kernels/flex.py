"""The Q-Former masks as a FlexAttention ``BlockMask`` (PyTorch's compiled block-sparse attention).

The mask kind and the key padding become a ``mask_mod``; ``create_block_mask``
turns it into a block-sparse map once, and the map is cached per (mask kind,
n_query, shapes, device, padding tensor), so the Q-Former's layers, which all
receive the same padding tensor, build it once per batch and reuse it.

Limits, by PyTorch's FlexAttention rather than by choice:

- no attention dropout: ``dropout_p > 0`` is rejected (use the ``triton`` or
  ``sdpa`` backend for training with attention dropout);
- on CPU, FlexAttention has no backward: inputs that require grad raise there;
  the forward runs eagerly on CPU (a compiled CPU forward works too but costs a
  long compile); on CUDA it runs compiled.
"""

from __future__ import annotations

import collections
import math
import warnings

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from blip2_fast.attention import MaskKind, _check_qkv, key_valid_mask

_CACHE_SIZE = 16
_block_masks: collections.OrderedDict[tuple, tuple[BlockMask, torch.Tensor | None]] = collections.OrderedDict()
_compiled_flex = None


def _mask_mod(mask_kind: MaskKind, n_query: int, offset: int, valid: torch.Tensor):
    """mask_mod(b, h, row, key) -> True where the row may attend; the same rule as ``dense_mask``.

    Every number the rule reads is a tensor, never a Python int: the compiled flex guards on the values a
    closure holds (one compile per mask kind, n_query and shape, until dynamo's recompile limit turns flex
    eager) but only on a tensor's shape, so all masks share a compile.
    """
    device = valid.device
    is_unimodal = torch.tensor(mask_kind == MaskKind.UNIMODAL, device=device)
    is_causal = torch.tensor(mask_kind == MaskKind.MULTIMODAL_CAUSAL, device=device)
    n_query, offset = torch.tensor(n_query, device=device), torch.tensor(offset, device=device)

    def visible(b, h, row, key):
        pos = row + offset  # rows are aligned to the end of the keys
        query_key = key < n_query
        unimodal = (pos < n_query) == query_key
        causal = query_key | (key <= pos)
        bidirectional = key >= 0
        return torch.where(is_unimodal, unimodal, torch.where(is_causal, causal, bidirectional)) & valid[b, key]

    return visible


def block_mask_for(
    mask_kind: MaskKind,
    n_query: int,
    batch: int,
    n_rows: int,
    n_keys: int,
    device: torch.device,
    key_padding: torch.Tensor | None = None,
    key_lengths: torch.Tensor | None = None,
) -> BlockMask:
    """The cached ``BlockMask`` for this mask; a new padding tensor (or one changed in place) builds a new one."""
    pad = key_padding if key_padding is not None else key_lengths
    pad_id = None if pad is None else (id(pad), pad._version, "padding" if key_padding is not None else "lengths")
    key = (int(mask_kind), n_query, batch, n_rows, n_keys, str(device), pad_id)
    hit = _block_masks.get(key)
    if hit is not None and hit[1] is pad:  # the identity check guards against a recycled id()
        _block_masks.move_to_end(key)
        return hit[0]
    valid = key_valid_mask(batch, n_keys, key_padding, key_lengths, device)
    if valid is None:
        valid = torch.ones(batch, n_keys, dtype=torch.bool, device=device)
    # One map per batch entry even without padding: a broadcast map (batch 1) would be a shape of its own
    # to the compiled flex, one more compile to spend from dynamo's recompile limit.
    block_mask = create_block_mask(
        _mask_mod(mask_kind, n_query, n_keys - n_rows, valid), batch, None, n_rows, n_keys, device=device
    )
    _block_masks[key] = (block_mask, pad)
    while len(_block_masks) > _CACHE_SIZE:
        _block_masks.popitem(last=False)
    return block_mask


def clear_block_mask_cache() -> None:
    _block_masks.clear()


def _compiled():
    global _compiled_flex
    if _compiled_flex is None:
        # shapes vary across the passes (queries, text, match, decode steps): let dynamo go dynamic on recompiles
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


def attention_flex(
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
    compiled: bool | None = None,
) -> torch.Tensor:
    """FlexAttention with a cached ``BlockMask``; same arguments and numbers as ``attention_ref``.

    q: (B, H, Lq, D); k, v: (B, H, Lk, D); key_padding: (B, Lk) bool, True = may
    attend; key_lengths: (B,) int. Returns (B, H, Lq, D). ``compiled`` picks
    ``torch.compile(flex_attention)`` (default: on CUDA only).
    """
    mask_kind = MaskKind(mask_kind)
    _check_qkv(q, k, v, n_query, mask_kind)
    if dropout_p > 0.0:
        raise ValueError(
            f"the flex backend has no attention dropout (got dropout_p={dropout_p}); "
            "use backend 'triton' or 'sdpa', or set attention_probs_dropout_prob=0"
        )
    B, _, Lq, D = q.shape
    block_mask = block_mask_for(mask_kind, n_query, B, Lq, k.shape[2], q.device, key_padding, key_lengths)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    if q.is_cuda if compiled is None else compiled:
        return _compiled()(q, k, v, block_mask=block_mask, scale=scale)
    with warnings.catch_warnings():
        # eager here is a choice (CPU, where compiling costs more than it saves), not an oversight to warn about
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)
