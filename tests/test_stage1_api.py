"""Blip2Stage1: images and strings in, transformers' numbers out; run folders, image files, clear errors."""

import pytest
import torch
from PIL import Image
from transformers import Blip2ForImageTextRetrieval

from blip2_fast.data import SyntheticShapes, build_transform, clean_caption
from blip2_fast.stage1 import Blip2Stage1

TOL = 1e-5
TEXTS = ["A red circle, above a blue square.", "two green crosses", "a yellow triangle left of a purple circle"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three real PNG files drawn by the synthetic dataset."""
    folder = tmp_path_factory.mktemp("images")
    shapes = SyntheticShapes(3, image_size=80, seed=3)
    paths = []
    for i in range(3):
        path = folder / f"{i}.png"
        shapes.render(shapes.scene(i)).save(path)
        paths.append(path)
    return paths


def test_scores_from_image_files_match_blip2_for_image_text_retrieval(hf_retrieval_folder, images):
    model = Blip2Stage1.from_pretrained(hf_retrieval_folder)
    hf = Blip2ForImageTextRetrieval.from_pretrained(hf_retrieval_folder).eval()
    # what the user would do by hand: BLIP-2's eval transform, then the cleaned captions tokenized
    transform = build_transform(56, train=False)
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in images])
    batch = model.tokenizer([clean_caption(t) for t in TEXTS], padding="longest", return_tensors="pt")
    with torch.no_grad():
        itm = hf(pixels, batch.input_ids, batch.attention_mask, use_image_text_matching_head=True).logits_per_image
        itc = hf(pixels, batch.input_ids, batch.attention_mask, use_image_text_matching_head=False).logits_per_image
    torch.testing.assert_close(model.pixels(images), pixels, atol=0, rtol=0)
    torch.testing.assert_close(model.itm_scores(images, TEXTS), itm.softmax(-1)[:, 1], atol=TOL, rtol=0)
    torch.testing.assert_close(model.itc_scores(images, TEXTS), itc, atol=TOL, rtol=0)
    # the same scores from pixels, PIL images and encoded bytes
    pil = [Image.open(p) for p in images]
    encoded = [p.read_bytes() for p in images]
    for same in (pixels, pil, encoded):
        torch.testing.assert_close(model.itc_scores(same, TEXTS), itc, atol=TOL, rtol=0)


def test_features_and_captions(hf_retrieval_folder, images):
    model = Blip2Stage1.from_pretrained(hf_retrieval_folder)
    image, text = model.extract_image(images), model.extract_text(TEXTS)
    assert image.embeds.shape == (3, 5, 48) and image.proj.shape == (3, 5, 24)
    assert text.proj.shape == (3, 24) and text.embeds.shape[:2] == text.input_ids.shape
    torch.testing.assert_close(image.proj.norm(dim=-1), torch.ones(3, 5))
    multimodal = model.extract_multimodal(images, TEXTS)
    assert multimodal.shape == (3, 5, 48)
    assert not torch.allclose(multimodal, image.embeds, atol=1e-3)  # the text changes what the queries see
    # Blip2ForImageTextRetrieval has no LM head: captions from its random init would be noise
    assert any(name.startswith("lm_head.") for name in model.untrained)
    with pytest.raises(ValueError, match="captioning needs lm_head, which this model's checkpoint did not hold"):
        model.caption(images)


def test_captions_from_a_run(tmp_path, images, make_run_folder):
    make_run_folder(tmp_path)
    model = Blip2Stage1.from_pretrained(tmp_path)
    assert model.untrained == []
    captions = model.caption(images, max_new_tokens=4)
    assert len(captions) == 3 and all(isinstance(c, str) for c in captions)
    from blip2_fast.stage1 import main

    shell = main(["--model", str(tmp_path), "--images", *map(str, images), "--caption", "--num-beams", "1"])
    assert shell["captions"] == model.caption(images)


def test_run_folder_round_trip(tmp_path, images, make_run_folder):
    """A run folder as training leaves it: model.safetensors, vision.safetensors, config.yaml."""
    qformer, vision = make_run_folder(tmp_path, ("model.max_text_length", "6"))

    for source in (tmp_path, tmp_path / "model.safetensors"):
        model = Blip2Stage1.from_pretrained(source, backend="sdpa")
        assert model.qformer.config.backend == "sdpa" and model.max_text_length == 6
        pixels = model.pixels(images)
        assert pixels.shape == (3, 3, 32, 32)
        ids, mask = model.tokenize(TEXTS)
        with torch.no_grad():
            want = qformer.itm_logits(qformer.match(vision(pixels), ids, mask)).softmax(-1)[:, 1]
        torch.testing.assert_close(model.itm_scores(images, TEXTS), want, atol=TOL, rtol=0)
    assert ids.shape[1] == 6  # truncated to the run's max_text_length

    (tmp_path / "vision.safetensors").unlink()
    with pytest.raises(ValueError, match="a run folder needs vision.safetensors beside model.safetensors"):
        Blip2Stage1.from_pretrained(tmp_path)
    model = Blip2Stage1.from_pretrained(tmp_path, vision=vision)  # or the ViT given by hand
    assert model.vision is vision


def test_bad_input_is_named(hf_retrieval_folder, images):
    model = Blip2Stage1.from_pretrained(hf_retrieval_folder)
    with pytest.raises(ValueError, match=r"pixels must have shape \(B, 3, 56, 56\), got \(2, 3, 32, 32\)"):
        model.itc_scores(torch.zeros(2, 3, 32, 32), TEXTS)
    with pytest.raises(ValueError, match="got 3 images, 2 texts"):
        model.itm_scores(images, TEXTS[:2])
    with pytest.raises(ValueError, match="non-empty list of strings"):
        model.extract_text("a single string")
    with pytest.raises(ValueError, match="PIL images, paths or bytes"):
        model.extract_image(str(images[0]))
    with pytest.raises(FileNotFoundError):
        model.extract_image([images[0].parent / "missing.png"])
    with pytest.raises(FileNotFoundError, match="no stage-1 model at"):
        Blip2Stage1.from_pretrained(images[0].parent / "no-such-run")


def test_command_line_scores_every_pair_and_captions(hf_retrieval_folder, images, capsys):
    from blip2_fast.stage1 import main

    texts = TEXTS[:2]
    result = main(["--model", str(hf_retrieval_folder), "--images", *map(str, images), "--texts", *texts])
    model = Blip2Stage1.from_pretrained(hf_retrieval_folder)
    torch.testing.assert_close(result["itc"], model.itc_scores(images, texts), atol=TOL, rtol=0)
    for t, text in enumerate(texts):  # column t: every image against text t
        torch.testing.assert_close(result["itm"][:, t], model.itm_scores(images, [text] * 3), atol=TOL, rtol=0)
    out = capsys.readouterr().out
    assert str(images[0]) in out and "itm" in out
    # the command's scores come from one ViT pass over the images, and equal the two separate calls
    passes = []
    model.vision.register_forward_hook(lambda module, args, output: passes.append(args[0].shape[0]))
    itc, itm = model.score_matrices(images, texts)
    assert passes == [3]
    assert torch.equal(itc, model.itc_scores(images, texts)) and torch.equal(itm, model.itm_matrix(images, texts))
    model.batch_size = 2  # images, and image-text pairs, in passes of 2: the same numbers
    torch.testing.assert_close(model.itm_matrix(images, texts), itm, atol=TOL, rtol=0)
    with pytest.raises(SystemExit):
        main(["--model", str(hf_retrieval_folder), "--images", str(images[0])])  # neither texts nor captions asked
    with pytest.raises(ValueError, match="captioning needs lm_head"):
        main(["--model", str(hf_retrieval_folder), "--images", str(images[0]), "--caption"])


def test_long_lists_run_batch_by_batch_with_the_same_numbers(tmp_path, images, make_run_folder):
    make_run_folder(tmp_path)
    model = Blip2Stage1.from_pretrained(tmp_path)

    def everything(batch_size):
        model.batch_size = batch_size
        image = model.extract_image(images)
        kv = [t for pair in image.context.kv if pair for t in pair]
        return [
            model.itc_scores(images, TEXTS),
            *model.score_matrices(images, TEXTS),
            model.itm_scores(images, TEXTS),
            model.extract_multimodal(images, TEXTS),
            model.extract_text(TEXTS).proj,
            image.embeds,
            *kv,
        ], model.caption(images, max_new_tokens=4)

    (whole, whole_captions), (batched, batched_captions) = everything(64), everything(2)  # 3 = a full batch + 1
    for a, b in zip(batched, whole, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert batched_captions == whole_captions
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        Blip2Stage1(model.qformer, model.vision, model.tokenizer, batch_size=0)


def lavis_stage1(qformer) -> dict[str, torch.Tensor]:
    """A stage-1 Q-Former of ours under LAVIS' names, as its blip2 checkpoints hold it (no ViT: LAVIS leaves the
    frozen EVA ViT out)."""
    from blip2_fast.checkpoint import bert_encoder_names

    bert, cls = "Qformer.bert.", "Qformer.cls.predictions."
    names = {k: bert + v for k, v in bert_encoder_names(qformer.config, style="lavis", text_ffn=True).items()}
    names.update({"query_tokens": "query_tokens", "temp": "temp", "lm_head.decoder.bias": cls + "decoder.bias"})
    names.update({"embeddings.word.weight": bert + "embeddings.word_embeddings.weight",
                  "embeddings.position.weight": bert + "embeddings.position_embeddings.weight",
                  "lm_head.decoder.weight": cls + "decoder.weight"})  # fmt: skip
    parts = {"ln_vision": "ln_vision", "vision_proj": "vision_proj", "text_proj": "text_proj", "itm_head": "itm_head",
             "lm_head.dense": cls + "transform.dense", "lm_head.norm": cls + "transform.LayerNorm"}  # fmt: skip
    names.update({f"{ours}.{p}": f"{theirs}.{p}" for ours, theirs in parts.items() for p in ("weight", "bias")})
    state = qformer.state_dict()
    return {theirs: state[ours] for ours, theirs in names.items()}


def test_a_lavis_pth_needs_its_head_count_and_a_vit(tmp_path, images, make_run_folder):
    """A LAVIS .pth of a Q-Former that is not BLIP-2's BERT-base: its head count and its ViT come from the caller,
    through from_pretrained and the command line; then its numbers are those of the model it was written from."""
    from blip2_fast.stage1 import main

    qformer, vision = make_run_folder(tmp_path / "run")
    path = tmp_path / "blip2_pretrained.pth"
    torch.save({"model": lavis_stage1(qformer)}, path)
    heads = qformer.config.num_attention_heads
    with pytest.raises(ValueError, match=rf"{path}: a Q-Former of hidden size 64, .* pass num_attention_heads=N"):
        Blip2Stage1.from_pretrained(path, vision=vision)
    with pytest.raises(ValueError, match=rf"{path}: no EVA ViT .* LAVIS leaves the frozen EVA ViT out .* --vision"):
        Blip2Stage1.from_pretrained(path, num_attention_heads=heads)
    model = Blip2Stage1.from_pretrained(path, vision=vision, num_attention_heads=heads)
    assert model.untrained == []
    want = Blip2Stage1.from_pretrained(tmp_path / "run")
    torch.testing.assert_close(model.itm_matrix(images, TEXTS), want.itm_matrix(images, TEXTS), atol=TOL, rtol=0)
    with pytest.raises(ValueError, match=r"model\.safetensors: its Q-Former has 4 attention heads"):
        Blip2Stage1.from_pretrained(tmp_path / "run", num_attention_heads=2 * heads)  # a run records its own

    args = ["--model", str(path), "--images", *map(str, images), "--texts", *TEXTS]
    shell = main([*args, "--num-heads", str(heads), "--vision", str(tmp_path / "run" / "vision.safetensors")])
    torch.testing.assert_close(shell["itm"], want.itm_matrix(images, TEXTS), atol=TOL, rtol=0)
    with pytest.raises(FileNotFoundError, match=r"--vision: .*no-vit\.safetensors does not exist"):
        main([*args, "--num-heads", str(heads), "--vision", str(tmp_path / "no-vit.safetensors")])
