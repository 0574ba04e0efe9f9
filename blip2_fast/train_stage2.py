"""Stage-2 training: the Q-Former's queries as a soft prompt of a frozen LLM, with DeepSpeed ZeRO.

    deepspeed blip2_fast/train.py --stage 2                          # the embedded default, any machine
    python blip2_fast/train.py --stage 2                             # same, one process, no launcher
    deepspeed blip2_fast/train.py --stage 2 --init runs/stage1-default --train.steps 500
    deepspeed blip2_fast/train.py --stage 2 --config configs/stage2_opt.yaml --model.llm /models/opt-2.7b

The embedded default (the defaults of :class:`Stage2Config`) needs nothing from
the network: a small OPT over the shipped WordPiece vocabulary, first taught from
text alone to restate the captions it reads in its context, as a pretrained LLM
would (:mod:`blip2_fast.tiny_llm`; a minute once, then cached), procedurally
drawn shapes, and the stage-1 default's output (``runs/stage1-default``) as
the Q-Former's start when it exists, else a fresh tiny Q-Former over a random
frozen ViT. Only ``qformer`` and ``llm_proj`` train: the optimizer (torch
AdamW) holds them alone, so the frozen LLM and ViT carry no optimizer state.

A run folder ``<train.output_dir>/<train.name>/`` receives the resolved config
(``config.yaml``), ``metrics.csv``, ``loss.png``, atomic DeepSpeed checkpoints
under ``checkpoints/`` (train.py's), the trainable part as
``model.safetensors`` (:func:`blip2_fast.stage2.save_trainable`), the whole
model in the transformers ``Blip2ForConditionalGeneration`` layout under
``transformers/``, and ``captions.json``: greedy captions of held-out images
and, on synthetic shapes, how often they name the right colour / shape against
the chance level: the held-out reference captions scored on shuffled scenes.

``qformer`` and ``llm_proj`` learn at one rate, as in LAVIS, unless
``optim.qformer_lr_scale`` slows the Q-Former down. Stage 2 checks a loaded
Q-Former before training and warns when its query outputs have collapsed onto
one vector per image (a soft prompt of Q equal tokens, which stage 2 does not
undo). Not on a terminal, a progress line goes to stderr every
``train.log_every`` steps.
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
import csv  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

from blip2_fast import distributed  # noqa: E402
from blip2_fast.config import QFormerConfig, VisionConfig  # noqa: E402
from blip2_fast.train import (  # noqa: E402
    DataSection,
    OptimSection,
    StopRequest,
    TrainSection,
    build_datasets,
    check_finite_losses,
    check_finite_weights,
    checkpoints_said,
    deepspeed_config,
    holding_run_folder,
    is_terminal,
    lr_at,
    open_run,
    param_groups,
    parse_overrides,
    read_config,
    register_zero3_fused_parameters,
    run_facts,
    save_checkpoint,
    sections_from_dict,
    start_run,
    stop_on_request,
    write_csv_atomic,
    writing,
)

DEFAULT_INIT = "runs/stage1-default"
LLM_FAMILIES = ("auto", "decoder", "encoder_decoder")

# ---------------------------------------------------------------------------- config


@dataclasses.dataclass
class Stage2ModelSection:
    # "auto": runs/stage1-default when it exists (the stage-1 default's output), else a fresh Q-Former;
    # a stage-1 run folder or its model.safetensors; a transformers BLIP-2 stage-1 folder or a LAVIS .pth
    # of either stage (its Q-Former, and projection) over model.llm; or a trained stage-2 model to fine-tune,
    # LLM and tokenizer included: a Blip2ForConditionalGeneration folder or a stage-2 run; null: always fresh
    init: str | None = "auto"
    # the ViT when a LAVIS init leaves it out (as LAVIS does with frozen weights): any source
    # checkpoint.load_vision reads (LAVIS' eva_vit_g.pth, a transformers BLIP-2 folder, ...)
    vision_weights: str | None = None
    # a local transformers LLM folder (OPT, FlanT5, ...); null: the tiny OPT of default_stage2_model
    llm: str | None = None
    llm_family: str = "auto"  # auto: from the LLM config's is_encoder_decoder
    # the tiny OPT (llm: null): 2 layers of width 128 keep a step at CPU milliseconds
    llm_layers: int = 2
    llm_hidden: int = 128
    llm_heads: int = 4
    # the tiny OPT is first taught for this many steps to restate the captions it reads in its context
    # (blip2_fast.tiny_llm, cached); 0: a random frozen OPT, which stage 1's representation does not help
    llm_reader_steps: int = 200
    # a fresh Q-Former / ViT (no stage-1 init): QFormerConfig / VisionConfig keys or a preset;
    # encoder_width follows the ViT. model.vision also describes the ViT of an EVA .pth (eva_vit_g.pth:
    # {preset: eva_vit_g}), which cannot tell its head count
    qformer: dict = dataclasses.field(default_factory=lambda: {"preset": "tiny"})
    vision: dict = dataclasses.field(default_factory=lambda: {"preset": "tiny"})
    max_text_length: int = 24
    # the LLM's input: BLIP-2 pre-trains with an empty prompt (captions follow the queries directly)
    prompt: str = ""
    freeze_vit: bool = True  # False trains the ViT too, as BLIP-2's COCO caption fine-tuning does
    vit_grad_checkpoint: bool = False  # trainable ViT: recompute its activations in the backward
    image_size: int | None = None  # the ViT at another image size, its position embeddings resized; None: its own

    def __post_init__(self) -> None:
        if self.llm_family not in LLM_FAMILIES:
            raise ValueError(f"model.llm_family must be one of {', '.join(LLM_FAMILIES)}, got {self.llm_family!r}")
        for key in ("llm_layers", "llm_hidden", "llm_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key} must be >= 1, got {getattr(self, key)}")
        if self.llm_reader_steps < 0:
            raise ValueError(f"model.llm_reader_steps must be >= 0, got {self.llm_reader_steps}")
        if self.llm_hidden % self.llm_heads:
            raise ValueError(f"model.llm_hidden ({self.llm_hidden}) must be divisible by llm_heads ({self.llm_heads})")
        QFormerConfig.from_dict({k: v for k, v in self.qformer.items() if k != "encoder_width"})
        VisionConfig.from_dict(self.vision)
        if self.vit_grad_checkpoint and self.freeze_vit:
            raise ValueError(
                "model.vit_grad_checkpoint needs model.freeze_vit=false (a frozen ViT keeps no activations)"
            )
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"model.image_size must be a positive int or null, got {self.image_size}")
        if self.max_text_length < 2:
            raise ValueError(f"model.max_text_length must be >= 2 (a word + EOS), got {self.max_text_length}")


@dataclasses.dataclass
class Stage2EvalSection:
    num_images: int = 64  # held-out images captioned (greedy) and scored at the end
    batch_size: int = 32
    max_new_tokens: int = 12
    shuffles: int = 20  # shuffled-scene scorings averaged into the chance level
    show: int = 8  # captions printed

    def __post_init__(self) -> None:
        for key in ("num_images", "batch_size", "max_new_tokens", "shuffles"):
            if getattr(self, key) < 1:
                raise ValueError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        if self.show < 0:
            raise ValueError(f"eval.show must be >= 0, got {self.show}")


def _stage2_train() -> TrainSection:
    # 300 steps of 16: a bit over one epoch of the 4000 images, about 4 minutes on 2 busy CPU cores
    return TrainSection(name="stage2-default", steps=300, batch_size=16)


@dataclasses.dataclass
class Stage2OptimSection(OptimSection):
    # The Q-Former's rate (its queries and ln_vision too) as a fraction of lr; llm_proj (and a trainable
    # ViT, with vit_layer_decay) learn at lr. 1: one rate for all, as LAVIS trains
    qformer_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.qformer_lr_scale <= 1:
            raise ValueError(f"optim.qformer_lr_scale must lie in (0, 1], got {self.qformer_lr_scale}")


def _stage2_optim() -> Stage2OptimSection:
    # 300 steps from a 150-step stage-1 run (lr 1e-4) reach held-out LM loss 0.74 at 1e-3 and 0.78 at 3e-3;
    # the same Q-Former without stage 1 (BERT weights, fresh queries and cross-attention) 0.75 and 0.96
    return Stage2OptimSection(lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10)


def _stage2_data() -> DataSection:
    return DataSection(train_size=4000, eval_size=64)


SECTIONS: dict[str, type] = {
    "model": Stage2ModelSection,
    "data": DataSection,
    "optim": Stage2OptimSection,
    "train": TrainSection,
    "eval": Stage2EvalSection,
}


@dataclasses.dataclass
class Stage2Config:
    model: Stage2ModelSection = dataclasses.field(default_factory=Stage2ModelSection)
    data: DataSection = dataclasses.field(default_factory=_stage2_data)
    optim: Stage2OptimSection = dataclasses.field(default_factory=_stage2_optim)
    train: TrainSection = dataclasses.field(default_factory=_stage2_train)
    eval: Stage2EvalSection = dataclasses.field(default_factory=Stage2EvalSection)

    def __post_init__(self) -> None:
        if getattr(self.data, "feature_cache", False):
            raise ValueError("data.feature_cache is a stage-1 option; stage 2 runs the frozen ViT in its model")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stage2Config:
        return sections_from_dict(cls, SECTIONS, data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[tuple[str, str]] = ()) -> Stage2Config:
    """Defaults <- YAML/TOML file <- ``--key value`` overrides, validated."""
    return read_config(Stage2Config, SECTIONS, path, overrides)


def resolve_init(init: str | None) -> Path | None:
    """What to start from: ``auto`` is the stage-1 default's folder when it holds a model."""
    from blip2_fast.stage2_convert import is_stage2_folder

    if asked_fresh(init):
        return None
    if init == "auto":
        return Path(DEFAULT_INIT) if (Path(DEFAULT_INIT) / "model.safetensors").is_file() else None
    path = Path(init)
    stage1 = (path / "model.safetensors").is_file() or (path.is_file() and path.suffix == ".safetensors")
    other = (path.is_file() and path.suffix in (".pth", ".pt")) or (path / "config.json").is_file()
    if not stage1 and not other and not is_stage2_folder(path):
        raise FileNotFoundError(
            f"model.init: expected a run folder of ours (either stage) or a stage-1 model.safetensors, a "
            f"transformers BLIP-2 folder, or a LAVIS .pth, got {init}"
        )
    return path


def asked_fresh(init: str | None) -> bool:
    """model.init asks for a fresh Q-Former whatever exists (null, "fresh", ...), rather than "auto"."""
    return init is None or init.lower() in ("", "none", "null", "fresh")


def describe_init(init: str | None, resolved: Path | None) -> str:
    """What the run starts from, as printed: the folder, or why the Q-Former is fresh."""
    if resolved is not None:
        return str(resolved)
    if asked_fresh(init):
        found = (Path(DEFAULT_INIT) / "model.safetensors").is_file()
        return f"fresh Q-Former, as asked (model.init {init or 'null'}" + (
            f"; {DEFAULT_INIT} is not used)" if found else ")"
        )
    return f"fresh Q-Former (model.init auto: no stage-1 output at {DEFAULT_INIT})"


# ---------------------------------------------------------------------------- model


def build_model(config: Stage2Config):
    """(Blip2Stage2, tokenizer, init or None) as the model section says."""
    from blip2_fast.stage2_convert import is_stage2_folder, load_pretrained

    m = config.model
    init = resolve_init(m.init)
    if init is not None and is_stage2_folder(init):
        if m.llm is not None:
            raise ValueError(f"model.init {init} is a whole stage-2 model with its own LLM: model.llm must be null")
        _refuse_vision_weights(m, f"{init} is a whole stage-2 model, trained with its own ViT")
        model, tokenizer = load_pretrained(init)
    elif init is not None and (init.suffix in (".pth", ".pt") or (init / "config.json").is_file()):
        model, tokenizer = _checkpoint_model(config, init)
    else:
        if init is not None:
            _refuse_vision_weights(m, f"{init} is a stage-1 run, whose Q-Former learned with its vision.safetensors")
        model, tokenizer = _stage2_model(config, init)
        if m.vision_weights:
            model.image_encoder = _fresh_qformer_vision(m, model.image_encoder.config)
    if m.image_size is not None and m.image_size != model.image_encoder.config.image_size:
        from blip2_fast.checkpoint import resize_vision

        model.image_encoder = resize_vision(model.image_encoder, m.image_size)
    if not m.freeze_vit:
        model.image_encoder.unfreeze(m.vit_grad_checkpoint)
    return model, tokenizer, init


def _refuse_vision_weights(m: Stage2ModelSection, why: str) -> None:
    if m.vision_weights:
        raise ValueError(
            f"model.vision_weights {m.vision_weights}: not used, {why}; it applies to a LAVIS or transformers "
            "model.init, or a fresh Q-Former (model.init null): set it null"
        )


def _fresh_qformer_vision(m: Stage2ModelSection, described: VisionConfig):
    """The ViT of ``model.vision_weights`` for a fresh Q-Former, which was built for ``model.vision``'s width."""
    from blip2_fast.checkpoint import load_vision

    source = Path(m.vision_weights)
    vision = load_vision(source, described if source.suffix in (".pth", ".pt") else None)  # an EVA .pth: model.vision
    if vision.config.hidden_size != described.hidden_size:
        raise ValueError(
            f"model.vision_weights {source}: a ViT of width {vision.config.hidden_size}, but the fresh Q-Former "
            f"reads model.vision's width {described.hidden_size}: make model.vision describe that ViT"
        )
    return vision.freeze()


def _checkpoint_model(config: Stage2Config, init: Path):
    """A BLIP-2 checkpoint of another library under ``model.llm``: a LAVIS .pth of either stage or a
    transformers stage-1 folder. Its Q-Former (``model.qformer`` keys on top: shapes cannot tell the head
    count) and, from a LAVIS stage-2 file, its projection; the ViT from it or from ``model.vision_weights``
    (LAVIS leaves frozen weights out of its files)."""
    from blip2_fast.checkpoint import read_each_pth_once
    from blip2_fast.stage2 import Blip2Stage2

    if config.model.llm is None:
        raise ValueError(f"model.init {init} holds no LLM: model.llm must name the LLM folder to put under it")
    # a LAVIS file gives the Q-Former, the projection and maybe the ViT: one read, let go before the LLM loads
    with read_each_pth_once():
        qformer, vision, projection = _checkpoint_parts(config, init)
    llm, tokenizer = _local_llm(config.model)
    model = Blip2Stage2(qformer, llm, vision)
    if projection is not None:
        model.llm_proj.load_state_dict(projection)
    return model, tokenizer


def _checkpoint_parts(config: Stage2Config, init: Path):
    """(Q-Former, ViT, LAVIS projection or None) from ``model.init``."""
    from blip2_fast.checkpoint import load_checkpoint, load_vision
    from blip2_fast.stage2_convert import lavis_projection, read_lavis

    m = config.model
    lavis = init.suffix in (".pth", ".pt")
    state = read_lavis(init) if lavis else {}
    if m.vision_weights is None and lavis and not any(k.startswith("visual_encoder.") for k in state):
        raise ValueError(f"{init} holds no ViT (LAVIS leaves frozen weights out): set model.vision_weights")
    overrides = {k: v for k, v in m.qformer.items() if k != "preset"}
    qformer = load_checkpoint(init, vision=False, **{**overrides, "text_input": False}).qformer
    source = Path(m.vision_weights) if m.vision_weights else init
    # an EVA .pth cannot tell its head count, and BLIP-2 drops the last of EVA ViT-g's 40 blocks: model.vision
    # describes that ViT; other sources record their own
    vision = load_vision(source, VisionConfig.from_dict(m.vision) if source.suffix in (".pth", ".pt") else None)
    return qformer, vision, lavis_projection(state)


def _stage2_model(config: Stage2Config, init: Path | None):
    """A stage-2 model over a stage-1 init (or fresh parts) and the tiny OPT or a local LLM folder."""
    from blip2_fast.stage2 import default_stage2_model

    m = config.model
    vision = VisionConfig.from_dict(m.vision)
    qformer = QFormerConfig.from_dict({"encoder_width": vision.hidden_size, **m.qformer})
    if qformer.encoder_width != vision.hidden_size:
        raise ValueError(
            f"model.qformer.encoder_width ({qformer.encoder_width}) must equal the ViT width ({vision.hidden_size})"
        )
    if m.llm is None:
        if m.llm_family == "encoder_decoder":
            raise ValueError("model.llm_family=encoder_decoder needs model.llm (a local FlanT5 folder)")
        # the tiny OPT learns the captions' language from the synthetic training scenes of train.seed
        reader = dict(llm_reader_steps=m.llm_reader_steps, seed=config.train.seed, train_size=config.data.train_size)
        if init is not None:
            model, tok = default_stage2_model(
                init, llm_layers=m.llm_layers, llm_hidden=m.llm_hidden, llm_heads=m.llm_heads,
                max_length=m.max_text_length, **reader,
            )  # fmt: skip
        else:
            model, tok = default_stage2_model(
                qformer_config=qformer, vision_config=vision, llm_layers=m.llm_layers, llm_hidden=m.llm_hidden,
                llm_heads=m.llm_heads, max_length=m.max_text_length, **reader,
            )  # fmt: skip
        return model, tok
    return _pretrained_model(config, init, qformer, vision)


def _local_llm(m: Stage2ModelSection):
    """(LLM, tokenizer) from the local transformers folder ``model.llm``, frozen later by Blip2Stage2."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    folder = Path(m.llm)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model.llm: expected a transformers model folder with config.json, got {folder}")
    llm_config = AutoConfig.from_pretrained(str(folder))
    seq2seq = bool(getattr(llm_config, "is_encoder_decoder", False))
    if m.llm_family != "auto" and seq2seq != (m.llm_family == "encoder_decoder"):
        raise ValueError(f"model.llm_family={m.llm_family} but {folder} is_encoder_decoder={seq2seq}")
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    llm, tokenizer = (
        cls.from_pretrained(str(folder), torch_dtype=torch.float32),
        AutoTokenizer.from_pretrained(str(folder)),
    )
    from blip2_fast.stage2 import end_opt_at_newline

    end_opt_at_newline(llm, tokenizer)
    return llm, tokenizer


def _pretrained_model(config: Stage2Config, init: Path | None, qformer: QFormerConfig, vision: VisionConfig):
    """A local transformers LLM (OPT, FlanT5, ...) under the stage-1 Q-Former of a run of ours (or a fresh one)."""
    from blip2_fast.stage2 import Blip2Stage2, load_stage1, stage1_configs

    llm, tok = _local_llm(config.model)
    vision_file = model_file = None
    if init is not None:
        qformer, found_vision, model_file, vision_file = stage1_configs(init)
        vision = found_vision or vision
    model = Blip2Stage2(dataclasses.replace(qformer, text_input=False), llm, vision)
    if model_file is not None:
        load_stage1(model, model_file)
    if vision_file is not None:
        from safetensors.torch import load_file as load_tensors

        model.image_encoder.load_state_dict(load_tensors(str(vision_file)))
    elif init is None:
        model.image_encoder.reset_parameters()
    return model, tok


class Stage2Step(torch.nn.Module):
    """What DeepSpeed wraps: a collated batch in, the LM loss out.

    ``sampler`` carries no state: train.py's checkpoint helpers save and restore
    stage 1's hard-negative sampler through it, and stage 2 has none.
    """

    class _NoSampler:
        def state_dict(self) -> dict[str, Any]:
            return {}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            pass

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        self.sampler = self._NoSampler()

    def forward(self, batch: dict[str, Any]) -> torch.Tensor:
        return self.model.loss(batch)


def stage2_param_groups(step_module: torch.nn.Module, optim: OptimSection, scale: float) -> list[dict[str, Any]]:
    """train.param_groups (no decay on biases and norms, a trainable ViT's layer decay) with each group's
    Q-Former parameters split off at ``scale`` x its rate; the full-rate groups (llm_proj) come first."""
    groups = param_groups(step_module, optim.weight_decay, optim.lr, optim.vit_layer_decay)
    if scale == 1.0:
        return groups
    from blip2_fast.stage2 import Blip2Stage2

    qformer = {id(p) for m in step_module.modules() if isinstance(m, Blip2Stage2) for p in m.qformer.parameters()}
    rest, scaled = [], []
    for group in groups:
        others = [p for p in group["params"] if id(p) not in qformer]
        mine = [p for p in group["params"] if id(p) in qformer]
        if others:
            rest.append({**group, "params": others})
        if mine:
            scaled.append({**group, "params": mine, "lr": group["lr"] * scale})
    return rest + scaled


def build_engine(step_module: torch.nn.Module, config: Stage2Config, ds_config: dict[str, Any], scale: float):
    """train.build_engine's DeepSpeed engine (AdamW, warmup + cosine as a LambdaLR) over the groups of
    :func:`stage2_param_groups`. Returns (engine, optimizer, scheduler)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    optim = config.optim
    groups = stage2_param_groups(step_module, optim, scale)
    fused = get_accelerator().device_name() == "cuda"  # one fused update kernel on CUDA, as train.build_engine
    optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps, fused=fused or None)
    # LambdaLR multiplies each group's base lr: every group follows the schedule at its own scale
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, optim, config.train.steps) / optim.lr)
    engine, _, _, _ = deepspeed.initialize(
        model=step_module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, optimizer, scheduler


def register_zero3_external_parameters(step_module: Stage2Step) -> None:
    """ZeRO-3 gathers a parameter only around its own module's forward: the fused paths read some outside it
    (:func:`train.register_zero3_fused_parameters`), and ``encode_image`` reads ``query_tokens`` directly."""
    import deepspeed

    register_zero3_fused_parameters(step_module)
    deepspeed.zero.register_external_parameter(step_module, step_module.model.qformer.query_tokens)


# ---------------------------------------------------------------------------- outputs

CSV_FIELDS = ["step", "epoch", "lr", "loss", "skipped", "sec_per_step"]


class LossLog:
    """metrics.csv and loss.png; rank 0 only. A resumed run keeps the rows up to its step."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if resume_step and self.path.is_file():
            with self.path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        write_csv_atomic(self.path, CSV_FIELDS, self.rows)

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_FIELDS).writerow(row)

    def plot(self, path: Path) -> Path | None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no loss.png (pip install matplotlib)")
            return None
        steps = [int(r["step"]) for r in self.rows]
        losses = [float(r["loss"]) for r in self.rows]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, losses)
        ax.set_xlabel("step")
        ax.set_ylabel("LM loss (text tokens)")
        ax.set_title("stage-2 loss")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path


def chance_scores(references: list[str], scenes: list[Any], shuffles: int, seed: int) -> dict[str, float]:
    """The chance level of :func:`blip2_fast.stage2.shapes_caption_scores`: the held-out reference captions
    scored against the scenes of other images (a random shift of a random order, averaged over ``shuffles``
    draws), what a captioner that writes like the data but ignores the image gets. It depends on the
    references alone, so captions that name nothing score 0% against a chance that is not 0%."""
    from blip2_fast.stage2 import shapes_caption_scores

    if len(references) != len(scenes):
        raise ValueError(f"need one scene per reference, got {len(references)} references and {len(scenes)} scenes")
    n = len(scenes)
    total: dict[str, float] = {}
    g = torch.Generator().manual_seed(seed)
    for _ in range(shuffles):
        # a random shift of a random order: no caption meets its own scene
        perm = torch.randperm(n, generator=g, device="cpu").tolist()
        shift = 1 + int(torch.randint(max(1, n - 1), (1,), generator=g, device="cpu")) if n > 1 else 0
        mapping = {perm[i]: perm[(i + shift) % n] for i in range(n)}
        got = shapes_caption_scores(references, [scenes[mapping[i]] for i in range(n)])
        for key, value in got.items():
            total[key] = total.get(key, 0.0) + value / shuffles
    return total


@torch.no_grad()
def held_out_loss(model, tokenizer, config: Stage2Config, samples: list[dict[str, Any]], device: torch.device) -> float:
    """The LM loss of the training step on ``samples`` (eval mode), averaged over their target tokens."""
    from blip2_fast.stage2 import IGNORE_INDEX, Stage2Collator, end_token_id

    collate = Stage2Collator(
        tokenizer, encoder_decoder=model.is_encoder_decoder, prompt=config.model.prompt,
        max_length=config.model.max_text_length, eos_token_id=end_token_id(model, tokenizer),
    )  # fmt: skip
    model.eval()
    total, tokens = 0.0, 0
    for start in range(0, len(samples), config.eval.batch_size):
        batch = collate(samples[start : start + config.eval.batch_size])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        n = int((batch["labels"] != IGNORE_INDEX).sum())
        total += float(model.loss(batch)) * n
        tokens += n
    return total / max(1, tokens)


@torch.no_grad()
def caption_held_out(model, tokenizer, config: Stage2Config, device: torch.device) -> dict[str, Any]:
    """Greedy captions of held-out images and their LM loss (``lm_loss``, the training loss on the held-out
    captions); on synthetic shapes, their scores and the chance level from the references; on a caption JSON,
    COCO's BLEU and CIDEr-D against every reference of each image."""
    from blip2_fast import data as D
    from blip2_fast.stage2 import caption, shapes_caption_scores

    e, d = config.eval, config.data
    size = model.image_encoder.config.image_size
    if d.source == "caption_json" and d.eval_annotation_file:
        from blip2_fast.evaluate_stage2 import evaluate_captions

        got = evaluate_captions(
            model.eval(), tokenizer, d.eval_annotation_file, d.eval_image_root or d.image_root,
            batch_size=e.batch_size, limit=e.num_images, prompt=config.model.prompt, method="greedy",
            max_new_tokens=e.max_new_tokens, sharded=False,  # every rank captions them all (see run)
        )  # fmt: skip
        rows = [
            {"caption": r["caption"], "reference": r["references"][0], "image": r["image"]} for r in got["predictions"]
        ]
        return {"captions": rows, "metrics": got["scores"]}
    transform = D.build_transform(size, train=False)
    scenes = None
    if d.source == "synthetic":
        # build_datasets' held-out split: another seed than training
        shapes = D.SyntheticShapes(d.eval_size, image_size=size, seed=config.train.seed + 1_000_003)
        n = min(e.num_images, len(shapes))
        held = D.ImageTextDataset(shapes, transform, max_words=d.max_words, seed=config.train.seed)
        samples = [held[i] for i in range(n)]
        scenes = [shapes.scene(i) for i in range(n)]
    else:
        _, held = build_datasets(config, size)
        if held is None:
            return {}
        samples = [s for s in (held[i] for i in range(min(e.num_images, len(held)))) if s is not None]
    model.eval()
    captions: list[str] = []
    for start in range(0, len(samples), e.batch_size):
        pixels = torch.stack([s["pixels"] for s in samples[start : start + e.batch_size]]).to(device)
        captions += caption(
            model, tokenizer, pixels, prompt=config.model.prompt, method="greedy", max_new_tokens=e.max_new_tokens
        )
    result: dict[str, Any] = {
        "captions": [{"caption": c, "reference": s["caption"]} for c, s in zip(captions, samples, strict=True)],
        "lm_loss": held_out_loss(model, tokenizer, config, samples, device),
    }
    if scenes is not None:
        result["scores"] = shapes_caption_scores(captions, scenes)
        # from the references, not the captions: a model whose captions name nothing still faces a real chance
        result["chance"] = chance_scores([s["caption"] for s in samples], scenes, e.shuffles, config.train.seed)
    return result


# ---------------------------------------------------------------------------- the run

# a Q-Former whose query outputs differ across the queries of an image by less than this fraction of their
# std gives the LLM one vector repeated Q times. The stage-1 default's do (lr 3e-4; they stay apart at LAVIS's
# 1e-4, where its ITM head learns little in 150 steps): under the taught tiny OPT stage 2 still reaches held-out
# LM loss 0.72 from either run, since one vector says all a synthetic scene holds; real images hold more
COLLAPSED_QUERIES = 0.05


def progress_line(step: int, end: int, loss: float, lr: float, sec_per_step: float) -> str:
    """One training progress line, as printed every ``train.log_every`` steps when stderr is not a terminal."""
    return f"stage 2: step {step}/{end}  loss {loss:.4f}  lr {lr:.3g}  {sec_per_step:.2f} s/step"


def check_query_spread(model, train_set, device: torch.device, n: int = 16) -> dict[str, float] | None:
    """:func:`blip2_fast.stage2.query_spread` over the first ``n`` training images (a map-style set); prints a
    warning when the loaded Q-Former's queries have collapsed onto one vector per image."""
    from blip2_fast.stage2 import query_spread

    if not hasattr(train_set, "__len__"):
        return None
    samples = [s for s in (train_set[i] for i in range(min(n, len(train_set)))) if s is not None]
    if len(samples) < 2:
        return None
    spread = query_spread(model, torch.stack([s["pixels"] for s in samples]).to(device))
    if spread["across_queries"] < COLLAPSED_QUERIES * spread["scale"]:
        q = model.num_query_tokens
        print(
            f"stage-2 init: warning: the loaded Q-Former's {q} query outputs are all but equal for each image "
            f"(std across queries {spread['across_queries']:.2g}, across images {spread['across_images']:.2g}, "
            f"of all outputs {spread['scale']:.2g}; {len(samples)} training images): the LLM's soft prompt is one "
            f"vector repeated {q} times, where BLIP-2's queries each carry their own part of the image. The stage-1 "
            "run collapsed its queries (a lower stage-1 optim.lr keeps them apart)"
        )
    return spread


def run(config: Stage2Config) -> dict[str, Any]:
    """Train as ``config`` says, export, caption held-out images; returns losses, scores and paths."""
    with holding_run_folder(config), StopRequest() as stop:
        return _train(config, stop)


def _train(config: Stage2Config, stop: StopRequest) -> dict[str, Any]:
    import deepspeed
    from tqdm import tqdm

    from blip2_fast.stage2 import Stage2Collator, end_token_id, save_trainable
    from blip2_fast.stage2_convert import save_transformers

    # seeded alike on all ranks: fresh weights (queries, cross-attention, llm_proj, a random LLM / ViT) match
    device, run_dir, ckpt_dir = start_run(config)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    t = config.train
    model, tokenizer, init = build_model(config)
    scale = config.optim.qformer_lr_scale
    if rank == 0:
        print(f"stage-2 init: {describe_init(config.model.init, init)}")
        if scale != 1.0:
            print(f"stage-2 Q-Former learning rate: {scale:g} x optim.lr (optim.qformer_lr_scale); llm_proj: optim.lr")
    model.to_device(device)
    size = model.image_encoder.config.image_size
    train_set, _ = build_datasets(config, size, rank, world)
    spread = None
    if init is not None and rank == 0:
        spread = check_query_spread(model, train_set, device)
    step_module = Stage2Step(model)
    ds_config = deepspeed_config(config, device)
    # only qformer and llm_proj (and a ViT being fine-tuned) require grad: the frozen LLM gets no optimizer state
    engine, optimizer, _ = build_engine(step_module, config, ds_config, scale)
    zero3 = int(engine.zero_optimization_stage()) == 3
    if zero3:
        register_zero3_external_parameters(step_module)

    from blip2_fast.train import GlobalBatches

    collate = Stage2Collator(
        tokenizer,
        encoder_decoder=model.is_encoder_decoder,
        prompt=config.model.prompt,
        max_length=config.model.max_text_length,
        eos_token_id=end_token_id(model, tokenizer),  # what generation stops at ends every target
    )
    batches = GlobalBatches(train_set, t.batch_size, t.seed, rank, world, collate, config.data.num_workers)
    step, micro_step = open_run(engine, config, ckpt_dir)  # the first change to the run folder
    log = LossLog(run_dir, step) if rank == 0 else None
    end = t.stop_after or t.steps
    history: list[float] = []
    # not a terminal (CI logs, nohup, SLURM files): a plain line every log_every steps instead of the bar
    plain = rank == 0 and not is_terminal(sys.stderr)
    bar = tqdm(
        total=end, initial=step, desc=f"stage 2 ({world} rank{'s' if world > 1 else ''})", disable=rank != 0 or plain
    )
    engine.train()
    stream = batches.iterate(micro_step)
    acc, skipped = 0.0, 0
    tic, logged = time.perf_counter(), step
    while step < end:
        micro_step, batch = next(stream)
        skipped += int(batch["skipped"])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        loss = engine(batch)
        engine.backward(loss)
        lr = engine.get_lr()[0]  # the rate this step applies (an fp16 step skipped on overflow holds it back)
        engine.step()
        acc += loss.item() / t.grad_accum
        micro_step += 1
        if micro_step % t.grad_accum:
            continue
        step += 1
        values = torch.tensor([acc, skipped], dtype=torch.float64)
        distributed.all_reduce_sum(values)
        record = float(values[0]) / world
        check_finite_losses([{"loss": record}], step, ckpt_dir)
        acc, skipped = 0.0, 0
        history.append(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record:.3f}")
        if rank == 0 and (step % t.log_every == 0 or step == end):
            elapsed, tic = time.perf_counter() - tic, time.perf_counter()
            sec_per_step = elapsed / max(1, step - logged)  # the steps since the last row (fewer at the end)
            logged = step
            log.log(
                {
                    "step": step,
                    "epoch": round(micro_step / batches.per_epoch, 4) if batches.per_epoch else 0.0,
                    "lr": lr,
                    "loss": record,
                    "skipped": int(values[1]),
                    "sec_per_step": round(sec_per_step, 4),
                }
            )
            if plain:
                print(progress_line(step, end, record, lr, sec_per_step), file=sys.stderr, flush=True)
        if t.save_every and step % t.save_every == 0 and step < end:
            save_checkpoint(engine, ckpt_dir, step, micro_step, t.keep_checkpoints, run_facts(config))
        if step < end and stop.agreed(True):  # the ranks met for this step's loss
            bar.close()

            def export() -> Path:
                path = run_dir / "model.safetensors"
                with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None, enabled=zero3):
                    if rank == 0:
                        with writing(run_dir, "the trained model"):
                            save_trainable(model, path)
                distributed.barrier()
                return path

            stop_on_request(engine, config, step, micro_step, ckpt_dir, export)
    bar.close()
    if t.keep_checkpoints:  # which checks the weights finite first: nothing non-finite is saved or exported
        save_checkpoint(engine, ckpt_dir, step, micro_step, t.keep_checkpoints, run_facts(config))
    else:
        check_finite_weights(engine.module, step, ckpt_dir)

    result: dict[str, Any] = {
        "history": history,
        "run_dir": run_dir,
        "step": step,
        "optimized_numel": sum(p.numel() for g in optimizer.param_groups for p in g["params"]),
        "trainable_numel": sum(v.numel() for v in model.trainable_state_dict().values()),
        "frozen_numel": sum(p.numel() for p in model.parameters() if not p.requires_grad),
        "qformer_lr_scale": scale,
    }
    if spread is not None:
        result["query_spread"] = spread
    model_path, hf_dir = run_dir / "model.safetensors", run_dir / "transformers"
    # under ZeRO-3 every rank holds a shard: gather the whole model for the export and the generation
    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None, enabled=zero3):
        if rank == 0:
            with writing(run_dir, "the trained model"):
                save_trainable(model, model_path)
                save_transformers(model, hf_dir, tokenizer=tokenizer)  # the folder loads as a whole
            result.update(model=model_path, transformers=hf_dir)
        if t.evaluate and step == t.steps:
            # every rank captions the same images: under ZeRO-3 each forward takes part in collectives
            result["eval"] = caption_held_out(model, tokenizer, config, device)
            if rank == 0:
                from blip2_fast.checkpoint import write_text_atomic

                write_text_atomic(run_dir / "captions.json", json.dumps(result["eval"], indent=1))
    distributed.barrier()
    if rank == 0:
        plot = log.plot(run_dir / "loss.png")
        _print_outputs(run_dir, ckpt_dir, plot, history, result.get("eval"), config.eval.show)
    return result


def print_held_out(evaluation: dict[str, Any], show: int) -> None:
    """What :func:`caption_held_out` found, as a run (and ``evaluate_stage2`` on a run) prints it."""
    for row in evaluation["captions"][:show]:
        print(f"  {row['caption']!r:45}  (reference: {row['reference']!r})")
    n = len(evaluation["captions"])
    if "lm_loss" in evaluation:
        print(f"held-out LM loss ({n} images): {evaluation['lm_loss']:.4f}")
    if "scores" in evaluation:
        s, c = evaluation["scores"], evaluation["chance"]
        print(
            f"held-out captions ({n} images, greedy): first named colour right {100 * s['colour']:.1f}% "
            f"(chance {100 * c['colour']:.1f}%), shape {100 * s['shape']:.1f}% (chance {100 * c['shape']:.1f}%), "
            f"colour+shape {100 * s['pair']:.1f}% (chance {100 * c['pair']:.1f}%); "
            f"{100 * s['parsed']:.1f}% name a colour and a shape (chance: the references scored on shuffled images)"
        )
    if "metrics" in evaluation:
        print(f"held-out captions ({n} images, greedy): " + "  ".join(
            f"{k} {v:.4f}" for k, v in evaluation["metrics"].items()))  # fmt: skip


def _print_outputs(run_dir: Path, ckpt_dir: Path, plot, history, evaluation, show: int) -> None:
    if history:
        print(f"loss: first step {history[0]:.4f}, last step {history[-1]:.4f}")
    if evaluation:
        print_held_out(evaluation, show)
    print("outputs:")
    print(f"  run folder      {run_dir.resolve()}")
    print(f"  config          {(run_dir / 'config.yaml').resolve()}")
    print(f"  metrics         {(run_dir / 'metrics.csv').resolve()}")
    if plot:
        print(f"  loss curve      {Path(plot).resolve()}")
    print(f"  checkpoints     {checkpoints_said(ckpt_dir)}")
    print(f"  trainable part  {(run_dir / 'model.safetensors').resolve()}")
    print(f"  transformers    {(run_dir / 'transformers').resolve()}")
    if evaluation:
        print(f"  captions        {(run_dir / 'captions.json').resolve()}")


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[tuple[str, str]]]:
    parser = argparse.ArgumentParser(
        description="BLIP-2 stage 2 (frozen LLM) with DeepSpeed. Any config key can be overridden: "
        "--train.steps 500 --optim.lr 1e-4 --model.llm /models/opt-2.7b",
    )
    parser.add_argument("--stage", type=int, choices=(2,), default=2, help="2: generative pre-training")
    parser.add_argument("--config", default=None, help="YAML/TOML training config (default: the embedded one)")
    parser.add_argument(
        "--init", default=None, help="stage-1 run folder or model.safetensors (model.init); fresh: no stage-1 start"
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    overrides = parse_overrides(parser, rest)
    if args.init is not None:
        overrides.append(("model.init", json.dumps(args.init)))
    return args, overrides


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """``train.py --stage 2`` hands its arguments here (``--stage 2`` may be among them)."""
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    return run(load_config(args.config, overrides))


if __name__ == "__main__":
    from blip2_fast.cli import run_main

    run_main(main)
