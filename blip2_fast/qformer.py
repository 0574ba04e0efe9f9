"""The Q-Former (BLIP-2), reference path.

One BERT encoder serves three roles, chosen by the self-attention mask kind:

- ``encode_image``: 32 learned queries + cross-attention to the image (ITC,
  image side). Returns the query outputs and each layer's self-attention K/V of
  the query rows (the cache the decoder reuses).
- ``encode_text``: text alone (ITC, text side).
- ``match``: [queries ; text] under BIDIRECTIONAL, cross-attention for the query
  rows (ITM).
- ``decode``: text over the cached query K/V under MULTIMODAL_CAUSAL (ITG,
  captioning); returns LM logits and the cache grown by the new tokens.
- ``encode_itc_itg``: stage-1 training's ``encode_image`` + ``encode_text`` +
  ``decode`` over the query cache as one pass over [queries ; decoder text ; text],
  with the same numbers and half the launches.

Shapes: B batch, Q queries (32), T text tokens, N image tokens, H hidden,
E image-feature width, nh heads, hd head dim.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from blip2_fast.attention import MaskKind, attention, check_backend, dropout_seeds, resolve_backend
from blip2_fast.config import QFormerConfig
from blip2_fast.layers import FeedForward, ResidualNorm


@dataclasses.dataclass
class CacheBuffer:
    """Preallocated K/V storage for generation: keys[i], values[i] are (B, nh, capacity, hd).

    The first ``filled`` positions hold data. Decoding writes new K/V in place and
    hands the attention strided views of the filled part, so a step never copies
    the cache it grows.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    filled: int

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def views(self, length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(k[:, :, :length], v[:, :, :length]) for k, v in zip(self.keys, self.values, strict=True)]


@dataclasses.dataclass
class KVCache:
    """Per-layer self-attention K/V of the rows seen so far: [queries ; text].

    layers[i] = (k, v), each (B, nh, L, hd). ``n_query`` leading positions are
    query tokens; ``valid`` (B, L) marks keys that may be attended (None = all).
    ``buffer``, set by :meth:`reserve`, lets decoding grow the cache in place.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    n_query: int
    valid: torch.Tensor | None = None
    buffer: CacheBuffer | None = None

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.layers[0][0].shape[0]

    def reserve(self, extra: int) -> KVCache:
        """The same cache in preallocated storage with room for ``extra`` more positions (generation)."""
        L = self.length
        keys, values = [], []
        for k, v in self.layers:
            B, nh, _, hd = k.shape
            keys.append(k.new_empty(B, nh, L + extra, hd))
            values.append(v.new_empty(B, nh, L + extra, hd))
            keys[-1][:, :, :L] = k
            values[-1][:, :, :L] = v
        buffer = CacheBuffer(keys, values, L)
        return KVCache(buffer.views(L), self.n_query, self.valid, buffer)

    def can_grow_in_place(self, new: int) -> bool:
        # Only the newest cache of a buffer may write into it (an older one would overwrite
        # what a later step already holds), only without autograd, and only while room is left.
        b = self.buffer
        if b is None or torch.is_grad_enabled():
            return False
        return b.filled == self.length and self.length + new <= b.capacity

    def index_select(self, index: torch.Tensor) -> KVCache:
        """Rows of the batch picked by ``index`` (beam search, repeated prompts)."""
        valid = None if self.valid is None else self.valid.index_select(0, index)
        if self.buffer is not None:
            b = self.buffer
            keys = [k.index_select(0, index) for k in b.keys]
            values = [v.index_select(0, index) for v in b.values]
            buffer = CacheBuffer(keys, values, self.length)
            return KVCache(buffer.views(self.length), self.n_query, valid, buffer)
        layers = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.layers]
        return KVCache(layers, self.n_query, valid)


@dataclasses.dataclass
class ImageContext:
    """The image side of every cross-attention layer, computed once per image.

    kv[i] = (k, v), each (B, nh, N, hd), for cross-attention layers, None for the
    others; ``valid`` (B, N) marks real image tokens (None = all). ITC and the
    three ITM groups reuse it instead of projecting the image again. ``packed``, when
    set, is every cross-attention layer's [k | v] side by side, (B, N, 2 * H * layers),
    and kv are views into it: one GEMM made them, and selecting or concatenating
    images is one op on it (``pack`` says which layers, and how many heads).
    """

    kv: list[tuple[torch.Tensor, torch.Tensor] | None]
    valid: torch.Tensor | None = None
    packed: torch.Tensor | None = None
    pack: tuple[tuple[bool, ...], int] | None = None  # (cross-attention per layer, heads)

    @property
    def batch_size(self) -> int:
        return next(kv for kv in self.kv if kv is not None)[0].shape[0]

    @staticmethod
    def from_packed(
        packed: torch.Tensor, pack: tuple[tuple[bool, ...], int], valid: torch.Tensor | None
    ) -> ImageContext:
        layout, heads = pack
        B, N, width = packed.shape
        parts = iter(packed.split(width // (2 * sum(layout)), dim=-1))

        def view(x: torch.Tensor) -> torch.Tensor:
            return x.view(B, N, heads, -1).transpose(1, 2)

        kv = [(view(next(parts)), view(next(parts))) if cross else None for cross in layout]
        return ImageContext(kv, valid, packed, pack)

    def index_select(self, index: torch.Tensor) -> ImageContext:
        valid = None if self.valid is None else self.valid.index_select(0, index)
        if self.packed is not None:
            return ImageContext.from_packed(self.packed.index_select(0, index), self.pack, valid)
        kv = [None if p is None else (p[0].index_select(0, index), p[1].index_select(0, index)) for p in self.kv]
        return ImageContext(kv, valid)

    @staticmethod
    def cat(contexts: list[ImageContext]) -> ImageContext:
        if all(c.valid is None for c in contexts):
            valid = None
        else:
            valid = torch.cat([c.valid if c.valid is not None else c.kv_ones() for c in contexts])
        pack = contexts[0].pack
        if all(c.packed is not None and c.pack == pack for c in contexts):
            return ImageContext.from_packed(torch.cat([c.packed for c in contexts]), pack, valid)
        kv = [
            None if parts[0] is None else (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
            for parts in zip(*(c.kv for c in contexts), strict=True)
        ]
        return ImageContext(kv, valid)

    def kv_ones(self) -> torch.Tensor:
        k = next(kv for kv in self.kv if kv is not None)[0]
        return torch.ones(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)


@dataclasses.dataclass
class QueryOutput:
    hidden: torch.Tensor  # (B, Q, H) last-layer query outputs
    cache: KVCache  # the query rows' self-attention K/V, for the decoder


def as_bool_mask(mask: torch.Tensor | None, shape: tuple[int, ...], name: str) -> torch.Tensor | None:
    """Validate a padding mask: bool (or 0/1 integer) of ``shape``, True/1 = real token."""
    if mask is None:
        return None
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"{name} must be a bool (or 0/1 integer) tensor of shape {shape}, got dtype {mask.dtype}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {shape} (B, T), got {tuple(mask.shape)}")
    return mask.bool()


class Embeddings(nn.Module):
    """Word + position embeddings for text; queries are prepended as they are; LayerNorm + dropout over all."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.word = self.position = None
        if config.text_input:
            self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
            self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        query_embeds: torch.Tensor | None = None,
        position_offset: int = 0,
    ) -> torch.Tensor:
        parts = [] if query_embeds is None else [query_embeds]
        if input_ids is not None:
            positions = torch.arange(position_offset, position_offset + input_ids.shape[1], device=input_ids.device)
            parts.append(self.word(input_ids) + self.position(positions))
        x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, Q + T, H)
        return self.dropout(self.norm(x))


class Attention(nn.Module):
    """Multi-head attention projections + output block; ``kv_width`` differs for cross-attention."""

    def __init__(self, config: QFormerConfig, kv_width: int):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(kv_width, h)
        self.value = nn.Linear(kv_width, h)
        self.output = ResidualNorm(h, h, config.layer_norm_eps, config.hidden_dropout_prob)
        self.dropout = config.attention_probs_dropout_prob

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, -1).transpose(1, 2)  # (B, nh, L, hd)

    def project_qkv(self, x: torch.Tensor, weight_cache: dict | None = None) -> torch.Tensor:
        """Self-attention's [q | k | v] of ``x`` (B, L, 3H) by one GEMM over the three weights concatenated (per
        call, or once per ``weight_cache``, a dict that lives as long as the weights do not change: the
        parameters stay the three Linears checkpoints name): one launch and one weight-grad GEMM pair instead of
        three."""
        fused = None if weight_cache is None else weight_cache.get(self)
        if fused is None:
            fused = (
                torch.cat([self.query.weight, self.key.weight, self.value.weight]),
                torch.cat([self.query.bias, self.key.bias, self.value.bias]),
            )
            if weight_cache is not None:
                weight_cache[self] = fused
        return F.linear(x, *fused)

    def qkv_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, L, 3H) from :meth:`project_qkv` -> q, k, v heads, strided views into it (their grads are views of one
        (B, L, 3H) grad: split and view backwards copy nothing but the final concatenation)."""
        q, k, v = qkv.split(self.query.out_features, dim=-1)
        return self.heads(q), self.heads(k), self.heads(v)

    def forward(
        self,
        hidden: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        mask_kind: MaskKind,
        n_query: int,
        key_padding: torch.Tensor | None,
        backend: str,
        seeds: tuple[torch.Tensor, torch.Tensor] | None = None,
        q: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``seeds``: the triton kernels' dropout seeds (attention probabilities, output), or None; ``q``: the
        heads of ``hidden``'s queries if already projected (:meth:`project_qkv`)."""
        q = self.heads(self.query(hidden)) if q is None else q
        ctx = attention(
            q,
            k,
            v,
            mask_kind=mask_kind,
            n_query=n_query,
            key_padding=key_padding,
            dropout_p=self.dropout if self.training else 0.0,
            backend=backend,
            dropout_seed=None if seeds is None else seeds[0],
        )  # (B, nh, Lq, hd)
        ctx = ctx.transpose(1, 2).reshape(hidden.shape)
        return self.output(ctx, hidden, backend, None if seeds is None else seeds[1])


# Dropout sites of a layer: self-attention probabilities and output, cross-attention probabilities and output,
# the query FFN, the text FFN, and the second self-attention of the ITC + ITG pass (Layer.forward_itc_itg).
SEEDS_PER_LAYER = 7


class Layer(nn.Module):
    def __init__(self, config: QFormerConfig, index: int):
        super().__init__()
        self.self_attn = Attention(config, config.hidden_size)
        self.cross_attn = Attention(config, config.encoder_width) if config.has_cross_attention(index) else None
        ffn = lambda: FeedForward(
            config.hidden_size,
            config.intermediate_size,
            config.layer_norm_eps,
            config.hidden_dropout_prob,
            config.chunk_size_feed_forward,
            config.ffn_recompute,
        )
        self.ffn_query = ffn()
        self.ffn_text = ffn() if config.text_input else None

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        n_query_rows: int,
        mask_kind: MaskKind,
        past: tuple[torch.Tensor, torch.Tensor] | None,
        storage: tuple[torch.Tensor, torch.Tensor] | None,
        n_query_keys: int,
        key_padding: torch.Tensor | None,
        image_kv: tuple[torch.Tensor, torch.Tensor] | None,
        image_valid: torch.Tensor | None,
        backend: str,
        seeds: tuple[torch.Tensor, ...] | None = None,
        weight_cache: dict | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """hidden: (B, L, H), its first ``n_query_rows`` rows are queries. Returns (B, L, H) and this layer's K/V.

        ``seeds``: ``SEEDS_PER_LAYER`` dropout seeds for the triton kernels (see :meth:`QFormer._encode`), or None.
        """
        seeds = seeds or (None,) * SEEDS_PER_LAYER
        q, k, v = self.self_attn.qkv_heads(self.self_attn.project_qkv(hidden, weight_cache))
        if storage is not None:  # grow a preallocated cache in place
            start, end = past[0].shape[2], past[0].shape[2] + k.shape[2]
            storage[0][:, :, start:end] = k
            storage[1][:, :, start:end] = v
            k, v = storage[0][:, :, :end], storage[1][:, :, :end]
        elif past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        x = self.self_attn(
            hidden, k, v, mask_kind=mask_kind, n_query=n_query_keys, key_padding=key_padding, backend=backend,
            seeds=seeds[0:2], q=q,
        )  # fmt: skip
        queries, text = x.split([n_query_rows, x.shape[1] - n_query_rows], dim=1)  # its backward: one cat
        outputs = []
        if n_query_rows:
            if self.cross_attn is not None:
                if image_kv is None:
                    raise ValueError("query rows reach a cross-attention layer but no image was given")
                queries = self.cross_attn(
                    queries,
                    *image_kv,
                    mask_kind=MaskKind.BIDIRECTIONAL,
                    n_query=0,
                    key_padding=image_valid,
                    backend=backend,
                    seeds=seeds[2:4],
                )
            outputs.append(self.ffn_query(queries, backend, seeds[4]))
        if text.shape[1]:
            outputs.append(self.ffn_text(text, backend, seeds[5]))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        return out, (k, v)

    def forward_itc_itg(
        self,
        hidden: torch.Tensor,
        *,
        n_query: int,
        n_text: int,
        decoder_valid: torch.Tensor | None,
        text_valid: torch.Tensor | None,
        image_kv: tuple[torch.Tensor, torch.Tensor],
        image_valid: torch.Tensor | None,
        backend: str,
        seeds: tuple[torch.Tensor, ...] | None = None,
        weight_cache: dict | None = None,
    ) -> torch.Tensor:
        """One layer of the ITC + ITG pass over [queries ; ITG text ; ITC text] (B, Q + 2T, H).

        The same numbers as the query pass, the text pass and the decoder over the query cache, with every
        projection, output block and text FFN run once over all rows: queries see queries (and, by
        cross-attention, the image); the ITG text sees the queries and itself causally (MULTIMODAL_CAUSAL over
        the leading Q + T rows, ``decoder_valid`` (B, Q + T) their keys); the ITC text sees itself alone
        (``text_valid`` (B, T)).
        """
        seeds = seeds or (None,) * SEEDS_PER_LAYER
        attn = self.self_attn
        B, L, H = hidden.shape
        split = n_query + n_text  # [queries ; ITG text] | [ITC text]
        # rows split before heads: every backward here is a view or one concatenation, never a zero-filled slice
        decoder_qkv, text_qkv = attn.project_qkv(hidden, weight_cache).split([split, L - split], dim=1)
        p = attn.dropout if self.training else 0.0
        decoder = attention(
            *attn.qkv_heads(decoder_qkv), mask_kind=MaskKind.MULTIMODAL_CAUSAL, n_query=n_query,
            key_padding=decoder_valid, dropout_p=p, backend=backend, dropout_seed=seeds[0],
        )  # fmt: skip
        text = attention(
            *attn.qkv_heads(text_qkv), mask_kind=MaskKind.UNIMODAL, n_query=0,
            key_padding=text_valid, dropout_p=p, backend=backend, dropout_seed=seeds[6],
        )  # fmt: skip
        rows = [decoder.transpose(1, 2).reshape(B, split, H), text.transpose(1, 2).reshape(B, L - split, H)]
        x = attn.output(torch.cat(rows, dim=1), hidden, backend, seeds[1])
        queries, texts = x.split([n_query, L - n_query], dim=1)
        if self.cross_attn is not None:
            queries = self.cross_attn(
                queries, *image_kv, mask_kind=MaskKind.BIDIRECTIONAL, n_query=0, key_padding=image_valid,
                backend=backend, seeds=seeds[2:4],
            )  # fmt: skip
        queries = self.ffn_query(queries, backend, seeds[4])
        return torch.cat([queries, self.ffn_text(texts, backend, seeds[5])], dim=1)


class LMHead(nn.Module):
    """BERT's MLM head: dense -> GELU -> LayerNorm -> decoder to the vocabulary."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(F.gelu(self.dense(hidden))))


class QFormer(nn.Module):
    """The trainable stage-1 model: ``ln_vision`` + Q-Former + ITC/ITM/LM heads + temperature."""

    def __init__(self, config: QFormerConfig):
        super().__init__()
        self.config = config
        self.backend = config.backend
        h = config.hidden_size
        self.ln_vision = nn.LayerNorm(config.encoder_width, eps=config.ln_vision_eps)  # on the frozen ViT's output
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, h))
        self.embeddings = Embeddings(config)
        self.layers = nn.ModuleList(Layer(config, i) for i in range(config.num_hidden_layers))
        if config.text_input:
            self.vision_proj = nn.Linear(h, config.embed_dim)
            self.text_proj = nn.Linear(h, config.embed_dim)
            self.itm_head = nn.Linear(h, 2)
            self.lm_head = LMHead(config)
            self.temp = nn.Parameter(torch.tensor(0.07))
        self.reset_parameters()

    # ---------------------------------------------------------------- set-up

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.query_tokens, std=std)
        if self.config.text_input:
            with torch.no_grad():
                self.temp.fill_(0.07)
            self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.text_input and self.config.tie_word_embeddings:
            self.lm_head.decoder.weight = self.embeddings.word.weight

    def set_backend(self, backend: str) -> QFormer:
        self.backend = check_backend(backend)
        return self

    # ---------------------------------------------------------------- checks

    def _check_image(self, image_embeds: torch.Tensor) -> None:
        width = self.config.encoder_width
        if image_embeds.dim() != 3 or image_embeds.shape[-1] != width:
            raise ValueError(
                f"image_embeds must have shape (B, N, {width}) (encoder_width), got {tuple(image_embeds.shape)}"
            )

    def _check_text(self, input_ids: torch.Tensor, mask: torch.Tensor | None, position_offset: int = 0):
        if not self.config.text_input:
            raise ValueError("this Q-Former was built with text_input=False (stage 2): it takes no text")
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an int64 tensor of shape (B, T), got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        limit = self.config.max_position_embeddings
        if position_offset + input_ids.shape[1] > limit:
            raise ValueError(
                f"text of length {position_offset + input_ids.shape[1]} exceeds max_position_embeddings={limit}; "
                f"truncate it to at most {limit} tokens"
            )
        return as_bool_mask(mask, tuple(input_ids.shape), "attention_mask")

    @staticmethod
    def _check_batch(**sizes: int) -> None:
        if len(set(sizes.values())) > 1:
            detail = ", ".join(f"{k}={v}" for k, v in sizes.items())
            raise ValueError(f"batch sizes must match: {detail}")

    # ---------------------------------------------------------------- core pass

    def _encode(
        self,
        hidden: torch.Tensor,
        *,
        n_query_rows: int,
        mask_kind: MaskKind,
        row_valid: torch.Tensor | None,
        image: ImageContext | None = None,
        past: KVCache | None = None,
        weight_cache: dict | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Run every layer over ``hidden`` (B, L, H); return (B, L, H) and the K/V cache extended by these rows.
        ``weight_cache``: see :meth:`Attention.project_qkv`."""
        n_query_keys = past.n_query if past is not None else n_query_rows
        key_valid = row_valid
        if past is not None and (past.valid is not None or row_valid is not None):
            B, L = hidden.shape[:2]
            old = past.valid if past.valid is not None else hidden.new_ones(B, past.length, dtype=torch.bool)
            new = row_valid if row_valid is not None else hidden.new_ones(B, L, dtype=torch.bool)
            key_valid = torch.cat([old, new], dim=1)
        buffer = past.buffer if past is not None and past.can_grow_in_place(hidden.shape[1]) else None
        backend = resolve_backend(self.backend, hidden.device)
        seeds = self._dropout_seeds(backend, hidden.device)
        layers = []
        for i, layer in enumerate(self.layers):
            hidden, kv = layer(
                hidden,
                n_query_rows=n_query_rows,
                mask_kind=mask_kind,
                past=None if past is None else past.layers[i],
                storage=None if buffer is None else (buffer.keys[i], buffer.values[i]),
                n_query_keys=n_query_keys,
                key_padding=key_valid,
                image_kv=None if image is None else image.kv[i],
                image_valid=None if image is None else image.valid,
                backend=backend,
                seeds=None if seeds is None else seeds[i * SEEDS_PER_LAYER : (i + 1) * SEEDS_PER_LAYER],
                weight_cache=weight_cache,
            )
            layers.append(kv)
        if buffer is not None:
            buffer.filled = layers[0][0].shape[2]
        return hidden, KVCache(layers, n_query_keys, key_valid, buffer)

    def _queries(self, batch: int) -> torch.Tensor:
        return self.query_tokens.expand(batch, -1, -1)

    # ---------------------------------------------------------------- public API

    def image_context(self, image_embeds: torch.Tensor, image_mask: torch.Tensor | None = None) -> ImageContext:
        """ln_vision + the K/V projections of every cross-attention layer. image_embeds: (B, N, E)."""
        self._check_image(image_embeds)
        valid = as_bool_mask(image_mask, tuple(image_embeds.shape[:2]), "image_mask")
        x = self.ln_vision(image_embeds.to(self.ln_vision.weight.dtype))
        # every cross-attention layer's K and V by one GEMM over their weights concatenated (per call: the
        # parameters stay each layer's Linears)
        cross = [layer.cross_attn for layer in self.layers if layer.cross_attn is not None]
        if not cross:
            return ImageContext([None] * len(self.layers), valid)
        weight = torch.cat([w for a in cross for w in (a.key.weight, a.value.weight)])
        bias = torch.cat([b for a in cross for b in (a.key.bias, a.value.bias)])
        pack = (tuple(layer.cross_attn is not None for layer in self.layers), self.config.num_attention_heads)
        return ImageContext.from_packed(F.linear(x, weight, bias), pack, valid)

    def _as_context(self, image: torch.Tensor | ImageContext) -> ImageContext:
        return image if isinstance(image, ImageContext) else self.image_context(image)

    def encode_image(self, image: torch.Tensor | ImageContext) -> QueryOutput:
        """Queries attend to each other and, by cross-attention, to the image. Returns (B, Q, H) + cache."""
        ctx = self._as_context(image)
        embeds = self.embeddings(query_embeds=self._queries(ctx.batch_size))
        hidden, cache = self._encode(
            embeds, n_query_rows=self.config.num_query_tokens, mask_kind=MaskKind.UNIMODAL, row_valid=None, image=ctx
        )
        return QueryOutput(hidden, cache)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Text alone (no queries). input_ids: (B, T). Returns (B, T, H)."""
        valid = self._check_text(input_ids, attention_mask)
        hidden, _ = self._encode(
            self.embeddings(input_ids), n_query_rows=0, mask_kind=MaskKind.UNIMODAL, row_valid=valid
        )
        return hidden

    def match(
        self,
        image: torch.Tensor | ImageContext,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        weight_cache: dict | None = None,
    ) -> torch.Tensor:
        """[queries ; text] under BIDIRECTIONAL with cross-attention for the queries. Returns (B, Q + T, H).
        ``weight_cache``: see :meth:`Attention.project_qkv`."""
        ctx = self._as_context(image)
        valid = self._check_text(input_ids, attention_mask)
        self._check_batch(image=ctx.batch_size, input_ids=input_ids.shape[0])
        embeds = self.embeddings(input_ids, query_embeds=self._queries(input_ids.shape[0]))
        row_valid = None
        if valid is not None:
            row_valid = torch.cat([valid.new_ones(valid.shape[0], self.config.num_query_tokens), valid], dim=1)
        hidden, _ = self._encode(
            embeds,
            n_query_rows=self.config.num_query_tokens,
            mask_kind=MaskKind.BIDIRECTIONAL,
            row_valid=row_valid,
            image=ctx,
            weight_cache=weight_cache,
        )
        return hidden

    def decode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        cache: KVCache,
    ) -> tuple[torch.Tensor, KVCache]:
        """Text over the cache under MULTIMODAL_CAUSAL. Returns LM logits (B, T, V) and the grown cache.

        Text positions continue after the text already in the cache (queries take none).
        """
        offset = cache.length - cache.n_query
        valid = self._check_text(input_ids, attention_mask, position_offset=offset)
        self._check_batch(cache=cache.batch_size, input_ids=input_ids.shape[0])
        embeds = self.embeddings(input_ids, position_offset=offset)
        hidden, cache = self._encode(
            embeds, n_query_rows=0, mask_kind=MaskKind.MULTIMODAL_CAUSAL, row_valid=valid, past=cache
        )
        return self.lm_head(hidden), cache

    def encode_itc_itg(
        self,
        image: torch.Tensor | ImageContext,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        decoder_ids: torch.Tensor,
        weight_cache: dict | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Stage 1's ITC and ITG passes as one: (query outputs (B, Q, H), text outputs (B, T, H), LM logits of
        ``decoder_ids`` over the queries (B, T, V)).

        The numbers of ``encode_image``, ``encode_text`` and ``decode`` over the query cache (within fp32
        rounding; each row draws its own dropout), in one pass over [queries ; decoder text ; text]: every
        layer's projections, output blocks and text FFN run once, with bigger GEMMs and half the launches.
        ``decoder_ids`` (B, T) shares ``attention_mask`` with ``input_ids`` (the caption with [DEC] first);
        ``weight_cache``: see :meth:`Attention.project_qkv`.
        """
        ctx = self._as_context(image)
        valid = self._check_text(input_ids, attention_mask)
        if decoder_ids.shape != input_ids.shape:
            raise ValueError(
                f"decoder_ids must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(decoder_ids.shape)}"
            )
        B, T = input_ids.shape
        Q = self.config.num_query_tokens
        self._check_batch(image=ctx.batch_size, input_ids=B)
        emb = self.embeddings
        positions = emb.position(torch.arange(T, device=input_ids.device))
        text = emb.word(torch.cat([decoder_ids, input_ids], dim=1)) + positions.repeat(2, 1)
        hidden = emb.dropout(emb.norm(torch.cat([self._queries(B), text], dim=1)))  # (B, Q + 2T, H)
        decoder_valid = None if valid is None else torch.cat([valid.new_ones(B, Q), valid], dim=1)
        backend = resolve_backend(self.backend, hidden.device)
        seeds = self._dropout_seeds(backend, hidden.device)
        for i, layer in enumerate(self.layers):
            hidden = layer.forward_itc_itg(
                hidden,
                n_query=Q,
                n_text=T,
                decoder_valid=decoder_valid,
                text_valid=valid,
                image_kv=ctx.kv[i],
                image_valid=ctx.valid,
                backend=backend,
                seeds=None if seeds is None else seeds[i * SEEDS_PER_LAYER : (i + 1) * SEEDS_PER_LAYER],
                weight_cache=weight_cache,
            )
        queries, decoder, text = hidden.split([Q, T, T], dim=1)
        return queries, text, self.lm_head(decoder)

    def _dropout_seeds(self, backend: str, device: torch.device) -> tuple[torch.Tensor, ...] | None:
        """Every dropout seed of a pass for the triton kernels, drawn in one launch (None: nothing to draw)."""
        dropout = self.config.hidden_dropout_prob > 0 or self.config.attention_probs_dropout_prob > 0
        if backend == "triton" and self.training and dropout:
            return dropout_seeds(len(self.layers) * SEEDS_PER_LAYER, device)
        return None

    # ---------------------------------------------------------------- heads

    def image_features(self, query_hidden: torch.Tensor) -> torch.Tensor:
        """(B, Q, H) -> (B, Q, embed_dim), L2-normalised."""
        return F.normalize(self.vision_proj(query_hidden), dim=-1)

    def text_features(self, text_hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, embed_dim) from [CLS], L2-normalised."""
        return F.normalize(self.text_proj(text_hidden[:, 0]), dim=-1)

    def itm_logits(self, match_hidden: torch.Tensor) -> torch.Tensor:
        """(B, Q + T, H) -> (B, 2): ``itm_head`` on every query output, averaged over the queries."""
        return self.itm_head(match_hidden[:, : self.config.num_query_tokens]).mean(dim=1)
