"""BLIP-2 stage 2: the Q-Former's query outputs as a soft prompt of a frozen LLM.

Pipeline: frozen image encoder -> ``ln_vision`` + Q-Former (no text parts,
``QFormerConfig(text_input=False)``) -> ``llm_proj`` (H -> LLM width) -> a
frozen transformers LLM. Two LLM families, with LAVIS's semantics
(``blip2_opt.py`` / ``blip2_t5.py``):

- **decoder-only** (OPT, any ``AutoModelForCausalLM``): the LLM reads
  ``[queries ; prompt ; text]``; the LM loss covers the text tokens only
  (queries, prompt and pads are ignored, label -100).
- **encoder-decoder** (FlanT5, any ``AutoModelForSeq2SeqLM``): the encoder reads
  ``[queries ; prompt]``, the decoder is trained on the text.

A training loop needs two things: :class:`Stage2Collator` (samples -> batch of
tensors) and :meth:`Blip2Stage2.loss` (batch -> scalar). Only ``qformer`` and
``llm_proj`` train (:meth:`Blip2Stage2.trainable_state_dict`); the image
encoder and the LLM stay frozen: eval mode, no parameter gradients, half
precision on GPU (:meth:`Blip2Stage2.to_device`). Gradients still flow *through*
the LLM into the soft prompt.

Generation goes through the LLM's own ``generate`` (greedy, beam search,
nucleus sampling, several sequences per image). Decoder-only prompts of
different lengths are packed with LEFT padding, ``[pads ; queries ; prompt]``,
so every row ends where generation starts and positions (derived from the
attention mask) match an unpadded run.

Shapes: B batch, Q queries, P prompt tokens, T text tokens, D LLM width, V LLM vocab.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from blip2_fast.config import QFormerConfig, VisionConfig
from blip2_fast.qformer import QFormer, as_bool_mask
from blip2_fast.vision import ImageEncoder

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label of tokens that carry no loss (transformers' and LAVIS's convention)
VQA_PROMPT = "Question: {} Short answer:"  # BLIP-2's zero-shot VQA template
_MODEL_KEYS = frozenset({"pixels", "image_embeds", "input_ids", "attention_mask", "labels", "decoder_attention_mask"})
_BOOKKEEPING_KEYS = frozenset({"skipped", "texts", "image_ids", "indices"})


@dataclasses.dataclass
class Stage2Output:
    loss: torch.Tensor | None  # scalar: mean cross-entropy over the text tokens
    logits: torch.Tensor  # decoder-only (B, Q + L, V); encoder-decoder (B, T, V)
    labels: torch.Tensor | None  # aligned with ``logits`` (decoder-only: -100 over the queries)


def _freeze(module: nn.Module) -> None:
    module.requires_grad_(False)
    module.eval()


def pack_rows(mask: torch.Tensor, *, left: bool) -> torch.Tensor:
    """(B, L) index that moves each row's real positions to the right (``left`` padding) or left end.

    The sort is stable, so real tokens keep their order; works whatever padding the input had.
    """
    key = mask.long() if left else (~mask).long()
    return torch.sort(key, dim=1, stable=True).indices


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x.gather(1, index)
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


class Blip2Stage2(nn.Module):
    """Frozen image encoder + stage-2 Q-Former + ``llm_proj`` + frozen LLM.

    ``qformer``: a :class:`QFormer` built with ``text_input=False`` (or its config);
    ``llm``: a transformers causal LM or seq2seq LM; ``image_encoder``: an
    :class:`ImageEncoder`, its config, or None when the caller feeds ViT
    features (``image_embeds``) instead of pixels. ``image_token_index`` is the
    LLM token id the transformers layout uses as the placeholder of each query
    (kept for export only; our forward never reads it).
    """

    def __init__(
        self,
        qformer: QFormer | QFormerConfig,
        llm: PreTrainedModel,
        image_encoder: ImageEncoder | VisionConfig | None = None,
        *,
        image_token_index: int | None = None,
    ):
        super().__init__()
        if isinstance(qformer, QFormerConfig):
            qformer = QFormer(qformer)
        if qformer.config.text_input:
            raise ValueError(
                "the stage-2 Q-Former must be built with QFormerConfig(text_input=False); "
                "to start from a stage-1 Q-Former, build the stage-2 model and call load_stage1()"
            )
        if isinstance(image_encoder, VisionConfig):
            image_encoder = ImageEncoder(image_encoder)
        if image_encoder is not None and image_encoder.config.hidden_size != qformer.config.encoder_width:
            raise ValueError(
                f"QFormerConfig.encoder_width ({qformer.config.encoder_width}) must equal the image encoder's "
                f"VisionConfig.hidden_size ({image_encoder.config.hidden_size})"
            )
        if not isinstance(llm, PreTrainedModel) or llm.get_input_embeddings() is None:
            raise ValueError(f"llm must be a transformers PreTrainedModel with input embeddings, got {type(llm)}")
        self.image_encoder = image_encoder
        self.qformer = qformer
        self.llm = llm
        # The LLM's *input embedding* width (OPT's word_embed_proj_dim), which is what inputs_embeds needs.
        self.llm_proj = nn.Linear(qformer.config.hidden_size, llm.get_input_embeddings().embedding_dim)
        nn.init.normal_(self.llm_proj.weight, std=qformer.config.initializer_range)
        nn.init.zeros_(self.llm_proj.bias)
        self.image_token_index = image_token_index
        _freeze(self.llm)
        if self.image_encoder is not None:
            self.image_encoder.freeze()

    # ---------------------------------------------------------------- set-up

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.llm.config, "is_encoder_decoder", False))

    @property
    def num_query_tokens(self) -> int:
        return self.qformer.config.num_query_tokens

    def train(self, mode: bool = True) -> Blip2Stage2:
        super().train(mode)
        self.llm.eval()  # frozen parts never switch dropout on (a frozen ImageEncoder stays in eval by itself)
        return self

    def set_backend(self, backend: str) -> Blip2Stage2:
        self.qformer.set_backend(backend)
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a stage-2 checkpoint holds: ``qformer.*`` (with ``ln_vision``) and ``llm_proj.*``, and
        ``image_encoder.*`` when the ViT trains too (fine-tuning)."""
        trained = ("qformer.", "llm_proj.")
        if self.image_encoder is not None and not self.image_encoder.frozen:
            trained += ("image_encoder.",)
        return {k: v for k, v in self.state_dict().items() if k.startswith(trained)}

    def to_device(self, device: torch.device | str) -> Blip2Stage2:
        """Move to ``device``. On GPU the frozen LLM and image encoder go to bf16 (fp16 without bf16 support);
        the Q-Former and ``llm_proj`` stay fp32 (their optimiser / autocast decides the compute dtype)."""
        device = torch.device(device)
        self.qformer.to(device)
        self.llm_proj.to(device)
        dtype = torch.float32
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.llm.to(device=device, dtype=dtype)
        if self.image_encoder is not None:
            self.image_encoder.to_device(device)
        return self

    # ---------------------------------------------------------------- image side

    def image_features(
        self, pixels: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Frozen ViT features (B, N, E), from pixels (B, 3, S, S) or given directly."""
        if (pixels is None) == (image_embeds is None):
            raise ValueError("give exactly one of pixels (B, 3, S, S) or image_embeds (B, N, encoder_width)")
        if image_embeds is not None:
            return image_embeds
        if self.image_encoder is None:
            raise ValueError("this model has no image encoder: pass image_embeds (B, N, encoder_width)")
        return self.image_encoder(pixels)

    def query_embeds(self, pixels: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None):
        """The soft prompt: Q-Former query outputs through ``llm_proj``, (B, Q, D) in the LLM's dtype."""
        features = self.image_features(pixels, image_embeds)
        hidden = self.qformer.encode_image(features).hidden  # (B, Q, H)
        hidden = hidden.to(self.llm_proj.weight.dtype)
        return self.llm_proj(hidden).to(self.llm.get_input_embeddings().weight.dtype)

    # ---------------------------------------------------------------- checks

    def _check_tokens(self, ids: torch.Tensor | None, mask: torch.Tensor | None, name: str, batch: int):
        """(ids (B, L) int64, mask (B, L) bool); None ids -> an empty (B, 0) sequence."""
        if ids is None:
            if mask is not None:
                raise ValueError(f"{name}_attention_mask given without {name}")
            device = self.llm_proj.weight.device
            return torch.zeros(batch, 0, dtype=torch.long, device=device), torch.ones(
                batch, 0, dtype=torch.bool, device=device
            )
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be an int64 tensor of shape (B, L), got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[0] != batch:
            raise ValueError(f"{name} has batch size {ids.shape[0]}, the images have {batch}")
        vocab = self.llm.get_input_embeddings().num_embeddings
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"{name} must hold token ids in [0, {vocab}) (the LLM's vocabulary)")
        mask_name = "attention_mask" if name == "input_ids" else f"{name}_attention_mask"
        valid = as_bool_mask(mask, tuple(ids.shape), mask_name)
        if valid is None:
            valid = torch.ones_like(ids, dtype=torch.bool)
        return ids.long(), valid

    # ---------------------------------------------------------------- training

    def forward(
        self,
        *,
        pixels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        decoder_attention_mask: torch.Tensor | None = None,
    ) -> Stage2Output:
        """LM logits (and loss when ``labels`` are given).

        Decoder-only: ``input_ids`` (B, L) = prompt + text, ``labels`` (B, L) = the
        same ids with prompt and pads set to -100; the queries are prepended and
        the loss is the next-token cross-entropy over the labelled tokens.
        Encoder-decoder: ``input_ids`` (B, P) = prompt (may be None), ``labels``
        (B, T) = text (pads -100), ``decoder_attention_mask`` (B, T).
        """
        queries = self.query_embeds(pixels, image_embeds)  # (B, Q, D)
        B, Q = queries.shape[:2]
        ids, valid = self._check_tokens(input_ids, attention_mask, "input_ids", B)
        embeds = torch.cat([queries, self.llm.get_input_embeddings()(ids)], dim=1)  # (B, Q + L, D)
        mask = torch.cat([valid.new_ones(B, Q), valid], dim=1)
        if labels is not None and (labels.dim() != 2 or labels.dtype != torch.int64 or labels.shape[0] != B):
            raise ValueError(
                f"labels must be an int64 tensor of shape (B, T) with B={B}, got {labels.dtype} {tuple(labels.shape)}"
            )
        if self.is_encoder_decoder:
            return self._forward_seq2seq(embeds, mask, labels, decoder_attention_mask)
        if labels is not None and labels.shape != ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(ids.shape)}, got {tuple(labels.shape)}")
        logits = self.llm(inputs_embeds=embeds, attention_mask=mask.long()).logits  # (B, Q + L, V)
        if labels is None:
            return Stage2Output(None, logits, None)
        labels = torch.cat([labels.new_full((B, Q), IGNORE_INDEX), labels], dim=1)
        # token t predicts token t + 1
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
        return Stage2Output(loss, logits, labels)

    def _forward_seq2seq(self, embeds, mask, labels, decoder_attention_mask) -> Stage2Output:
        if labels is None:
            raise ValueError("an encoder-decoder LLM needs labels (B, T): the text the decoder is trained on")
        dec_mask = as_bool_mask(decoder_attention_mask, tuple(labels.shape), "decoder_attention_mask")
        if dec_mask is None:
            dec_mask = labels != IGNORE_INDEX
        # the LLM shifts labels right behind its decoder_start_token_id to build the decoder inputs
        out = self.llm(
            inputs_embeds=embeds,
            attention_mask=mask.long(),
            labels=labels,
            decoder_attention_mask=dec_mask.long(),
        )
        logits = out.logits  # (B, T, V)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return Stage2Output(loss, logits, labels)

    def loss(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """The training step's scalar, from a :class:`Stage2Collator` batch (bookkeeping keys are skipped)."""
        unknown = sorted(set(batch) - _MODEL_KEYS - _BOOKKEEPING_KEYS)
        if unknown:
            raise ValueError(f"unknown stage-2 batch key(s) {unknown}; expected some of {sorted(_MODEL_KEYS)}")
        if batch.get("labels") is None:
            raise ValueError("a stage-2 training batch needs labels")
        return self(**{k: v for k, v in batch.items() if k in _MODEL_KEYS}).loss

    # ---------------------------------------------------------------- generation

    def prepare_generation_inputs(
        self,
        pixels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """``inputs_embeds`` (B, Q + P, D) and ``attention_mask`` for the LLM's ``generate``.

        Decoder-only rows are left-padded ``[pads ; queries ; prompt]`` whatever padding
        the prompt came with; with no prompt the LLM's BOS token follows the queries
        (LAVIS's empty prompt). Encoder-decoder rows are ``[queries ; prompt ; pads]``.
        """
        queries = self.query_embeds(pixels, image_embeds)
        B, Q = queries.shape[:2]
        if input_ids is None and not self.is_encoder_decoder:
            bos = self.llm.config.bos_token_id
            if bos is not None:
                input_ids = torch.full((B, 1), bos, dtype=torch.long, device=queries.device)
        ids, valid = self._check_tokens(input_ids, attention_mask, "input_ids", B)
        embeds = torch.cat([queries, self.llm.get_input_embeddings()(ids)], dim=1)
        mask = torch.cat([valid.new_ones(B, Q), valid], dim=1)
        order = pack_rows(mask, left=not self.is_encoder_decoder)
        return {"inputs_embeds": _gather_rows(embeds, order), "attention_mask": _gather_rows(mask, order).long()}

    @torch.no_grad()
    def generate(
        self,
        pixels: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **generate_kwargs: Any,
    ) -> torch.Tensor:
        """Generated token ids (B * num_return_sequences, T_new): the continuation only, no prompt and no
        decoder start token. ``generate_kwargs`` go to the LLM's ``generate`` (num_beams, do_sample, top_p,
        max_new_tokens, num_return_sequences, eos_token_id, ...)."""
        inputs = self.prepare_generation_inputs(pixels, image_embeds, input_ids, attention_mask)
        out = self.llm.generate(**inputs, **generate_kwargs)
        if self.is_encoder_decoder:
            return out[:, 1:]  # drop decoder_start_token_id
        return out  # with inputs_embeds only, decoder-only generate returns the new tokens alone


# -------------------------------------------------------------------- text side


def _token_id(tokenizer: PreTrainedTokenizerBase, given: int | None, attr: str) -> int | None:
    return given if given is not None else getattr(tokenizer, attr)


def _llm_eos(model: Blip2Stage2) -> int | list[int] | None:
    """The LLM's own end of text: its generation config's, then its config's (one id or several)."""
    for source in (getattr(model.llm, "generation_config", None), model.llm.config):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int) or (isinstance(eos, (list, tuple)) and eos):
            return eos if isinstance(eos, int) else list(eos)
    return None


def end_token_id(model: Blip2Stage2, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token that ends this model's training targets, where generation stops too: the LLM's own (its
    generation config, then its config; of several, the tokenizer's EOS if among them, else the first), else
    the tokenizer's EOS. transformers' BLIP-2 OPT checkpoints and LAVIS end OPT's text at "\\n" (see
    :func:`end_opt_at_newline`), not at "</s>"."""
    eos = _llm_eos(model)
    if isinstance(eos, list):
        return tokenizer.eos_token_id if tokenizer.eos_token_id in eos else eos[0]
    return eos if eos is not None else tokenizer.eos_token_id


def end_opt_at_newline(llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Give an OPT LLM loaded from its own folder BLIP-2's end of text, "\\n": LAVIS appends it to OPT's
    training captions and stops generation there, and transformers' BLIP-2 OPT checkpoints carry it as EOS.
    Other LLMs, and tokenizers without a one-token newline, are left as they are."""
    if getattr(llm.config, "model_type", None) != "opt":
        return
    ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
    if len(ids) == 1:
        llm.config.eos_token_id = ids[0]
        if getattr(llm, "generation_config", None) is not None:
            llm.generation_config.eos_token_id = ids[0]


def encode_prompts(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    max_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> (input_ids (B, P), attention_mask (B, P)), LEFT-padded, BOS first and EOS last when given
    (an encoder-decoder's prompt ends with EOS, as T5's tokenizer closes every input). ``max_length`` caps
    each prompt's own tokens, BOS and EOS aside."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        if max_length is not None:
            ids = ids[:max_length]
        bos = [bos_token_id] if bos_token_id is not None else []
        rows.append(bos + ids + ([eos_token_id] if eos_token_id is not None else []))
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
    return input_ids, mask


class Stage2Collator:
    """Samples -> a batch for :meth:`Blip2Stage2.loss`.

    A sample is a mapping with ``pixels`` (3, S, S) or ``image_embeds`` (N, E), ``text``
    or ``caption`` (the target string) and optionally ``prompt`` (else the collator's
    ``prompt``); None samples are dropped and counted in ``skipped``. The batch also
    carries ``texts`` (the target strings). Token layout (LAVIS):

    - decoder-only: ``[BOS] prompt text [EOS]`` packed per row, right-padded; labels
      keep the text and EOS, everything else is -100. EOS defaults to the tokenizer's; pass
      :func:`end_token_id` (the model's end of text, "\\n" for BLIP-2's OPT) so that targets end where
      generation stops, as training does.
    - encoder-decoder: ``input_ids`` = prompt (right-padded), ``labels`` = text + EOS
      (pads -100), ``decoder_attention_mask``.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        encoder_decoder: bool,
        prompt: str = "",
        max_length: int = 32,
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
    ):
        if max_length <= 0:
            raise ValueError(f"max_length must be a positive int, got {max_length}")
        self.tokenizer = tokenizer
        self.encoder_decoder = encoder_decoder
        self.prompt = prompt
        self.max_length = max_length
        self.bos_token_id = None if encoder_decoder else _token_id(tokenizer, bos_token_id, "bos_token_id")
        self.eos_token_id = _token_id(tokenizer, eos_token_id, "eos_token_id")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _right_pad(self, rows: list[list[int]], value: int) -> torch.Tensor:
        width = max(1, max(len(r) for r in rows))
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    def __call__(self, samples: Sequence[Mapping[str, Any] | None]) -> dict[str, Any]:
        kept = [s for s in samples if s is not None]  # datasets return None for unreadable samples
        if not kept:
            raise ValueError(f"no sample left to collate ({len(samples)} given, all None)")
        batch: dict[str, Any] = {}
        for key in ("pixels", "image_embeds"):
            if key in kept[0]:
                batch[key] = torch.stack([s[key] for s in kept])
        if not batch:
            raise ValueError("each stage-2 sample needs 'pixels' (3, S, S) or 'image_embeds' (N, E)")
        prompts, texts, strings = [], [], []
        for s in kept:
            text = s.get("text", s.get("caption"))
            if not isinstance(text, str):
                raise ValueError("each stage-2 sample needs 'text' (or 'caption'): the target string")
            strings.append(text)
            bos = [self.bos_token_id] if self.bos_token_id is not None else []
            # an encoder-decoder's prompt ends with EOS, as T5's tokenizer closes every input (LAVIS)
            closing = (
                [self.tokenizer.eos_token_id]
                if self.encoder_decoder and self.tokenizer.eos_token_id is not None
                else []
            )
            prompt_ids = bos + self._ids(s.get("prompt", self.prompt))
            prompts.append(prompt_ids[: self.max_length - len(closing)] + closing)
            eos = [self.eos_token_id] if self.eos_token_id is not None else []
            texts.append(self._ids(text)[: self.max_length - len(eos)] + eos)
        batch["texts"] = strings
        batch["skipped"] = len(samples) - len(kept)
        if self.encoder_decoder:
            batch["input_ids"] = self._right_pad(prompts, self.pad_token_id)
            batch["attention_mask"] = self._right_pad([[1] * len(p) for p in prompts], 0)
            batch["labels"] = self._right_pad(texts, IGNORE_INDEX)
            batch["decoder_attention_mask"] = self._right_pad([[1] * len(t) for t in texts], 0)
            return batch
        rows = [p + t for p, t in zip(prompts, texts, strict=True)]
        batch["input_ids"] = self._right_pad(rows, self.pad_token_id)
        batch["attention_mask"] = self._right_pad([[1] * len(r) for r in rows], 0)
        batch["labels"] = self._right_pad(
            [[IGNORE_INDEX] * len(p) + t for p, t in zip(prompts, texts, strict=True)], IGNORE_INDEX
        )
        return batch


def generation_kwargs(
    method: str = "beam",
    *,
    num_beams: int = 5,
    top_p: float = 0.9,
    temperature: float = 1.0,
    num_captions: int = 1,
    max_new_tokens: int = 30,
    min_new_tokens: int = 1,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
) -> dict[str, Any]:
    """``generate`` keywords for ``method`` in {"greedy", "beam", "nucleus"} (LAVIS's defaults)."""
    if method not in ("greedy", "beam", "nucleus"):
        raise ValueError(f"unknown generation method {method!r}; expected greedy, beam or nucleus")
    if num_captions < 1:
        raise ValueError(f"num_captions must be >= 1, got {num_captions}")
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        repetition_penalty=repetition_penalty,
        num_return_sequences=num_captions,
    )
    if method == "nucleus":
        kwargs.update(do_sample=True, top_p=top_p, temperature=temperature, num_beams=1)
    elif method == "beam":
        if num_beams < num_captions:
            raise ValueError(f"beam search returns at most num_beams={num_beams} captions, asked {num_captions}")
        kwargs.update(do_sample=False, num_beams=num_beams, length_penalty=length_penalty)
    else:
        if num_captions != 1:
            raise ValueError("greedy decoding gives one caption per image; use beam or nucleus for more")
        kwargs.update(do_sample=False, num_beams=1)
    return kwargs


@torch.no_grad()
def caption(
    model: Blip2Stage2,
    tokenizer: PreTrainedTokenizerBase,
    pixels: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    prompt: str | Sequence[str] = "",
    *,
    images: Sequence[Any] | None = None,
    method: str = "beam",
    eos_token_id: int | None = None,
    **options: Any,
) -> list[str]:
    """Captions (or prompted answers) as strings, ``num_captions`` per image, image-major.

    The images: ``pixels`` (B, 3, S, S), ``image_embeds`` (frozen ViT features), or ``images``, a list of PIL
    images, paths or encoded bytes put through BLIP-2's eval transform. ``prompt``: one string for every image
    or one per image. ``options`` go to :func:`generation_kwargs` (num_beams, top_p, num_captions, ...).
    """
    if images is not None:
        from blip2_fast.data import build_transform, load_pixels

        if pixels is not None or image_embeds is not None or model.image_encoder is None:
            raise ValueError("images need the model's image encoder and replace pixels / image_embeds")
        transform = build_transform(model.image_encoder.config.image_size, train=False)
        pixels = load_pixels(images, transform).to(model.llm_proj.weight.device)
    features = model.image_features(pixels, image_embeds)
    B = features.shape[0]
    prompts = [prompt] * B if isinstance(prompt, str) else list(prompt)
    if len(prompts) != B:
        raise ValueError(f"got {len(prompts)} prompts for {B} images")
    bos = None if model.is_encoder_decoder else model.llm.config.bos_token_id
    closing = tokenizer.eos_token_id if model.is_encoder_decoder else None
    ids, mask = encode_prompts(tokenizer, prompts, bos_token_id=bos, eos_token_id=closing)
    device = model.llm_proj.weight.device
    kwargs = generation_kwargs(method, **options)
    # generation stops at any of the LLM's own end tokens (several, for some chat LLMs)
    eos = next((e for e in (eos_token_id, _llm_eos(model), tokenizer.eos_token_id) if e is not None), None)
    if eos is not None:
        kwargs["eos_token_id"] = eos
    if tokenizer.pad_token_id is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    out = model.generate(image_embeds=features, input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    return [text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True)]


def answer(
    model: Blip2Stage2,
    tokenizer: PreTrainedTokenizerBase,
    questions: Sequence[str],
    pixels: torch.Tensor | None = None,
    image_embeds: torch.Tensor | None = None,
    *,
    images: Sequence[Any] | None = None,
    template: str = VQA_PROMPT,
    method: str = "beam",
    **options: Any,
) -> list[str]:
    """Zero-shot VQA: one question per image, asked through ``template`` (BLIP-2's short-answer prompt)."""
    prompts = [template.format(q) for q in questions]
    return caption(model, tokenizer, pixels, image_embeds, prompts, images=images, method=method, **options)


def shapes_caption_scores(captions: Sequence[str], scenes: Sequence[Any]) -> dict[str, float]:
    """How often a caption's first "<colour> <shape>" names an object of its ``SyntheticShapes`` scene.

    ``scenes``: :meth:`blip2_fast.data.SyntheticShapes.scene` results, one per caption. Returns
    the fraction of captions whose first named colour / shape / (colour, shape) pair belongs to
    one of the two objects, and the fraction with any such phrase. The chance level of these
    scores comes from the references: the held-out reference captions scored against the scenes of
    other images (``train_stage2.chance_scores``), what a captioner that writes like the data but
    ignores the image gets, whatever the model's own captions name.
    """
    from blip2_fast.data import COLOURS, SHAPES

    if len(captions) != len(scenes) or not captions:
        raise ValueError(f"need one scene per caption, got {len(captions)} captions and {len(scenes)} scenes")
    colour = shape = pair = parsed = 0
    for text, scene in zip(captions, scenes, strict=True):
        words = text.split()
        named = [(a, b) for a, b in zip(words[:-1], words[1:], strict=True) if a in COLOURS and b in SHAPES]
        if not named:
            continue
        truth = {(scene.first.colour, scene.first.shape), (scene.second.colour, scene.second.shape)}
        parsed += 1
        colour += named[0][0] in {c for c, _ in truth}
        shape += named[0][1] in {s for _, s in truth}
        pair += named[0] in truth
    n = len(captions)
    return {"colour": colour / n, "shape": shape / n, "pair": pair / n, "parsed": parsed / n}


@torch.no_grad()
def query_spread(
    model: Blip2Stage2, pixels: torch.Tensor | None = None, image_embeds: torch.Tensor | None = None
) -> dict[str, float]:
    """How much the Q-Former's query outputs (B, Q, H) differ across the queries of one image and across images.

    ``across_queries``: the std over the Q queries, averaged over images and channels; ``across_images``: the
    std over the B images, averaged over queries and channels; ``scale``: the std of all outputs. When
    ``across_queries`` is a tiny fraction of ``scale`` the queries have collapsed onto one vector per image,
    and the LLM's soft prompt is that vector repeated Q times (``llm_proj`` maps equal rows to equal rows).
    Evaluated in eval mode (no dropout); the training mode is restored.
    """
    was_training = model.qformer.training
    model.qformer.eval()
    try:
        features = model.image_features(pixels, image_embeds)
        hidden = model.qformer.encode_image(features).hidden.float()  # (B, Q, H)
    finally:
        model.qformer.train(was_training)
    B, Q = hidden.shape[:2]
    return {
        "across_queries": float(hidden.std(1).mean()) if Q > 1 else 0.0,
        "across_images": float(hidden.std(0).mean()) if B > 1 else 0.0,
        "scale": float(hidden.std()),
    }


# -------------------------------------------------------------------- stage-1 init

# stage-1 Q-Former keys with no stage-2 counterpart: the text side and the stage-1 heads
_TEXT_ONLY = ("embeddings.word.", "embeddings.position.", "vision_proj.", "text_proj.", "itm_head.", "lm_head.", "temp")


def _read_state_dict(source: str | Path | Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float | None]:
    """(state dict, ln_vision eps when the file records it)."""
    if isinstance(source, Mapping):
        sd, eps = dict(source), None
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"stage-1 checkpoint not found: {path}")
        eps = None
        if path.suffix == ".safetensors":
            from blip2_fast.checkpoint import naming_damage, read_safetensors, safetensors_metadata

            metadata = safetensors_metadata(path)
            # blip2_fast.checkpoint.save_qformer records it in the metadata or in the config JSON
            with naming_damage(path):
                config = json.loads(metadata.get("qformer_config", "{}"))
                if "ln_vision_eps" in config or "ln_vision_eps" in metadata:
                    eps = float(config.get("ln_vision_eps", metadata.get("ln_vision_eps")))
            sd = read_safetensors(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    # wrappers used by DeepSpeed and LAVIS
    for key in ("module", "model", "state_dict"):
        if key in sd and isinstance(sd[key], Mapping):
            sd = dict(sd[key])
    return sd, eps


def load_stage1(model: Blip2Stage2, source: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
    """Load a stage-1 Q-Former (state dict, ``.pt`` or our ``.safetensors``) into ``model.qformer``.

    Keys may carry a ``qformer.`` or ``module.`` prefix. Every stage-2 Q-Former
    tensor (queries, ``ln_vision``, self/cross-attention, query FFNs, embedding
    LayerNorm) must be present; the text-only stage-1 keys are skipped and
    returned, sorted. Any other key is an error. A ``ln_vision`` eps recorded in
    the file's metadata is applied too.
    """
    raw, eps = _read_state_dict(source)
    sd = {}
    for key, value in raw.items():
        for prefix in ("module.", "qformer."):
            key = key.removeprefix(prefix)
        sd[key] = value
    own = model.qformer.state_dict()
    ignored = sorted(k for k in sd if k not in own and (k.startswith(_TEXT_ONLY) or ".ffn_text." in k))
    unknown = sorted(k for k in sd if k not in own and k not in ignored)
    if unknown:
        raise ValueError(f"stage-1 checkpoint has keys the Q-Former does not know: {unknown[:8]}")
    missing = sorted(k for k in own if k not in sd)
    if missing:
        raise ValueError(f"stage-1 checkpoint lacks stage-2 Q-Former keys: {missing[:8]}")
    for key, value in own.items():
        if value.shape != sd[key].shape:
            raise ValueError(
                f"stage-1 {key} has shape {tuple(sd[key].shape)}, the stage-2 Q-Former expects {tuple(value.shape)}"
            )
    model.qformer.load_state_dict({k: sd[k] for k in own}, strict=True)
    if eps is not None:
        model.qformer.ln_vision.eps = eps
    return ignored


def stage1_configs(init: str | Path) -> tuple[QFormerConfig, VisionConfig | None, Path, Path | None]:
    """Configs and files of a stage-1 output: a run folder (``model.safetensors``, ``vision.safetensors``,
    ``config.yaml``) or a ``model.safetensors`` written by ``blip2_fast.checkpoint.save_qformer``.

    Returns (stage-2 QFormerConfig, VisionConfig or None, model file, vision file or None).
    """
    from blip2_fast.checkpoint import naming_damage, safetensors_metadata
    from blip2_fast.stage1 import run_files

    files = run_files(init)
    metadata = safetensors_metadata(files.model)
    if "qformer_config" not in metadata:
        raise ValueError(f"{files.model}: no 'qformer_config' metadata (expected a save_qformer file)")
    with naming_damage(files.model):
        qformer = QFormerConfig.from_dict({**json.loads(metadata["qformer_config"]), "text_input": False})
    vision_config = files.config.get("model", {}).get("vision")
    vision = VisionConfig.from_dict(vision_config) if isinstance(vision_config, dict) else None
    return qformer, vision, files.model, files.vision


TRAINABLE_FORMAT = "blip2_fast.stage2"


def save_trainable(model: Blip2Stage2, path: str | Path) -> Path:
    """The trained part alone (:meth:`Blip2Stage2.trainable_state_dict`) as safetensors, fp32 or as held, with the
    QFormerConfig, ``ln_vision`` eps and the LLM's config as JSON metadata (the frozen parts are not written)."""
    from blip2_fast.checkpoint import save_tensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_trainable writes a .safetensors file, got {path}")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.trainable_state_dict().items()}
    metadata = {
        "format": TRAINABLE_FORMAT,
        "qformer_config": json.dumps(model.qformer.config.to_dict(), sort_keys=True),
        "ln_vision_eps": repr(float(model.qformer.ln_vision.eps)),
        "llm_config": model.llm.config.to_json_string(use_diff=False),
    }
    return save_tensors(tensors, path, metadata)


def load_trainable(model: Blip2Stage2, path: str | Path) -> None:
    """Load a :func:`save_trainable` file into ``model``: exactly its trainable tensors, same shapes (and the
    ViT's when the file's run trained it)."""
    from blip2_fast.checkpoint import read_safetensors, safetensors_metadata

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"stage-2 checkpoint not found: {path}")
    metadata = safetensors_metadata(path)
    if metadata.get("format") != TRAINABLE_FORMAT:
        raise ValueError(
            f"{path}: expected a {TRAINABLE_FORMAT} safetensors file, got format {metadata.get('format')!r}"
        )
    sd = read_safetensors(path)
    own = model.trainable_state_dict()
    if model.image_encoder is not None and any(k.startswith("image_encoder.") for k in sd):
        own = {**own, **{k: v for k, v in model.state_dict().items() if k.startswith("image_encoder.")}}  # trained
    if sd.keys() != own.keys():
        raise ValueError(
            f"{path}: tensors differ from the model's trainable ones: missing {sorted(own.keys() - sd.keys())[:8]}, "
            f"unexpected {sorted(sd.keys() - own.keys())[:8]}"
        )
    for key, value in sd.items():
        if value.shape != own[key].shape:
            raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}")
    model.load_state_dict(sd, strict=False)
    model.qformer.ln_vision.eps = float(metadata.get("ln_vision_eps", model.qformer.ln_vision.eps))


# -------------------------------------------------------------------- the embedded default


@torch.no_grad()
def default_stage2_model(
    init: str | Path | None = None,
    *,
    qformer_config: QFormerConfig | None = None,
    vision_config: VisionConfig | None = None,
    llm_layers: int = 2,
    llm_hidden: int = 128,
    llm_heads: int = 4,
    max_length: int = 32,
    llm_reader_steps: int = 0,
    seed: int = 0,
    train_size: int = 4000,
) -> tuple[Blip2Stage2, PreTrainedTokenizerBase]:
    """A small stage-2 model that needs no download, and its tokenizer.

    The LLM is an OPT decoder built from an ``OPTConfig``: random, or with ``llm_reader_steps`` > 0 first
    taught to restate the synthetic captions it reads in its context (:func:`blip2_fast.tiny_llm.reader_llm`,
    from ``train_size`` training scenes of ``seed``), as a pretrained LLM would. Its
    vocabulary is the shipped bert-base-uncased WordPiece
    (:func:`blip2_fast.text.load_tokenizer`: 30522 tokens + ``[DEC]``): ``[DEC]`` is
    BOS, ``[SEP]`` EOS, ``[PAD]`` pad and ``[unused0]`` the query placeholder of the
    transformers layout. No GPT-2 BPE files ship offline; WordPiece suits the
    lower-case synthetic captions.

    ``init``: a stage-1 run folder or its ``model.safetensors``: the Q-Former's
    configuration and query path come from it (text-only keys are skipped), and
    the frozen ViT from the folder's ``vision.safetensors`` / ``config.yaml`` when
    present (else a random ViT at std 0.02). Without it: the ``tiny`` Q-Former (stage-2
    variant) over the ``tiny`` ViT, unless configs are given.
    """
    from transformers import OPTForCausalLM

    from blip2_fast.text import load_tokenizer
    from blip2_fast.tiny_llm import opt_config, reader_llm

    model_file = vision_file = None
    if init is not None:
        qformer_config, found_vision, model_file, vision_file = stage1_configs(init)
        vision_config = vision_config or found_vision
        if vision_config is None:
            raise ValueError(f"{init}: no config.yaml with model.vision beside the checkpoint; pass vision_config")
    tokenizer = load_tokenizer(max_length=max_length)
    tokenizer.eos_token = tokenizer.sep_token
    vision_config = vision_config or VisionConfig.preset("tiny")
    if qformer_config is None:
        qformer_config = QFormerConfig.preset("tiny", encoder_width=vision_config.hidden_size)
    qformer_config = dataclasses.replace(qformer_config, text_input=False)
    # A random LLM at OPT's 0.02 caps any tied-embedding logit near 0.02 * hidden = 2.6, flat over 30k tokens:
    # no soft prompt could steer it; 0.2 lets the queries pick words. A taught one starts from OPT's own 0.02.
    config = opt_config(
        tokenizer, layers=llm_layers, hidden=llm_hidden, heads=llm_heads,
        max_positions=qformer_config.num_query_tokens + 2 * max_length + 2, init_std=0.02 if llm_reader_steps else 0.2,
    )  # fmt: skip
    if llm_reader_steps:
        llm = reader_llm(config, tokenizer, steps=llm_reader_steps, seed=seed, train_size=train_size)
    else:
        llm = OPTForCausalLM(config)
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(llm.generation_config, key, getattr(tokenizer, key))
    placeholder = tokenizer.convert_tokens_to_ids("[unused0]")
    model = Blip2Stage2(qformer_config, llm, vision_config, image_token_index=placeholder)
    if model_file is not None:
        ignored = load_stage1(model, model_file)
        logger.info("stage-1 init from %s; skipped text-only keys: %s", model_file, ", ".join(ignored))
        if vision_file is not None:
            from blip2_fast.checkpoint import read_safetensors

            model.image_encoder.load_state_dict(read_safetensors(vision_file))
    return model, tokenizer
