"""KV-cache path: Q-Former captioning, greedy, at the BLIP-2 size (MiniLM-sized, 2 layers, in the CPU ``--quick`` set).

``cached``: the query pass's K/V cache is grown one token at a time
(``QFormer.decode`` over the returned cache, concatenating). ``preallocated``: the
same, in storage reserved up front (``KVCache.reserve``: decoding writes in place;
the reservation, a copy of the query K/V, is timed too). ``recompute``: every step decodes
the whole text so far again over the query cache (the queries themselves are
never recomputed in any mode: BLIP-2 caches them). The image side
(ln_vision, cross-attention K/V, the query pass) runs once, outside the timing.
"""

from __future__ import annotations

import pytest
import torch
from benchutil import CUDA, DEVICE, DTYPE_NAMES, measure, require_backend, sizes

from blip2_fast import QFormer, QFormerConfig
from blip2_fast.qformer import KVCache

N_IMAGE = 257
_MODELS: dict[tuple[str, torch.dtype], QFormer] = {}


def shared_qformer(config: QFormerConfig, label: str, dtype: torch.dtype) -> QFormer:
    """One Q-Former per size and dtype for the whole session (building it dominates a quick run)."""
    if (label, dtype) not in _MODELS:
        torch.manual_seed(0)
        _MODELS[label, dtype] = QFormer(config).to(DEVICE, dtype).eval()
    return _MODELS[label, dtype]


def generate(model: QFormer, cache: KVCache, bos: torch.Tensor, n_tokens: int, mode: str) -> torch.Tensor:
    ids = bos
    if mode == "preallocated":
        cache = cache.reserve(n_tokens)
    if mode != "recompute":
        logits, grown = model.decode(ids, None, cache)
        for _ in range(n_tokens - 1):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            logits, grown = model.decode(nxt, None, grown)
    else:
        for _ in range(n_tokens):
            logits, _ = model.decode(ids, None, cache)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("mode", ["cached", "preallocated", "recompute"])
def test_caption_decode(benchmark, request, rounds, backend, dtype, decode_batch, decode_tokens, mode):
    require_backend(request, backend)
    if mode == "preallocated" and not hasattr(KVCache, "reserve"):
        pytest.skip("preallocated: this QFormer's KVCache has no reserve()")
    preset = sizes(request.config).model_label
    model = shared_qformer(sizes(request.config).qformer_config(), preset, dtype).set_backend(backend)
    cfg = model.config
    image = torch.randn(decode_batch, N_IMAGE, cfg.encoder_width, device=DEVICE, dtype=dtype)
    with torch.no_grad():
        cache = model.encode_image(image).cache
    bos = torch.full((decode_batch, 1), cfg.vocab_size - 1, device=DEVICE, dtype=torch.long)  # [DEC]

    @torch.no_grad()
    def call():
        return generate(model, cache, bos, decode_tokens, mode)

    ms = measure(
        benchmark,
        call,
        case=f"caption {preset} {decode_tokens} tokens B={decode_batch} {DTYPE_NAMES[dtype]}",
        backend=f"{backend}/{mode}",
        rounds=rounds if CUDA else 3,
        mode=mode,
        attention_backend=backend,
    )
    benchmark.extra_info["tokens_per_s"] = decode_batch * decode_tokens / (ms * 1e-3)
