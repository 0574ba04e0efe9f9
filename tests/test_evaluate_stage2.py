"""Stage-2 evaluation: a transformers folder in, captions and answers generated from image files, scored.

The model is the tiny random stage-2 model (a 2-layer OPT): its words are noise, so
the tests check the plumbing that a real model relies on: every image and question
reaches the model as ``caption`` / ``answer`` would take it, and the scores are the
metrics of exactly those predictions against the right references.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from blip2_fast.evaluate_stage2 import main, read_vqa, run_prompt
from blip2_fast.metrics import caption_scores
from blip2_fast.stage2 import answer, caption, default_stage2_model
from blip2_fast.stage2_convert import load_pretrained, save_transformers


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage2_eval")
    torch.manual_seed(0)
    model, tokenizer = default_stage2_model()
    save_transformers(model, root / "transformers", tokenizer=tokenizer)  # the root reads as a run folder
    g = torch.Generator().manual_seed(0)
    for n in range(3):
        pixels = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(root / f"img{n}.png")
    return root


OPTIONS = dict(num_beams=2, max_new_tokens=5, min_new_tokens=1)


def test_captions_are_scored_against_the_references_of_their_image(folder):
    references = {
        "img0.png": ["a red circle", "a circle that is red"],
        "img1.png": ["two blue squares"],
        "img2.png": ["a green cross", "green cross on white", "a cross"],
    }
    annotations = [{"image": image, "caption": texts} for image, texts in references.items()]
    (folder / "captions.json").write_text(json.dumps(annotations))
    out = folder / "caption_result.json"
    args = [
        "--model",
        str(folder / "transformers"),
        "--task",
        "caption",
        "--annotations",
        str(folder / "captions.json"),
    ]
    args += ["--images", str(folder), "--batch-size", "2", "--num-beams", "2", "--max-new-tokens", "5"]
    args += ["--min-new-tokens", "1", "--out", str(out)]
    result = main(args)

    model, tokenizer = load_pretrained(folder / "transformers")
    want = caption(model, tokenizer, images=[folder / i for i in references], **OPTIONS)
    got = {p["image"]: p["caption"] for p in result["predictions"]}
    assert list(got) == list(references) and list(got.values()) == want
    assert result["scores"] == caption_scores(got, references)
    saved = json.loads(out.read_text())
    assert saved["scores"] == result["scores"] and saved["options"]["max_new_tokens"] == 5


def test_vqa_accuracy_of_the_generated_answers(folder):
    questions = ["what colour is it?", "how many shapes?"]
    model, tokenizer = load_pretrained(folder / "transformers")
    said = answer(model, tokenizer, questions, images=[folder / "img0.png", folder / "img1.png"], **OPTIONS)
    # question 1: 3 of 10 annotators gave the model's answer; leaving one of those 3 out leaves 2 matches (2/3),
    # leaving one of the other 7 out leaves 3 (1): (3 * 2/3 + 7) / 10 = 90%. Question 2: nobody did (0%).
    entries = [
        {"question_id": 7, "image": "img0.png", "question": questions[0], "answer": [said[0]] * 3 + ["zzz"] * 7},
        {"question_id": 9, "image": "img1.png", "question": questions[1], "answers": [{"answer": "zzz"}] * 10},
    ]
    (folder / "vqa.json").write_text(json.dumps(entries))
    args = ["--model", str(folder), "--task", "vqa", "--annotations", str(folder / "vqa.json"), "--images", str(folder)]
    args += ["--num-beams", "2", "--max-new-tokens", "5", "--length-penalty", "1.0"]
    result = main(args)
    assert [p["answer"] for p in result["predictions"]] == said
    assert result["scores"]["accuracy"] == pytest.approx(45.0)


def test_test_splits_without_references_give_predictions_in_server_rows(folder, tmp_path):
    """NoCaps- / VQAv2-test-dev-style files: no captions, no answers; the predictions alone, with the ids."""
    (tmp_path / "nocaps.json").write_text(json.dumps([{"image": "img0.png", "image_id": 40}, {"image": "img2.png"}]))
    args = ["--model", str(folder), "--images", str(folder), "--num-beams", "2", "--max-new-tokens", "5"]
    args += ["--min-new-tokens", "1"]
    result = main([*args, "--task", "caption", "--annotations", str(tmp_path / "nocaps.json")])
    model, tokenizer = load_pretrained(folder)
    want = caption(model, tokenizer, images=[folder / "img0.png", folder / "img2.png"], **OPTIONS)
    assert result["scores"] == {}
    assert result["predictions"] == [
        {"image": "img0.png", "image_id": 40, "caption": want[0]},
        {"image": "img2.png", "image_id": "img2.png", "caption": want[1]},
    ]
    questions = [{"question_id": 5, "image": "img1.png", "question": "what is it?"}]
    (tmp_path / "test_dev.json").write_text(json.dumps(questions))
    result = main([*args, "--task", "vqa", "--annotations", str(tmp_path / "test_dev.json"), "--length-penalty", "1"])
    said = answer(model, tokenizer, ["what is it?"], images=[folder / "img1.png"], **OPTIONS)
    assert result == {"scores": {}, "predictions": [{"question_id": 5, "answer": said[0]}], "skipped": []}
    questions.append({"question_id": 6, "image": "img1.png", "question": "and now?", "answer": ["yes"]})
    (tmp_path / "mixed.json").write_text(json.dumps(questions))
    with pytest.raises(ValueError, match=r"entry 0 must hold .* as other entries do, 'answer'"):
        read_vqa(tmp_path / "mixed.json")


def test_bad_inputs_are_named(folder, tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"question_id": 1, "image": "a.png", "answer": ["yes"]}]))
    with pytest.raises(ValueError, match=r"entry 0 must hold 'question_id', 'image' \(str\), 'question' \(str\)"):
        read_vqa(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="expected a Blip2ForConditionalGeneration folder"):
        load_pretrained(tmp_path)
    with pytest.raises(SystemExit):
        main(["--model", str(folder), "--task", "retrieval", "--annotations", "x", "--images", "y"])


@pytest.mark.slow
def test_two_ranks_share_the_work_and_agree_with_one(folder, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from blip2_fast.train import _free_port

    entries = [{"image": f"img{n}.png", "caption": [f"caption {n}", "a picture"]} for n in range(3)]
    (tmp_path / "captions.json").write_text(json.dumps(entries))
    args = ["--model", str(folder), "--task", "caption", "--annotations", str(tmp_path / "captions.json")]
    args += ["--images", str(folder), "--num-beams", "2", "--max-new-tokens", "5", "--min-new-tokens", "1"]
    one = main(args)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}"]
    out = tmp_path / "two.json"
    proc = subprocess.run(
        [*torchrun, "-m", "blip2_fast.evaluate_stage2", *args, "--batch-size", "1", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["predictions"] == one["predictions"] and two["scores"] == one["scores"]
    assert proc.stdout.count("caption on 3 images") == 1  # rank 0 alone reports


def test_a_run_is_captioned_with_the_prompt_it_trained_with(tmp_path):
    run = tmp_path / "run"
    (run / "transformers").mkdir(parents=True)
    assert run_prompt(run) is None  # no config.yaml: not a run of ours, no prompt
    (run / "config.yaml").write_text('model:\n  prompt: "a photo of"\n')
    assert run_prompt(run) == run_prompt(run / "transformers") == "a photo of"


def test_an_unreadable_image_is_skipped_counted_and_named(folder, tmp_path, capsys):
    """A JPEG cut short (and a file that is not there) among good images: the others are captioned and scored as
    without them, the skipped ones counted and named; VQA leaves out the questions on them."""
    import io

    buf = io.BytesIO()
    Image.open(folder / "img1.png").save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for n in (0, 2):
        (tmp_path / f"img{n}.png").write_bytes((folder / f"img{n}.png").read_bytes())
    references = {"img0.png": ["a red circle"], "cut.jpg": ["a cut file"], "img2.png": ["a green cross"]}
    (tmp_path / "captions.json").write_text(json.dumps([{"image": i, "caption": c} for i, c in references.items()]))
    args = ["--model", str(folder), "--images", str(tmp_path), "--num-beams", "2", "--max-new-tokens", "5"]
    args += ["--min-new-tokens", "1"]
    result = main([*args, "--task", "caption", "--annotations", str(tmp_path / "captions.json")])
    model, tokenizer = load_pretrained(folder)
    want = caption(model, tokenizer, images=[folder / "img0.png", folder / "img2.png"], **OPTIONS)
    got = {p["image"]: p["caption"] for p in result["predictions"]}
    assert got == {"img0.png": want[0], "img2.png": want[1]} and result["skipped"] == ["cut.jpg"]
    assert result["scores"] == caption_scores(got, {i: references[i] for i in got})
    out = capsys.readouterr().out
    assert "caption on 2 images: " in out
    assert "skipped 1 images (a missing or unreadable image): cut.jpg; the scores leave them out" in out

    questions = [{"question_id": n, "image": image, "question": "what is it?", "answer": ["a cross"]}
                 for n, image in enumerate(["img0.png", "cut.jpg", "missing.png", "img2.png"])]  # fmt: skip
    (tmp_path / "vqa.json").write_text(json.dumps(questions))
    result = main([*args, "--task", "vqa", "--annotations", str(tmp_path / "vqa.json"), "--length-penalty", "1"])
    assert [p["question_id"] for p in result["predictions"]] == [0, 3]
    assert result["skipped"] == ["cut.jpg", "missing.png"]
    assert "skipped 2 questions (a missing or unreadable image): cut.jpg, missing.png" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"none of the 4 images could be read .* is it the folder"):
        main([*args, "--task", "vqa", "--annotations", str(tmp_path / "vqa.json"), "--images", str(tmp_path / "x")])


def test_options_that_would_be_ignored_are_refused(folder, tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("model:\n  prompt: ''\n")  # a run folder, scored on its own split
    for extra, said in (
        (["--num-beams", "3", "--limit", "2"], "--num-beams, --limit: without --annotations a run's held-out split"),
        (["--prompt", "a photo of"], "--prompt: without --annotations"),
    ):
        with pytest.raises(SystemExit):
            main(["--model", str(tmp_path), "--task", "caption", *extra])
        assert said in capsys.readouterr().err
    (tmp_path / "vqa.json").write_text(json.dumps([{"question_id": 1, "image": "img0.png", "question": "what?"}]))
    vqa = ["--model", str(folder), "--task", "vqa", "--annotations", str(tmp_path / "vqa.json")]
    vqa += ["--images", str(folder)]
    for extra, said in (
        (["--prompt", "Answer briefly:"], "a VQA template needs {} where the question goes"),
        (["--max-new-tokens", "3", "--min-new-tokens", "4"], "--min-new-tokens 4 exceeds --max-new-tokens 3"),
    ):
        with pytest.raises(SystemExit):
            main([*vqa, *extra])
        assert said in capsys.readouterr().err
