"""Stage-2 evaluation as LAVIS' captioning and VQA tasks run it: generate, then score.

    python -m blip2_fast.evaluate_stage2 --model runs/stage2-default --task caption \
        --annotations coco_karpathy_test.json --images coco/              # BLEU-1..4 and CIDEr
    python -m blip2_fast.evaluate_stage2 --model blip2-opt-2.7b/ --task vqa \
        --annotations okvqa_val.json --images coco/                        # VQAv2 accuracy
    python -m blip2_fast.evaluate_stage2 --model runs/stage2-default --task caption   # the run's own held-out set

``--model`` is a transformers ``Blip2ForConditionalGeneration`` folder with its
tokenizer (what ``save_pretrained`` writes, and what a stage-2 run exports under
``transformers/``) or a stage-2 run folder. Captions: one per image, scored
against every reference caption of that image with COCO's BLEU and CIDEr-D
(:mod:`blip2_fast.metrics`). VQA: one answer per question through BLIP-2's
short-answer prompt, scored with the VQAv2 accuracy. The generation defaults are
LAVIS' (beam 5; captions 8 to 30 new tokens; answers at most 10, length penalty
-1 so that beams prefer short answers). Predictions and scores go to ``--out``; annotations without
references (a test split) give the predictions alone, in the rows a test server takes.
Without ``--annotations``/``--images``, a stage-2 run folder is scored on its own held-out split as the run
scored it at its end (``train_stage2.caption_held_out``: greedy; on synthetic shapes the named colour and
shape against the chance level, and the LM loss).
Under ``torchrun --nproc_per_node N -m blip2_fast.evaluate_stage2 ...`` each rank generates a strided
share and rank 0 scores and writes. ``--limit`` evaluates the first images or questions only.
An image that is missing or does not decode (a truncated or corrupt file) is skipped, as training skips it:
the scores are over the rest, and the skipped images are counted, named (``skipped`` in ``--out``) and printed.

Not modelled: LAVIS' OK-VQA evaluation lemmatises answers with spaCy first; the
human answers are compared as the annotation file stores them (see
:func:`blip2_fast.metrics.vqa_accuracy`).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from blip2_fast import distributed
from blip2_fast.stage2 import VQA_PROMPT, answer, caption
from blip2_fast.stage2_convert import load_pretrained

logger = logging.getLogger(__name__)

TASKS = ("caption", "vqa")
BATCH_SIZE = 16  # images per generate call
# LAVIS' generation settings: its caption task and the VQA evaluation of blip2_opt / blip2_t5. The caption prompt
# belongs to the model (LAVIS' COCO captioners were fine-tuned after "a photo of", its pre-trained models use
# none): a run of ours is evaluated with the prompt it trained with (run_prompt), anything else without one.
DEFAULTS = {
    "caption": dict(prompt="", num_beams=5, max_new_tokens=30, min_new_tokens=8, length_penalty=1.0),
    "vqa": dict(prompt=VQA_PROMPT, num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=-1.0),
}


def read_vqa(path: str | Path) -> list[dict[str, Any]]:
    """Questions of a VQA JSON: a list of ``{"question_id", "image", "question", "answer": [str, ...]}``
    (LAVIS' layout; ``"answers"`` and VQAv2's ``[{"answer": str}, ...]`` are read too). A file with no answers
    at all (a test split, scored by its server) gives ``answers`` None."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VQA annotation file not found: {path}")
    data = json.loads(path.read_text())
    if not isinstance(data, list) or not data:
        raise ValueError(f"{path}: expected a non-empty JSON list of questions")
    scored = any(isinstance(e, Mapping) and ("answer" in e or "answers" in e) for e in data)
    out = []
    for n, entry in enumerate(data):
        answers = entry.get("answer", entry.get("answers")) if isinstance(entry, Mapping) else None
        if isinstance(answers, str):
            answers = [answers]
        if isinstance(answers, list):
            answers = [a["answer"] if isinstance(a, Mapping) else a for a in answers]
        fields_ok = isinstance(entry, Mapping) and all(isinstance(entry.get(k), str) for k in ("image", "question"))
        answers_ok = answers and all(isinstance(a, str) for a in answers) if scored else True
        if not fields_ok or "question_id" not in entry or not answers_ok:
            raise ValueError(
                f"{path}: entry {n} must hold 'question_id', 'image' (str), 'question' (str) and, as other entries "
                f"do, 'answer' (a non-empty list of str), got {entry!r:.200}"
            )
        out.append({"question_id": entry["question_id"], "image": entry["image"], "question": entry["question"],
                    "answers": answers})  # fmt: skip
    return out


def _generate(
    items: Sequence[Any], batch_size: int, generate: Callable[[list[Any]], list[str | None]], sharded: bool
) -> list[str | None]:
    """``generate`` over ``items``, ``batch_size`` at a time. ``sharded``: each rank takes its share (r, r + world,
    ...) and every rank gets all the outputs back, in the order of ``items`` (every rank must call)."""
    rank, world = (distributed.get_rank(), distributed.get_world_size()) if sharded else (0, 1)
    mine = list(items[rank::world])
    outputs = [text for start in range(0, len(mine), batch_size) for text in generate(mine[start : start + batch_size])]
    merged: list[Any] = [None] * len(items)
    for r, part in enumerate(distributed.all_gather_object(outputs) if sharded else [outputs]):
        merged[r::world] = part
    return merged


def _skipping_unreadable(
    model, root: Path, images: Sequence[str], run: Callable[[torch.Tensor, list[int]], list[str]]
) -> list[str | None]:
    """``run(pixels, kept)`` on those of ``images`` (paths under ``root``) that load, ``kept`` their indices; None
    in place of the others: a missing, truncated or corrupt file fails the errors training skips on."""
    from blip2_fast.data import IMAGE_ERRORS, build_transform, load_image

    transform = build_transform(model.image_encoder.config.image_size, train=False)
    kept, pixels = [], []
    for n, image in enumerate(images):
        try:
            pixels.append(transform(load_image(root / image)))
        except IMAGE_ERRORS as err:  # FileNotFoundError is an OSError
            logger.warning("skipping image %s: %s: %s", root / image, type(err).__name__, err)
            continue
        kept.append(n)
    out: list[str | None] = [None] * len(images)
    if kept:
        texts = run(torch.stack(pixels).to(model.llm_proj.weight.device), kept)
        for n, text in zip(kept, texts, strict=True):
            out[n] = text
    return out


def _skipped(items: Sequence[Any], outputs: list[str | None], image_root: Path) -> list[Any]:
    """The items whose image was skipped (None output); an error when that is every one of them."""
    skipped = [item for item, out in zip(items, outputs, strict=True) if out is None]
    if items and len(skipped) == len(items):
        raise ValueError(
            f"{image_root}: none of the {len(items)} images could be read (missing or damaged); is it the folder "
            "the annotations' image paths are relative to?"
        )
    return skipped


def evaluate_captions(
    model, tokenizer, annotations, image_root, *, batch_size=16, limit=None, prompt="", sharded=True, **options
):
    """Caption every image of a caption JSON (``data.CaptionJSON``'s layouts) and score against its references;
    ``sharded=False`` keeps the work on this rank alone (see :func:`_generate`).
    Returns ``{"scores": {bleu_1 .. bleu_4, cider}, "predictions": [{"image", "caption", "references"}],
    "skipped": [image, ...]}`` (images that would not load, left out of the scores); for a list of ``{"image",
    "image_id"}`` without captions (a test split), no scores and ``{"image", "image_id", "caption"}`` rows."""
    from blip2_fast.data import CaptionJSON
    from blip2_fast.metrics import caption_scores

    image_ids = _unscored_images(Path(annotations))
    references: dict[str, list[str]] = {}
    if image_ids is None:
        for image, text, _ in CaptionJSON(annotations, image_root).samples:
            references.setdefault(image, []).append(text)
    images = list(references or image_ids)[:limit]
    root = Path(image_root)

    def generate(chunk):
        return _skipping_unreadable(
            model, root, chunk, lambda pixels, kept: caption(model, tokenizer, pixels, prompt=prompt, **options)
        )

    outputs = _generate(images, batch_size, generate, sharded)
    skipped = _skipped(images, outputs, root)
    predictions = {i: c for i, c in zip(images, outputs, strict=True) if c is not None}
    if image_ids is not None:  # a test split: what its server takes
        rows = [{"image": i, "image_id": image_ids[i], "caption": c} for i, c in predictions.items()]
        return {"scores": {}, "predictions": rows, "skipped": skipped}
    scores = caption_scores(predictions, {i: references[i] for i in predictions})
    rows = [{"image": i, "caption": c, "references": references[i]} for i, c in predictions.items()]
    return {"scores": scores, "predictions": rows, "skipped": skipped}


def _unscored_images(path: Path) -> dict[str, Any] | None:
    """image -> image_id of a caption JSON without any caption (a test split such as NoCaps'), else None."""
    if not path.is_file():
        return None  # CaptionJSON names the missing file
    data = json.loads(path.read_text())
    if not isinstance(data, list) or not data or any(not isinstance(e, Mapping) or "caption" in e for e in data):
        return None
    if not all(isinstance(e.get("image"), str) for e in data):
        raise ValueError(f"{path}: every entry of a caption JSON needs 'image' (a path under the image folder)")
    return {e["image"]: e.get("image_id", e["image"]) for e in data}


def evaluate_vqa(
    model, tokenizer, annotations, image_root, *, batch_size=16, limit=None, prompt=VQA_PROMPT, sharded=True, **options
):
    """Answer every question of a VQA JSON (:func:`read_vqa`) and score with the VQAv2 accuracy (``sharded`` as
    in :func:`evaluate_captions`; no answers in the file: no scores; questions whose image would not load are
    left out and their images listed in ``skipped``).
    Returns ``{"scores": {"accuracy": percent}, "predictions": [{"question_id", "answer"}], "skipped"}``."""
    from blip2_fast.metrics import vqa_accuracy

    questions = read_vqa(annotations)[:limit]
    root = Path(image_root)

    def generate(chunk):
        def run(pixels, kept):
            asked = [chunk[n]["question"] for n in kept]
            return answer(model, tokenizer, asked, pixels, template=prompt, **options)

        return _skipping_unreadable(model, root, [q["image"] for q in chunk], run)

    said = _generate(questions, batch_size, generate, sharded)
    skipped = [q["image"] for q in _skipped(questions, said, root)]
    answered = [(q, a) for q, a in zip(questions, said, strict=True) if a is not None]
    predictions = {q["question_id"]: a for q, a in answered}
    rows = [{"question_id": k, "answer": v} for k, v in predictions.items()]  # the VQAv2 server's format
    if questions and questions[0]["answers"] is None:
        return {"scores": {}, "predictions": rows, "skipped": skipped}
    accuracy = vqa_accuracy(predictions, {q["question_id"]: q["answers"] for q, _ in answered})["accuracy"]
    return {"scores": {"accuracy": accuracy}, "predictions": rows, "skipped": skipped}


def run_prompt(model: str | Path) -> str | None:
    """The caption prompt a stage-2 run of ours trained with (its config.yaml), None for any other model."""
    from blip2_fast.checkpoint import run_config

    folder = Path(model)
    if folder.name == "transformers" and not (folder / "config.yaml").is_file():
        folder = folder.parent  # the run's export, inside its folder
    prompt = (run_config(folder).get("model") or {}).get("prompt")
    return prompt if isinstance(prompt, str) else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="Score a BLIP-2 stage-2 model on captions (BLEU, CIDEr) or VQA.")
    parser.add_argument("--model", required=True, help="Blip2ForConditionalGeneration folder or stage-2 run folder")
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument(
        "--annotations", default=None, help="caption JSON (COCO or LAVIS) or VQA JSON; none: a run's own held-out set"
    )
    parser.add_argument("--images", default=None, help="the folder the annotations' image paths are relative to")
    parser.add_argument(
        "--prompt", default=None, help="caption prefix (default: a run's own, else none) / VQA template with {}"
    )
    parser.add_argument("--num-beams", type=int, default=None, help="beam width (default 5)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--min-new-tokens", type=int, default=None)
    parser.add_argument("--length-penalty", type=float, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help=f"images per generate call (default {BATCH_SIZE})")
    parser.add_argument("--limit", type=int, default=None, help="the first N images (caption) or questions (vqa)")
    parser.add_argument("--out", default=None, help="JSON file for the scores and every prediction")
    args = parser.parse_args(argv)
    if any(v is not None and v < 1 for v in (args.batch_size, args.limit, args.num_beams)):
        parser.error("--batch-size, --limit and --num-beams must be >= 1")
    if (args.annotations is None) != (args.images is None):
        parser.error("--annotations and --images go together")
    given = dict(prompt=args.prompt, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                 length_penalty=args.length_penalty, num_beams=args.num_beams)  # fmt: skip
    if args.annotations is None:
        if args.task != "caption":
            parser.error("--task vqa needs --annotations and --images")
        _refuse_generation_options(parser, {**given, "batch_size": args.batch_size, "limit": args.limit})
        return _own_held_out(parser, Path(args.model), args.out)
    defaults = dict(DEFAULTS[args.task])
    if args.task == "caption" and (recorded := run_prompt(args.model)) is not None:
        defaults["prompt"] = recorded
    options = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    _check_options(parser, args.task, options)

    device = distributed.init_from_launcher()
    model, tokenizer = load_pretrained(args.model)
    model.eval().to_device(device)
    run = evaluate_captions if args.task == "caption" else evaluate_vqa
    batch_size = args.batch_size or BATCH_SIZE
    result = run(model, tokenizer, args.annotations, args.images, batch_size=batch_size, limit=args.limit, **options)
    if distributed.get_rank() != 0:
        return result
    count = len(result["predictions"])
    what = "images" if args.task == "caption" else "questions"
    scores = "  ".join(f"{k} {v:.4f}" for k, v in result["scores"].items())
    print(f"{args.task} on {count} {what}: " + (scores or "predictions only (the annotations hold no references)"))
    if result["skipped"]:
        from blip2_fast.evaluate import skipped_summary

        print(skipped_summary(len(result["skipped"]), result["skipped"], f"{what} (a missing or unreadable image)"))
    if args.out:
        from blip2_fast.checkpoint import write_text_atomic

        write_text_atomic(
            args.out, json.dumps({"task": args.task, "model": str(args.model), "options": options, **result}, indent=1)
        )
    return result


def _check_options(parser: argparse.ArgumentParser, task: str, options: dict[str, Any]) -> None:
    """Refuse generation settings that would be dropped without a word: a VQA template that leaves the question
    out, a minimum length beyond the maximum (generation stops at the maximum)."""
    if task == "vqa" and "{}" not in options["prompt"]:
        parser.error(f"--prompt {options['prompt']!r}: a VQA template needs {{}} where the question goes")
    if options["min_new_tokens"] > options["max_new_tokens"]:
        parser.error(
            f"--min-new-tokens {options['min_new_tokens']} exceeds --max-new-tokens {options['max_new_tokens']} "
            f"(the {task} defaults: {DEFAULTS[task]['min_new_tokens']} to {DEFAULTS[task]['max_new_tokens']})"
        )


def _refuse_generation_options(parser: argparse.ArgumentParser, given: dict[str, Any]) -> None:
    """A run's own held-out split is scored as the run scored it (its eval settings, greedy): options that
    would change that are refused, not ignored."""
    named = [f"--{k.replace('_', '-')}" for k, v in given.items() if v is not None]
    if named:
        parser.error(
            f"{', '.join(named)}: without --annotations a run's held-out split is scored with the run's own eval "
            "settings (greedy); pass --annotations and --images to choose them"
        )


def _own_held_out(parser: argparse.ArgumentParser, model: Path, out: str | None) -> dict[str, Any]:
    """A stage-2 run folder (or its transformers/ export) scored on the held-out split its config names."""
    from blip2_fast.train_stage2 import caption_held_out, load_config, print_held_out

    run = model.parent if model.name == "transformers" else model
    if not (run / "config.yaml").is_file():
        parser.error(f"--model {model}: no config.yaml of a stage-2 run here; pass --annotations and --images")
    config = load_config(run / "config.yaml")
    device = distributed.init_from_launcher()
    pretrained, tokenizer = load_pretrained(model)
    pretrained.eval().to_device(device)
    result = caption_held_out(pretrained, tokenizer, config, device)
    if not result:
        parser.error(f"--model {model}: its config.yaml names no held-out set; pass --annotations and --images")
    if distributed.get_rank() == 0:
        print_held_out(result, show=0)
        if out:
            from blip2_fast.checkpoint import write_text_atomic

            write_text_atomic(out, json.dumps({"task": "caption", "model": str(model), **result}, indent=1))
    return result


if __name__ == "__main__":
    from blip2_fast.cli import run_main

    run_main(main)
