"""Stage-1 training: config, schedule, data order, atomic checkpoints; DeepSpeed runs in subprocesses.

The DeepSpeed runs (marked slow) use a tiny variant of the embedded default:
one Q-Former layer from MiniLM, 4 queries, the tiny ViT, batches of 4.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from blip2_fast.train import (
    GlobalBatches,
    OptimSection,
    TrainConfig,
    build_datasets,
    deepspeed_config,
    load_config,
    lr_at,
    param_groups,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]

TINY = [
    ("model.qformer.num_hidden_layers", "1"),
    ("model.qformer.num_query_tokens", "4"),
    ("model.qformer.hidden_dropout_prob", "0.0"),
    ("model.qformer.attention_probs_dropout_prob", "0.0"),
    ("model.vision", "{preset: tiny}"),
    ("model.max_text_length", "16"),
    ("data.train_size", "64"),
    ("data.eval_size", "12"),
    ("train.batch_size", "4"),
    ("train.steps", "2"),
    ("train.log_every", "1"),
    ("train.precision", "fp32"),
    ("eval.k_test", "3"),
    ("eval.num_captions", "1"),
    ("eval.num_beams", "2"),
    ("eval.max_new_tokens", "4"),
    ("eval.min_new_tokens", "1"),
]


# ------------------------------------------------------------------ config


def test_defaults_equal_the_shipped_default_yaml():
    assert load_config(ROOT / "configs" / "stage1_default.yaml").to_dict() == TrainConfig().to_dict()


def test_real_run_config_and_deepspeed_jsons_load():
    config = load_config(ROOT / "configs" / "stage1_coco.yaml")
    assert config.data.source == "caption_json" and config.model.qformer == {}
    finetune = load_config(ROOT / "configs" / "stage1_coco_finetune.yaml")
    assert not finetune.model.freeze_vit and finetune.model.vision["image_size"] == 364
    assert finetune.optim.vit_layer_decay == 0.95 and finetune.optim.min_lr == 0.0
    for stage in (1, 2, 3):
        path = ROOT / "configs" / f"ds_zero{stage}.json"
        config = load_config(None, [("train.deepspeed_config", str(path))])
        ds = deepspeed_config(config, torch.device("cpu"))
        assert ds["zero_optimization"]["stage"] == stage and ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
        assert ds["train_micro_batch_size_per_gpu"] == config.train.batch_size
    config = load_config(None, [("train.deepspeed_config", str(ROOT / "configs" / "ds_zero2_fp16.json"))])
    ds = deepspeed_config(config, torch.device("cpu"))
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0 and not ds["bf16"]["enabled"]
    # explicit keys win over the JSON
    config = load_config(
        None,
        [("train.deepspeed_config", str(ROOT / "configs" / "ds_zero3.json")), ("train.zero_stage", "1")]
        + [("train.precision", "fp32")],
    )
    ds = deepspeed_config(config, torch.device("cpu"))
    assert ds["zero_optimization"]["stage"] == 1 and not ds["bf16"]["enabled"]


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown train key 'stepz'; valid keys: .*steps"):
        load_config(None, [("train.stepz", "3")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: 3\n  lrr: 1\n")
    with pytest.raises(ValueError, match=r"unknown TrainSection key\(s\) \['lrr'\] in train; valid keys:"):
        load_config(bad)
    bad.write_text("trian:\n  steps: 3\n")
    with pytest.raises(ValueError, match="unknown section.*valid sections: model, data, optim, train, eval"):
        load_config(bad)
    with pytest.raises(ValueError, match="valid keys"):
        load_config(None, [("model.qformer.num_layers", "2")])  # QFormerConfig's own check


def test_overrides_are_typed():
    config = load_config(
        None,
        [("optim.lr", "1e-4"), ("steps", "7"), ("train.resume", "true"), ("model.qformer.num_hidden_layers", "3")],
    )
    assert config.optim.lr == 1e-4 and isinstance(config.optim.lr, float)
    assert config.train.steps == 7 and config.train.resume is True
    assert config.model.qformer["num_hidden_layers"] == 3
    with pytest.raises(ValueError, match="train.steps must be an int"):
        load_config(None, [("train.steps", "many")])
    with pytest.raises(ValueError, match="train.precision must be one of"):
        load_config(None, [("train.precision", "fp8")])
    with pytest.raises(ValueError, match="dotted key"):
        load_config(None, [("nonsense", "1")])


@pytest.mark.parametrize(
    "key, value",
    [
        ("optim.lr", "inf"),
        ("optim.lr", ".nan"),
        ("optim.lr", "0"),
        ("optim.min_lr", "1.0"),  # above lr
        ("optim.warmup_lr", "-1e-6"),
        ("optim.eps", "0"),  # divides by zero where a moment is 0: NaN weights
        ("optim.eps", "-1e-8"),
        ("optim.weight_decay", "-.inf"),
        ("optim.betas", "[0.9, 1.0]"),
        ("optim.betas", "[0.9, .nan]"),
        ("optim.betas", "[0.9]"),
        ("optim.betas", "[0.9, fast]"),
        ("optim.vit_layer_decay", "nan"),
        ("train.grad_clip", "nan"),
        ("train.grad_clip", "-1"),
        ("train.seed", "-1"),
        ("train.seed", "4294967296"),
        ("model.qformer.layer_norm_eps", "0"),
        ("model.qformer.initializer_range", "inf"),
        ("model.qformer.hidden_dropout_prob", "nan"),
        ("model.vision", "{preset: tiny, layer_norm_eps: -1e-6}"),
    ],
)
def test_every_number_is_checked_finite_and_in_range(key, value):
    field = key.split(".")[-1] if key != "model.vision" else "layer_norm_eps"
    with pytest.raises(ValueError, match=re.escape(field) + " must"):
        load_config(None, [(key, value)])


def test_config_files_are_parsed_strictly(tmp_path):
    """Nothing ambiguous is resolved silently: a key given twice, a YAML 1.1 boolean where a name is meant,
    a DeepSpeed JSON key the run sets itself, both half precisions."""
    config = tmp_path / "run.yaml"
    config.write_text("optim:\n  lr: 1.0e-4\n  lr: 1.0e-3\n")  # PyYAML alone keeps the last
    with pytest.raises(ValueError, match=r"run.yaml: line 3: key 'lr' given twice"):
        load_config(config)
    config.write_text("train:\n  steps: [3\n")
    with pytest.raises(ValueError, match=r"run.yaml: line 3: "):
        load_config(config)
    for name in ("no", "on", "off", "yes"):
        with pytest.raises(ValueError, match=r"train.name must be a str, got (True|False) \(quote it"):
            load_config(None, [("train.name", name)])
    assert load_config(None, [("train.name", "'no'")]).train.name == "no"
    assert load_config(None, [("train.name", "2024")]).train.name == "2024"
    ds = tmp_path / "ds.json"
    cases = {
        '{"zero_optimization": {"stage": 1}, "zero_optimization": {}}': r"\['zero_optimization'\] given twice",
        '{"zero_optimization": {"stage": 1},}': r"ds.json: Expecting property name",
        '{"scheduler": {"type": "WarmupLR"}}': r"remove 'scheduler'; it comes from optim",
        '{"optimizer": {"type": "Adam"}}': r"remove 'optimizer'; it comes from optim",
        '{"gradient_clipping": 5.0}': r"remove 'gradient_clipping'; it comes from train.grad_clip",
        '{"train_batch_size": 64}': r"remove 'train_batch_size'; it comes from train.batch_size",
        '{"fp16": {"enabled": true}, "bf16": {"enabled": true}}': "fp16 and bf16 are both enabled",
    }
    for text, message in cases.items():
        ds.write_text(text)
        with pytest.raises(ValueError, match=message):
            deepspeed_config(load_config(None, [("train.deepspeed_config", str(ds))]), torch.device("cpu"))


def test_missing_data_paths_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="data.source=caption_json needs data.annotation_file"):
        load_config(None, [("data.source", "caption_json")])
    config = load_config(
        None,
        [
            ("data.source", "caption_json"),
            ("data.annotation_file", str(tmp_path / "nope.json")),
            ("data.image_root", str(tmp_path)),
        ],
    )
    with pytest.raises(FileNotFoundError, match="data.annotation_file: file not found: .*nope.json"):
        build_datasets(config, 32)
    (tmp_path / "ann.json").write_text("[]")
    config = load_config(
        None,
        [
            ("data.source", "caption_json"),
            ("data.annotation_file", str(tmp_path / "ann.json")),
            ("data.image_root", str(tmp_path / "missing")),
        ],
    )
    with pytest.raises(FileNotFoundError, match="data.image_root: folder not found"):
        build_datasets(config, 32)


# ------------------------------------------------------------------ optimisation


def test_lr_warmup_then_cosine():
    o = OptimSection(lr=1e-3, min_lr=1e-5, warmup_lr=1e-6, warmup_steps=10)
    assert lr_at(0, o, 110) == pytest.approx(1e-6)
    assert lr_at(5, o, 110) == pytest.approx(1e-6 + (1e-3 - 1e-6) / 2)
    assert lr_at(10, o, 110) == pytest.approx(1e-3)
    assert lr_at(60, o, 110) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)
    assert lr_at(110, o, 110) == pytest.approx(1e-5)
    values = [lr_at(s, o, 110) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_no_weight_decay_on_biases_norms_and_temperature():
    from blip2_fast.config import QFormerConfig
    from blip2_fast.qformer import QFormer

    model = QFormer(QFormerConfig.preset("tiny"))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "temp" in nd and "ln_vision.weight" in nd and "layers.0.self_attn.query.bias" in nd
    assert "layers.0.self_attn.query.weight" in d and "query_tokens" in d  # LAVIS decays the queries
    assert not nd & d and len(nd) + len(d) == len(list(model.parameters()))


def test_trainable_vit_learns_at_lavis_layer_wise_rates():
    from blip2_fast.config import QFormerConfig, VisionConfig
    from blip2_fast.losses import Stage1Loss
    from blip2_fast.qformer import QFormer
    from blip2_fast.train import Stage1WithVision
    from blip2_fast.vision import ImageEncoder

    vision = ImageEncoder(VisionConfig.preset("tiny")).unfreeze()  # 2 blocks
    stage1 = Stage1Loss(QFormer(QFormerConfig.preset("tiny")), bos_token_id=1)
    model = Stage1WithVision(vision, stage1)
    groups = param_groups(model, 0.05, lr=1e-4, vit_layer_decay=0.5)
    lr_of = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    expected = {
        "vision.vit.embeddings.patch_embedding.weight": (1e-4 * 0.5**3, 0.05),  # decay^(L + 1), L = 2
        "vision.vit.embeddings.class_embedding": (1e-4 * 0.5**3, 0.05),
        "vision.vit.encoder.layers.0.mlp.fc1.weight": (1e-4 * 0.5**2, 0.05),  # decay^(L - i)
        "vision.vit.encoder.layers.1.layer_norm1.bias": (1e-4 * 0.5, 0.0),
        "stage1.qformer.ln_vision.weight": (1e-4, 0.0),  # not part of the ViT
        "stage1.qformer.layers.0.self_attn.query.weight": (1e-4, 0.05),
    }
    named = dict(model.named_parameters())
    for name, (lr, decay) in expected.items():
        assert lr_of[id(named[name])] == (pytest.approx(lr), decay), name
    assert len(lr_of) == len(named)  # every parameter in exactly one group
    assert groups[0]["lr"] == 1e-4  # the group whose lr the metrics log reports
    frozen = Stage1WithVision(ImageEncoder(VisionConfig.preset("tiny")), stage1)
    assert len(param_groups(frozen, 0.05, lr=1e-4, vit_layer_decay=0.5)) == 2  # a frozen ViT is not optimised


def test_trainable_vit_checkpointing_saves_memory_not_accuracy():
    from blip2_fast.config import VisionConfig
    from blip2_fast.vision import ImageEncoder

    vision = ImageEncoder(VisionConfig.preset("tiny"))
    pixels = torch.randn(2, 3, 32, 32)
    assert not vision(pixels).requires_grad and not vision.train().training  # frozen: no graph, eval mode
    saved, grads = [], []
    for checkpoint in (False, True):
        vision.zero_grad()
        vision.unfreeze(grad_checkpoint=checkpoint).train()
        assert vision.training
        nbytes = [0]

        def pack(t, nbytes=nbytes):
            nbytes[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = vision(pixels)
        (out**2).sum().backward()
        saved.append(nbytes[0])
        grads.append([p.grad.clone() for p in vision.parameters()])
    assert saved[1] < saved[0] / 2
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_fine_tuning_options_are_checked():
    with pytest.raises(ValueError, match="model.vit_grad_checkpoint needs model.freeze_vit=false"):
        load_config(None, [("model.vit_grad_checkpoint", "true")])
    with pytest.raises(ValueError, match=r"data.feature_cache needs model.freeze_vit=true"):
        load_config(None, [("model.freeze_vit", "false"), ("data.feature_cache", "true")])
    with pytest.raises(ValueError, match=r"optim.vit_layer_decay must lie in \(0, 1\]"):
        load_config(None, [("optim.vit_layer_decay", "1.5")])


# ------------------------------------------------------------------ data order


class Numbers(torch.utils.data.Dataset):
    """Sample i is i; every index in ``broken`` fails to load (None)."""

    def __init__(self, n, broken=()):
        self.n, self.broken = n, set(broken)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return None if i in self.broken else i


def collate(samples):
    return {"ids": torch.tensor(samples), "skipped": 0}


def take(batches, start, count):
    it = batches.iterate(start)
    return [next(it) for _ in range(count)]


def test_global_batch_does_not_depend_on_the_number_of_ranks():
    one = take(GlobalBatches(Numbers(40), 8, 3, 0, 1, collate), 0, 12)  # 5 batches per epoch: crosses epochs
    parts = [take(GlobalBatches(Numbers(40), 4, 3, r, 2, collate), 0, 12) for r in range(2)]
    for k in range(12):
        assert one[k][0] == k
        joined = torch.cat([parts[0][k][1]["ids"], parts[1][k][1]["ids"]])
        assert torch.equal(one[k][1]["ids"], joined)
    first_epoch = torch.cat([one[k][1]["ids"] for k in range(5)])
    assert sorted(first_epoch.tolist()) == list(range(40))  # a permutation
    second = torch.cat([one[k][1]["ids"] for k in range(5, 10)])
    assert not torch.equal(first_epoch, second)  # reshuffled per epoch


def test_resuming_the_data_stream_is_exact():
    batches = GlobalBatches(Numbers(30), 4, 0, 0, 1, collate)
    full = take(batches, 0, 9)
    resumed = take(GlobalBatches(Numbers(30), 4, 0, 0, 1, collate), 4, 5)
    for a, b in zip(full[4:], resumed, strict=True):
        assert a[0] == b[0] and torch.equal(a[1]["ids"], b[1]["ids"])


def test_broken_samples_are_replaced_and_counted():
    batches = take(GlobalBatches(Numbers(16, broken={1, 2, 9}), 16, 0, 0, 1, collate), 0, 1)
    batch = batches[0][1]
    assert batch["ids"].shape == (16,) and batch["skipped"] == 4  # 1 -> 2 -> 3, 2 -> 3, 9 -> 10
    assert not {1, 2, 9} & set(batch["ids"].tolist())


# ------------------------------------------------------------------ atomic checkpoints


class FakeEngine:
    """What save_checkpoint needs of a DeepSpeed engine; ``fail`` breaks the write midway."""

    def __init__(self, fail=False):
        from blip2_fast.losses import HardNegativeSampler

        self.module = torch.nn.Linear(2, 2)  # weights, checked finite before a save
        self.module.sampler = HardNegativeSampler(0)
        self.fail = fail

    def save_checkpoint(self, save_dir, tag, client_state, save_latest, exclude_frozen_parameters):
        assert not save_latest and exclude_frozen_parameters
        (Path(save_dir) / tag).mkdir(parents=True)
        (Path(save_dir) / tag / "model.pt").write_text("half")
        if self.fail:
            raise OSError("disk full")


FACTS = {"batch_size": 4, "grad_accum": 1, "world_size": 1, "seed": 0}


def test_checkpoint_is_atomic_and_pruned(tmp_path):
    save_checkpoint(FakeEngine(), tmp_path, 1, 1, keep=2, facts=FACTS)
    assert (tmp_path / "latest").read_text() == "step00000001"
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(FakeEngine(fail=True), tmp_path, 2, 2, keep=2, facts=FACTS)
    assert (tmp_path / "latest").read_text() == "step00000001"  # never names the broken tag
    assert not (tmp_path / "step00000002").exists()
    (tmp_path / "old-step00000001").mkdir()  # a crash between a re-save's renames leaves one: the next save clears it
    for step in (2, 3, 4):
        save_checkpoint(FakeEngine(), tmp_path, step, step, keep=2, facts=FACTS)
    assert (tmp_path / "latest").read_text() == "step00000004"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step00000003", "step00000004"]
    assert (tmp_path / "step00000004" / "rng_rank00000.safetensors").is_file()
    assert json.loads((tmp_path / "step00000004" / "run.json").read_text()) == FACTS

    # the checkpoint `latest` names is this step's: nothing is written again
    written = (tmp_path / "step00000004" / "model.pt").stat().st_mtime_ns
    save_checkpoint(FakeEngine(fail=True), tmp_path, 4, 4, keep=2, facts=FACTS)
    assert (tmp_path / "step00000004" / "model.pt").stat().st_mtime_ns == written
    # an older tag written again takes its place whole; rotation (newest first) never takes the tag just written
    save_checkpoint(FakeEngine(), tmp_path, 3, 3, keep=1, facts=FACTS)
    assert (tmp_path / "latest").read_text() == "step00000003"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step00000003", "step00000004"]


def test_a_fresh_run_moves_an_earlier_one_aside(tmp_path):
    from blip2_fast.train import RUN_MARKER, _move_earlier_run_aside

    run_dir = tmp_path / "run"
    _move_earlier_run_aside(run_dir)  # nothing there: nothing moves
    run_dir.mkdir()
    _move_earlier_run_aside(run_dir)  # an empty folder holds no run
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    for _ in range(2):
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "latest").write_text("step00000004")
        (run_dir / RUN_MARKER).write_text("")
        _move_earlier_run_aside(run_dir)
        assert not run_dir.exists()
    moved = sorted(p.name for p in tmp_path.iterdir())
    assert len(moved) == 2 and all(name.startswith("run.replaced-") for name in moved)  # two in a second: both kept
    assert all((tmp_path / name / "checkpoints" / "latest").is_file() for name in moved)


def test_a_fresh_run_never_moves_a_folder_it_did_not_write(tmp_path):
    """A folder without the project's marker (a user's, whatever it holds, metrics.csv included) is refused
    by name and left as it was; so is a file where the run folder would go."""
    from blip2_fast.train import _move_earlier_run_aside

    user = tmp_path / "mine"
    user.mkdir()
    (user / "metrics.csv").write_text("step\n1\n")
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=re.escape(f"{user} holds files no run of this project wrote")):
        _move_earlier_run_aside(user)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        _move_earlier_run_aside(tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "mine"]
    assert (user / "notes.txt").read_text() == "keep me" and (user / "metrics.csv").read_text() == "step\n1\n"


def test_best_survives_a_crash_between_its_renames(tmp_path):
    from blip2_fast.checkpoint import replacing_folder
    from blip2_fast.train import best_so_far

    best = tmp_path / "best"
    with replacing_folder(best) as scratch:
        (scratch / "best.json").write_text(json.dumps({"step": 2, "r_mean": 40.0}))
    best.rename(tmp_path / ".best.old")  # where a crash between the two renames leaves it
    assert best_so_far(tmp_path) == 40.0 and (best / "best.json").is_file()
    best.rename(tmp_path / ".best.old")
    with replacing_folder(best) as scratch:  # the next replacement puts it back first, then replaces it
        assert (best / "best.json").is_file()
        (scratch / "best.json").write_text(json.dumps({"step": 4, "r_mean": 50.0}))
    assert best_so_far(tmp_path) == 50.0 and not (tmp_path / ".best.old").exists()


def test_run_settings_that_would_mislead_are_refused(tmp_path):
    for name in (".", "..", "a/b"):
        with pytest.raises(ValueError, match="train.name must be a folder name"):
            load_config(None, [("train.name", name)])
    with pytest.raises(ValueError, match="data.num_workers applies to map-style sources"):
        load_config(None, [("data.source", "webdataset"), ("data.urls", "x.tar"), ("data.num_workers", "2")])
    (tmp_path / "ann.json").write_text("[]")
    data = [("data.source", "caption_json"), ("data.annotation_file", str(tmp_path / "ann.json"))]
    config = load_config(None, data + [("data.image_root", str(tmp_path)), ("eval.every", "2")])
    with pytest.raises(ValueError, match="eval.every=2 needs a held-out set: data.eval_annotation_file"):
        build_datasets(config, 32)
    # refused at start, not when the end-of-run captions are drawn (that lost the last recall row and plot)
    for low, high in (("21", "20"), ("-1", "20"), ("5", "4")):
        with pytest.raises(ValueError, match=r"eval.min_new_tokens must lie in \[0, eval.max_new_tokens="):
            load_config(None, [("eval.min_new_tokens", low), ("eval.max_new_tokens", high)])
    load_config(None, [("eval.min_new_tokens", "4"), ("eval.max_new_tokens", "4")])


# ------------------------------------------------------------------ DeepSpeed runs


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _train_in_subprocess(tmp_path, body: str):
    """Run training code in a process of its own (DeepSpeed's state stays out of pytest's) and return the JSON
    value it leaves in ``result``; ``load_config`` and ``run`` are imported for it."""
    script = "import json\nfrom blip2_fast.train import load_config, run\n" + textwrap.dedent(body)
    script += '\nprint("RESULT", json.dumps(result))\n'
    proc = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def _args(pairs):
    return [f"--{k}={v}" for k, v in pairs]


def _losses(run_dir: Path) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open() as f:
        return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


@pytest.mark.slow
@pytest.mark.parametrize("freeze_vit", ["true", "false"])
def test_resume_equals_uninterrupted(tmp_path, freeze_vit):
    """4 steps == 2 steps, checkpoint, restart, 2 steps (ZeRO-1, dropout on: the RNG must be restored); a
    trainable ViT is part of the checkpoint and ends the same."""
    from safetensors.torch import load_file

    common = TINY + [
        ("train.steps", "4"),
        ("train.zero_stage", "1"),
        ("train.output_dir", str(tmp_path)),
        ("train.evaluate", "false"),
        ("model.qformer.hidden_dropout_prob", "0.1"),
        ("model.qformer.attention_probs_dropout_prob", "0.1"),
        ("model.freeze_vit", freeze_vit),
    ]
    changed = [("train.steps", "6"), ("optim.lr", "1e-3"), ("optim.eps", "1e-6"), ("optim.betas", "[0.8, 0.99]")]
    full, first, second, refused = _train_in_subprocess(
        tmp_path,
        f"""
        common = {common!r}
        full = run(load_config(None, common + [("train.name", "full")]))
        first = run(load_config(None, common + [("train.name", "split"), ("train.stop_after", "2")]))
        second = run(load_config(None, common + [("train.name", "split"), ("train.resume", "true")]))
        from pathlib import Path
        tag = Path(second["run_dir"]) / "checkpoints" / "step00000004"
        written = tag.stat().st_mtime_ns
        again = run(load_config(None, common + [("train.name", "split"), ("train.resume", "true")]))
        assert again["history"] == [] and tag.stat().st_mtime_ns == written  # finished: nothing saved again
        resume = [("train.name", "split"), ("train.resume", "true")]
        other_batch = load_config(None, common + resume + [("train.batch_size", "3")])
        try:
            run(other_batch)
            refused = None
        except ValueError as err:
            refused = str(err)
        import yaml
        recorded = yaml.safe_load((Path(second["run_dir"]) / "config.yaml").read_text())["train"]["batch_size"]
        result = [full["history"], first["history"], second["history"], [refused, recorded]]
        if {freeze_vit == "true"}:  # two steps more at new optimizer settings (once: the ViT changes nothing here)
            import contextlib, io
            said = io.StringIO()
            with contextlib.redirect_stdout(said):
                run(load_config(None, common + resume + {changed!r}))
            result[3].append(said.getvalue())
        """,
    )
    if freeze_vit == "true":
        said = refused.pop()
        assert "optim.lr 0.0003 -> 0.001, optim.betas (0.9, 0.999) -> (0.8, 0.99), optim.eps 1e-08 -> 1e-06" in said
        optim = load_config(None, common + changed).optim  # steps 5 and 6 ran at the new rates
        rows = _losses(tmp_path / "split")
        assert [r["lr"] for r in rows[4:]] == pytest.approx([lr_at(s, optim, 6) for s in (4, 5)], rel=1e-9)
    assert len(full) == 4 and len(first) == 2 and len(second) == 2
    refused, recorded = refused
    assert refused and "batch_size 4 -> 3" in refused, refused
    assert recorded == 4  # a refused resume leaves the run's config.yaml as it was
    for a, b in zip(full, first + second, strict=True):
        for key in ("loss", "itc", "itm", "itg"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (key, full, first + second)
    assert full[0]["loss"] != full[3]["loss"]
    split = tmp_path / "split"
    last = 6 if freeze_vit == "true" else 4
    assert (split / "checkpoints" / "latest").read_text() == f"step{last:08d}"
    assert [r["step"] for r in _losses(split)] == list(range(1, last + 1))  # the resumed run continues the CSV
    optim = load_config(None, common).optim  # each row's lr is the one its step ran at: lr_at(step - 1)
    assert [r["lr"] for r in _losses(split)][:4] == pytest.approx([lr_at(s, optim, 4) for s in range(4)], rel=1e-9)
    whole, resumed = load_file(tmp_path / "full" / "vision.safetensors"), load_file(split / "vision.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.slow
def test_bf16_training_follows_fp32(tmp_path):
    """DeepSpeed's bf16 mode (a GPU's default) runs on CPU too: the first step's losses agree with fp32 within
    bf16 rounding, and the exported model is fp32. (Its fp16 mode needs a GPU: DeepSpeed refuses it on CPU.)"""
    from safetensors.torch import load_file

    common = [o for o in TINY if o[0] != "train.precision"] + [("train.evaluate", "false")]
    runs = _train_in_subprocess(
        tmp_path,
        f"""
        runs = {{p: run(load_config(None, {common!r} + [("train.name", p), ("train.precision", p)]))
                 for p in ("fp32", "bf16")}}
        result = {{p: [r["precision"], r["history"][0], str(r["model"])] for p, r in runs.items()}}
        """,
    )
    assert runs["bf16"][0] == "bf16" and runs["fp32"][0] == "fp32"
    for key in ("itc", "itm", "itg"):
        want, got = runs["fp32"][1][key], runs["bf16"][1][key]
        assert got != want and abs(got - want) <= 0.01 * max(1.0, abs(want)), (key, got, want)
    assert {t.dtype for t in load_file(str(tmp_path / runs["bf16"][2])).values()} == {torch.float32}


@pytest.mark.slow
def test_feature_cache_serves_later_epochs(tmp_path):
    """Two epochs with the ViT features cached on disk train like two epochs that run the ViT every step."""
    common = TINY + [
        ("data.train_size", "8"),
        ("train.steps", "4"),  # 2 epochs of 2 global batches
        ("train.output_dir", str(tmp_path)),
        ("train.evaluate", "false"),
    ]
    plain, cached = _train_in_subprocess(
        tmp_path,
        f"""
        common = {common!r}
        plain = run(load_config(None, common + [("train.name", "plain")]))
        cached = run(load_config(None, common + [("train.name", "cached"), ("data.feature_cache", "true")]))
        result = [plain["history"], cached["history"]]
        """,
    )
    assert len(plain) == len(cached) == 4
    for a, b in zip(plain, cached, strict=True):  # the cache stores fp16: equal up to that rounding
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-3)
    assert (tmp_path / "cached" / "vit_features_rank0.npy").is_file()
    assert (tmp_path / "cached" / "vit_features_rank0.npy.json").is_file()
    assert not (tmp_path / "plain" / "vit_features_rank0.npy").exists()
    with pytest.raises(ValueError, match="feature_cache needs data.augment=false"):
        load_config(None, [("data.feature_cache", "true"), ("data.augment", "true")])


@pytest.mark.slow
def test_fine_tuning_starts_from_a_trained_model_and_trains_its_vit(tmp_path, hf_retrieval_folder):
    """BLIP-2's COCO fine-tuning in small: a trained model as init, a larger image size, the ViT trained too.

    - From a run of ours at 48 px (its 32 px ViT resized): one step at lr 0 must export exactly the init,
      the Q-Former bit for bit and the ViT as ``load_vision`` resizes it.
    - From a transformers BLIP-2 folder at 84 px (its 56 px ViT resized), with layer-wise decay and
      activation checkpointing: every ViT block learns, and the run's model serves at 84 px afterwards.
    """
    from safetensors.torch import load_file

    from blip2_fast import Blip2Stage1
    from blip2_fast.checkpoint import load_vision
    from blip2_fast.config import VisionConfig

    common = TINY + [("train.output_dir", str(tmp_path)), ("train.evaluate", "false"), ("train.steps", "1")]
    unfrozen = [("model.freeze_vit", "false"), ("model.vit_grad_checkpoint", "true")]
    at_lr_0 = [("optim.warmup_lr", "0"), ("optim.warmup_steps", "5")]
    hf_vision = {**load_vision(hf_retrieval_folder).config.to_dict(), "image_size": 84}
    from_hf = [o for o in common if not o[0].startswith(("model.qformer", "model.vision"))] + [
        ("model.init", str(hf_retrieval_folder)),
        ("model.qformer", "{hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"),
        ("model.vision", json.dumps(hf_vision)),
        ("optim.vit_layer_decay", "0.9"),
        ("train.steps", "2"),
        ("train.evaluate", "true"),
    ]
    result = _train_in_subprocess(
        tmp_path,
        f"""
        common = {common!r}
        run(load_config(None, common + [("train.name", "pretrained")]))
        init = [("model.init", {str(tmp_path / "pretrained")!r}), ("model.vision.image_size", "48")]
        run(load_config(None, common + init + {unfrozen!r} + {at_lr_0!r} + [("train.name", "lr0")]))
        hf = run(load_config(None, {from_hf!r} + {unfrozen!r} + [("train.name", "hf")]))
        result = [hf["history"], hf["eval"]["n_images"]]
        """,
    )
    pretrained, lr0, hf = (tmp_path / name for name in ("pretrained", "lr0", "hf"))
    before, after = load_file(pretrained / "model.safetensors"), load_file(lr0 / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    tiny48 = VisionConfig.preset("tiny", image_size=48)
    resized = load_vision(pretrained, tiny48).state_dict()
    exported = load_vision(lr0)
    assert exported.config == tiny48 and resized.keys() == exported.state_dict().keys()
    assert all(torch.equal(resized[k], v) for k, v in exported.state_dict().items())

    history, n_images = result
    assert len(history) == 2 and n_images == 12
    start = load_vision(hf_retrieval_folder, VisionConfig.from_dict(hf_vision)).state_dict()
    trained = load_vision(hf).state_dict()
    for i in range(hf_vision["num_hidden_layers"]):
        key = f"vit.encoder.layers.{i}.mlp.fc1.weight"
        assert not torch.equal(start[key], trained[key]), key
    assert not torch.equal(start["vit.embeddings.position_embedding"], trained["vit.embeddings.position_embedding"])
    model = Blip2Stage1.from_pretrained(hf)
    assert model.vision.config.image_size == 84
    assert torch.equal(
        model.vision.state_dict()["vit.encoder.layers.0.mlp.fc1.weight"], trained[key.replace("1.", "0.", 1)]
    )
    assert model.itc_scores(torch.randn(2, 3, 84, 84), ["a red circle", "a blue square"]).shape == (2, 2)


@pytest.mark.slow
def test_periodic_evaluation_logs_recall_and_keeps_the_best(tmp_path):
    """eval.every: held-out retrieval every 2 steps, logged; the best weights by mean recall are kept in
    <run>/best/, which evaluates to the recorded figures again; training itself is not disturbed."""
    common = TINY + [
        ("train.steps", "4"),
        ("train.output_dir", str(tmp_path)),
        ("model.qformer.hidden_dropout_prob", "0.1"),  # the evaluation must not move the training's RNG
        ("model.qformer.attention_probs_dropout_prob", "0.1"),
    ]
    every, plain = _train_in_subprocess(
        tmp_path,
        f"""
        common = {common!r}
        every = run(load_config(None, common + [("train.name", "every"), ("eval.every", "2")]))
        plain = run(load_config(None, common + [("train.name", "plain"), ("train.evaluate", "false")]))
        result = [every["history"], plain["history"]]
        """,
    )
    for a, b in zip(every, plain, strict=True):
        for key in ("loss", "itc", "itm", "itg"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), (key, every, plain)
    evaluations = [r for r in _losses(tmp_path / "every") if "r_mean" in r]
    assert [r["step"] for r in evaluations] == [2, 4]
    record = json.loads((tmp_path / "every" / "best" / "best.json").read_text())
    best = max(evaluations, key=lambda r: r["r_mean"])  # the first of equals: a later one must beat it
    assert record["step"] == best["step"] and record["r_mean"] == pytest.approx(best["r_mean"], abs=1e-3)
    proc = subprocess.run(
        [sys.executable, "-m", "blip2_fast.evaluate", "--checkpoint", str(tmp_path / "every" / "best"),
         "--out", str(tmp_path / "again.json")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out retrieval (" in proc.stdout and "image->text R@1" in proc.stdout  # training's own words
    figures = json.loads((tmp_path / "again.json").read_text())
    for key in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"):
        assert figures[key] == pytest.approx(record[key], abs=0.01), (key, figures, record)
    assert not (tmp_path / "plain" / "best").exists()
    from blip2_fast import Blip2Stage1

    assert Blip2Stage1.from_pretrained(tmp_path / "every" / "best").itc_scores(
        torch.randn(1, 3, 32, 32), ["a"]
    ).shape == (1, 1)


@pytest.mark.slow
def test_two_ranks_equal_one_rank(tmp_path):
    """Same global batch (8), seeded hard negatives: 2 ranks (ZeRO-3, torchrun) == 1 rank (ZeRO-2), one step.

    Only the first step can match: ITC gives no gradient to other ranks' features
    (LAVIS), so the updates differ by design. The step's learning rate is 0 (the
    warmup starts there), so both runs end with the initial weights and the
    end-of-training retrieval, sharded across the 2 ranks, must match too.
    """
    lr0 = [("train.steps", "1"), ("optim.warmup_lr", "0"), ("optim.warmup_steps", "5")]
    one = TINY + lr0 + [("train.batch_size", "8"), ("train.zero_stage", "2"), ("train.name", "one")]
    two = TINY + lr0 + [("train.batch_size", "4"), ("train.zero_stage", "3"), ("train.name", "two")]
    common = [("train.output_dir", str(tmp_path))]
    train = str(ROOT / "blip2_fast" / "train.py")
    proc = subprocess.run(
        [sys.executable, train, "--stage", "1", *_args(one + common)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from blip2_fast.train import _free_port

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    proc2 = subprocess.run(
        [*torchrun, train, "--stage", "1", *_args(two + common)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc2.returncode == 0, proc2.stdout[-3000:] + proc2.stderr[-3000:]
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    steps_a = [r for r in a if "loss" in r]
    steps_b = [r for r in b if "loss" in r]
    assert len(steps_a) == len(steps_b) == 1
    for ra, rb in zip(steps_a, steps_b, strict=True):
        for key in ("loss", "itc", "itm", "itg"):
            assert ra[key] == pytest.approx(rb[key], abs=2e-5), (key, ra, rb)
    eval_a = next(r for r in a if "txt_r1" in r)
    eval_b = next(r for r in b if "txt_r1" in r)
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5", "r_mean"):
        assert eval_a[key] == pytest.approx(eval_b[key], abs=1e-6)
    assert "outputs:" in proc2.stdout and (tmp_path / "two" / "model.safetensors").is_file()
    # the exported model (no ViT inside) + the run's config and ViT give the same retrieval again
    proc3 = subprocess.run(
        [
            sys.executable,
            "-m",
            "blip2_fast.evaluate",
            "--checkpoint",
            str(tmp_path / "two" / "model.safetensors"),
            "--out",
            str(tmp_path / "again.json"),
        ],  # fmt: skip
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc3.returncode == 0, proc3.stdout[-3000:] + proc3.stderr[-3000:]
    figures = json.loads((tmp_path / "again.json").read_text())
    for key in ("txt_r1", "txt_r5", "img_r1", "img_r5"):
        assert figures[key] == pytest.approx(eval_b[key], abs=0.01), (key, figures)


def test_stage_2_is_handed_to_its_entry_point(monkeypatch):
    import blip2_fast.train_stage2 as stage2
    from blip2_fast.train import main

    seen = []
    monkeypatch.setattr(stage2, "run", lambda config: seen.append(config) or "stage-2 ran")
    assert main(["--stage", "2", "--train.steps", "3"]) == "stage-2 ran"
    assert seen[0].train.steps == 3


def test_init_without_a_vit_points_at_vision_weights(tmp_path):
    from blip2_fast.train import build_vision

    torch.save(
        {"model": {"Qformer.bert.embeddings.LayerNorm.weight": torch.ones(4)}}, tmp_path / "blip2_pretrained.pth"
    )
    config = load_config(None, [("model.init", str(tmp_path / "blip2_pretrained.pth"))])
    with pytest.raises(ValueError, match="the ViT comes from model.init unless model.vision_weights names it"):
        build_vision(config)
    with pytest.raises(FileNotFoundError, match="model.vision_weights: not found"):
        build_vision(load_config(None, [("model.vision_weights", str(tmp_path / "eva_vit_g.pth"))]))


def test_compile_modes_are_checked():
    from blip2_fast.train import compile_step

    with pytest.raises(ValueError, match="train.compile must be null or one of inductor, inductor-cudagraphs"):
        load_config(None, [("train.compile", "fast")])
    module = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="needs ZeRO stage 0, 1 or 2"):
        compile_step(module, "inductor", torch.device("cpu"), 3)
    with pytest.raises(ValueError, match="inductor-cudagraphs needs a CUDA device"):
        compile_step(module, "inductor-cudagraphs", torch.device("cpu"), 2)
    compile_step(module, None, torch.device("cpu"), 3)  # eager: any stage


@pytest.mark.slow
def test_a_compiled_step_trains_as_eager(tmp_path):
    """train.compile (aot_eager here: the graph inductor would take, without code generation) under ZeRO-2 gives
    the eager run's losses: the whole Q-Former + losses step is one graph (fullgraph=True) inside DeepSpeed."""
    common = TINY + [("train.zero_stage", "2"), ("train.output_dir", str(tmp_path)), ("train.evaluate", "false")]
    runs = _train_in_subprocess(
        tmp_path,
        f"""
        from torch._dynamo.utils import counters
        result = {{}}
        for m in ("null", "aot_eager"):
            counters.clear()
            history = run(load_config(None, {common!r} + [("train.name", "run-" + m), ("train.compile", m)]))["history"]
            result[m] = history
            result[m + " graphs"] = counters["stats"]["unique_graphs"]
        """,
    )
    assert runs["null graphs"] == 0 and runs["aot_eager graphs"] == 1, runs  # one graph: no break
    assert len(runs["null"]) == 2
    for eager, compiled in zip(runs["null"], runs["aot_eager"], strict=True):
        for key in ("loss", "itc", "itm", "itg"):
            assert compiled[key] == pytest.approx(eager[key], rel=1e-5), (key, runs)


def test_the_first_cpu_run_says_deepspeed_builds_its_op(tmp_path, monkeypatch, capsys):
    from blip2_fast.train import _announce_cpu_op_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # where torch builds and finds extensions
    _announce_cpu_op_build()
    assert "DeepSpeed is building its CPU communication op" in capsys.readouterr().err
    (tmp_path / "deepspeed_shm_comm").mkdir(exist_ok=True)
    (tmp_path / "deepspeed_shm_comm" / "deepspeed_shm_comm.so").write_bytes(b"")
    _announce_cpu_op_build()  # built: nothing to say
    assert capsys.readouterr().err == ""


def test_the_curves_show_what_was_measured(tmp_path):
    """No evaluation: the loss panel alone. One evaluation: its recalls on the run's step axis, each value
    written on the plot (not three dots on an axis zoomed around one step)."""
    from PIL import Image

    from blip2_fast.train import MetricsLog

    losses = [{"step": s, "itc": 2.0 / s, "itm": 0.6, "itg": 3.0 / s} for s in range(1, 11)]
    widths = {}
    for name, recall in {"none": {}, "one": {"txt_r1": 26.5, "img_r1": 14.0, "r_mean": 60.0}}.items():
        folder = tmp_path / name
        folder.mkdir()
        log = MetricsLog(folder, 0)
        for row in losses:
            log.log(row)
        if recall:
            log.log({"step": 10, **recall})
        widths[name] = Image.open(log.plot(folder / "curves.png")).size[0]
        log.close()
    assert widths["none"] < 0.7 * widths["one"], widths


def test_non_finite_losses_and_weights_are_named():
    from blip2_fast.train import NonFiniteTraining, check_finite_losses, check_finite_weights

    rows = [{"loss": 3.0, "itc": 1.0, "itm": 0.6, "itg": 1.4, "temp": 0.07}] * 2
    check_finite_losses(rows, 1, Path("nowhere"))  # finite: nothing happens
    bad = [*rows, {"loss": float("nan"), "itc": 1.0, "itm": float("nan"), "itg": 1.4, "temp": 0.07}]
    with pytest.raises(NonFiniteTraining, match=r"^step 7: the itm loss is nan; training stops and no checkpoint"):
        check_finite_losses(bad, 5, Path("nowhere"))
    with pytest.raises(NonFiniteTraining, match="step 4: the loss is -inf"):  # stage 2 has one term
        check_finite_losses([{"loss": float("-inf")}], 4, Path("nowhere"))
    with pytest.raises(NonFiniteTraining, match="step 2: the ITC temperature is inf"):
        check_finite_losses([{"loss": 1.0, "temp": float("inf")}], 2, Path("nowhere"))
    layer = torch.nn.Linear(2, 2)
    check_finite_weights(layer, 3, Path("nowhere"))
    with torch.no_grad():
        layer.bias[1] = float("inf")
    with pytest.raises(NonFiniteTraining, match="step 3: the trained weights hold NaN or inf"):
        check_finite_weights(layer, 3, Path("nowhere"))
    layer.bias.requires_grad_(False)  # frozen weights are not the run's to guard
    check_finite_weights(layer, 3, Path("nowhere"))


@pytest.mark.slow
def test_a_diverging_run_stops_naming_the_step_and_keeps_its_last_good_checkpoint(tmp_path):
    """lr 1e30: the losses turn NaN; the run stops at the first non-finite read, exports nothing, and every
    checkpoint left is finite (before: it trained on, checkpointed and exported from a NaN loss)."""
    common = TINY + [
        ("train.steps", "12"),
        ("train.save_every", "2"),
        ("train.log_every", "1"),
        ("optim.lr", "1e30"),
        ("optim.warmup_steps", "0"),
        ("train.output_dir", str(tmp_path)),
        ("train.name", "diverging"),
    ]
    said = _train_in_subprocess(
        tmp_path,
        f"""
        from blip2_fast.train import NonFiniteTraining
        try:
            run(load_config(None, {common!r}))
            result = None
        except NonFiniteTraining as err:
            result = str(err)
        """,
    )
    assert said is not None and re.match(r"step \d+: the (itc|itm|itg) loss is (nan|inf)", said), said
    folder = tmp_path / "diverging"
    assert not (folder / "model.safetensors").exists()
    for tag in (folder / "checkpoints").glob("step*"):  # what is left is what a resume would read: finite
        state = torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)["module"]
        assert all(bool(v.isfinite().all()) for v in state.values() if v.is_floating_point()), tag
    assert str(folder / "checkpoints") in said or "no checkpoint was written" in said


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_step_and_stops(tmp_path):
    """SIGTERM to a whole 2-rank run (torchrun, its ranks and their data-loader workers), as SLURM or Kubernetes
    send it before preemption: the ranks agree on a step, save its checkpoint and stop with status 143, and
    the run resumes from it."""
    from interrupt import logged_steps, sigterm_once_training

    from blip2_fast.train import _free_port

    args = TINY + [("train.steps", "1000"), ("train.output_dir", str(tmp_path)), ("data.num_workers", "1")]
    train = str(ROOT / "blip2_fast" / "train.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    run_dir = tmp_path / "stage1-default"
    env = _env()
    proc = sigterm_once_training([*torchrun, train, "--stage", "1", *_args(args)], run_dir / "metrics.csv", env=env)
    said = proc.stdout + proc.stderr
    stopped = re.search(r"stopped: SIGTERM at step (\d+) of 1000: checkpoint (\S+);", said)
    assert stopped, said[-3000:]
    step = int(stopped.group(1))
    assert proc.stderr.count("stopped: SIGTERM") == 1  # rank 0 says it
    assert "raise Preempted" not in said  # the ranks' exit is a message, not a traceback (torchrun prints its own)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step{step:08d}"
    assert sorted(p.name for p in (run_dir / "checkpoints" / f"step{step:08d}").glob("rng_rank*")) == [
        "rng_rank00000.safetensors",
        "rng_rank00001.safetensors",
    ]
    assert logged_steps(run_dir / "metrics.csv")[-1] == step
    # stderr is a file (CI logs, nohup, SLURM): each log step prints one plain line instead of the bar
    lines = [line for line in proc.stderr.splitlines() if line.startswith("stage 1: step ")]
    assert [line.split()[3] for line in lines][:2] == ["1/1000", "2/1000"], proc.stderr[-2000:]
    assert " itc " in lines[0] and " s/step" in lines[0]
    assert proc.returncode != 0  # never read as a finished run (the ranks exit 143; torchrun, signalled, its own)
    resume = args + [("train.resume", "true"), ("train.steps", str(step + 1)), ("train.evaluate", "false")]
    torchrun[-1] = f"--master_port={_free_port()}"
    again = subprocess.run(
        [*torchrun, train, "--stage", "1", *_args(resume)], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {run_dir / 'checkpoints' / f'step{step:08d}'} at step {step}" in again.stdout
    assert logged_steps(run_dir / "metrics.csv")[-1] == step + 1


def test_a_full_disk_is_named_with_the_path_and_its_free_space(tmp_path):
    """torch's writer fails on a full disk with "unexpected pos 704 vs 598", naming neither file nor cause:
    a write that fails so (here for real, under a file-size limit) or with ENOSPC says both; others pass."""
    import errno

    script = textwrap.dedent(
        f"""
        import resource, signal, torch
        from pathlib import Path
        from blip2_fast.train import writing
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        target = Path({str(tmp_path)!r}) / "checkpoints" / "tmp-step00000003"
        target.mkdir(parents=True)
        with writing(target, "the checkpoint of step 3"):
            torch.save({{"w": torch.zeros(100_000)}}, target / "mp_rank_00_model_states.pt")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True, text=True, timeout=300)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("OSError: [Errno 28] writing the checkpoint of step 3 to "), last
    assert "tmp-step00000003 failed: the device is probably full or over quota (" in last and " MB free)" in last
    assert "unexpected pos" in last  # the writer's own words follow

    from blip2_fast.train import writing

    with pytest.raises(OSError, match=r"writing the metrics to .*metrics.csv failed: no space left on the device \("):
        with writing(tmp_path / "metrics.csv", "the metrics"):
            raise OSError(errno.ENOSPC, "No space left on device")
    for other in (OSError(errno.EACCES, "Permission denied"), ValueError("not a write")):
        with pytest.raises(type(other)) as raised:
            with writing(tmp_path, "anything"):
                raise other
        assert raised.value is other


def test_user_errors_are_one_line_unless_debugging(tmp_path, capsys):
    """A mistake on the command line ends in one line naming it (status 1); --debug shows the traceback."""
    from blip2_fast.cli import run_main
    from blip2_fast.train import main

    bad = tmp_path / "run.yaml"
    bad.write_text("optim:\n  lr: 1.0e-4\n  lr: 1.0e-3\n")
    for args, named in (
        (["--optim.eps", "0"], "optim.eps must lie in (0, inf), got 0.0"),
        (["--config", str(bad)], f"{bad}: line 3: key 'lr' given twice"),
        (["--config", str(tmp_path / "none.yaml")], f"config file not found: {tmp_path / 'none.yaml'}"),
    ):
        with pytest.raises(SystemExit) as stopped:
            run_main(main, ["--stage", "1", *args])
        said = capsys.readouterr().err
        assert stopped.value.code == 1 and "Traceback" not in said, said
        assert said.strip().splitlines()[-1].startswith(f"error: {named}"), said
    with pytest.raises(SystemExit):
        run_main(main, ["--stage", "1", "--optim.eps", "0", "--debug"])
    said = capsys.readouterr().err
    assert "Traceback" in said
    assert said.strip().splitlines()[-1] == "ValueError: optim.eps must lie in (0, inf), got 0.0"
    # the command lines as users run them, a script and a module
    commands = {
        "train": [str(ROOT / "blip2_fast" / "train.py"), "--stage", "1", "--optim.lr", "inf"],
        "evaluate": ["-m", "blip2_fast.evaluate", "--checkpoint", str(tmp_path)],
    }
    for args in commands.values():
        proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=_env(), capture_output=True, text=True)
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 1 and "Traceback" not in proc.stderr and last.startswith("error: "), proc.stderr
        assert "optim.lr must be a finite number" in last or str(tmp_path) in last, last
