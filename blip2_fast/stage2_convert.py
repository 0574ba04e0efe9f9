"""Stage-2 checkpoint interop: transformers' ``Blip2ForConditionalGeneration`` and LAVIS ``.pth``.

transformers layout (the published blip2-opt / blip2-flan-t5 folders) vs ours:

==========================================================  =======================================
transformers                                                ours (:class:`Blip2Stage2`)
==========================================================  =======================================
``vision_model.*`` (but ``post_layernorm``)                  ``image_encoder.vit.*``
``vision_model.post_layernorm``                             ``qformer.ln_vision`` (BLIP-2's ln_vision)
``query_tokens``                                            ``qformer.query_tokens``
``qformer.layernorm``                                       ``qformer.embeddings.norm``
``qformer.encoder.layer.{i}.attention.attention.{q,k,v}``   ``qformer.layers.{i}.self_attn.{q,k,v}``
``...attention.output.{dense,LayerNorm}``                   ``...self_attn.output.{dense,norm}``
``...crossattention.*``                                     ``...cross_attn.*`` (same inner names)
``...intermediate_query.dense``                             ``...ffn_query.up``
``...output_query.{dense,LayerNorm}``                       ``...ffn_query.{down,norm}``
``language_projection``                                     ``llm_proj``
``language_model.*``                                        ``llm.*``
==========================================================  =======================================

transformers applies ``post_layernorm`` with the vision config's ``layer_norm_eps``;
importing sets ``ln_vision.eps`` to it so the numbers match transformers exactly.

LAVIS (``blip2_opt.py`` / ``blip2_t5.py``) stage-2 checkpoints are ``{"model": sd}``
holding only the trained tensors: ``Qformer.bert.*`` (``attention.self`` for the
projections, ``embeddings.LayerNorm``), ``query_tokens``, ``ln_vision`` and
``opt_proj`` / ``t5_proj``. The frozen LLM comes from its own folder and the
frozen ViT from the caller (LAVIS's EVA layout is not mapped here).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    Blip2Config,
    Blip2ForConditionalGeneration,
    PreTrainedModel,
)

from blip2_fast.checkpoint import qformer_config_from_transformers, vision_config_from_transformers
from blip2_fast.config import QFormerConfig, VisionConfig
from blip2_fast.stage2 import Blip2Stage2
from blip2_fast.vision import ImageEncoder, hf_vision_config

# (transformers name, ours) inside one Q-Former layer; applied to whole dotted components
_LAYER_NAMES = (
    ("attention.attention.", "self_attn."),
    ("attention.output.LayerNorm.", "self_attn.output.norm."),
    ("attention.output.dense.", "self_attn.output.dense."),
    ("crossattention.attention.", "cross_attn."),
    ("crossattention.output.LayerNorm.", "cross_attn.output.norm."),
    ("crossattention.output.dense.", "cross_attn.output.dense."),
    ("intermediate_query.dense.", "ffn_query.up."),
    ("output_query.LayerNorm.", "ffn_query.norm."),
    ("output_query.dense.", "ffn_query.down."),
)
_HF_LAYER = re.compile(r"^qformer\.encoder\.layer\.(\d+)\.(.*)$")
_OUR_LAYER = re.compile(r"^qformer\.layers\.(\d+)\.(.*)$")


# -------------------------------------------------------------------- name maps


def hf_to_ours_key(key: str) -> str | None:
    """Our name for a transformers ``Blip2ForConditionalGeneration`` tensor; None for tensors we do not hold."""
    if key == "query_tokens":
        return "qformer.query_tokens"
    if key.startswith("vision_model.post_layernorm."):
        return "qformer.ln_vision." + key.rsplit(".", 1)[1]
    if key.startswith("vision_model."):
        return "image_encoder.vit." + key.removeprefix("vision_model.")
    if key.startswith("qformer.layernorm."):
        return "qformer.embeddings.norm." + key.rsplit(".", 1)[1]
    if key.startswith("language_projection."):
        return "llm_proj." + key.removeprefix("language_projection.")
    if key.startswith("language_model."):
        return "llm." + key.removeprefix("language_model.")
    match = _HF_LAYER.match(key)
    if match:
        index, rest = match.groups()
        for theirs, ours in _LAYER_NAMES:
            if rest.startswith(theirs):
                return f"qformer.layers.{index}.{ours}{rest.removeprefix(theirs)}"
    return None


def ours_to_hf_key(key: str) -> str:
    """The transformers name of one of our stage-2 tensors."""
    if key == "qformer.query_tokens":
        return "query_tokens"
    if key.startswith("qformer.ln_vision."):
        return "vision_model.post_layernorm." + key.rsplit(".", 1)[1]
    if key.startswith("image_encoder.vit."):
        return "vision_model." + key.removeprefix("image_encoder.vit.")
    if key.startswith("qformer.embeddings.norm."):
        return "qformer.layernorm." + key.rsplit(".", 1)[1]
    if key.startswith("llm_proj."):
        return "language_projection." + key.removeprefix("llm_proj.")
    if key.startswith("llm."):
        return "language_model." + key.removeprefix("llm.")
    match = _OUR_LAYER.match(key)
    if match:
        index, rest = match.groups()
        for theirs, ours in sorted(_LAYER_NAMES, key=lambda pair: -len(pair[1])):  # longest prefix first
            if rest.startswith(ours):
                return f"qformer.encoder.layer.{index}.{theirs}{rest.removeprefix(ours)}"
    raise ValueError(f"{key!r} has no transformers Blip2ForConditionalGeneration counterpart")


def lavis_to_hf_key(key: str) -> str | None:
    """LAVIS stage-2 name -> transformers name (the Q-Former side); None for text-only or unknown keys."""
    if key == "query_tokens":
        return key
    if key.startswith("ln_vision."):
        return "vision_model.post_layernorm." + key.removeprefix("ln_vision.")
    for proj in ("opt_proj.", "t5_proj.", "llm_proj."):
        if key.startswith(proj):
            return "language_projection." + key.removeprefix(proj)
    if key.startswith("Qformer.bert.embeddings.LayerNorm."):
        return "qformer.layernorm." + key.rsplit(".", 1)[1]
    match = re.match(r"^Qformer\.bert\.encoder\.layer\.(\d+)\.(.*)$", key)
    if match:
        index, rest = match.groups()
        rest = re.sub(r"^(attention|crossattention)\.self\.", r"\1.attention.", rest)
        if rest.startswith(tuple(theirs for theirs, _ in _LAYER_NAMES)):
            return f"qformer.encoder.layer.{index}.{rest}"
    return None


# -------------------------------------------------------------------- configs


def hf_config(model: Blip2Stage2, image_token_index: int | None = None) -> Blip2Config:
    """The ``Blip2Config`` of our model (needs its image encoder: the transformers layout always has one)."""
    if model.image_encoder is None:
        raise ValueError("the transformers layout includes the vision model: this Blip2Stage2 has no image_encoder")
    q = model.qformer.config
    token = image_token_index if image_token_index is not None else model.image_token_index
    if token is None:
        raise ValueError(
            "transformers marks the query positions with an LLM token id: pass image_token_index "
            "(a token the prompts never use) or set model.image_token_index"
        )
    text_config = model.llm.config
    width = model.llm_proj.out_features
    if getattr(text_config, "hidden_size", width) != width:
        raise ValueError(
            f"transformers projects the queries to text_config.hidden_size ({text_config.hidden_size}) but this "
            f"LLM's input embeddings are {width} wide; such an LLM has no transformers Blip2 layout"
        )
    vision = hf_vision_config(model.image_encoder.config)
    qformer = dict(
        hidden_size=q.hidden_size,
        num_hidden_layers=q.num_hidden_layers,
        num_attention_heads=q.num_attention_heads,
        intermediate_size=q.intermediate_size,
        hidden_dropout_prob=q.hidden_dropout_prob,
        attention_probs_dropout_prob=q.attention_probs_dropout_prob,
        layer_norm_eps=q.layer_norm_eps,
        initializer_range=q.initializer_range,
        vocab_size=q.vocab_size,
        max_position_embeddings=q.max_position_embeddings,
        pad_token_id=q.pad_token_id,
        cross_attention_frequency=q.cross_attention_freq,
        encoder_hidden_size=q.encoder_width,
    )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer,
        text_config=text_config.to_dict(),
        num_query_tokens=q.num_query_tokens,
        image_token_index=token,
    )


# -------------------------------------------------------------------- state dicts


def _read_folder(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for name in files:
            sd.update(load_file(str(folder / name)))
        return sd
    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if (folder / "pytorch_model.bin").is_file():
        return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{folder}: no model.safetensors(.index.json) or pytorch_model.bin")


def _load_into(model: Blip2Stage2, sd: Mapping[str, torch.Tensor], where: str) -> None:
    """Copy ``sd`` (our names) into ``model``; every tensor of the model must be given, shapes must agree.

    Tied LLM weights (an LM head sharing the input embeddings) may be absent, as save_pretrained leaves them out.
    """
    params = model.state_dict()
    unknown = sorted(set(sd) - set(params))
    if unknown:
        raise ValueError(f"{where}: tensors the model does not hold: {unknown[:8]}")
    tied = {name for name, _ in _tied_llm_names(model)}
    missing = sorted(k for k in params if k not in sd and k not in tied)
    if missing:
        raise ValueError(f"{where}: missing tensors: {missing[:8]}")
    for key, value in sd.items():
        if params[key].shape != value.shape:
            expected = tuple(params[key].shape)
            raise ValueError(f"{where}: {key} has shape {tuple(value.shape)}, the model expects {expected}")
    model.load_state_dict(dict(sd), strict=False)
    model.llm.tie_weights()


def _tied_llm_names(model: Blip2Stage2) -> list[tuple[str, str]]:
    """(alias, source) pairs of our state-dict names that share storage with an earlier name (tied weights)."""
    seen: dict[int, str] = {}
    pairs = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel():
            pairs.append((name, seen[ptr]))
        else:
            seen[ptr] = name
    return pairs


# -------------------------------------------------------------------- transformers folder


def load_transformers(folder: str | Path, *, with_vision: bool = True) -> Blip2Stage2:
    """Our model from a ``Blip2ForConditionalGeneration`` folder (config.json + safetensors / bin).

    ``with_vision=False`` leaves the ViT out (the model then takes ``image_embeds``).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Blip2ForConditionalGeneration folder)")
    hf = Blip2Config.from_pretrained(str(folder), local_files_only=True)
    if hf.model_type != "blip-2":
        raise ValueError(f"{folder}: expected model_type 'blip-2', got {hf.model_type!r}")
    text_config = hf.text_config
    llm_cls = AutoModelForSeq2SeqLM if text_config.is_encoder_decoder else AutoModelForCausalLM
    llm = llm_cls.from_config(text_config)
    raw = hf.to_dict()
    vision = vision_config_from_transformers(raw)
    # post_layernorm (= ln_vision) carries the vision config's eps
    qformer = qformer_config_from_transformers(raw, text_input=False, ln_vision_eps=vision.layer_norm_eps)
    model = Blip2Stage2(
        qformer, llm, ImageEncoder(vision) if with_vision else None, image_token_index=hf.image_token_index
    )
    theirs = _read_folder(folder)
    ours = {}
    for key, value in theirs.items():
        name = hf_to_ours_key(key)
        if name is None:
            raise ValueError(f"{folder}: unexpected tensor {key!r} in a Blip2ForConditionalGeneration checkpoint")
        if name.startswith("image_encoder.") and not with_vision:
            continue
        ours[name] = value
    _load_into(model, ours, str(folder))
    return model


def transformers_state_dict(model: Blip2Stage2) -> dict[str, torch.Tensor]:
    """Our tensors under transformers names (tied aliases included)."""
    return {ours_to_hf_key(k): v for k, v in model.state_dict().items()}


def save_transformers(
    model: Blip2Stage2,
    folder: str | Path,
    *,
    image_token_index: int | None = None,
    **save_kwargs: Any,
) -> Path:
    """Write a folder that ``Blip2ForConditionalGeneration.from_pretrained`` loads (its save_pretrained output).

    The tensors are handed over without a copy: an empty shell is built on the meta device and given ours.
    """
    folder = Path(folder)
    config = hf_config(model, image_token_index)
    with torch.device("meta"):
        shell = Blip2ForConditionalGeneration(config)
    sd = transformers_state_dict(model)
    expected = shell.state_dict()
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected))
    if missing or extra:
        raise ValueError(f"not the Blip2ForConditionalGeneration layout: missing {missing[:8]}, extra {extra[:8]}")
    shell.load_state_dict(sd, strict=True, assign=True)
    shell.tie_weights()
    shell.save_pretrained(str(folder), **save_kwargs)
    return folder


# -------------------------------------------------------------------- LAVIS


def read_lavis(path: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of a LAVIS checkpoint (``{"model": sd}`` or a bare state dict)."""
    if isinstance(path, Mapping):
        data = dict(path)
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"LAVIS checkpoint not found: {path}")
        data = torch.load(path, map_location="cpu", weights_only=True)
    sd = data.get("model", data)
    if not isinstance(sd, Mapping):
        raise ValueError("a LAVIS checkpoint is {'model': state_dict}; 'model' is not a mapping")
    return dict(sd)


def load_lavis(
    model: Blip2Stage2,
    checkpoint: str | Path | Mapping[str, Any],
) -> list[str]:
    """Load a LAVIS stage-2 ``.pth`` into ``model`` (whose LLM and ViT come from elsewhere).

    Every tensor of ``qformer`` and ``llm_proj`` must be in the checkpoint. Returns the
    checkpoint keys that were skipped, sorted: the frozen ViT (``visual_encoder.*``),
    an LLM copy (``opt_model.*`` / ``t5_model.*``), and text-only Q-Former parts
    (word/position embeddings, text FFNs, ``Qformer.cls``). Anything else is an error.
    """
    sd = read_lavis(checkpoint)
    ours: dict[str, torch.Tensor] = {}
    skipped = []
    for key, value in sd.items():
        hf_key = lavis_to_hf_key(key)
        if hf_key is not None:
            name = hf_to_ours_key(hf_key)
            assert name is not None
            ours[name] = value
        elif _lavis_skippable(key):
            skipped.append(key)
        else:
            raise ValueError(f"LAVIS checkpoint key {key!r} has no place in the stage-2 model")
    trainable = {k for k in model.state_dict() if k.startswith(("qformer.", "llm_proj."))}
    missing = sorted(trainable - set(ours))
    if missing:
        raise ValueError(f"LAVIS checkpoint lacks: {missing[:8]}")
    params = model.state_dict()
    for key, value in ours.items():
        if params[key].shape != value.shape:
            raise ValueError(f"LAVIS {key}: shape {tuple(value.shape)}, the model expects {tuple(params[key].shape)}")
    model.load_state_dict(ours, strict=False)
    return sorted(skipped)


def _lavis_skippable(key: str) -> bool:
    if key.startswith(("visual_encoder.", "opt_model.", "t5_model.", "llm_model.", "Qformer.cls.")):
        return True
    if key.startswith(("Qformer.bert.embeddings.word_embeddings.", "Qformer.bert.embeddings.position_")):
        return True
    return bool(re.match(r"^Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\.", key))


def lavis_model(
    checkpoint: str | Path | Mapping[str, Any],
    llm: str | Path | PreTrainedModel,
    qformer_config: QFormerConfig,
    image_encoder: ImageEncoder | VisionConfig | None = None,
) -> tuple[Blip2Stage2, list[str]]:
    """A stage-2 model from a LAVIS ``.pth`` plus the LLM (a local folder or a loaded model).

    Returns the model and the skipped checkpoint keys (see :func:`load_lavis`).
    """
    if not isinstance(llm, PreTrainedModel):
        folder = Path(llm)
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        llm = cls.from_pretrained(str(folder), local_files_only=True)
    if qformer_config.text_input:
        qformer_config = dataclasses.replace(qformer_config, text_input=False)
    model = Blip2Stage2(qformer_config, llm, image_encoder)
    return model, load_lavis(model, checkpoint)
