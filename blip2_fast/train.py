"""Stage-1 pre-training (and fine-tuning) of the Q-Former with DeepSpeed ZeRO (ITC + ITM + ITG).

    deepspeed blip2_fast/train.py --stage 1                 # the embedded default, any machine
    python blip2_fast/train.py --stage 1                    # same, one process, no launcher
    deepspeed --hostfile hosts blip2_fast/train.py --stage 1 --config configs/stage1_coco.yaml --train.steps 20000
    deepspeed blip2_fast/train.py --stage 1 --config configs/stage1_coco_finetune.yaml   # a trained model, ViT too

The embedded default (the defaults of :class:`TrainConfig`) trains a 6-layer
Q-Former (hidden 384, 8 queries) initialised from the shipped MiniLM BERT on procedurally drawn shapes
with a frozen, randomly initialised small ViT; on 2 CPU cores it finishes in a
few minutes and its retrieval recall ends far above chance.

A run folder ``<train.output_dir>/<train.name>/`` receives the resolved config
(``config.yaml``), ``metrics.csv`` (and TensorBoard events when installed),
``curves.png``, DeepSpeed checkpoints under ``checkpoints/`` (atomic: a tag
is written under a temporary name, renamed, and only then named in
``latest``), the trainable model alone as ``model.safetensors`` and the ViT as
``vision.safetensors`` (as trained when ``model.freeze_vit`` is false: the ViT
then runs inside the DeepSpeed engine, see :class:`Stage1WithVision`).

Resuming (``--train.resume true``) restores the weights, optimizer, LR
schedule, the data position (epoch permutation and offset), the torch / numpy
/ python RNG of every rank and the hard-negative generator, so a resumed run
follows the uninterrupted one; a checkpoint written with another batch size,
accumulation, number of ranks, seed or ``model.freeze_vit`` is refused. The optimizer settings (``optim.lr``,
the schedule, betas, eps, weight decay) and ``train.steps`` are this run's: a resume may change them (a lower
rate after a divergence) and says what it changed. A resume unpickles nothing that
could run code: the RNG state is safetensors, and DeepSpeed's own files must first load weights-only.
A fresh run in a folder that holds one moves the earlier run aside (``<name>.replaced-<time>``), and only
a folder a run wrote (marked by ``.blip2_fast-run``); either way the folder is left untouched until every
setting is checked and the engine built. While a run trains, ``<output_dir>/<name>.lock`` holds it: a
second training in the same folder is refused at once, naming the holder.
"""

from __future__ import annotations

import os
import sys

# Run as a script, Python puts blip2_fast/ first on sys.path, where our data.py would shadow the
# package of that name; the installed blip2_fast is imported instead (never the repository root:
# its kernels/ would shadow PyPI's `kernels`, which transformers imports).
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    del sys.path[0]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import errno  # noqa: E402
import fcntl  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import typing  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, TypeVar  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from blip2_fast import distributed  # noqa: E402
from blip2_fast.cli import RunStopped  # noqa: E402
from blip2_fast.config import QFormerConfig, VisionConfig, check_range, from_dict, load_file, parse_yaml  # noqa: E402

# ---------------------------------------------------------------------------- config


@dataclasses.dataclass
class ModelSection:
    bert_path: str | None = None  # local HF BERT folder; None = the shipped MiniLM (hidden 384)
    # QFormerConfig keys on top of the BERT's. The default keeps all 6 MiniLM layers: its [CLS] output
    # only tells captions apart after the last ones (across captions its std is 4e-4 after 2 layers,
    # 0.19 after 6), and ITC reads [CLS]. 8 queries instead of 32 keep the run within CPU minutes.
    # initializer_range reaches only the fresh parts (cross-attention, queries, heads; BERT's weights are
    # copied over them): at BERT's 0.02 the queries barely see the image and ITC sits at chance for
    # hundreds of steps; 0.08 lets a few-minute run learn.
    qformer: dict = dataclasses.field(
        default_factory=lambda: {"num_query_tokens": 8, "initializer_range": 0.08, "backend": "auto"}
    )
    vision: dict = dataclasses.field(default_factory=lambda: {"preset": "small"})  # VisionConfig keys or a preset
    # the ViT's weights: a transformers BLIP-2 folder, a run folder or its vision.safetensors, a LAVIS BLIP-2
    # .pth or a bare EVA .pth (eva_vit_g.pth); another image size resizes its position embeddings.
    # None = init's ViT, else a random one from train.seed
    vision_weights: str | None = None
    # a trained BLIP-2 to start from instead of BERT (fine-tuning): a stage-1 run folder or its
    # model.safetensors, a transformers BLIP-2 folder or a LAVIS .pth. model.qformer still applies on top
    # of its config ({} keeps it as is), model.vision describes the ViT built around its weights.
    init: str | None = None
    freeze_vit: bool = True  # False trains the ViT too, as BLIP-2's COCO fine-tuning does
    vit_grad_checkpoint: bool = False  # trainable ViT: recompute its activations in the backward
    max_text_length: int = 32

    def __post_init__(self) -> None:
        QFormerConfig.from_dict({k: v for k, v in self.qformer.items() if k != "preset"})  # validate keys early
        VisionConfig.from_dict(self.vision)
        if self.max_text_length < 2:
            raise ValueError(f"model.max_text_length must be >= 2 ([CLS] + a word), got {self.max_text_length}")
        if self.vit_grad_checkpoint and self.freeze_vit:
            raise ValueError(
                "model.vit_grad_checkpoint needs model.freeze_vit=false (a frozen ViT keeps no activations)"
            )


DATA_SOURCES = ("synthetic", "caption_json", "webdataset")


@dataclasses.dataclass
class DataSection:
    source: str = "synthetic"
    train_size: int = 4000  # synthetic: images drawn for training
    eval_size: int = 100  # synthetic: held-out images (drawn from another seed)
    annotation_file: str | None = None  # caption_json: [{"image": path, "caption": str, "image_id": ...}, ...]
    image_root: str | None = None
    eval_annotation_file: str | None = None
    eval_image_root: str | None = None
    urls: str | None = None  # webdataset: tar shards, brace notation allowed
    eval_urls: str | None = None
    augment: bool = False  # BLIP-2's random resized crop + flip; off for shapes, whose captions name positions
    max_words: int = 50
    num_workers: int = 0
    # frozen-ViT features computed once per training image and memory-mapped for later epochs
    # (augment off only: a cached image must always give the same pixels)
    feature_cache: bool = False

    def __post_init__(self) -> None:
        if self.feature_cache and (self.augment or self.source == "webdataset"):
            raise ValueError(
                "data.feature_cache needs data.augment=false and a map-style source (synthetic or caption_json)"
            )
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source must be one of {', '.join(DATA_SOURCES)}, got {self.source!r}")
        if self.source == "caption_json":
            for key in ("annotation_file", "image_root"):
                if not getattr(self, key):
                    raise ValueError(f"data.source=caption_json needs data.{key}")
        if self.source == "webdataset" and not self.urls:
            raise ValueError("data.source=webdataset needs data.urls (tar shards)")
        if self.source == "webdataset" and self.num_workers:
            raise ValueError(
                "data.num_workers applies to map-style sources (synthetic, caption_json): a webdataset stream is "
                "read in the training process, shard by shard per rank; set data.num_workers to 0"
            )
        if self.train_size < 1 or self.eval_size < 1 or self.num_workers < 0 or self.max_words < 1:
            raise ValueError("data.train_size, data.eval_size, data.max_words must be >= 1 and num_workers >= 0")


@dataclasses.dataclass
class OptimSection:
    lr: float = 3e-4  # peak; BLIP-2 uses 1e-4 at batch 2320, the short default run needs more
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 20
    weight_decay: float = 0.05  # not on biases, norms or the temperature (parameters with ndim < 2), as LAVIS
    betas: list = dataclasses.field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # trainable ViT: block i of L learns at lr * decay^(L - i), its embeddings at lr * decay^(L + 1)
    # (LAVIS' lr_layer_decay; 0.95 in BLIP-2's COCO fine-tuning)
    vit_layer_decay: float = 1.0

    def __post_init__(self) -> None:
        check_range("optim", "lr", self.lr, 0, open_low=True)
        for key in ("min_lr", "warmup_lr"):
            check_range("optim", key, getattr(self, key), 0, self.lr)
        check_range("optim", "eps", self.eps, 0, open_low=True)  # 0 divides by zero where a moment is 0
        check_range("optim", "weight_decay", self.weight_decay, 0)
        check_range("optim", "vit_layer_decay", self.vit_layer_decay, 0, 1, open_low=True)
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in self.betas):
            raise ValueError(f"optim.betas must be a pair of numbers, got {self.betas!r}")
        for beta in self.betas:
            if not 0 <= beta < 1:  # 1 never forgets the first gradient; nan fails this too
                raise ValueError(f"optim.betas must each lie in [0, 1), got {self.betas!r}")


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


COMPILE_MODES = ("inductor", "inductor-cudagraphs", "aot_eager")


@dataclasses.dataclass
class TrainSection:
    name: str = "stage1-default"
    output_dir: str = "runs"
    steps: int = 150  # optimizer steps
    batch_size: int = 16  # per rank and micro-step
    grad_accum: int = 1
    grad_clip: float = 1.0
    precision: str = "auto"  # auto: bf16 on a GPU that has it, else fp32; set here it overrides the JSON
    zero_stage: int | None = None  # None: the JSON's, else 2; set here it overrides the JSON
    deepspeed_config: str | None = None  # base DeepSpeed JSON (configs/ds_zero*.json)
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = False  # continue from <run>/checkpoints/latest
    stop_after: int | None = None  # stop (checkpoint saved) after this many steps in total, before `steps`
    evaluate: bool = True  # retrieval + captions at the end
    # torch.compile of the Q-Former and the three losses, forward and backward, as one graph: null (eager);
    # "inductor" (fused generated kernels); "inductor-cudagraphs" (CUDA only: CUDA graphs replay the compiled
    # step, no host cost per kernel); "aot_eager" (traced, no code generation: checks that a step captures)
    compile: str | None = None

    def __post_init__(self) -> None:
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"train.compile must be null or one of {', '.join(COMPILE_MODES)}, got {self.compile!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.zero_stage not in (None, 0, 1, 2, 3):
            raise ValueError(f"train.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage!r}")
        for key in ("steps", "batch_size", "grad_accum", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if self.keep_checkpoints < 0:
            raise ValueError(
                f"train.keep_checkpoints must be >= 0 (0: none, only the model), got {self.keep_checkpoints}"
            )
        if self.keep_checkpoints == 0 and (self.save_every or self.resume or self.stop_after):
            raise ValueError(
                "train.keep_checkpoints 0 keeps no checkpoint: train.save_every, train.resume and train.stop_after "
                "need one"
            )
        if self.save_every < 0:
            raise ValueError(f"train.save_every must be >= 0, got {self.save_every}")
        check_range("train", "grad_clip", self.grad_clip, 0)  # 0: no clipping
        if not 0 <= self.seed < 2**31:  # numpy seeds lie in [0, 2**32); the held-out data uses seed + 1_000_003
            raise ValueError(f"train.seed must lie in [0, 2**31), got {self.seed}")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise ValueError(f"train.stop_after must lie in [1, train.steps={self.steps}], got {self.stop_after}")
        if self.name in ("", ".", "..") or "/" in self.name or "\\" in self.name:
            raise ValueError(f"train.name must be a folder name (no '/', not '.' or '..'), got {self.name!r}")


@dataclasses.dataclass
class EvalSection:
    k_test: int = 8  # ITC candidates re-ranked by ITM per query (LAVIS: 128 on COCO)
    batch_size: int = 64
    num_captions: int = 4  # held-out images captioned at the end
    num_beams: int = 3
    max_new_tokens: int = 20
    min_new_tokens: int = 3
    # optimizer steps between held-out evaluations during training (logged; the best by mean recall is
    # kept in <run>/best/); 0: only at the end
    every: int = 0

    def __post_init__(self) -> None:
        for key in ("k_test", "batch_size", "num_beams", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:  # checked at start, not when captioning at the end
            raise ValueError(
                f"eval.min_new_tokens must lie in [0, eval.max_new_tokens={self.max_new_tokens}], "
                f"got {self.min_new_tokens}"
            )
        if self.every < 0:
            raise ValueError(f"eval.every must be >= 0, got {self.every}")


SECTIONS = {
    "model": ModelSection,
    "data": DataSection,
    "optim": OptimSection,
    "train": TrainSection,
    "eval": EvalSection,
}


@dataclasses.dataclass
class TrainConfig:
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimSection = dataclasses.field(default_factory=OptimSection)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)

    def __post_init__(self) -> None:
        if self.data.feature_cache and not self.model.freeze_vit:
            raise ValueError("data.feature_cache needs model.freeze_vit=true (a trainable ViT's features change)")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return sections_from_dict(cls, SECTIONS, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sections_from_dict(cls: type[T], sections: dict[str, type], data: dict[str, Any]) -> T:
    """A run config (``cls``, one field per section) from nested dicts; unknown sections and keys are errors."""
    unknown = sorted(set(data) - set(sections))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} section(s) {unknown}; valid sections: {', '.join(sections)}")
    parts = {}
    for name, section in sections.items():
        value = data.get(name) or {}
        if not isinstance(value, dict):
            raise ValueError(f"config section {name!r} must be a mapping, got {type(value).__name__}")
        parts[name] = from_dict(section, _coerce(section, value, name), where=name)
    return cls(**parts)


def _coerce(section: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Convert YAML/command-line strings to the field types (YAML reads ``1e-4`` as a string)."""
    hints = typing.get_type_hints(section)
    out = dict(values)
    for key, value in values.items():
        if key not in hints or value is None:
            continue
        hint = hints[key]
        args = set(typing.get_args(hint)) - {type(None)}
        target = next(iter(args)) if args and len(args) == 1 else hint
        try:
            if target is float and isinstance(value, (int, str)) and not isinstance(value, bool):
                out[key] = float(value)
            elif target is int and isinstance(value, str):
                out[key] = int(value)
            elif target is bool and isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                out[key] = value.lower() in ("true", "1", "yes")
            elif target is str and isinstance(value, bool):  # YAML 1.1 reads yes/no/on/off as booleans
                raise ValueError(value)
            elif target is str and not isinstance(value, str):
                out[key] = str(value)
        except ValueError as err:
            quote = " (quote it: YAML reads yes/no/on/off as booleans)" if target is str else ""
            raise ValueError(f"{where}.{key} must be {_a(target)}, got {value!r}{quote}") from err
        expected = {float: (float,), int: (int,), bool: (bool,), str: (str,), dict: (dict,), list: (list,)}.get(target)
        if expected and not isinstance(out[key], expected) or (target is int and isinstance(out[key], bool)):
            raise ValueError(f"{where}.{key} must be {_a(target)}, got {value!r}")
    return out


def _a(kind: type) -> str:
    return f"{'an' if kind.__name__[0] in 'aeiou' else 'a'} {kind.__name__}"


def apply_override(data: dict[str, Any], key: str, raw: str, sections: dict[str, type] = SECTIONS) -> None:
    """Set ``key`` (``section.field`` or ``section.dict.entry``; a bare field name if unique) to YAML-parsed ``raw``."""
    parts = key.split(".")
    if len(parts) == 1:
        owners = [s for s, cls in sections.items() if key in {f.name for f in dataclasses.fields(cls)}]
        if len(owners) != 1:
            where = f"found in sections {owners}" if owners else "no section has it"
            raise ValueError(f"override --{key}: use a dotted key section.field ({where})")
        parts = [owners[0], key]
    section, rest = parts[0], parts[1:]
    if section not in sections:
        raise ValueError(f"override --{key}: unknown section {section!r}; valid sections: {', '.join(sections)}")
    fields = {f.name for f in dataclasses.fields(sections[section])}
    if rest[0] not in fields:
        raise ValueError(
            f"override --{key}: unknown {section} key {rest[0]!r}; valid keys: {', '.join(sorted(fields))}"
        )
    node = data.setdefault(section, {})
    for name in rest[:-1]:
        if node.get(name) is None:
            node[name] = {}
        elif not isinstance(node[name], dict):
            raise ValueError(f"override --{key}: {name} is not a mapping")
        node = node[name]
    node[rest[-1]] = parse_yaml(raw)


T = TypeVar("T")


def read_config(cls: type[T], sections: dict[str, type], path: str | Path | None, overrides) -> T:
    """``cls`` (a config of ``sections``): defaults <- YAML/TOML file <- ``--key value`` overrides, validated."""
    data = cls().to_dict()
    if path is not None:
        loaded = load_file(path)
        unknown = sorted(set(loaded) - set(sections))
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {unknown}; valid sections: {', '.join(sections)}")
        for section, values in loaded.items():
            if values is None:
                continue
            if not isinstance(values, dict):
                raise ValueError(f"{path}: section {section!r} must be a mapping")
            # key by key: a file's model.qformer / model.vision dicts replace the defaults, not merge
            data[section].update(values)
    for key, raw in overrides:
        apply_override(data, key, raw, sections)
    return cls.from_dict(data)


def load_config(path: str | Path | None = None, overrides: list[tuple[str, str]] = ()) -> TrainConfig:
    """Defaults <- YAML/TOML file <- ``--key value`` overrides, validated."""
    return read_config(TrainConfig, SECTIONS, path, overrides)


# ---------------------------------------------------------------------------- set-up


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _announce_cpu_op_build() -> None:
    """On CPU, DeepSpeed compiles its shared-memory communication op the first time, silently: say so."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        built = Path(_get_build_directory("deepspeed_shm_comm", verbose=False)) / "deepspeed_shm_comm.so"
    except Exception:  # a torch without the helper: nothing to tell
        return
    if not built.is_file():
        print(
            f"DeepSpeed is building its CPU communication op (once, a minute or more; kept in {built.parent})",
            file=sys.stderr,
            flush=True,
        )


def init_distributed() -> torch.device:
    """Start (or join) the process group DeepSpeed's launcher describes; a lone process makes a group of one."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:  # no launcher: a world of one, so collectives and ZeRO still work
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not distributed.is_distributed():
        if get_accelerator().device_name() == "cpu" and os.environ.get("LOCAL_RANK", "0") == "0":
            _announce_cpu_op_build()
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    accel = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accel.device_name() == "cpu":
        if "OMP_NUM_THREADS" not in os.environ:
            # ranks on one machine share its cores; more threads than cores slows every rank many times over
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        return torch.device("cpu")
    accel.set_device(local_rank)
    return torch.device(accel.device_name(local_rank))


def resolve_precision(config: TrainConfig, ds_base: dict, device: torch.device) -> str:
    precision = config.train.precision
    if precision == "auto":
        if ds_base.get("bf16", {}).get("enabled") is True:
            return "bf16"
        if ds_base.get("fp16", {}).get("enabled") is True:
            return "fp16"
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def deepspeed_config(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed JSON: the base file (if any), with batch, accumulation, clipping, stage and precision filled in."""
    t = config.train
    base: dict[str, Any] = {}
    if t.deepspeed_config:
        path = Path(t.deepspeed_config)
        if not path.is_file():
            raise FileNotFoundError(f"train.deepspeed_config: file not found: {path}")
        base = load_file(path, (".json",))
    # what a run sets itself: a JSON value for it would be ignored, so it is refused
    owned = {
        "train_batch_size": "train.batch_size",
        "train_micro_batch_size_per_gpu": "train.batch_size",
        "gradient_accumulation_steps": "train.grad_accum",
        "gradient_clipping": "train.grad_clip",
        "optimizer": "optim.* (training passes torch AdamW)",
        "scheduler": "optim.* (warmup + cosine, passed to DeepSpeed)",
    }
    for key, source in owned.items():
        if key in base:
            raise ValueError(f"{t.deepspeed_config}: remove {key!r}; it comes from {source}")
    if all(base.get(half, {}).get("enabled") is True for half in ("fp16", "bf16")):
        raise ValueError(f"{t.deepspeed_config}: fp16 and bf16 are both enabled; enable one (or set train.precision)")
    ds = dict(base)
    precision = resolve_precision(config, base, device)
    ds["train_micro_batch_size_per_gpu"] = t.batch_size
    ds["gradient_accumulation_steps"] = t.grad_accum
    ds["gradient_clipping"] = t.grad_clip
    zero = dict(base.get("zero_optimization", {}))
    zero["stage"] = t.zero_stage if t.zero_stage is not None else zero.get("stage", 2)
    ds["zero_optimization"] = zero
    fp16 = {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    ds["fp16"] = {**fp16, **base.get("fp16", {}), "enabled": precision == "fp16"}
    ds["bf16"] = {**base.get("bf16", {}), "enabled": precision == "bf16"}
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def build_tokenizer(config: TrainConfig):
    from blip2_fast.text import load_tokenizer

    return load_tokenizer(config.model.bert_path, max_length=config.model.max_text_length)


def _existing(key: str, value: str) -> Path:
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"{key}: not found: {path}")
    return path


def build_vision(config: TrainConfig):
    """The ViT as ``model`` says: weights from ``vision_weights``, else ``init``, else random (frozen unless
    ``freeze_vit`` is false)."""
    from blip2_fast.vision import ImageEncoder

    m = config.model
    vision_config = VisionConfig.from_dict(m.vision)
    source = None
    if m.vision_weights:
        source = _existing("model.vision_weights", m.vision_weights)
    elif m.init:
        source = _existing("model.init", m.init)
        if source.suffix == ".safetensors":  # a run's model.safetensors: its ViT lies beside it
            source = source.parent
    if source is not None:
        from blip2_fast.checkpoint import load_vision

        try:
            vision = load_vision(source, vision_config)
        except ValueError as err:
            if m.vision_weights:
                raise
            # LAVIS leaves frozen weights out of its files: its ViT is eva_vit_g.pth, given apart
            raise ValueError(f"{err} (the ViT comes from model.init unless model.vision_weights names it)") from err
    else:
        vision = ImageEncoder(vision_config)  # drawn after train.seed was set: the same ViT on every rank
    return vision.freeze() if m.freeze_vit else vision.unfreeze(m.vit_grad_checkpoint)


def build_qformer(config: TrainConfig, vision_width: int):
    """The Q-Former from ``model.init`` when given, else from BERT, with ``model.qformer`` on top."""
    from blip2_fast.text import from_bert

    overrides = {"encoder_width": vision_width, **config.model.qformer}
    if overrides["encoder_width"] != vision_width:
        raise ValueError(
            f"model.qformer.encoder_width ({overrides['encoder_width']}) must equal the ViT width ({vision_width})"
        )
    if config.model.init:
        from blip2_fast.checkpoint import load_checkpoint

        overrides.pop("preset", None)
        try:
            return load_checkpoint(_existing("model.init", config.model.init), vision=False, **overrides).qformer
        except ValueError as err:
            raise ValueError(f"{err} (model.qformer applies on top of model.init's config: {{}} keeps it)") from err
    return from_bert(config.model.bert_path, **overrides)


def register_zero3_fused_parameters(root: torch.nn.Module) -> None:
    """Tell ZeRO-3 about the Q-Former parameters its fused paths read outside their own module's ``forward``.

    ZeRO-3 gathers a partitioned parameter only around the forward (and backward)
    of the module that owns it. The fused blocks (``ResidualNorm``,
    ``FeedForward``) hand their children's weights to one function instead of
    calling the children, a layer reads its self-attention's three projections
    as one (``Attention.project_qkv``), and ``QFormer.image_context`` reads every
    cross-attention layer's key and value projections as one: each is registered
    with the module that reads it (``root``, whose forward runs around the Q-Former's
    methods, for the image context and the ITC + ITG pass).
    """
    import deepspeed

    from blip2_fast.layers import FeedForward, ResidualNorm
    from blip2_fast.qformer import Layer

    for module in root.modules():
        if isinstance(module, (ResidualNorm, FeedForward)):
            for p in module.parameters():
                deepspeed.zero.register_external_parameter(module, p)
        elif isinstance(module, Layer):
            attn = module.self_attn
            for p in (*attn.query.parameters(), *attn.key.parameters(), *attn.value.parameters()):
                deepspeed.zero.register_external_parameter(module, p)
                # the ITC + ITG pass runs Layer.forward_itc_itg, a method: its reads are the root's
                deepspeed.zero.register_external_parameter(root, p)
            if module.cross_attn is not None:
                for p in (*module.cross_attn.key.parameters(), *module.cross_attn.value.parameters()):
                    deepspeed.zero.register_external_parameter(root, p)


def register_zero3_external_parameters(stage1: torch.nn.Module) -> None:
    """Tell ZeRO-3 about parameters read outside their own module's ``forward``: the fused paths' (see
    :func:`register_zero3_fused_parameters`), and ``query_tokens`` / ``temp``, read by methods of the Q-Former
    other than ``forward``."""
    import deepspeed

    register_zero3_fused_parameters(stage1)
    qformer = stage1.qformer
    for p in (qformer.query_tokens, qformer.temp):
        deepspeed.zero.register_external_parameter(stage1, p)


class Stage1WithVision(torch.nn.Module):
    """What DeepSpeed wraps when the ViT trains too: pixels in, :class:`Stage1Loss` out. The ViT's parameters
    then live in the engine: optimised, checkpointed and partitioned (ZeRO-3) like the Q-Former's."""

    def __init__(self, vision: torch.nn.Module, stage1: torch.nn.Module):
        super().__init__()
        self.vision = vision
        self.stage1 = stage1

    @property
    def qformer(self):
        return self.stage1.qformer

    @property
    def sampler(self):
        return self.stage1.sampler

    def forward(self, pixels, input_ids, attention_mask, image_ids):
        return self.stage1(self.vision(pixels), input_ids, attention_mask, image_ids)


def vit_lr_scale(name: str, num_layers: int, decay: float) -> float:
    """LAVIS' layer-wise lr decay of a trainable ViT, for ``name`` relative to the ImageEncoder: block i of
    ``num_layers`` learns at decay^(L - i), the embeddings at decay^(L + 1)."""
    if name.startswith("vit.embeddings."):
        return decay ** (num_layers + 1)
    if m := re.match(r"vit\.encoder\.layers\.(\d+)\.", name):
        return decay ** (num_layers - int(m.group(1)))
    return 1.0


def param_groups(
    model: torch.nn.Module, weight_decay: float, lr: float = 1.0, vit_layer_decay: float = 1.0
) -> list[dict[str, Any]]:
    """LAVIS' split: parameters with fewer than 2 dims (biases, norms, temperature) get no weight decay; a
    trainable ViT's learn at ``lr`` scaled by :func:`vit_lr_scale`, everything else at ``lr``. The groups at
    the full ``lr`` come first."""
    from blip2_fast.vision import ImageEncoder

    encoders = {
        f"{name}.": m.config.num_hidden_layers for name, m in model.named_modules() if isinstance(m, ImageEncoder)
    }
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            prefix = next((k for k in encoders if name.startswith(k)), None)
            scale = vit_lr_scale(name.removeprefix(prefix), encoders[prefix], vit_layer_decay) if prefix else 1.0
            groups.setdefault((scale, p.ndim >= 2), []).append(p)
    order = sorted(groups, key=lambda k: (-k[0], not k[1]))
    return [
        {"params": groups[scale, decay], "weight_decay": weight_decay if decay else 0.0, "lr": lr * scale}
        for scale, decay in order
    ]


def lr_at(step: int, optim: OptimSection, total: int) -> float:
    """Linear warmup from warmup_lr to lr, then cosine decay to min_lr at the last step."""
    if step < optim.warmup_steps:
        return optim.warmup_lr + (optim.lr - optim.warmup_lr) * step / optim.warmup_steps
    span = max(1, total - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return optim.min_lr + (optim.lr - optim.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------- data


def build_datasets(config: TrainConfig, image_size: int, rank: int = 0, world: int = 1):
    """(train, held-out) ``ImageTextDataset``s; held-out may be None. Shards of a stream are split across ranks."""
    from blip2_fast import data as D

    d = config.data
    train_tf = D.build_transform(image_size, train=d.augment)
    eval_tf = D.build_transform(image_size, train=False)
    if d.source == "synthetic":
        train_src = D.SyntheticShapes(d.train_size, image_size=image_size, seed=config.train.seed)
        # another seed, and ids offset so that they never collide with the training images
        eval_src = D.SyntheticShapes(d.eval_size, image_size=image_size, seed=config.train.seed + 1_000_003)
    elif d.source == "caption_json":
        for key in ("annotation_file", "eval_annotation_file"):
            if getattr(d, key) and not Path(getattr(d, key)).is_file():
                raise FileNotFoundError(f"data.{key}: file not found: {getattr(d, key)}")
        for key in ("image_root", "eval_image_root"):
            if getattr(d, key) and not Path(getattr(d, key)).is_dir():
                raise FileNotFoundError(f"data.{key}: folder not found: {getattr(d, key)}")
        train_src = D.CaptionJSON(d.annotation_file, d.image_root)
        eval_src = None
        if d.eval_annotation_file:
            eval_src = D.CaptionJSON(d.eval_annotation_file, d.eval_image_root or d.image_root)
    else:
        seed = config.train.seed
        train_src = D.WebDatasetShards(
            d.urls, rank=rank, world_size=world, shuffle=True, shuffle_buffer=1000, seed=seed
        )
        eval_src = D.WebDatasetShards(d.eval_urls) if d.eval_urls else None  # every rank reads all of it
    every = getattr(config.eval, "every", 0)  # stage 1's periodic retrieval; stage 2 has none
    if eval_src is None and every:
        raise ValueError(
            f"eval.every={every} needs a held-out set: data.eval_annotation_file (caption_json) "
            "or data.eval_urls (webdataset)"
        )
    seed = config.train.seed
    train = D.ImageTextDataset(train_src, train_tf, max_words=d.max_words, seed=seed)
    held_out = None if eval_src is None else D.ImageTextDataset(eval_src, eval_tf, max_words=d.max_words, seed=seed)
    return train, held_out


class GlobalBatches:
    """Micro-batch ``k`` of a run is global positions [k*G, (k+1)*G) of a seeded per-epoch permutation.

    Rank ``r`` takes rows [r*B, (r+1)*B) of each global batch, so the global
    batch does not depend on the number of ranks, and the position in the data
    is one integer (the micro-step), which makes resuming exact. Map-style
    datasets are permuted per epoch (seed + epoch). A stream (tar shards) is
    split across ranks by its reader and each rank batches its own share; a
    resumed run reads the stream again up to its position. Samples that fail
    to load (``None``) are replaced by the next loadable one and counted, so
    every rank always has B rows (the losses gather equal shapes).
    """

    def __init__(self, dataset, batch_size: int, seed: int, rank: int, world: int, collate, num_workers: int = 0):
        self.dataset, self.B, self.seed, self.rank, self.world = dataset, batch_size, seed, rank, world
        self.G = batch_size * world
        self.collate = collate
        self.num_workers = num_workers
        self.map_style = hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")
        if self.map_style and len(dataset) < self.G:
            raise ValueError(f"the dataset has {len(dataset)} samples, fewer than one global batch ({self.G})")

    @property
    def per_epoch(self) -> int | None:
        return len(self.dataset) // self.G if self.map_style else None

    def _indices(self, micro_step: int) -> list[int]:
        epoch, offset = divmod(micro_step, self.per_epoch)
        perm = torch.randperm(
            len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch), device="cpu"
        )
        start = offset * self.G + self.rank * self.B
        return perm[start : start + self.B].tolist()

    def iterate(self, start_micro_step: int):
        """Yield (micro_step, batch) from ``start_micro_step`` on, forever."""
        if self.map_style:
            yield from self._iterate_map(start_micro_step)
        else:
            yield from self._iterate_stream(start_micro_step)

    def _iterate_map(self, start: int):
        dataset, n = self.dataset, len(self.dataset)

        class _Steps(torch.utils.data.Dataset):
            def __len__(_):
                return 1 << 40

            def __getitem__(_, k):
                samples, skipped = [], 0
                if hasattr(dataset, "set_epoch"):
                    dataset.set_epoch((start + k) // self.per_epoch)  # augmentation is seeded by (epoch, index)
                for i in self._indices(start + k):
                    for j in range(n):
                        sample = dataset[(i + j) % n]
                        if sample is not None:
                            break
                        skipped += 1
                    else:
                        raise RuntimeError("no sample of the dataset could be loaded")
                    samples.append(sample)
                return samples, skipped

        loader = torch.utils.data.DataLoader(
            _Steps(),
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=lambda x: x,
            generator=torch.Generator().manual_seed(self.seed),  # keeps the global RNG untouched
            persistent_workers=False,
            worker_init_fn=ignore_sigterm,
        )
        for k, (samples, skipped) in enumerate(loader):
            batch = self.collate(samples)
            batch["skipped"] = int(batch.get("skipped", 0)) + skipped
            yield start + k, batch

    def _iterate_stream(self, start: int):
        micro_step, skipped, buffer, epoch = 0, 0, [], 0
        while True:
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(epoch)
            seen = 0
            for sample in self.dataset:
                seen += 1
                if sample is None:
                    skipped += 1
                    continue
                buffer.append(sample)
                if len(buffer) == self.B:
                    if micro_step >= start:
                        batch = self.collate(buffer)
                        batch["skipped"] = int(batch.get("skipped", 0)) + skipped
                        yield micro_step, batch
                    skipped = 0  # a resumed run's replay counts nothing: those batches were counted before
                    micro_step, buffer = micro_step + 1, []
            if not seen:
                raise ValueError("the training stream yielded no sample on this rank (too few shards or samples?)")
            epoch += 1


# ---------------------------------------------------------------------------- checkpoints


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _rng_file(folder: Path, rank: int) -> Path:
    return folder / f"rng_rank{rank:05d}.safetensors"


def save_rng(path: Path) -> None:
    """This process's torch / numpy / python (and CUDA) RNG state as safetensors: no pickle for a resume to run.
    Floats go into the metadata as ``float.hex`` (exact)."""
    from safetensors.torch import save_file

    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, words, gauss_next = random.getstate()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "python": torch.tensor(words, dtype=torch.int64),  # 32-bit words and an index: int64 holds them
    }
    if (cuda := _cuda_rng()) is not None:
        tensors["cuda"] = cuda
    meta = {
        "numpy_pos": str(pos),
        "numpy_has_gauss": str(has_gauss),
        "numpy_gauss": float(gauss).hex(),
        "python_version": str(version),
        "python_gauss_next": "none" if gauss_next is None else float(gauss_next).hex(),
    }
    save_file(tensors, str(path), metadata=meta)


def load_rng(path: Path) -> dict[str, Any]:
    """The state :func:`save_rng` wrote, for :func:`_set_rng_state` (and ``"cuda"``: a tensor or None)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no mapping)
        gauss_next = meta["python_gauss_next"]
        return {
            "torch": tensors["torch"],
            "numpy": (
                "MT19937",
                tensors["numpy"].numpy().astype(np.uint32),
                int(meta["numpy_pos"]),
                int(meta["numpy_has_gauss"]),
                float.fromhex(meta["numpy_gauss"]),
            ),
            "python": (
                int(meta["python_version"]),
                tuple(tensors["python"].tolist()),
                None if gauss_next == "none" else float.fromhex(gauss_next),
            ),
            "cuda": tensors.get("cuda"),
        }
    except Exception as err:  # safetensors, a missing key and a bad number each raise their own type
        raise ValueError(f"{path}: not an RNG state this project wrote ({type(err).__name__}: {err})") from None


def _load_legacy_rng(path: Path) -> dict[str, Any]:
    """``rng_rank*.pt`` of a checkpoint written before :func:`save_rng`: a torch.save dict of tensors, numpy's
    state (an array in a tuple) and python's (tuples of ints), read weights-only with numpy's array allowed."""
    from blip2_fast.checkpoint import unreadable_pickle

    core = getattr(np, "_core", None) or np.core  # numpy 2 moved it; the pickle names where it lives
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), core.multiarray._reconstruct]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(unreadable_pickle(path, err, allowed)) from None


def run_facts(config) -> dict[str, int]:
    """What a resumed run must share with its checkpoint: the global batch (batch size x ranks), where
    accumulation ends and the seed of the data order, for the data position and schedule to carry over, and
    whether the ViT trains, for the checkpoint to hold the weights the engine expects."""
    train = config.train
    return {
        "batch_size": train.batch_size,
        "grad_accum": train.grad_accum,
        "world_size": distributed.get_world_size(),
        "seed": train.seed,
        "freeze_vit": int(config.model.freeze_vit),
    }


# how a full disk (or quota) reads where the writer drops errno: torch's zip writer, safetensors (Rust)
_DISK_FULL = ("no space left", "os error 28", "disk quota exceeded", "os error 122")
_WRITE_FAILED = ("unexpected pos", "file write failed", *_DISK_FULL)


@contextlib.contextmanager
def writing(path: Path, what: str) -> Iterator[None]:
    """A write under ``path`` that fails for want of space is an ``OSError`` saying so, naming ``path`` and its
    free space (torch's own message, "unexpected pos 704 vs 598", names neither); other errors pass."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        text = str(err).lower()
        full = getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(s in text for s in _DISK_FULL)
        if not full and not any(s in text for s in _WRITE_FAILED):
            raise
        place = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
        free = shutil.disk_usage(place).free / 1e6
        why = "no space left on the device" if full else "the device is probably full or over quota"
        raise OSError(
            errno.ENOSPC, f"writing {what} to {path} failed: {why} ({free:.0f} MB free); the writer said: {err}"
        ) from err


def save_checkpoint(engine, folder: Path, step: int, micro_step: int, keep: int, facts: dict[str, int]) -> Path:
    """Atomic DeepSpeed checkpoint: write ``tmp-<tag>``, rename to ``<tag>``, then point ``latest`` at it.
    ``facts`` (:func:`run_facts`) go beside it as ``run.json``, for a resumed run to be checked against."""
    tag = f"step{step:08d}"
    tmp = f"tmp-{tag}"
    rank = distributed.get_rank()
    latest = folder / "latest"
    # a resumed run with nothing left to do: that checkpoint is this one (rank 0 decides for all)
    done = rank == 0 and latest.is_file() and latest.read_text().strip() == tag and (folder / tag).is_dir()
    if distributed.all_gather_object(done)[0]:
        return folder / tag
    check_finite_weights(engine.module, step, folder)
    if rank == 0:
        for leftover in [*folder.glob("tmp-step*"), *folder.glob("old-step*")]:  # of crashes mid-save
            shutil.rmtree(leftover, ignore_errors=True)
    distributed.barrier()
    stage1 = engine.module
    client = {"step": step, "micro_step": micro_step, "sampler": stage1.sampler.state_dict()}
    # frozen weights (a stage-2 LLM) come from their own files: a checkpoint holds what training changes
    with writing(folder / tmp, f"the checkpoint of step {step} ({_last_good(folder)})"):
        engine.save_checkpoint(
            str(folder), tag=tmp, client_state=client, save_latest=False, exclude_frozen_parameters=True
        )
        save_rng(_rng_file(folder / tmp, rank))
    distributed.barrier()
    if rank == 0:
        (folder / tmp / "run.json").write_text(json.dumps(facts))
        aside = folder / f"old-{tag}"  # a tag written before (not the latest): set aside, never deleted first
        if (folder / tag).exists():
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(folder / tag, aside)
        os.replace(folder / tmp, folder / tag)
        shutil.rmtree(aside, ignore_errors=True)
        from blip2_fast.checkpoint import write_text_atomic

        write_text_atomic(latest, tag)  # the last thing: `latest` never names a half-written tag
        tags = sorted(p.name for p in folder.iterdir() if p.is_dir() and p.name.startswith("step"))
        for old in tags[:-keep]:
            if old != tag:
                shutil.rmtree(folder / old, ignore_errors=True)
    distributed.barrier()
    return folder / tag


class Preempted(RunStopped):
    """The run stopped on SIGTERM, its checkpoint saved: ``--train.resume true`` continues it."""

    EXIT_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process SIGTERM ended: not a finished run


class StopRequest:
    """SIGTERM (what SLURM, Kubernetes and DeepSpeed's launcher send before they stop a job) noted, not obeyed
    at once: the loop asks :meth:`agreed` at each step boundary, and every rank stops at the same step.

    Ranks agree where they meet anyway (``at_sync``: the steps whose losses are read), so that the loop adds
    no collective; a run of one rank stops at the next step."""

    def __init__(self):
        self.received, self._before = False, None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # where Python runs signal handlers
            self._before = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc) -> None:
        if self._before is not None:
            signal.signal(signal.SIGTERM, self._before)

    def _note(self, signum, frame) -> None:
        if not self.received and distributed.get_rank() == 0:
            print("SIGTERM: checkpointing at the next step, then stopping", file=sys.stderr, flush=True)
        self.received = True

    def agreed(self, at_sync: bool) -> bool:
        if distributed.get_world_size() == 1:
            return self.received
        return at_sync and any(distributed.all_gather_object(self.received))


def stop_on_request(engine, config, step: int, micro_step: int, ckpt_dir: Path, export) -> None:
    """End a run that :class:`StopRequest` stopped: its checkpoint (with ``train.keep_checkpoints`` 0 the model
    so far, by ``export()``), then :class:`Preempted` naming where it stands."""
    t = config.train
    if t.keep_checkpoints:
        where = save_checkpoint(engine, ckpt_dir, step, micro_step, t.keep_checkpoints, run_facts(config))
        then = f"checkpoint {where}; --train.resume true continues the run"
    else:
        check_finite_weights(engine.module, step, ckpt_dir)
        then = f"no checkpoint kept (train.keep_checkpoints 0), the model so far exported to {export()}"
    raise Preempted(f"SIGTERM at step {step} of {t.steps}: {then}")


def ignore_sigterm(worker_id: int = 0) -> None:
    """Data-loader workers leave SIGTERM to the training process (a launcher signals the whole process tree):
    it stops them when it stops, after its checkpoint."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class NonFiniteTraining(RunStopped):
    """A loss or a weight turned NaN or infinite: the run stops rather than train on, or save, garbage."""


def _last_good(folder: Path) -> str:
    latest = folder / "latest"
    if latest.is_file():
        return f"the last good checkpoint, {folder / latest.read_text().strip()}, is kept"
    return "no checkpoint was written"


def check_finite_losses(rows: list[dict[str, float]], first_step: int, ckpt_dir: Path) -> None:
    """Raise :class:`NonFiniteTraining` at the first step of ``rows`` (one per step from ``first_step``) whose
    loss is not finite, naming the step and the term (the total only when no term is to blame)."""
    for offset, row in enumerate(rows):
        bad = [key for key, value in row.items() if not math.isfinite(value)]
        if bad:
            term = next((key for key in bad if key != "loss"), "loss")
            what = {"temp": "the ITC temperature", "loss": "the loss"}.get(term, f"the {term} loss")
            raise NonFiniteTraining(
                f"step {first_step + offset}: {what} is {row[term]}; training stops and {_last_good(ckpt_dir)} "
                "(a lower optim.lr, or a look at the data, is the usual cure)"
            )


def check_finite_weights(module: torch.nn.Module, step: int, ckpt_dir: Path) -> None:
    """Raise :class:`NonFiniteTraining` when any rank's trainable weights hold NaN or inf: never saved."""
    # under ZeRO-3 a parameter's own data is a placeholder: its rank's partition is ds_tensor
    local = all(bool(getattr(p, "ds_tensor", p).isfinite().all()) for p in module.parameters() if p.requires_grad)
    if not all(distributed.all_gather_object(local)):
        raise NonFiniteTraining(
            f"step {step}: the trained weights hold NaN or inf, so no checkpoint or model is written from them; "
            f"training stops and {_last_good(ckpt_dir)} (a lower optim.lr, or a look at the data, is the usual cure)"
        )


def checkpoints_said(folder: Path) -> str:
    """The checkpoints line of a run's outputs: where, the latest, and what they weigh on disk."""
    latest = folder / "latest"
    if not latest.is_file():
        return "none (train.keep_checkpoints 0: the exported model is all this run keeps; it cannot resume)"
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return (
        f"{folder.resolve()} (latest: {latest.read_text().strip()}; {size / 1e6:.0f} MB with the optimizer state, "
        "for resuming; --train.keep_checkpoints 0 keeps none)"
    )


def _cuda_rng():
    return torch.cuda.get_rng_state() if torch.cuda.is_available() else None


def load_checkpoint(engine, folder: Path, facts: dict[str, int]) -> tuple[int, int]:
    """Restore weights, optimizer, schedule, RNG and sampler from ``folder/latest``; returns (step, micro_step).
    A checkpoint written with other ``facts`` (:func:`run_facts`: batch size, accumulation, ranks, seed, a
    trained or frozen ViT) is refused: its data position, accumulation boundary or weights would mean something
    else in this run."""
    latest = folder / "latest"
    if not latest.is_file():
        raise FileNotFoundError(f"train.resume: no checkpoint to resume from ({latest} does not exist)")
    tag = latest.read_text().strip()
    recorded = folder / tag / "run.json"
    if recorded.is_file():
        then = json.loads(recorded.read_text())
        changed = {k: (then[k], v) for k, v in facts.items() if k in then and then[k] != v}
        if changed:
            diff = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
            raise ValueError(
                f"train.resume: {folder / tag} was written with other settings ({diff}); resume with the "
                "checkpoint's (train.batch_size, train.grad_accum, ranks, train.seed, model.freeze_vit) or start anew"
            )
    rng = _read_rng(folder / tag, distributed.get_rank())
    # DeepSpeed unpickles its files in full: each must first pass as tensors and plain containers
    from blip2_fast.checkpoint import check_weights_only

    for file in sorted((folder / tag).glob("*.pt")):
        check_weights_only(file, deepspeed_checkpoint_types())
    settings = _optimizer_settings(engine)  # this run's, from its config: the checkpoint's replace them
    path, client = engine.load_checkpoint(str(folder), tag=tag, load_module_strict=False)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {folder / tag}")
    changed = _restore_optimizer_settings(engine, settings)
    if changed and distributed.get_rank() == 0:
        print(f"train.resume: {', '.join(changed)}: the rest of the run follows this config, not the checkpoint")
    engine.module.sampler.load_state_dict(client["sampler"])
    _set_rng_state(rng)
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return int(client["step"]), int(client["micro_step"])


OPTIMIZER_SETTINGS = {"weight_decay": "optim.weight_decay", "betas": "optim.betas", "eps": "optim.eps"}


def _optimizer_settings(engine) -> tuple[list[dict[str, Any]], list[float]]:
    """The settings of each parameter group (weight decay, betas, eps) and its peak rate (the schedule's base)."""
    groups = [{k: g[k] for k in OPTIMIZER_SETTINGS} for g in engine.optimizer.param_groups]
    return groups, list(engine.lr_scheduler.base_lrs)


def _restore_optimizer_settings(engine, settings: tuple[list[dict[str, Any]], list[float]]) -> list[str]:
    """Put back this run's optimizer settings and peak rates over a loaded checkpoint's (which DeepSpeed restores
    with the moments, so a resume with a new optim.lr would keep the old one); the rates of this step follow.
    Returns what changed, as "optim.lr 0.0003 -> 0.001"."""
    groups, peaks = settings
    scheduler = engine.lr_scheduler
    changed = {}
    if scheduler.base_lrs != peaks:
        changed["optim.lr"] = f"optim.lr {scheduler.base_lrs[0]:g} -> {peaks[0]:g}"
    for group, wanted in zip(engine.optimizer.param_groups, groups, strict=True):
        for key, value in wanted.items():
            if group[key] != value:
                changed.setdefault(key, f"{OPTIMIZER_SETTINGS[key]} {group[key]} -> {value}")
                group[key] = value
    scheduler.base_lrs = peaks
    for group, peak, ratio in zip(engine.optimizer.param_groups, peaks, scheduler.lr_lambdas, strict=True):
        group["initial_lr"], group["lr"] = peak, peak * ratio(scheduler.last_epoch)
    return list(changed.values())


def _read_rng(folder: Path, rank: int) -> dict[str, Any]:
    """This rank's RNG state in checkpoint ``folder`` (a legacy ``.pt`` when it holds no safetensors one)."""
    path, legacy = _rng_file(folder, rank), folder / f"rng_rank{rank:05d}.pt"
    if path.is_file():
        return load_rng(path)
    if legacy.is_file():
        return _load_legacy_rng(legacy)
    raise FileNotFoundError(f"{path} missing: was the checkpoint written by a run with another world size?")


def deepspeed_checkpoint_types() -> list[type]:
    """The classes DeepSpeed 0.19's checkpoint files hold besides tensors and containers (in its ZeRO
    optimizer shards), each a plain record of numbers: what a weights-only read of them allows."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]  # DynamicLossScaler: fp16 runs


def export_trainable(engine, qformer_config: QFormerConfig, path: Path) -> Path | None:
    """The Q-Former alone (no ViT) as safetensors, fp32, gathered from ZeRO-3 partitions if needed. Rank 0 writes."""
    import deepspeed

    from blip2_fast.checkpoint import save_qformer
    from blip2_fast.qformer import QFormer

    qformer = engine.module.qformer
    params = list(qformer.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=_zero_stage(engine) == 3):
        state = {k: v.detach().float().cpu().clone() for k, v in qformer.state_dict().items()}
    if distributed.get_rank() != 0:
        return None
    plain = QFormer(qformer_config)
    state["temp"] = state["temp"].reshape(plain.temp.shape)
    plain.load_state_dict(state)
    plain.tie_weights()
    plain.ln_vision.eps = qformer.ln_vision.eps
    return save_qformer(plain, path)


def export_vision(engine, path: Path) -> Path | None:
    """A trained ViT (``engine.module.vision``) as ``save_vision`` writes it, gathered from ZeRO-3 partitions
    if needed. Rank 0 writes."""
    import deepspeed

    from blip2_fast.checkpoint import save_vision

    vision = engine.module.vision
    params = list(vision.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=_zero_stage(engine) == 3):
        if distributed.get_rank() == 0:
            return save_vision(vision, path)
    return None


def export_run(engine, qformer_config: QFormerConfig, vision, run_dir: Path) -> None:
    """The weights in ``engine`` now as ``model.safetensors`` (and ``vision.safetensors`` when the ViT trains),
    seen by every rank when this returns."""
    with writing(run_dir, "the trained model"):
        export_trainable(engine, qformer_config, run_dir / "model.safetensors")
        if not vision.frozen:
            export_vision(engine, run_dir / "vision.safetensors")
    distributed.barrier()


def evaluate_now(engine, qformer_config: QFormerConfig, vision, held_out, tokenizer, config, device, run_dir: Path):
    """Held-out retrieval of the weights in ``engine`` now (every rank takes part): they are exported first
    (``model.safetensors``, and ``vision.safetensors`` for a trainable ViT), then read back as plain models.
    Every RNG is left as it was, so that training goes on as it would have without the evaluation."""
    from blip2_fast.checkpoint import load_qformer, load_vision
    from blip2_fast.evaluate import evaluate_run

    state, cuda = _rng_state(), _cuda_rng()  # building the plain models draws (then overwrites) weights
    export_run(engine, qformer_config, vision, run_dir)
    plain = load_qformer(run_dir / "model.safetensors").to(device).eval()
    if not vision.frozen:
        vision = load_vision(run_dir / "vision.safetensors").to_device(device)
    metrics = evaluate_run(plain, vision, held_out, tokenizer, config, device)
    _set_rng_state(state)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)
    return metrics


def keep_best(run_dir: Path, step: int, metrics: dict[str, float]) -> Path:
    """Copy the run's exported model (and ViT, and config) to ``<run>/best/``, replacing it whole."""
    from blip2_fast.checkpoint import replacing_folder

    best = run_dir / "best"
    with replacing_folder(best) as scratch:
        for name in ("model.safetensors", "vision.safetensors", "config.yaml"):
            shutil.copy2(run_dir / name, scratch / name)
        (scratch / "best.json").write_text(json.dumps({"step": step, **{k: metrics[k] for k in RECALL_FIELDS}}))
    return best


def best_so_far(run_dir: Path) -> float:
    """The mean recall of ``<run>/best/`` (-1 without one): a resumed run keeps beating the same record."""
    from blip2_fast.checkpoint import restore_replaced

    if distributed.get_rank() == 0:  # the rank that keeps best/ (two renaming it would race)
        restore_replaced(run_dir / "best")  # a crash mid-replacement left it aside
    record = run_dir / "best" / "best.json"
    return float(json.loads(record.read_text())["r_mean"]) if record.is_file() else -1.0


def _zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


# ---------------------------------------------------------------------------- outputs


CSV_FIELDS = ["step", "epoch", "lr", "loss", "itc", "itm", "itg", "temp", "skipped", "sec_per_step"]
RECALL_FIELDS = ["txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10", "r_mean"]
RECALL_LABELS = [("txt_r1", "image->text R@1"), ("img_r1", "text->image R@1"), ("r_mean", "mean recall")]


def write_csv_atomic(path: Path, fields: list[str], rows: list[dict[str, Any]]) -> None:
    """A whole CSV in one atomic write: a resumed run's metrics.csv keeps its history through a crash."""
    from blip2_fast.checkpoint import write_text_atomic

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    with writing(path, "the metrics"):
        write_text_atomic(path, text.getvalue())


class MetricsLog:
    """metrics.csv (train and eval rows in one table), TensorBoard when installed; rank 0 only."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if resume_step and self.path.is_file():
            with self.path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self._rewrite()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self.tb = None

    def _rewrite(self) -> None:
        write_csv_atomic(self.path, CSV_FIELDS + RECALL_FIELDS, self.rows)

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with writing(self.path, "the metrics"), self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_FIELDS + RECALL_FIELDS).writerow(row)
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, int(row["step"]))

    def plot(self, path: Path) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no curves.png (pip install matplotlib)")
            return None

        def series(key):
            pts = [(int(r["step"]), float(r[key])) for r in self.rows if r.get(key) not in (None, "")]
            return [p[0] for p in pts], [p[1] for p in pts]

        recalls = [(key, label) for key, label in RECALL_LABELS if series(key)[0]]
        # the retrieval panel only when an evaluation ran; on the run's step axis and 0-100, each value written
        fig, axes = plt.subplots(1, 2 if recalls else 1, figsize=(11 if recalls else 6, 4), squeeze=False)
        ax_loss = axes[0][0]
        for key in ("itc", "itm", "itg"):
            ax_loss.plot(*series(key), label=key)
        ax_loss.set_xlabel("step")
        ax_loss.set_ylabel("loss")
        ax_loss.legend()
        ax_loss.set_title("stage-1 losses")
        if recalls:
            ax_rec = axes[0][1]
            for key, label in recalls:
                steps, values = series(key)
                ax_rec.plot(steps, values, marker="o", label=label)
                for x, y in zip(steps, values, strict=True):
                    ax_rec.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 5), ha="center")
            last = max(int(r["step"]) for r in self.rows) if self.rows else 1
            ax_rec.set_xlim(0, last * 1.05)
            ax_rec.set_ylim(0, 105)
            ax_rec.set_xlabel("step")
            ax_rec.set_ylabel("recall (%)")
            ax_rec.legend()
            ax_rec.set_title("held-out retrieval")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------- the run


RUN_MARKER = ".blip2_fast-run"  # what tells a run folder this project wrote from a user's folder


def _move_earlier_run_aside(run_dir: Path) -> None:
    """A fresh run (``train.resume`` false) in a folder that holds one already: its checkpoints, best model and
    metrics would mix with the new run's (checkpoint rotation could even delete the new run's newest), so the
    earlier run moves to ``<name>.replaced-<time>`` beside it, whole. Only a folder holding :data:`RUN_MARKER`
    moves; any other non-empty one is refused, never touched."""
    if not run_dir.exists() and not run_dir.is_symlink():
        return
    if not run_dir.is_dir():
        raise ValueError(f"train.name: {run_dir} exists and is not a folder; choose another train.name")
    if not (run_dir / RUN_MARKER).is_file():
        if not any(run_dir.iterdir()):
            return  # an empty folder holds no run
        raise ValueError(
            f"train.name: {run_dir} holds files no run of this project wrote (it has no {RUN_MARKER}); "
            "choose another train.name or train.output_dir, or move that folder away yourself"
        )
    base = run_dir.with_name(f"{run_dir.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}")
    aside, n = base, 0
    while aside.exists():  # two fresh starts within a second
        n += 1
        aside = base.with_name(f"{base.name}-{n}")
    run_dir.rename(aside)
    print(f"{run_dir} held an earlier run: moved it to {aside} (train.resume true continues a run instead)")


def _record_config(run_dir: Path, config) -> None:
    """The run's resolved config as ``config.yaml``, written whole."""
    from blip2_fast.checkpoint import write_text_atomic

    write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(config.to_dict(), sort_keys=False))


class RunFolderLock:
    """An exclusive ``flock`` on ``<output_dir>/<name>.lock``, beside the run folder (moving the folder aside
    leaves it in place), that names its holder while held. The kernel drops it when the process dies, so a
    crashed run never leaves its folder locked."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.path = run_dir.with_name(f"{run_dir.name}.lock")
        self.fd: int | None = None

    def acquire(self) -> RunFolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process that has not named itself"
            os.close(fd)
            raise RuntimeError(
                f"{self.run_dir} is in use by another training ({holder}; lock {self.path}); "
                "wait for it to end, or choose another train.name or train.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a holder no longer there is not named
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunFolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def holding_run_folder(config) -> Iterator[None]:
    """The run folder of ``config.train`` locked for the block (rank 0 holds :class:`RunFolderLock` for all
    ranks): a second training in it is refused at once, on every rank, before it changes anything."""
    init_distributed()
    lock, refusal = None, None
    if distributed.get_rank() == 0:
        try:
            lock = RunFolderLock(Path(config.train.output_dir) / config.train.name).acquire()
        except (RuntimeError, OSError) as err:
            refusal = str(err)
    refusal = distributed.all_gather_object(refusal)[0]  # the other ranks stop too, instead of waiting
    if refusal:
        raise RuntimeError(refusal)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def start_run(config) -> tuple[torch.device, Path, Path]:
    """Join the ranks and seed every RNG the same on all ranks, so that fresh weights match everywhere; the run
    folder is left as it is until :func:`open_run` (once everything is built). ``config``: any run config with
    ``train`` and ``to_dict``. Returns (device, run folder, checkpoint folder)."""
    device = init_distributed()
    t = config.train
    run_dir = Path(t.output_dir) / t.name
    torch.manual_seed(t.seed)
    np.random.seed(t.seed)
    random.seed(t.seed)
    return device, run_dir, run_dir / "checkpoints"


def open_run(engine, config, ckpt_dir: Path) -> tuple[int, int]:
    """(step, micro_step) to start from, once the engine and data are built (every setting checked): 0, 0 for a
    fresh run, which moves an earlier run aside and writes ``config.yaml``; a resumed run's from the latest
    checkpoint, which must accept this config first. Nothing in the run folder changes before."""
    run_dir = ckpt_dir.parent
    rank = distributed.get_rank()
    step = micro_step = 0
    if config.train.resume:
        step, micro_step = load_checkpoint(engine, ckpt_dir, run_facts(config))
    else:
        refusal = None
        if rank == 0:
            try:
                _move_earlier_run_aside(run_dir)
            except (ValueError, OSError) as err:
                refusal = str(err)
        if refusal := distributed.all_gather_object(refusal)[0]:  # every rank stops, none waits
            raise ValueError(refusal)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RUN_MARKER).write_text("a run folder of blip2_fast (a fresh run may move it aside)\n")
        _record_config(run_dir, config)  # a resumed run's checkpoint accepted this config: the run's record now
        if config.train.resume:
            print(f"resumed from {ckpt_dir / (ckpt_dir / 'latest').read_text().strip()} at step {step}")
    distributed.barrier()
    return step, micro_step


def is_terminal(stream) -> bool:
    """Whether ``stream`` is a terminal: elsewhere (CI logs, nohup, SLURM files) progress prints as lines."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def compile_step(module: torch.nn.Module, mode: str | None, device: torch.device, zero_stage: int) -> None:
    """``train.compile``: the module's forward (and so its backward) compiled in place as one graph.

    ZeRO-3 gathers each layer's parameters in module hooks that DeepSpeed keeps out of compiled code, which
    splits the graph at every layer: refused (ZeRO 0-2 keep whole parameters on every rank and compile whole).
    """
    if mode is None:
        return
    if zero_stage == 3:
        raise ValueError(
            f"train.compile={mode} needs ZeRO stage 0, 1 or 2 (ZeRO-3 gathers parameters in hooks that split "
            "the compiled graph at every layer); set train.zero_stage or train.compile null"
        )
    if mode == "inductor-cudagraphs" and device.type != "cuda":
        raise ValueError(f"train.compile=inductor-cudagraphs needs a CUDA device, this run is on {device.type}")
    backend = "aot_eager" if mode == "aot_eager" else "inductor"
    module.compile(backend=backend, fullgraph=True, mode="reduce-overhead" if mode == "inductor-cudagraphs" else None)


def build_engine(module: torch.nn.Module, config, ds_config: dict[str, Any]):
    """DeepSpeed engine over ``module``: AdamW on its trainable parameters (no decay on biases and norms) and
    warmup + cosine as a LambdaLR. Returns (engine, optimizer, scheduler)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    optim = config.optim
    groups = param_groups(module, optim.weight_decay, optim.lr, optim.vit_layer_decay)
    # one fused kernel for the whole update on CUDA (torch's foreach loop elsewhere, as the CPU tests hold it)
    fused = get_accelerator().device_name() == "cuda"
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused or None)
    # LambdaLR multiplies each group's base lr, so the schedule is written as a ratio to optim.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, optim, config.train.steps) / optim.lr)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine, optimizer, scheduler


def run(config: TrainConfig) -> dict[str, Any]:
    """Train (and evaluate) as ``config`` says; returns the per-step losses, the final metrics and the paths.
    On SIGTERM the run checkpoints at the next step and raises :class:`Preempted`."""
    with holding_run_folder(config), StopRequest() as stop:
        return _train(config, stop)


def _train(config: TrainConfig, stop: StopRequest) -> dict[str, Any]:
    from tqdm import tqdm

    from blip2_fast.losses import Stage1Loss

    # seeded alike on all ranks: the fresh weights (cross-attention, queries, heads, a random ViT) match
    device, run_dir, ckpt_dir = start_run(config)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    t = config.train
    tokenizer = build_tokenizer(config)
    from blip2_fast.checkpoint import read_each_pth_once

    with read_each_pth_once():  # a LAVIS model.init gives both: one read
        vision = build_vision(config)
        qformer = build_qformer(config, vision.config.hidden_size)
    if len(tokenizer) > qformer.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the Q-Former vocab_size is {qformer.config.vocab_size}"
        )
    # DeepSpeed broadcasts parameters as bytes, which a 0-dim tensor cannot be viewed as: train the
    # temperature as shape (1,) and give it back its 0-dim shape on export.
    qformer.temp = torch.nn.Parameter(qformer.temp.detach().reshape(1))
    ds_config = deepspeed_config(config, device)
    zero3 = ds_config["zero_optimization"]["stage"] == 3
    stage1 = Stage1Loss(qformer, tokenizer.bos_token_id, seed=t.seed, share_fused_weights=not zero3)
    if zero3:
        register_zero3_external_parameters(stage1)
    compile_step(stage1, t.compile, device, ds_config["zero_optimization"]["stage"])
    vision = vision.to_device(device)
    train_vit = not vision.frozen
    engine, _, _ = build_engine(Stage1WithVision(vision, stage1) if train_vit else stage1, config, ds_config)
    precision = "bf16" if ds_config["bf16"]["enabled"] else "fp16" if ds_config["fp16"]["enabled"] else "fp32"

    from blip2_fast import data as D

    train_set, held_out = build_datasets(config, vision.config.image_size, rank, world)
    max_len = config.model.max_text_length
    batches = GlobalBatches(
        train_set,
        t.batch_size,
        t.seed,
        rank,
        world,
        lambda s: D.collate_batch(s, tokenizer, max_length=max_len),
        config.data.num_workers,
    )
    step, micro_step = open_run(engine, config, ckpt_dir)  # the first change to the run folder
    if rank == 0 and not (train_vit and t.resume):
        from blip2_fast.checkpoint import save_vision

        # a trainable ViT's is replaced at each export; a resumed one's stays the last export until then
        with writing(run_dir, "the run's ViT"):
            save_vision(vision, run_dir / "vision.safetensors")
    log = MetricsLog(run_dir, step) if rank == 0 else None
    best = best_so_far(run_dir)

    def evaluated(metrics: dict[str, float]) -> None:
        """Log a held-out evaluation at this step; with eval.every, keep the best weights so far."""
        nonlocal best
        if rank == 0:
            log.log({"step": step, **{k: round(metrics[k], 3) for k in RECALL_FIELDS}})
            if config.eval.every and metrics["r_mean"] > best:
                best = metrics["r_mean"]
                keep_best(run_dir, step, metrics)
        distributed.barrier()

    features = None
    if config.data.feature_cache:
        fingerprint = {"vit": D.module_fingerprint(vision), "data": dataclasses.asdict(config.data), "seed": t.seed}
        # one file per rank: each rank reads its own rows of every global batch
        features = D.FeatureCache(run_dir / f"vit_features_rank{rank}.npy", len(train_set), vision, fingerprint)
    vision_dtype = next(vision.parameters()).dtype
    end = t.stop_after or t.steps
    history: list[dict[str, float]] = []
    # not a terminal: a plain line every log_every steps instead of the bar
    plain = rank == 0 and not is_terminal(sys.stderr)
    desc = f"stage 1 ({world} rank{'s' if world > 1 else ''})"
    bar = tqdm(total=end, initial=step, desc=desc, disable=rank != 0 or plain)
    engine.train()
    stream = batches.iterate(micro_step)
    acc: torch.Tensor | None = None  # this step's (loss, itc, itm, itg, temp) so far, on the device
    pending: list[torch.Tensor] = []  # finished steps' (loss, itc, itm, itg, temp, skipped), not yet read
    tic = time.perf_counter()
    skipped = 0
    while step < end:
        micro_step, batch = next(stream)
        skipped += int(batch["skipped"])
        pixels = batch["pixels"].to(device)
        if train_vit:
            image_input = pixels  # the engine runs the ViT
        elif features is not None:
            image_input = features(batch["indices"], pixels).to(device=device, dtype=vision_dtype)
        else:
            image_input = vision(pixels)  # frozen, no_grad, half precision on GPU
        out = engine(
            image_input,
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            torch.as_tensor(batch["image_ids"], device=device),
        )
        engine.backward(out.loss)
        lr = engine.get_lr()[0]  # the rate this step applies (an fp16 step skipped on overflow holds it back)
        engine.step()
        terms = out.terms().double() / t.grad_accum
        acc = terms if acc is None else acc + terms
        micro_step += 1
        if micro_step % t.grad_accum:
            continue
        step += 1
        pending.append(torch.cat([acc, acc.new_tensor([skipped])]))
        acc, skipped = None, 0
        bar.update(1)
        evaluating = config.eval.every and step % config.eval.every == 0 and step < t.steps and held_out is not None
        reading = step % t.log_every == 0 or step == end or evaluating  # the ranks meet: losses are read
        if reading:
            # losses averaged over ranks, what the global batch gave: one read for every step since the last
            # (in between they stay on the device: no host sync)
            values = torch.stack(pending)
            pending = []
            distributed.all_reduce_sum(values)
            values = values.cpu()
            values[:, :5] /= world
            rows = [
                dict(zip(("loss", "itc", "itm", "itg", "temp"), row, strict=True)) for row in values[:, :5].tolist()
            ]
            check_finite_losses(rows, step - len(rows) + 1, ckpt_dir)  # the same values on every rank
            history += rows
            record = history[-1]
            bar.set_postfix(itc=f"{record['itc']:.3f}", itm=f"{record['itm']:.3f}", itg=f"{record['itg']:.3f}")
            if rank == 0 and (step % t.log_every == 0 or step == end):
                elapsed = time.perf_counter() - tic
                tic = time.perf_counter()
                epoch = micro_step / batches.per_epoch if batches.per_epoch else 0.0
                log.log(
                    {
                        "step": step,
                        "epoch": round(epoch, 4),
                        "lr": lr,
                        **record,
                        "skipped": int(values[-1, 5]),
                        "sec_per_step": round(elapsed / t.log_every, 4),
                    }
                )
                if plain:
                    print(
                        f"stage 1: step {step}/{end}  itc {record['itc']:.4f}  itm {record['itm']:.4f}  "
                        f"itg {record['itg']:.4f}  lr {lr:.3g}  {elapsed / t.log_every:.2f} s/step",
                        file=sys.stderr,
                        flush=True,
                    )
        # evaluate before the checkpoint of the same step, so that a crash mid-evaluation replays it on resume;
        # at train.stop_after too, as an uninterrupted run would (the last step's is the final evaluation's)
        if evaluating:
            evaluated(evaluate_now(engine, qformer.config, vision, held_out, tokenizer, config, device, run_dir))
            engine.train()
        if t.save_every and step % t.save_every == 0 and step < end:
            save_checkpoint(engine, ckpt_dir, step, micro_step, t.keep_checkpoints, run_facts(config))
        if step < end and stop.agreed(reading):
            bar.close()
            if log is not None:
                log.close()

            def export() -> Path:
                export_run(engine, qformer.config, vision, run_dir)
                return run_dir / "model.safetensors"

            stop_on_request(engine, config, step, micro_step, ckpt_dir, export)
    bar.close()
    if t.keep_checkpoints:  # which checks the weights finite first: nothing non-finite is saved or exported
        save_checkpoint(engine, ckpt_dir, step, micro_step, t.keep_checkpoints, run_facts(config))
    else:
        check_finite_weights(engine.module, step, ckpt_dir)
    model_path = run_dir / "model.safetensors"

    result: dict[str, Any] = {"history": history, "run_dir": run_dir, "model": model_path, "precision": precision}
    if t.evaluate and step == t.steps and held_out is not None:
        result["eval"] = evaluate_now(engine, qformer.config, vision, held_out, tokenizer, config, device, run_dir)
        evaluated(result["eval"])
    else:
        export_run(engine, qformer.config, vision, run_dir)
    if rank == 0:
        plot = log.plot(run_dir / "curves.png")
        log.close()
        _print_outputs(run_dir, ckpt_dir, model_path, plot, history, result.get("eval"))
    return result


def _print_outputs(run_dir, ckpt_dir, model_path, plot, history, metrics) -> None:
    if history:
        last = history[-1]
        print(f"final losses: itc {last['itc']:.4f}  itm {last['itm']:.4f}  itg {last['itg']:.4f}")
    if metrics:
        from blip2_fast.evaluate import recall_summary

        print(recall_summary(metrics))
    print("outputs:")
    print(f"  run folder      {run_dir.resolve()}")
    print(f"  config          {(run_dir / 'config.yaml').resolve()}")
    print(f"  metrics         {(run_dir / 'metrics.csv').resolve()}")
    if plot:
        print(f"  curves          {Path(plot).resolve()}")
    print(f"  checkpoints     {checkpoints_said(ckpt_dir)}")
    print(f"  trainable model {model_path.resolve()}")
    print(f"  image encoder   {(run_dir / 'vision.safetensors').resolve()}")
    if (run_dir / "best" / "best.json").is_file():
        record = json.loads((run_dir / "best" / "best.json").read_text())
        where = f"step {record['step']}, mean recall {record['r_mean']:.1f}"
        print(f"  best so far     {(run_dir / 'best').resolve()} ({where})")
    print(f"  evaluate again  python -m blip2_fast.evaluate --checkpoint {model_path}")


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    parser = argparse.ArgumentParser(
        description="BLIP-2 Q-Former pre-training with DeepSpeed. Any config key can be overridden: "
        "--train.steps 500 --optim.lr 1e-4 --model.qformer.num_hidden_layers 6",
    )
    parser.add_argument(
        "--stage",
        type=int,
        choices=(1, 2),
        required=True,
        help="1: Q-Former pre-training (ITC+ITM+ITG); 2: soft prompt of a frozen LLM (blip2_fast/train_stage2.py)",
    )
    parser.add_argument("--config", default=None, help="YAML/TOML training config (default: the embedded one)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    return args, parse_overrides(parser, rest)


def parse_overrides(parser: argparse.ArgumentParser, rest: list[str]) -> list[tuple[str, str]]:
    """``--section.key value`` and ``--section.key=value`` pairs, in order; anything else is a usage error."""
    overrides = []
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or token == "--":
            parser.error(f"unexpected argument {token!r}; overrides look like --section.key value")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                parser.error(f"override {token} needs a value")
            key, value = token[2:], rest[i + 1]
            i += 2
        overrides.append((key, value))
    return overrides


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args, overrides = parse_args(argv)
    if args.stage == 2:
        # stage 2 (a frozen LLM after the Q-Former) has its own entry point; it takes the raw arguments
        from blip2_fast import train_stage2

        return train_stage2.main(sys.argv[1:] if argv is None else list(argv))
    return run(load_config(args.config, overrides))


if __name__ == "__main__":
    from blip2_fast.cli import run_main

    run_main(main)
