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
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    Blip2Config,
    Blip2ForConditionalGeneration,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from blip2_fast.checkpoint import (
    bert_encoder_names,
    qformer_config_from_transformers,
    qformer_config_to_transformers,
    read_transformers_tensors,
    replacing_folder,
    vision_config_from_transformers,
)
from blip2_fast.config import QFormerConfig, VisionConfig
from blip2_fast.stage2 import Blip2Stage2
from blip2_fast.vision import ImageEncoder, hf_vision_config

# Whole modules renamed between our Blip2Stage2 and transformers' Blip2ForConditionalGeneration; the Q-Former's
# own names come from checkpoint.py's map, which stage 1 uses too.
_HF_PREFIXES = (
    ("image_encoder.vit.", "vision_model."),
    ("llm_proj.", "language_projection."),
    ("llm.", "language_model."),
)
_LAVIS_PROJECTIONS = ("opt_proj.", "t5_proj.", "llm_proj.")


# -------------------------------------------------------------------- name maps


def qformer_names(config: QFormerConfig, style: str) -> dict[str, str]:
    """Our stage-2 Q-Former tensors (``qformer.*``) -> their names in a transformers (``style="hf"``) or LAVIS
    (``"lavis"``) stage-2 checkpoint."""
    root = "qformer." if style == "hf" else "Qformer.bert."
    encoder = bert_encoder_names(config, style=style, text_ffn=False)
    names = {f"qformer.{ours}": root + theirs for ours, theirs in encoder.items()}
    names["qformer.query_tokens"] = "query_tokens"
    ln_vision = "vision_model.post_layernorm." if style == "hf" else "ln_vision."
    names.update({f"qformer.ln_vision.{p}": ln_vision + p for p in ("weight", "bias")})
    return names


def hf_names(model: Blip2Stage2) -> dict[str, str]:
    """Every tensor name of ``model`` (tied aliases included) -> its transformers name."""
    qformer = qformer_names(model.qformer.config, "hf")
    names = {}
    for key in model.state_dict():
        if key in qformer:
            names[key] = qformer[key]
            continue
        prefix = next(((ours, theirs) for ours, theirs in _HF_PREFIXES if key.startswith(ours)), None)
        if prefix is None:
            raise ValueError(f"{key!r} has no transformers Blip2ForConditionalGeneration counterpart")
        names[key] = prefix[1] + key.removeprefix(prefix[0])
    return names


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
    return Blip2Config(
        vision_config=hf_vision_config(model.image_encoder.config).to_dict(),
        qformer_config=qformer_config_to_transformers(q).to_dict(),
        text_config=text_config.to_dict(),
        num_query_tokens=q.num_query_tokens,
        image_token_index=token,
    )


# -------------------------------------------------------------------- state dicts


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
    names = {theirs: ours for ours, theirs in hf_names(model).items()}
    ours = {}
    for key, value in read_transformers_tensors(folder).items():
        if not with_vision and key.startswith("vision_model.") and not key.startswith("vision_model.post_layernorm."):
            continue
        if key not in names:
            raise ValueError(f"{folder}: unexpected tensor {key!r} in a Blip2ForConditionalGeneration checkpoint")
        ours[names[key]] = value
    _load_into(model, ours, str(folder))
    return model


def load_pretrained(source: str | Path) -> tuple[Blip2Stage2, PreTrainedTokenizerBase]:
    """A trained stage-2 model and its tokenizer: a ``Blip2ForConditionalGeneration`` folder with its tokenizer
    files, or a stage-2 run folder (its ``transformers/`` export). In eval mode, as ``from_pretrained`` gives."""
    folder = Path(source)
    if not (folder / "config.json").is_file() and (folder / "transformers" / "config.json").is_file():
        folder = folder / "transformers"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{source}: expected a Blip2ForConditionalGeneration folder or a stage-2 run folder")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        raise FileNotFoundError(f"{folder}: no tokenizer files (tokenizer.json / tokenizer_config.json) beside it")
    return load_transformers(folder).eval(), AutoTokenizer.from_pretrained(str(folder))


def is_stage2_folder(path: str | Path) -> bool:
    """Whether ``path`` is what :func:`load_pretrained` reads (rather than a stage-1 output)."""
    path = Path(path)
    for folder in (path, path / "transformers"):
        config = folder / "config.json"
        # every BLIP-2 config.json holds a text_config; only the architecture tells whether an LLM is there
        if config.is_file() and "Blip2ForConditionalGeneration" in (
            json.loads(config.read_text()).get("architectures") or []
        ):
            return True
    return False


def transformers_state_dict(model: Blip2Stage2) -> dict[str, torch.Tensor]:
    """Our tensors under transformers names (tied aliases included)."""
    names = hf_names(model)
    return {names[k]: v for k, v in model.state_dict().items()}


def save_transformers(
    model: Blip2Stage2,
    folder: str | Path,
    *,
    image_token_index: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **save_kwargs: Any,
) -> Path:
    """Write a folder that ``Blip2ForConditionalGeneration.from_pretrained`` loads (its save_pretrained output),
    with ``tokenizer`` beside the model when given; an earlier folder is replaced only once the new one is whole.

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
    with replacing_folder(folder) as scratch:
        shell.save_pretrained(str(scratch), **save_kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(scratch))
    return folder


# -------------------------------------------------------------------- LAVIS


def read_lavis(path: str | Path | Mapping[str, Any], *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of a LAVIS checkpoint (``{"model": sd}`` or a bare state dict), from a file or in memory.
    ``trust_pickle`` reads a file that needs more than weights-only unpickling."""
    if not isinstance(path, Mapping):
        from blip2_fast.checkpoint import _read_pth  # one reader: checkpoint.read_each_pth_once applies

        sd = _read_pth(Path(path), trust_pickle, "LAVIS checkpoint")
        if not sd:
            raise ValueError(f"{path}: expected a LAVIS checkpoint ({{'model': state_dict}}); it holds no state dict")
        return sd
    sd = path.get("model", path)
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
    names = {theirs: ours for ours, theirs in qformer_names(model.qformer.config, "lavis").items()}
    ours: dict[str, torch.Tensor] = {}
    skipped = []
    for key, value in sd.items():
        projection = next((p for p in _LAVIS_PROJECTIONS if key.startswith(p)), None)
        if key in names:
            ours[names[key]] = value
        elif projection is not None:
            ours["llm_proj." + key.removeprefix(projection)] = value
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


def lavis_projection(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """``llm_proj`` weight and bias of a LAVIS state dict (``opt_proj`` / ``t5_proj`` / ``llm_proj``); None for
    a stage-1 checkpoint, which has none."""
    prefix = next((p for p in _LAVIS_PROJECTIONS if p + "weight" in state), None)
    return None if prefix is None else {"weight": state[prefix + "weight"], "bias": state[prefix + "bias"]}


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
        if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            from blip2_fast.stage2 import end_opt_at_newline

            end_opt_at_newline(llm, AutoTokenizer.from_pretrained(str(folder), local_files_only=True))
        elif config.model_type == "opt":
            warnings.warn(
                f"{folder} has no tokenizer files: its OPT keeps EOS {llm.config.eos_token_id}, where LAVIS ends "
                'text at "\\n"; pass eos_token_id to caption()/answer(), or call stage2.end_opt_at_newline',
                stacklevel=2,
            )
    if qformer_config.text_input:
        qformer_config = dataclasses.replace(qformer_config, text_input=False)
    model = Blip2Stage2(qformer_config, llm, image_encoder)
    return model, load_lavis(model, checkpoint)
