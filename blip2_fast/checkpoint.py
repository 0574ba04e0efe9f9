"""Checkpoint interop: transformers BLIP-2 folders, LAVIS ``.pth`` files, our own safetensors.

Three sources, one strict rule: every tensor a checkpoint holds lands somewhere
known, and every parameter of ours that no tensor fills is named.

- :func:`load_transformers` reads a folder written by transformers'
  ``save_pretrained`` (``config.json`` + ``model.safetensors``, sharded with an
  index or not; ``pytorch_model.bin`` too) in the layouts of
  ``Blip2ForImageTextRetrieval``, ``Blip2Model``, ``Blip2ForConditionalGeneration``,
  ``Blip2QFormerModel``, ``Blip2TextModelWithProjection`` and
  ``Blip2VisionModelWithProjection``. The configs are derived from ``config.json``.
- :func:`load_lavis` reads a LAVIS ``.pth`` (``{"model": state_dict}`` with
  ``Qformer.bert.*`` keys) and infers the config from the tensor shapes; the
  EVA ``visual_encoder`` is mapped onto the ``Blip2VisionModel`` layout on request.
- :func:`save_qformer` / :func:`load_qformer`: one safetensors file with the
  ``QFormerConfig`` as JSON in its metadata; a tied LM-head decoder is stored once
  and re-tied on load.
- :func:`save_transformers` writes QFormer + ImageEncoder back as a
  ``Blip2ForImageTextRetrieval`` folder (no LM head, no ``temp``: that layout has none).
- :func:`load_checkpoint` picks the reader from the path (folder, ``.pth``, ``.safetensors``).
- :func:`load_vision` reads the image encoder alone from any of these (and from
  LAVIS' bare ``eva_vit_g.pth``), resizing its position embeddings to another
  image size; :func:`save_vision` writes it with its config.

Name correspondence (ours <- transformers <- LAVIS):

================================  ==========================================  =====================================
ours                              transformers                                LAVIS
================================  ==========================================  =====================================
``ln_vision``                     ``vision_model.post_layernorm``             ``ln_vision``
``query_tokens``                  ``query_tokens``                            ``query_tokens``
``embeddings.word/position``      ``embeddings.{word,position}_embeddings``   ``Qformer.bert.embeddings.*``
``embeddings.norm``               ``qformer.layernorm``                       ``Qformer.bert.embeddings.LayerNorm``
``layers.i.self_attn.{q,k,v}``    ``qformer.encoder.layer.i.attention.``      ``...layer.i.attention.self.*``
                                  ``attention.*``
``layers.i.cross_attn``           ``...crossattention.attention.*``           ``...crossattention.self.*``
``layers.i.ffn_query.up/down``    ``...intermediate_query/output_query``      same as transformers
``layers.i.ffn_text.up/down``     ``...intermediate/output``                  same as transformers
``vision_proj`` / ``text_proj``   ``vision_projection`` / ``text_projection`` ``vision_proj`` / ``text_proj``
``lm_head``                       (none)                                      ``Qformer.cls.predictions.*``
================================  ==========================================  =====================================

Parts a layout lacks (the LM head and ``temp`` of a retrieval checkpoint, the
text parts of ``Blip2Model``'s Q-Former) keep their fresh init and are listed in
:attr:`LoadReport.fresh` (and logged); tensors that are not part of the
Q-Former (the language model, its projection) are listed in
:attr:`LoadReport.ignored`; second copies of a tied tensor (a LAVIS LM head's
decoder weight, which is the word embedding) in :attr:`LoadReport.tied`.
Anything else that does not fit is a ``ValueError`` naming the missing keys,
the unexpected keys and the shape mismatches.

transformers' vision ``post_layernorm`` uses the vision config's
``layer_norm_eps`` (1e-6) where LAVIS' ``ln_vision`` uses 1e-5; loading a
transformers folder sets ``ln_vision.eps`` to the folder's value so the numbers
match (``QFormerConfig.ln_vision_eps``).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from blip2_fast.config import QFormerConfig, VisionConfig
from blip2_fast.qformer import QFormer
from blip2_fast.vision import ImageEncoder

logger = logging.getLogger(__name__)

FORMAT = "blip2_fast.qformer"


# ------------------------------------------------------------------ report


@dataclasses.dataclass
class LoadReport:
    """What a load did. Names in ``loaded``/``fresh`` are ours (vision ones start with ``vision.``)."""

    source: str
    layout: str
    loaded: list[str]
    fresh: list[str]  # ours, not in the checkpoint: they keep their fresh init
    ignored: list[str]  # the checkpoint's, not part of the model built (language model, dropped parts)
    notes: list[str] = dataclasses.field(default_factory=list)
    # the checkpoint's second copies of a tied tensor -> the key loaded in their place (the same values)
    tied: dict[str, str] = dataclasses.field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"{self.source} ({self.layout}): {len(self.loaded)} tensors loaded"]
        if self.fresh:
            lines.append(f"fresh init (not in the checkpoint): {', '.join(group_names(self.fresh))}")
        if self.ignored:
            lines.append(f"ignored checkpoint keys: {', '.join(group_names(self.ignored))}")
        # said apart from the ignored keys: a tied LM head is loaded, through the tensor it shares
        for copy, original in self.tied.items():
            lines.append(f"{copy}: tied to {original} (the same tensor, loaded once)")
        lines.extend(self.notes)
        return "\n".join(lines)


@dataclasses.dataclass
class Loaded:
    qformer: QFormer
    vision: ImageEncoder | None
    report: LoadReport


def group_names(names: Iterable[str]) -> list[str]:
    """Collapse per-layer names for messages: ``layers.3.ffn_text.up.weight`` -> ``layers.*.ffn_text.up``."""
    grouped = {re.sub(r"\.(weight|bias)$", "", re.sub(r"\.\d+\.", ".*.", n)) for n in names}
    return sorted(grouped)


def _listing(keys: Iterable[str], limit: int = 40) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


# ------------------------------------------------------------------ tensor sources


class _Tensors:
    """Checkpoint keys -> lazily read tensors, so a multi-GB language model is never read."""

    def __init__(self, getters: dict[str, Callable[[], torch.Tensor]], shapes: dict[str, tuple[int, ...]]):
        self.getters = getters
        self.shapes = shapes

    @classmethod
    def from_dict(cls, state: dict[str, torch.Tensor]) -> _Tensors:
        return cls({k: (lambda v=v: v) for k, v in state.items()}, {k: tuple(v.shape) for k, v in state.items()})

    def keys(self) -> set[str]:
        return set(self.getters)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.getters[key]()

    def rename(self, old: str, new: str) -> None:
        self.getters[new] = self.getters.pop(old)
        self.shapes[new] = self.shapes.pop(old)

    def fuse_qkv_bias(self) -> None:
        """``X.q_bias`` + ``X.v_bias`` -> ``X.qkv.bias`` = [q ; 0 ; v] (EVA and transformers < 5 keep them apart)."""
        for key in sorted(k for k in self.getters if k.endswith(".q_bias")):
            prefix = key[: -len("q_bias")]
            if prefix + "v_bias" not in self.getters:
                continue
            q, v = self.getters.pop(key), self.getters.pop(prefix + "v_bias")
            (n,) = self.shapes.pop(key)
            self.shapes.pop(prefix + "v_bias")

            def fused(q=q, v=v):
                qb, vb = q(), v()
                return torch.cat([qb, torch.zeros_like(qb), vb])

            self.getters[prefix + "qkv.bias"] = fused
            self.shapes[prefix + "qkv.bias"] = (3 * n,)


@contextlib.contextmanager
def naming_damage(path: Path) -> Iterator[None]:
    """Reading ``path`` fails with a ``ValueError`` naming it: a safetensors file cut short or not one at all,
    metadata that is not JSON or holds a config that does not validate (the readers' own errors name none)."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        raise ValueError(f"{path}: not a complete safetensors file (truncated or damaged?): {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata that is not valid JSON ({err})") from None
    except ValueError as err:
        if str(path) in str(err):
            raise
        raise ValueError(f"{path}: {err}") from None


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The metadata of safetensors file ``path`` ({} for none), reading no tensor; damage named."""
    from safetensors import safe_open

    with naming_damage(path), safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of safetensors file ``path``; damage named."""
    from safetensors.torch import load_file

    with naming_damage(path):
        return load_file(str(path))


def _read_folder(folder: Path) -> _Tensors:
    from safetensors import safe_open

    def safetensors_files(files: list[Path]) -> _Tensors:
        getters, shapes = {}, {}
        for file in files:
            with naming_damage(file):
                handle = safe_open(str(file), "pt")  # memory-mapped: reading one tensor reads only its bytes
                for key in handle.keys():
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
                    getters[key] = lambda key=key, handle=handle: handle.get_tensor(key)
        return _Tensors(getters, shapes)

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with naming_damage(index):
            weight_map = json.loads(index.read_text())["weight_map"]
        return safetensors_files(sorted({folder / name for name in weight_map.values()}))
    if (folder / "model.safetensors").is_file():
        return safetensors_files([folder / "model.safetensors"])
    if (folder / "pytorch_model.bin").is_file():
        return _Tensors.from_dict(torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True))
    raise FileNotFoundError(
        f"{folder}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin beside config.json"
    )


def read_transformers_tensors(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a transformers folder (sharded or not, safetensors or .bin), EVA-style ``q_bias`` /
    ``v_bias`` pairs fused into ``qkv.bias`` as transformers 5 names them."""
    tensors = _read_folder(Path(folder))
    tensors.fuse_qkv_bias()
    return {key: tensors[key] for key in tensors.keys()}


# ------------------------------------------------------------------ name maps (ours -> theirs)


def bert_encoder_names(config: QFormerConfig, *, style: str, text_ffn: bool) -> dict[str, str]:
    """Our encoder parameters -> BERT-style names under the Q-Former root (``qformer.`` / ``Qformer.bert.``).

    ``style`` is ``"hf"`` (``attention.attention``, ``layernorm``) or ``"lavis"``
    (``attention.self``, ``embeddings.LayerNorm``).
    """
    inner = "attention" if style == "hf" else "self"
    norm = "layernorm" if style == "hf" else "embeddings.LayerNorm"
    names = {f"embeddings.norm.{p}": f"{norm}.{p}" for p in ("weight", "bias")}
    for i in range(config.num_hidden_layers):
        ours, theirs = f"layers.{i}.", f"encoder.layer.{i}."
        blocks = {"self_attn": "attention"}
        if config.has_cross_attention(i):
            blocks["cross_attn"] = "crossattention"
        ffns = {"ffn_query": ("intermediate_query", "output_query")}
        if text_ffn:
            ffns["ffn_text"] = ("intermediate", "output")
        for p in ("weight", "bias"):
            for mine, block in blocks.items():
                for proj in ("query", "key", "value"):
                    names[f"{ours}{mine}.{proj}.{p}"] = f"{theirs}{block}.{inner}.{proj}.{p}"
                names[f"{ours}{mine}.output.dense.{p}"] = f"{theirs}{block}.output.dense.{p}"
                names[f"{ours}{mine}.output.norm.{p}"] = f"{theirs}{block}.output.LayerNorm.{p}"
            for mine, (up, down) in ffns.items():
                names[f"{ours}{mine}.up.{p}"] = f"{theirs}{up}.dense.{p}"
                names[f"{ours}{mine}.down.{p}"] = f"{theirs}{down}.dense.{p}"
                names[f"{ours}{mine}.norm.{p}"] = f"{theirs}{down}.LayerNorm.{p}"
    return names


def _linear(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.{p}": f"{theirs}.{p}" for p in ("weight", "bias")}


def _vision_names(vision: ImageEncoder, prefix: str) -> dict[str, str]:
    """Our ImageEncoder wraps a Blip2VisionModel as ``vit``: names match one to one under ``prefix``."""
    return {f"vision.{k}": prefix + k.removeprefix("vit.") for k, _ in vision.named_parameters()}


# ------------------------------------------------------------------ the mapping engine


def _targets(qformer: QFormer | None, vision: ImageEncoder | None) -> dict[str, torch.Tensor]:
    # named_parameters() lists a tied parameter once, under its first name (embeddings.word.weight)
    targets = dict(qformer.named_parameters()) if qformer is not None else {}
    if vision is not None:
        targets.update({f"vision.{k}": p for k, p in vision.named_parameters()})
    return targets


def _apply(
    names: dict[str, str],
    tensors: _Tensors,
    qformer: QFormer | None,
    vision: ImageEncoder | None,
    *,
    source: str,
    layout: str,
    droppable: set[str],
    ignorable: Callable[[str], bool],
    tied: dict[str, str] | None = None,
) -> LoadReport:
    """Copy ``tensors[names[ours]]`` into each of our parameters, strictly.

    ``names``: ours -> checkpoint key, for everything the layout holds. Entries whose
    parameter does not exist in the model built (``text_input=False``, no vision
    encoder) are dropped and their keys reported as ignored, as are checkpoint keys
    in ``droppable`` or matching ``ignorable``. ``tied``: checkpoint keys that are a
    second copy of another (checked equal by the caller), reported as tied when that
    other one loads (else as ``droppable`` says). Any other checkpoint key is
    unexpected; a mapped key absent from the checkpoint is missing.
    """
    targets = _targets(qformer, vision)
    present = {ours: key for ours, key in names.items() if ours in targets}
    loads = set(present.values())
    tied = {copy: original for copy, original in (tied or {}).items() if copy in tensors.keys() and original in loads}
    dropped = {key for ours, key in names.items() if ours not in targets}
    available = tensors.keys()
    missing = sorted(key for key in present.values() if key not in available)
    expected = set(present.values()) | set(tied)
    ignored = sorted(k for k in available if k not in expected and (k in dropped or k in droppable or ignorable(k)))
    unexpected = sorted(available - expected - set(ignored))
    mismatched = [
        f"{key} (checkpoint {tensors.shapes[key]}, model {tuple(targets[ours].shape)} for {ours})"
        for ours, key in sorted(present.items())
        if key in available and tensors.shapes[key] != tuple(targets[ours].shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_listing(unexpected)}")
        if mismatched:
            problems.append(f"shape mismatches: {_listing(mismatched)}")
        into = "QFormer" if qformer is not None else "ImageEncoder"
        raise ValueError(f"{source}: cannot load the {layout} layout into {into}; " + "; ".join(problems))
    with torch.no_grad():
        for ours, key in present.items():
            targets[ours].copy_(tensors[key])
    fresh = sorted(set(targets) - set(present))
    report = LoadReport(source, layout, sorted(present), fresh, ignored, tied=dict(sorted(tied.items())))
    if fresh:
        logger.warning("%s: kept the fresh init of %s", source, ", ".join(group_names(fresh)))
    if ignored:
        logger.info("%s: ignored %s", source, ", ".join(group_names(ignored)))
    return report


# ------------------------------------------------------------------ transformers


# Which parts each architecture holds besides the Q-Former encoder.
_HF_PARTS: dict[str, frozenset[str]] = {
    "Blip2ForImageTextRetrieval": frozenset(
        {"vision", "queries", "text_embeddings", "vision_proj", "text_proj", "itm"}
    ),
    "Blip2Model": frozenset({"vision", "queries"}),
    "Blip2ForConditionalGeneration": frozenset({"vision", "queries"}),
    "Blip2TextModelWithProjection": frozenset({"queries", "text_embeddings", "text_proj"}),
    "Blip2VisionModelWithProjection": frozenset({"vision", "queries", "vision_proj"}),
    "Blip2QFormerModel": frozenset(),
}
# The language model and its input projection are not part of the Q-Former.
_HF_FOREIGN = ("language_model.", "language_projection.")


def _is_buffer_key(key: str) -> bool:
    return key.endswith("position_ids")  # a non-trainable arange some versions save


def _hf_architecture(raw: dict[str, Any], architecture: str | None, folder: Path) -> str:
    if architecture is None:
        names = [a for a in raw.get("architectures") or [] if a in _HF_PARTS]
        if names:
            architecture = names[0]
        elif raw.get("model_type") == "blip_2_qformer":
            architecture = "Blip2QFormerModel"
        else:
            raise ValueError(
                f"{folder}/config.json names no supported architecture ({raw.get('architectures')!r}); "
                f"pass architecture= one of {', '.join(_HF_PARTS)}"
            )
    if architecture not in _HF_PARTS:
        raise ValueError(f"unsupported architecture {architecture!r}; expected one of {', '.join(_HF_PARTS)}")
    return architecture


def _transformers_names(
    layout: str, config: QFormerConfig, *, text_ffn: bool, vision: ImageEncoder | None
) -> dict[str, str]:
    """Ours -> transformers keys for everything ``layout`` holds (the vision model only if ``vision`` is given)."""
    parts = _HF_PARTS[layout]
    root = "" if layout == "Blip2QFormerModel" else "qformer."
    names = {ours: root + key for ours, key in bert_encoder_names(config, style="hf", text_ffn=text_ffn).items()}
    if "queries" in parts:
        names["query_tokens"] = "query_tokens"
    if "text_embeddings" in parts:
        names["embeddings.word.weight"] = "embeddings.word_embeddings.weight"
        names["embeddings.position.weight"] = "embeddings.position_embeddings.weight"
    if "vision_proj" in parts:
        names.update(_linear("vision_proj", "vision_projection"))
    if "text_proj" in parts:
        names.update(_linear("text_proj", "text_projection"))
    if "itm" in parts:
        names.update(_linear("itm_head", "itm_head"))
    if "vision" in parts:
        names.update(_linear("ln_vision", "vision_model.post_layernorm"))
        if vision is not None:
            names.update(_vision_names(vision, "vision_model."))
    return names


def qformer_config_from_transformers(raw: dict[str, Any], **overrides: Any) -> QFormerConfig:
    """QFormerConfig from a transformers ``config.json`` (a ``blip-2`` config or a bare ``blip_2_qformer`` one).

    A bare Q-Former config has no query count or ITC width: they keep our defaults
    unless given in ``overrides`` (any QFormerConfig key).
    """
    from transformers import Blip2Config, Blip2QFormerConfig

    if raw.get("model_type") == "blip_2_qformer" or "qformer_config" not in raw:
        q = Blip2QFormerConfig.from_dict(raw)
        top: dict[str, Any] = {}
    else:
        full = Blip2Config.from_dict(raw)
        q = full.qformer_config
        top = dict(num_query_tokens=full.num_query_tokens, embed_dim=full.image_text_hidden_size)
    if q.hidden_act != "gelu":
        raise ValueError(f"qformer_config.hidden_act: the Q-Former uses 'gelu' (erf), got {q.hidden_act!r}")
    if getattr(q, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(
            f"qformer_config.position_embedding_type must be 'absolute', got {q.position_embedding_type!r}"
        )
    fields = dict(
        hidden_size=q.hidden_size,
        num_hidden_layers=q.num_hidden_layers,
        num_attention_heads=q.num_attention_heads,
        intermediate_size=q.intermediate_size,
        hidden_dropout_prob=float(q.hidden_dropout_prob),
        attention_probs_dropout_prob=float(q.attention_probs_dropout_prob),
        layer_norm_eps=q.layer_norm_eps,
        initializer_range=q.initializer_range,
        vocab_size=q.vocab_size,
        max_position_embeddings=q.max_position_embeddings,
        pad_token_id=q.pad_token_id if q.pad_token_id is not None else 0,
        cross_attention_freq=q.cross_attention_frequency,
        encoder_width=q.encoder_hidden_size,
        chunk_size_feed_forward=getattr(q, "chunk_size_feed_forward", 0) or 0,
        **top,
    )
    return QFormerConfig(**{**fields, **overrides})


def vision_config_from_transformers(raw: dict[str, Any]) -> VisionConfig:
    """VisionConfig from a transformers ``blip-2`` ``config.json`` (its ``vision_config``)."""
    from transformers import Blip2Config

    v = Blip2Config.from_dict(raw).vision_config
    if v.hidden_act != "gelu":
        raise ValueError(f"vision_config.hidden_act: the image encoder uses 'gelu' (erf), got {v.hidden_act!r}")
    return VisionConfig(
        hidden_size=v.hidden_size,
        intermediate_size=v.intermediate_size,
        num_hidden_layers=v.num_hidden_layers,
        num_attention_heads=v.num_attention_heads,
        image_size=v.image_size,
        patch_size=v.patch_size,
        layer_norm_eps=v.layer_norm_eps,
        qkv_bias=v.qkv_bias,
    )


def load_transformers(
    path: str | Path,
    *,
    architecture: str | None = None,
    vision: bool = True,
    **overrides: Any,
) -> Loaded:
    """Load a transformers BLIP-2 folder into our QFormer (+ ImageEncoder when it holds a vision model).

    ``architecture`` defaults to the folder's ``config.json``; ``vision=False``
    skips the image encoder (its tensors are reported as ignored, ``ln_vision``
    still loads). ``overrides`` set QFormerConfig keys (``backend``,
    ``text_input=False`` for a stage-2 Q-Former without text parts, ...).
    """
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a transformers folder (no config.json)")
    raw = json.loads((folder / "config.json").read_text())
    layout = _hf_architecture(raw, architecture, folder)
    parts = _HF_PARTS[layout]
    encoder: ImageEncoder | None = None
    notes = []
    if "vision" in parts:
        vision_config = vision_config_from_transformers(raw)
        # post_layernorm (= ln_vision) carries the vision config's eps, not LayerNorm's default
        overrides = {"ln_vision_eps": vision_config.layer_norm_eps, **overrides}
        notes.append(f"ln_vision_eps = {vision_config.layer_norm_eps} (vision_config.layer_norm_eps)")
        if vision:
            encoder = ImageEncoder(vision_config)
    config = qformer_config_from_transformers(raw, **overrides)
    model = QFormer(config)

    q_raw = raw if layout == "Blip2QFormerModel" else raw.get("qformer_config", {})
    text_ffn = bool(q_raw.get("use_qformer_text_input", False))
    names = _transformers_names(layout, config, text_ffn=text_ffn, vision=encoder)
    tensors = _read_folder(folder)
    droppable: set[str] = set()
    if "vision" in parts:
        tensors.fuse_qkv_bias()
        if encoder is None:
            droppable |= {k for k in tensors.keys() if k.startswith("vision_model.") and "post_layernorm" not in k}

    def ignorable(key: str) -> bool:
        return key.startswith(_HF_FOREIGN) or _is_buffer_key(key)

    report = _apply(
        names, tensors, model, encoder, source=str(folder), layout=layout, droppable=droppable, ignorable=ignorable
    )
    report.notes.extend(notes)
    return Loaded(model, encoder, report)


def qformer_config_to_transformers(config: QFormerConfig):
    """transformers' ``Blip2QFormerConfig`` of our QFormerConfig (the inverse of qformer_config_from_transformers)."""
    from transformers import Blip2QFormerConfig

    return Blip2QFormerConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        intermediate_size=config.intermediate_size,
        hidden_act="gelu",
        hidden_dropout_prob=config.hidden_dropout_prob,
        attention_probs_dropout_prob=config.attention_probs_dropout_prob,
        max_position_embeddings=config.max_position_embeddings,
        initializer_range=config.initializer_range,
        layer_norm_eps=config.layer_norm_eps,
        pad_token_id=config.pad_token_id,
        cross_attention_frequency=config.cross_attention_freq,
        encoder_hidden_size=config.encoder_width,
        use_qformer_text_input=config.text_input,
    )


def transformers_config(config: QFormerConfig, vision_config: VisionConfig) -> dict[str, Any]:
    """The ``config.json`` of a transformers ``Blip2ForImageTextRetrieval`` equal to our QFormer + ImageEncoder."""
    from transformers import Blip2Config

    from blip2_fast.vision import hf_vision_config

    if vision_config.hidden_size != config.encoder_width:
        raise ValueError(
            f"VisionConfig.hidden_size ({vision_config.hidden_size}) must equal QFormerConfig.encoder_width "
            f"({config.encoder_width}): transformers derives one from the other"
        )
    full = Blip2Config(
        vision_config=hf_vision_config(vision_config).to_dict(),
        qformer_config=qformer_config_to_transformers(config).to_dict(),
        num_query_tokens=config.num_query_tokens,
        image_text_hidden_size=config.embed_dim,
        initializer_range=config.initializer_range,
    )
    full.architectures = ["Blip2ForImageTextRetrieval"]
    return full.to_dict()


def save_transformers(qformer: QFormer, vision: ImageEncoder, folder: str | Path) -> list[str]:
    """Write ``qformer`` + ``vision`` as a transformers ``Blip2ForImageTextRetrieval`` folder.

    That layout has no LM head and no temperature: those parameters are left out
    and their names returned (and logged). transformers' ``post_layernorm`` takes the
    vision config's eps; a different ``ln_vision.eps`` is logged, since it shifts the
    numbers slightly.
    """
    from safetensors.torch import save_file

    if not qformer.config.text_input:
        raise ValueError("Blip2ForImageTextRetrieval needs the text parts: this QFormer has text_input=False")
    folder = Path(folder)
    config = transformers_config(qformer.config, vision.config)
    names = _transformers_names("Blip2ForImageTextRetrieval", qformer.config, text_ffn=True, vision=vision)
    targets = _targets(qformer, vision)
    tensors = {key: targets[ours].detach().contiguous().cpu() for ours, key in names.items()}
    left_out = sorted(set(targets) - set(names))
    if left_out:
        logger.warning("%s: Blip2ForImageTextRetrieval has no place for %s", folder, ", ".join(group_names(left_out)))
    if qformer.config.ln_vision_eps != vision.config.layer_norm_eps:
        logger.warning(
            "%s: ln_vision.eps %g is written as post_layernorm with the vision eps %g",
            folder,
            qformer.config.ln_vision_eps,
            vision.config.layer_norm_eps,
        )
    with replacing_folder(folder) as scratch:
        (scratch / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(scratch / "model.safetensors"), metadata={"format": "pt"})
    return left_out


# ------------------------------------------------------------------ LAVIS

_LAVIS_ROOT = "Qformer.bert."
# Stage-2 LAVIS models carry their LLM (or at least its projection) in the same state dict.
_LAVIS_FOREIGN = ("opt_model.", "t5_model.", "llm_model.", "opt_proj.", "t5_proj.", "llm_proj.")


_pth_memo: contextvars.ContextVar[dict[tuple[Path, bool], dict[str, torch.Tensor]] | None] = contextvars.ContextVar(
    "pth_memo", default=None
)


@contextlib.contextmanager
def read_each_pth_once():
    """Within the block a ``.pth`` is read once, however many loaders take from it (a LAVIS file gives the
    Q-Former, the ViT and the projection: each a read of several GB otherwise). The tensors are shared,
    never changed in place by a loader. The memo ends with the outermost block; it is the caller's context's
    own, so threads do not share it."""
    token = _pth_memo.set({} if _pth_memo.get() is None else _pth_memo.get())
    try:
        yield
    finally:
        _pth_memo.reset(token)


def _read_pth(path: Path, trust_pickle: bool, what: str) -> dict[str, torch.Tensor]:
    """The state dict of a ``.pth`` (LAVIS' ``{"model": state_dict}`` or a bare one); {} if it holds none."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    key, memo = (path.resolve(), trust_pickle), _pth_memo.get()
    if memo is not None and key in memo:
        return dict(memo[key])  # a dict of its own: callers may drop keys
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except Exception as err:  # pickle errors come in many types
        raise ValueError(unreadable_pickle(path, err)) from err
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    state = dict(state) if isinstance(state, dict) else {}
    if memo is not None:
        memo[key] = state
    return dict(state)


def check_weights_only(path: str | Path, allowed: Iterable[type] = ()) -> None:
    """Refuse ``path`` (a ``ValueError`` naming it) unless it unpickles weights-only: tensors, plain containers
    and the ``allowed`` classes. For files that something else then reads with full pickle (DeepSpeed's),
    whose code would otherwise run. Tensors are memory-mapped, not read."""
    allowed = list(allowed)
    try:
        with torch.serialization.safe_globals(allowed):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # pickle errors come in many types
        raise ValueError(unreadable_pickle(Path(path), err, allowed)) from None


def unreadable_pickle(path: Path, err: Exception, allowed: Iterable[type] = ()) -> str:
    """One line on why ``torch.load(path, weights_only=True)`` failed: objects that would run code (named), or
    a damaged file."""
    try:  # lists the globals a pickle names without running any
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        found = []
    known = {f"{t.__module__}.{t.__qualname__}" for t in allowed}
    unsafe = sorted(set(found) - known)
    if unsafe:
        return (
            f"{path}: refused: it holds objects other than tensors and plain containers ({', '.join(unsafe)}), "
            "and unpickling those can run any code"
        )
    text = " ".join(str(err).split())
    if "WeightsUnpickler error:" in text:  # torch's advice around it would be to load unsafely: left out
        detail = text.split("WeightsUnpickler error:", 1)[1].split(" Check the documentation")[0].strip()
        return f"{path}: refused by the weights-only reader (which runs no code): {detail}"
    first = text.split(". ")[0] or type(err).__name__
    return f"{path}: not a complete PyTorch weights file (truncated or damaged?): {first}"


def _read_lavis(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    state = _read_pth(path, trust_pickle, "LAVIS checkpoint")
    if not any(k.startswith(_LAVIS_ROOT) for k in state):
        raise ValueError(f"{path}: expected {{'model': state_dict}} with {_LAVIS_ROOT}* keys (a LAVIS BLIP-2 .pth)")
    return state


def _layer_indices(keys: Iterable[str], pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return sorted(found)


# (hidden size, layers, FFN width) of the only Q-Former LAVIS' BLIP-2 models use: BERT-base, with its 12 heads
BLIP2_QFORMER_SHAPES = (768, 12, 3072)
BLIP2_QFORMER_HEADS = 12


def lavis_config(
    state: dict[str, torch.Tensor],
    *,
    num_attention_heads: int | None = None,
    source: str = "LAVIS state dict",
    **overrides: Any,
) -> QFormerConfig:
    """QFormerConfig inferred from a LAVIS state dict's shapes.

    Shapes give hidden size, layers, FFN width, image-feature width, number of
    queries, vocabulary, positions, ITC width and which layers cross-attend. The
    head count cannot be read from shapes: ``num_attention_heads`` defaults to 12
    when the shapes are BLIP-2's BERT-base (hidden 768, 12 layers, FFN 3072) and
    must be given for any other layout (a ``ValueError`` naming ``source`` says so).
    ``overrides`` set any QFormerConfig key.
    """

    def shape(key: str) -> tuple[int, ...] | None:
        return tuple(state[key].shape) if key in state else None

    def need(key: str) -> tuple[int, ...]:
        if key not in state:
            raise ValueError(f"{source}: missing key {key} (needed to infer the config)")
        return tuple(state[key].shape)

    enc = _LAVIS_ROOT + "encoder.layer."
    layers = _layer_indices(state, re.escape(enc) + r"(\d+)\.")
    if not layers or layers != list(range(len(layers))):
        raise ValueError(f"{source}: expected {enc}0 ... {enc}N-1 keys, found layers {layers}")
    cross = _layer_indices(state, re.escape(enc) + r"(\d+)\.crossattention\.")
    if not cross or cross[0] != 0:
        raise ValueError(f"{source}: expected cross-attention in layer 0, found it in layers {cross}")
    freq = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if cross != list(range(0, len(layers), freq)):
        raise ValueError(f"{source}: cross-attention in layers {cross} is not every k-th layer from 0")
    query = shape("query_tokens")
    if query is None or len(query) != 3:
        raise ValueError(f"{source}: expected query_tokens of shape (1, Q, H)")
    fields: dict[str, Any] = dict(
        hidden_size=query[2],
        num_query_tokens=query[1],
        num_hidden_layers=len(layers),
        intermediate_size=need(f"{enc}0.intermediate_query.dense.weight")[0],
        cross_attention_freq=freq,
        encoder_width=need(f"{enc}0.crossattention.self.key.weight")[1],
    )
    fields["num_attention_heads"] = _lavis_heads(fields, num_attention_heads, source)
    word = shape(_LAVIS_ROOT + "embeddings.word_embeddings.weight")
    position = shape(_LAVIS_ROOT + "embeddings.position_embeddings.weight")
    if word is not None:
        fields["vocab_size"] = word[0]
    if position is not None:
        fields["max_position_embeddings"] = position[0]
    proj = shape("vision_proj.weight") or shape("text_proj.weight")
    if proj is not None:
        fields["embed_dim"] = proj[0]
    decoder = state.get("Qformer.cls.predictions.decoder.weight")
    if decoder is not None and word is not None:
        fields["tie_word_embeddings"] = bool(
            torch.equal(decoder, state[_LAVIS_ROOT + "embeddings.word_embeddings.weight"])
        )
    return QFormerConfig(**{**fields, **overrides})


def _lavis_heads(fields: dict[str, Any], given: int | None, source: str) -> int:
    """The head count of a LAVIS Q-Former: ``given``, else BERT-base's 12 when the shapes are BLIP-2's."""
    if given is not None:
        return given
    found = (fields["hidden_size"], fields["num_hidden_layers"], fields["intermediate_size"])
    if found == BLIP2_QFORMER_SHAPES:
        return BLIP2_QFORMER_HEADS
    raise ValueError(
        f"{source}: a Q-Former of hidden size {found[0]}, {found[1]} layers, FFN width {found[2]} (not BLIP-2's "
        f"BERT-base {'/'.join(map(str, BLIP2_QFORMER_SHAPES))}, which has {BLIP2_QFORMER_HEADS} heads): its head "
        "count cannot be read from shapes; pass num_attention_heads=N (model.qformer.num_attention_heads in a "
        "training config, --num-heads N on the command line)"
    )


def _eva_to_blip2_vision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EVA ViT keys (``visual_encoder.*``) -> transformers' Blip2VisionModel keys (``vision_model.*``).

    The correspondence is the one transformers' BLIP-2 conversion script applies.
    Keys it does not know keep their name and so surface as unexpected.
    """
    fixed = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    }
    block = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn.qkv": "self_attn.qkv",
        "attn.q_bias": "self_attn.q_bias",
        "attn.v_bias": "self_attn.v_bias",
        "attn.proj": "self_attn.projection",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    out = {}
    for key, value in state.items():
        name = key.removeprefix("visual_encoder.")
        new = None
        if name in fixed:
            new = fixed[name]
        elif m := re.match(r"blocks\.(\d+)\.(.+?)(\.weight|\.bias)?$", name):
            index, part, suffix = m.group(1), m.group(2), m.group(3) or ""
            if part in block:
                new = f"encoder.layers.{index}.{block[part]}{suffix}"
        out["vision_model." + new if new else key] = value
    return out


def eva_vision_config(
    state: dict[str, torch.Tensor], *, num_attention_heads: int = 16, source: str = "LAVIS state dict"
) -> VisionConfig:
    """VisionConfig of an EVA ``visual_encoder.*`` state dict (EVA ViT-g: 1408 wide, 16 heads of 88)."""
    v = "visual_encoder."
    if v + "cls_token" not in state or v + "patch_embed.proj.weight" not in state:
        raise ValueError(
            f"{source}: no EVA ViT ({v}cls_token, {v}patch_embed.proj.weight): LAVIS leaves the frozen EVA ViT out "
            "of its checkpoints; supply it apart (LAVIS' eva_vit_g.pth, or any source load_vision reads) with "
            "--vision on the command line, model.vision_weights in a training config or "
            "Blip2Stage1.from_pretrained(..., vision=load_vision(...)); or load the Q-Former alone (vision=False)"
        )
    hidden = state[v + "cls_token"].shape[-1]
    patch = state[v + "patch_embed.proj.weight"].shape[-1]
    side = math.isqrt(state[v + "pos_embed"].shape[1] - 1)
    blocks = _layer_indices(state, re.escape(v) + r"blocks\.(\d+)\.")
    return VisionConfig(
        hidden_size=hidden,
        intermediate_size=state[v + "blocks.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=len(blocks),
        num_attention_heads=num_attention_heads,
        image_size=side * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,  # EVA's partial(nn.LayerNorm, eps=1e-6)
        qkv_bias=v + "blocks.0.attn.q_bias" in state,
    )


def load_lavis(
    path: str | Path | dict[str, torch.Tensor],
    *,
    num_attention_heads: int | None = None,
    vision: bool = False,
    vision_heads: int = 16,
    trust_pickle: bool = False,
    **overrides: Any,
) -> Loaded:
    """Load a LAVIS BLIP-2 checkpoint (``.pth`` path or its state dict) into our QFormer.

    The config comes from :func:`lavis_config`: ``num_attention_heads`` must be given unless the
    Q-Former is BLIP-2's BERT-base (12 heads). ``vision=True`` also maps the EVA
    ``visual_encoder`` onto an :class:`ImageEncoder` (Blip2VisionModel layout);
    otherwise its tensors are reported as ignored. Stage-2 checkpoints (no text
    parts, an LLM beside) load with the text parts fresh, or pass ``text_input=False``.
    """
    if isinstance(path, dict):
        source, state = "LAVIS state dict", dict(path)
        state = dict(state.get("model", state)) if "model" in state else state
    else:
        source, state = str(path), _read_lavis(Path(path), trust_pickle)
    config = lavis_config(state, num_attention_heads=num_attention_heads, source=source, **overrides)
    model = QFormer(config)
    encoder = None
    if vision:
        encoder = ImageEncoder(eva_vision_config(state, num_attention_heads=vision_heads, source=source))

    root = _LAVIS_ROOT
    text_ffn = f"{root}encoder.layer.0.intermediate.dense.weight" in state
    names = {ours: root + key for ours, key in bert_encoder_names(config, style="lavis", text_ffn=text_ffn).items()}
    names["query_tokens"] = "query_tokens"
    names.update(_linear("ln_vision", "ln_vision"))
    optional = {
        "embeddings.word.weight": root + "embeddings.word_embeddings.weight",
        "embeddings.position.weight": root + "embeddings.position_embeddings.weight",
        **_linear("vision_proj", "vision_proj"),
        **_linear("text_proj", "text_proj"),
        **_linear("itm_head", "itm_head"),
        **_linear("lm_head.dense", "Qformer.cls.predictions.transform.dense"),
        **_linear("lm_head.norm", "Qformer.cls.predictions.transform.LayerNorm"),
        "lm_head.decoder.bias": "Qformer.cls.predictions.decoder.bias",
        "temp": "temp",
    }
    if not config.tie_word_embeddings:
        optional["lm_head.decoder.weight"] = "Qformer.cls.predictions.decoder.weight"
    names.update({ours: key for ours, key in optional.items() if key in state})

    # BERT's MLM head stores its bias twice (predictions.bias is decoder.bias) and,
    # when tied, the decoder weight is the word embedding: equal copies, one home.
    duplicates = {"Qformer.cls.predictions.bias": "Qformer.cls.predictions.decoder.bias"}
    if config.tie_word_embeddings:
        duplicates["Qformer.cls.predictions.decoder.weight"] = root + "embeddings.word_embeddings.weight"
    for copy, original in duplicates.items():
        if copy in state and original in state and not torch.equal(state[copy], state[original]):
            raise ValueError(f"{source}: {copy} differs from {original}; they must be the same tensor")
    # the copies are ignored where their original is too (text_input=False)
    droppable = {k for k in duplicates if k in state and duplicates[k] in state}

    if encoder is not None:
        state = _eva_to_blip2_vision(state)
        names.update(_vision_names(encoder, "vision_model."))
    tensors = _Tensors.from_dict(state)
    tensors.fuse_qkv_bias()

    def ignorable(key: str) -> bool:
        return key.startswith(_LAVIS_FOREIGN) or _is_buffer_key(key) or (not vision and key.startswith("visual_"))

    report = _apply(
        names, tensors, model, encoder, source=source, layout="LAVIS", droppable=droppable, ignorable=ignorable,
        tied=duplicates,
    )  # fmt: skip
    if not vision and any(k.startswith("visual_encoder.") for k in state):
        report.notes.append("visual_encoder (EVA ViT) skipped: pass vision=True to map it onto the ImageEncoder")
    return Loaded(model, encoder, report)


# ------------------------------------------------------------------ the image encoder alone

# Bare EVA checkpoints (LAVIS' eva_vit_g.pth) carry a classifier's final norm and head that BLIP-2 never runs.
_EVA_UNUSED = ("norm.", "fc_norm.", "head.")


def resize_position_embedding(position: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """(1, 1 + g*g, E) ViT position embeddings -> (1, num_tokens, E) for another image size.

    The class token's row is kept and the g x g patch grid is resized bicubically
    (``align_corners=False``): what LAVIS does when fine-tuning EVA ViT-g at 364 px
    and transformers' ``interpolate_pos_encoding`` does at run time.
    """
    tokens = position.shape[1] if position.dim() == 3 and position.shape[0] == 1 else 0
    old, new = math.isqrt(max(tokens - 1, 0)), math.isqrt(max(num_tokens - 1, 0))
    if min(old, new) < 1 or old * old + 1 != tokens or new * new + 1 != num_tokens:
        raise ValueError(
            f"position embeddings must be (1, 1 + g*g, E) and num_tokens 1 + G*G; got {tuple(position.shape)} "
            f"and {num_tokens}"
        )
    if old == new:
        return position
    grid = position[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(position.dtype)
    return torch.cat([position[:, :1], grid], dim=1)


def save_vision(vision: ImageEncoder, path: str | Path) -> Path:
    """The image encoder as fp32 safetensors, its VisionConfig as JSON in the metadata."""
    state = {k: v.detach().float().cpu().contiguous() for k, v in vision.state_dict().items()}
    return save_tensors(state, path, {"format": FORMAT, "vision_config": json.dumps(vision.config.to_dict())})


def run_config(folder: str | Path) -> dict[str, Any]:
    """A run folder's ``config.yaml``, parsed ({} without one)."""
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        return {}
    from blip2_fast.config import load_file

    return load_file(path)


def _vision_source(path: Path, trust_pickle: bool) -> tuple[dict[str, torch.Tensor], VisionConfig | None, str]:
    """(Blip2VisionModel tensors without a prefix, the config the source records or None, its layout name)."""
    if path.is_dir() and (path / "config.json").is_file():
        raw = json.loads((path / "config.json").read_text())
        if "vision_config" not in raw:
            raise ValueError(f"{path}: config.json has no vision_config (not a BLIP-2 folder with a vision model)")
        tensors = read_transformers_tensors(path)
        state = {
            k.removeprefix("vision_model."): v
            for k, v in tensors.items()
            if k.startswith("vision_model.") and not k.startswith("vision_model.post_layernorm.")
        }
        return state, vision_config_from_transformers(raw), "transformers"
    if path.is_dir():
        path = path / "vision.safetensors"
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"image encoder weights not found: {path}")
        metadata = safetensors_metadata(path)
        config = None
        if "vision_config" in metadata:
            with naming_damage(path):
                config = VisionConfig.from_dict(json.loads(metadata["vision_config"]))
        elif isinstance(vision := (run_config(path.parent).get("model") or {}).get("vision"), dict):
            config = VisionConfig.from_dict(vision)  # a run folder's vision.safetensors
        state = read_safetensors(path)
        if all(k.startswith("vit.") for k in state):
            state = {k.removeprefix("vit."): v for k, v in state.items()}
        elif any(k.startswith("vision_model.") for k in state):
            state = {k.removeprefix("vision_model."): v for k, v in state.items() if "post_layernorm" not in k}
        return state, config, FORMAT
    if path.suffix in (".pth", ".pt"):
        state = _read_pth(path, trust_pickle, "image encoder weights")
        if not any(k.startswith("visual_encoder.") for k in state):
            if "cls_token" not in state or "patch_embed.proj.weight" not in state:
                raise ValueError(
                    f"{path}: expected a LAVIS BLIP-2 checkpoint (visual_encoder.* keys) or a bare EVA ViT "
                    "(cls_token, patch_embed.proj.weight, blocks.*); LAVIS leaves the frozen EVA ViT out of its "
                    "pre-training checkpoints: its ViT is eva_vit_g.pth"
                )
            state = {"visual_encoder." + k: v for k, v in state.items() if not k.startswith(_EVA_UNUSED)}
        state = {k: v for k, v in state.items() if k.startswith("visual_encoder.")}
        config = eva_vision_config(state, source=str(path))
        tensors = _Tensors.from_dict(_eva_to_blip2_vision(state))
        tensors.fuse_qkv_bias()
        return {k.removeprefix("vision_model."): tensors[k] for k in tensors.keys()}, config, "LAVIS"
    raise ValueError(
        f"{path}: expected a transformers BLIP-2 folder, a run folder, a .safetensors image encoder, "
        "or a LAVIS/EVA .pth"
    )


def load_vision(source: str | Path, config: VisionConfig | None = None, *, trust_pickle: bool = False) -> ImageEncoder:
    """The image encoder of any checkpoint: a transformers BLIP-2 folder, a run folder of ours or its
    ``vision.safetensors``, a LAVIS BLIP-2 ``.pth``, or a bare EVA ViT ``.pth`` (LAVIS' ``eva_vit_g.pth``).

    ``config`` is the encoder to build (default: the one the source records). Its
    image size may differ from the weights': the position embeddings are then
    resized (:func:`resize_position_embedding`), as BLIP-2 fine-tunes at 364 px from
    224 px weights. It may also have fewer blocks: the later ones are left out, as
    BLIP-2 uses 39 of EVA ViT-g's 40. Anything else that does not fit is a
    ``ValueError`` naming the keys.
    """
    path = Path(source)
    state, recorded, layout = _vision_source(path, trust_pickle)
    config = config or recorded
    if config is None:
        raise ValueError(f"{path}: the file records no VisionConfig; pass config=VisionConfig(...)")
    return _vision_from_state(state, config, str(path), layout)


def resize_vision(vision: ImageEncoder, image_size: int) -> ImageEncoder:
    """A frozen copy of ``vision`` for ``image_size`` px images: the same weights, the position embeddings
    resized (:func:`resize_position_embedding`)."""
    config = dataclasses.replace(vision.config, image_size=image_size)
    state = {k.removeprefix("vit."): v.detach() for k, v in vision.state_dict().items()}
    return _vision_from_state(state, config, "image encoder", "ImageEncoder").to(next(vision.parameters()).device)


def _vision_from_state(state: dict[str, torch.Tensor], config: VisionConfig, source: str, layout: str):
    """An ImageEncoder of ``config`` from Blip2VisionModel tensors (no prefix), fitted as :func:`load_vision`
    describes."""
    encoder = ImageEncoder(config)
    notes = []
    blocks = _layer_indices(state, r"encoder\.layers\.(\d+)\.")
    if len(blocks) > config.num_hidden_layers:
        kept = config.num_hidden_layers
        state = {
            k: v
            for k, v in state.items()
            if not (m := re.match(r"encoder\.layers\.(\d+)\.", k)) or int(m.group(1)) < kept
        }
        notes.append(f"blocks {kept}..{blocks[-1]} left out (num_hidden_layers={kept})")
    position = "embeddings.position_embedding"
    if position in state and state[position].shape[1] != config.num_tokens:
        old = state[position].shape[1]
        state[position] = resize_position_embedding(state[position], config.num_tokens)
        notes.append(f"position embeddings resized from {old} to {config.num_tokens} tokens")
    _apply(
        _vision_names(encoder, ""),
        _Tensors.from_dict(state),
        None,
        encoder,
        source=source,
        layout=f"{layout} image encoder",
        droppable=set(),
        ignorable=lambda key: False,
    )
    for note in notes:
        logger.info("%s: %s", source, note)
    return encoder.freeze()


# ------------------------------------------------------------------ our own format


def _tied(model: QFormer) -> bool:
    return model.config.text_input and model.lm_head.decoder.weight is model.embeddings.word.weight


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """safetensors ``path`` written whole or not at all (:func:`replacing_file`), so a crash mid-write leaves any
    earlier file intact."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing_file(path) as partial:
        save_file(tensors, str(partial), metadata=metadata)
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``path`` holds ``text`` whole or keeps what it held (:func:`replacing_file`): config.yaml, metrics.csv,
    latest, JSON results."""
    path = Path(path)
    with replacing_file(path) as partial:
        partial.write_text(text)
    return path


@contextlib.contextmanager
def replacing_file(path: Path) -> Iterator[Path]:
    """Yield a scratch name beside ``path`` to write; when the block ends the file is synced to disk and renamed
    over ``path`` (a crash or power loss then never finds the new name over empty blocks). If the block fails,
    ``path`` stays as it was and the scratch file goes."""
    partial = path.with_name(f".{path.name}.partial")
    try:
        yield partial
        with partial.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def restore_replaced(folder: str | Path) -> None:
    """Undo a crash between :func:`replacing_folder`'s two renames: ``folder`` gone, its predecessor still at
    ``.<name>.old``. Put the predecessor back."""
    folder = Path(folder)
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and old.is_dir():
        old.rename(folder)


@contextlib.contextmanager
def replacing_folder(folder: str | Path) -> Iterator[Path]:
    """Yield an empty scratch folder beside ``folder`` to write into; when the block ends it takes ``folder``'s
    place (an earlier one is removed only then), and if the block fails ``folder`` stays as it was. A crash
    between the renames is undone by the next call (or :func:`restore_replaced`)."""
    folder = Path(folder)
    restore_replaced(folder)
    scratch, old = folder.with_name(f".{folder.name}.partial"), folder.with_name(f".{folder.name}.old")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        yield scratch
        shutil.rmtree(old, ignore_errors=True)
        if folder.exists():
            folder.rename(old)
        scratch.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def save_qformer(model: QFormer, path: str | Path) -> Path:
    """Write ``model`` to one safetensors file, its QFormerConfig as JSON in the metadata.

    safetensors refuses tensors that share memory, so a tied LM-head decoder is
    stored once (as ``embeddings.word.weight``) and re-tied by :func:`load_qformer`.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save_qformer writes a .safetensors file, got {path}")
    state = model.state_dict()
    if _tied(model):
        del state["lm_head.decoder.weight"]
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {
        "format": FORMAT,
        "qformer_config": json.dumps(model.config.to_dict(), sort_keys=True),
    }
    return save_tensors(tensors, path, metadata)


def load_qformer(path: str | Path, **overrides: Any) -> QFormer:
    """Read a file written by :func:`save_qformer`; bitwise the same weights, ties restored.

    ``overrides`` set QFormerConfig keys that do not change shapes (``backend``, dropouts).
    The model takes the file's dtype when all its floating tensors share one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    metadata = safetensors_metadata(path)
    if metadata.get("format") != FORMAT or "qformer_config" not in metadata:
        raise ValueError(
            f"{path}: expected a {FORMAT} safetensors file (metadata 'format' and 'qformer_config'), "
            f"got metadata keys {sorted(metadata)}"
        )
    with naming_damage(path):
        config = QFormerConfig.from_dict({**json.loads(metadata["qformer_config"]), **overrides})
    model = QFormer(config)
    state = read_safetensors(path)
    dtypes = {v.dtype for v in state.values() if v.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())
    names = {k: k for k in model.state_dict() if not (k == "lm_head.decoder.weight" and _tied(model))}
    _apply(
        names,
        _Tensors.from_dict(state),
        model,
        None,
        source=str(path),
        layout=FORMAT,
        droppable=set(),
        ignorable=lambda key: False,
    )
    model.tie_weights()
    return model


def load_checkpoint(path: str | Path, *, num_attention_heads: int | None = None, **kwargs: Any) -> Loaded:
    """Load any supported checkpoint: a transformers folder, a LAVIS ``.pth``, our ``.safetensors`` or a run
    folder holding one (``model.safetensors``; the Q-Former alone: ``vision`` is ignored, see :func:`load_vision`).

    ``num_attention_heads``: the Q-Former's head count, which a LAVIS ``.pth`` does not record
    (:func:`lavis_config`); the other sources record theirs, and another count for them is a ``ValueError``.
    """
    path = Path(path)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        path = path / "model.safetensors"
    if path.suffix in (".pth", ".pt") and not path.is_dir():
        return load_lavis(path, num_attention_heads=num_attention_heads, **kwargs)
    if path.is_dir():
        loaded = load_transformers(path, **kwargs)
    elif path.suffix == ".safetensors":
        kwargs.pop("vision", None)
        model = load_qformer(path, **kwargs)
        loaded = Loaded(model, None, LoadReport(str(path), FORMAT, sorted(dict(model.named_parameters())), [], []))
    else:
        raise ValueError(f"{path}: expected a transformers folder, a LAVIS .pth or a {FORMAT} .safetensors file")
    recorded = loaded.qformer.config.num_attention_heads
    if num_attention_heads is not None and num_attention_heads != recorded:
        # another count splits the same weights into other heads: other numbers, no error anywhere else
        raise ValueError(
            f"{path}: its Q-Former has {recorded} attention heads (recorded in the checkpoint), "
            f"num_attention_heads={num_attention_heads} asked; leave it unset for this checkpoint"
        )
    return loaded
