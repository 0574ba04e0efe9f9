"""Q-Former captioning: greedy and beam search over the query K/V cache (ITG decoding).

The image goes through the query pass once; its self-attention K/V (the
``QueryOutput.cache``) is the prefix every step attends to. Each step feeds one
token per row to ``QFormer.decode``, which appends that token's K/V to the
cache, so no step recomputes an earlier position. Beam search reorders the
cache rows with ``KVCache.index_select``.

Sequences start with ``[DEC]`` and end at ``[SEP]`` (BERT's end of sentence),
as BLIP-2's Q-Former captioner does.
"""

from __future__ import annotations

import dataclasses

import torch

from blip2_fast.qformer import ImageContext, KVCache, QFormer


@dataclasses.dataclass
class Generated:
    tokens: torch.Tensor  # (B, L) generated ids after [DEC], padded with pad_id after the end
    scores: torch.Tensor  # (B,) sum of log-probabilities of the kept tokens (end token included)
    lengths: torch.Tensor  # (B,) tokens kept per row, end token included


def _check(model: QFormer, max_new_tokens: int, min_new_tokens: int, num_beams: int) -> None:
    if not model.config.text_input:
        raise ValueError("captioning needs a Q-Former with text_input=True (an LM head)")
    if max_new_tokens < 1 or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(
            "need 1 <= max_new_tokens and 0 <= min_new_tokens <= max_new_tokens, "
            f"got max_new_tokens={max_new_tokens}, min_new_tokens={min_new_tokens}"
        )
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")


def _step_logprobs(
    model: QFormer, tokens: torch.Tensor, cache: KVCache, step: int, min_new_tokens: int, eos_id: int
) -> tuple[torch.Tensor, KVCache]:
    logits, cache = model.decode(tokens[:, None], None, cache)
    logp = torch.log_softmax(logits[:, -1].float(), dim=-1)  # (R, V)
    if step < min_new_tokens:
        logp[:, eos_id] = float("-inf")
    return logp, cache


@torch.no_grad()
def generate(
    model: QFormer,
    image: torch.Tensor | ImageContext,
    *,
    bos_id: int,
    eos_id: int,
    pad_id: int = 0,
    max_new_tokens: int = 20,
    min_new_tokens: int = 1,
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> Generated:
    """Caption ``image`` (ViT features (B, N, E) or an ImageContext).

    ``num_beams == 1`` is greedy. With beams, a finished beam is carried along
    unchanged (only ``pad_id`` may follow its end, at no cost); beams compete
    on their summed log-probability and the best is chosen at the end by
    sum / length ** length_penalty.
    """
    _check(model, max_new_tokens, min_new_tokens, num_beams)
    ctx = model._as_context(image)
    # room for every new token: decoding writes K/V in place instead of concatenating each step
    cache = model.encode_image(ctx).cache.reserve(max_new_tokens)
    B, K = ctx.batch_size, num_beams
    device = cache.layers[0][0].device
    if K > 1:
        cache = cache.index_select(torch.arange(B, device=device).repeat_interleave(K))
    R = B * K
    last = torch.full((R,), bos_id, dtype=torch.long, device=device)
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = float("-inf")  # all beams start identical: keep one until the first step spreads them
    finished = torch.zeros(R, dtype=torch.bool, device=device)
    lengths = torch.zeros(R, dtype=torch.long, device=device)
    tokens = torch.empty(R, 0, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        logp, cache = _step_logprobs(model, last, cache, step, min_new_tokens, eos_id)
        # a finished row may only continue with pad, at no cost
        logp[finished] = float("-inf")
        logp[finished, pad_id] = 0.0
        V = logp.shape[-1]
        total = (scores.view(R, 1) + logp).view(B, K * V)
        scores, flat = total.topk(K, dim=1)  # (B, K)
        beam = flat // V
        nxt = flat % V
        rows = (torch.arange(B, device=device)[:, None] * K + beam).view(R)
        nxt = nxt.view(R)
        tokens = torch.cat([tokens.index_select(0, rows), nxt[:, None]], dim=1)
        was_finished = finished.index_select(0, rows)
        lengths = lengths.index_select(0, rows) + (~was_finished).long()
        finished = was_finished | (nxt == eos_id)
        if K > 1:
            cache = cache.index_select(rows)
        last = nxt
        if bool(finished.all()):
            break
    norm = scores.view(R) / lengths.clamp(min=1).float() ** length_penalty
    best = norm.view(B, K).argmax(dim=1) + torch.arange(B, device=device) * K
    out_tokens = tokens.index_select(0, best)
    keep = torch.arange(out_tokens.shape[1], device=device)[None, :] < lengths.index_select(0, best)[:, None]
    out_tokens = out_tokens.masked_fill(~keep, pad_id)
    return Generated(out_tokens, scores.view(R).index_select(0, best), lengths.index_select(0, best))


def caption(
    model: QFormer,
    image: torch.Tensor | ImageContext,
    tokenizer,
    *,
    max_new_tokens: int = 20,
    min_new_tokens: int = 1,
    num_beams: int = 1,
) -> list[str]:
    """Captions as strings, decoded with ``tokenizer`` (its ``bos_token`` must be [DEC])."""
    if tokenizer.bos_token_id is None or tokenizer.sep_token_id is None:
        raise ValueError("the tokenizer needs a bos_token ([DEC]) and a sep_token ([SEP]); use text.load_tokenizer()")
    out = generate(
        model,
        image,
        bos_id=tokenizer.bos_token_id,
        eos_id=tokenizer.sep_token_id,
        pad_id=tokenizer.pad_token_id,
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        num_beams=num_beams,
    )
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out.tokens.tolist()]
