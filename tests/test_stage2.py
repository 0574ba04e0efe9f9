"""Stage 2: token layout, loss semantics, frozen parts, generation batching, stage-1 init, the embedded default."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import T5Config, T5ForConditionalGeneration

from blip2_fast.checkpoint import save_qformer
from blip2_fast.config import QFormerConfig, VisionConfig
from blip2_fast.qformer import QFormer
from blip2_fast.stage2 import (
    IGNORE_INDEX,
    VQA_PROMPT,
    Blip2Stage2,
    Stage2Collator,
    answer,
    caption,
    default_stage2_model,
    encode_prompts,
    end_opt_at_newline,
    end_token_id,
    generation_kwargs,
    load_stage1,
    load_trainable,
    save_trainable,
    shapes_caption_scores,
)


@pytest.fixture(scope="module")
def default():
    torch.manual_seed(0)
    model, tokenizer = default_stage2_model()
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def sharp(default):
    """The default model with sharper LLM logits, so that greedy and beam outputs depend on the input."""
    model, tokenizer = default
    torch.manual_seed(0)
    sharp, _ = default_stage2_model()
    sharp.load_state_dict(model.state_dict())
    with torch.no_grad():
        for p in sharp.llm.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    return sharp.eval(), tokenizer


def _pixels(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ token layout


def test_decoder_collator_labels_only_the_text(default):
    _, tok = default
    collate = Stage2Collator(tok, encoder_decoder=False, prompt="a photo of")
    samples = [
        {"pixels": torch.zeros(3, 32, 32), "text": "a red circle"},
        {"pixels": torch.ones(3, 32, 32), "caption": "two", "prompt": VQA_PROMPT.format("how many?")},
        None,
    ]
    batch = collate(samples)
    assert batch["skipped"] == 1 and batch["texts"] == ["a red circle", "two"]
    bos, eos, pad = tok.bos_token_id, tok.sep_token_id, tok.pad_token_id
    rows = [
        ([bos] + _ids(tok, "a photo of"), _ids(tok, "a red circle") + [eos]),
        ([bos] + _ids(tok, VQA_PROMPT.format("how many?")), _ids(tok, "two") + [eos]),
    ]
    width = max(len(p) + len(t) for p, t in rows)
    for i, (prompt, text) in enumerate(rows):
        n = len(prompt) + len(text)
        assert batch["input_ids"][i].tolist() == prompt + text + [pad] * (width - n)
        assert batch["labels"][i].tolist() == [IGNORE_INDEX] * len(prompt) + text + [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][i].tolist() == [1] * n + [0] * (width - n)
    assert batch["pixels"].shape == (2, 3, 32, 32)


def test_encoder_decoder_collator(default):
    _, tok = default
    collate = Stage2Collator(tok, encoder_decoder=True, eos_token_id=tok.sep_token_id)
    batch = collate(
        [
            {"image_embeds": torch.zeros(5, 8), "text": "a blue square", "prompt": "describe"},
            {"image_embeds": torch.zeros(5, 8), "text": "yes", "prompt": "is it red or blue"},
        ]
    )
    # the prompt closes with the tokenizer's EOS, as T5's tokenizer (and LAVIS with it) closes every input
    prompt = _ids(tok, "describe") + [tok.eos_token_id]
    assert tok.eos_token_id is not None and batch["input_ids"][0].tolist()[: len(prompt)] == prompt
    assert batch["attention_mask"].sum(1).tolist() == [len(prompt), len(_ids(tok, "is it red or blue")) + 1]
    text = _ids(tok, "yes") + [tok.sep_token_id]
    assert batch["labels"][1].tolist() == text + [IGNORE_INDEX] * (batch["labels"].shape[1] - len(text))
    assert batch["decoder_attention_mask"].sum(1).tolist() == [len(_ids(tok, "a blue square")) + 1, len(text)]


def test_prompts_are_left_padded_with_bos(default):
    _, tok = default
    ids, mask = encode_prompts(tok, ["a b c", "a"], bos_token_id=tok.bos_token_id)
    assert mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert ids[1].tolist() == [tok.pad_token_id] * 2 + [tok.bos_token_id] + _ids(tok, "a")


# ------------------------------------------------------------------ loss


def test_decoder_loss_is_next_token_cross_entropy_over_text_only(default):
    model, tok = default
    texts = ["a red circle left of a cross", "a square"]
    batch = Stage2Collator(tok, encoder_decoder=False, prompt="a photo of")(
        [{"pixels": p, "text": t} for p, t in zip(_pixels(2), texts, strict=True)]
    )
    loss = model.loss(batch)
    # the same number, spelled out token by token
    with torch.no_grad():
        queries = model.query_embeds(batch["pixels"])
        Q = queries.shape[1]
        total, count = 0.0, 0
        for i in range(2):
            n = int(batch["attention_mask"][i].sum())
            ids = batch["input_ids"][i, :n]
            embeds = torch.cat([queries[i], model.llm.get_input_embeddings()(ids)])[None]
            logits = model.llm(inputs_embeds=embeds).logits[0]
            n_prompt = 1 + len(_ids(tok, "a photo of"))
            for t in range(n_prompt, n):  # text token t is predicted at sequence position Q + t - 1
                total += F.cross_entropy(logits[Q + t - 1], ids[t]).item()
                count += 1
    assert count == int((batch["labels"] != IGNORE_INDEX).sum())
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_encoder_decoder_loss_and_generation():
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(
        T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0)
    )
    vision = VisionConfig.preset("tiny")
    model = Blip2Stage2(QFormerConfig.preset("tiny", text_input=False, encoder_width=48), t5, vision).eval()
    pixels = _pixels(2)
    prompt = torch.tensor([[5, 6, 7], [8, 9, 0]])
    prompt_mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    labels = torch.tensor([[3, 4, 1], [5, 1, IGNORE_INDEX]])
    out = model(pixels=pixels, input_ids=prompt, attention_mask=prompt_mask, labels=labels)
    # the encoder sees [queries ; prompt] and the decoder the shifted labels, as T5 does on its own
    with torch.no_grad():
        embeds = torch.cat([model.query_embeds(pixels), t5.get_input_embeddings()(prompt)], dim=1)
        mask = torch.cat([torch.ones(2, 8, dtype=torch.long), prompt_mask], dim=1)
        ref = t5(inputs_embeds=embeds, attention_mask=mask, labels=labels, decoder_attention_mask=labels != -100)
    torch.testing.assert_close(out.logits, ref.logits)
    torch.testing.assert_close(out.loss, ref.loss)
    generated = model.generate(pixels, input_ids=prompt, attention_mask=prompt_mask, max_new_tokens=4)
    assert generated.shape[0] == 2 and generated.shape[1] <= 4


def test_only_qformer_and_projection_learn(default):
    model, tok = default
    model.train()
    assert not model.llm.training and not model.image_encoder.training and model.qformer.training
    batch = Stage2Collator(tok, encoder_decoder=False)([{"pixels": p, "text": "a cross"} for p in _pixels(2)])
    model.zero_grad()
    model.loss(batch).backward()
    for name, p in model.named_parameters():
        if name.startswith(("llm.", "image_encoder.")):
            assert not p.requires_grad and p.grad is None, name
        elif name.startswith("qformer.layers.0.") or name.startswith(("llm_proj.", "qformer.query_tokens")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert set(model.trainable_state_dict()) == {n for n, p in model.named_parameters() if p.requires_grad}
    model.eval()


def test_padding_does_not_change_the_per_token_loss(default):
    model, tok = default
    collate = Stage2Collator(tok, encoder_decoder=False)
    pixels = _pixels(2, seed=3)
    texts = ["a green triangle above a yellow circle", "a cross"]
    both = collate([{"pixels": p, "text": t} for p, t in zip(pixels, texts, strict=True)])
    with torch.no_grad():
        total = model.loss(both) * (both["labels"] != IGNORE_INDEX).sum()
        alone = 0.0
        for p, t in zip(pixels, texts, strict=True):
            one = collate([{"pixels": p, "text": t}])
            alone += model.loss(one) * (one["labels"] != IGNORE_INDEX).sum()
    assert total.item() == pytest.approx(float(alone), rel=1e-5)


# ------------------------------------------------------------------ generation


@pytest.mark.parametrize("method", ["greedy", "beam"])
def test_batched_prompts_generate_as_one_at_a_time(sharp, method):
    model, tok = sharp
    pixels = _pixels(3, seed=5)
    prompts = ["", "a photo of", VQA_PROMPT.format("what colour is the circle?")]
    options = dict(method=method, max_new_tokens=5, num_beams=3)
    batched = caption(model, tok, pixels, prompt=prompts, **options)
    single = [caption(model, tok, pixels[i : i + 1], prompt=prompts[i], **options)[0] for i in range(3)]
    assert batched == single
    assert len(set(batched)) > 1, "the outputs do not depend on the input: the check proves nothing"


def test_several_captions_per_image(sharp):
    model, tok = sharp
    pixels = _pixels(2, seed=6)
    torch.manual_seed(0)
    first = caption(model, tok, pixels, method="nucleus", num_captions=3, max_new_tokens=4)
    torch.manual_seed(0)
    again = caption(model, tok, pixels, method="nucleus", num_captions=3, max_new_tokens=4)
    assert len(first) == 6 and first == again
    beams = caption(model, tok, pixels, method="beam", num_beams=3, num_captions=3, max_new_tokens=4)
    assert len(beams) == 6
    answers = answer(model, tok, ["what is it?", "where?"], pixels, method="greedy", max_new_tokens=3)
    assert answers == caption(
        model,
        tok,
        pixels,
        prompt=[VQA_PROMPT.format(q) for q in ["what is it?", "where?"]],
        method="greedy",
        max_new_tokens=3,
    )


def test_image_files_caption_like_their_pixels(sharp, tmp_path):
    """Captions and answers from PNG files (and their bytes) equal those from the eval transform's pixels."""
    from PIL import Image

    from blip2_fast.data import SyntheticShapes, build_transform

    model, tok = sharp
    shapes = SyntheticShapes(2, image_size=48, seed=9)  # another size than the ViT's: the transform resizes
    files = []
    for i in range(2):
        shapes[i]["image"].save(tmp_path / f"{i}.png")
        files.append(tmp_path / f"{i}.png")
    transform = build_transform(model.image_encoder.config.image_size, train=False)
    pixels = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
    options = dict(method="greedy", max_new_tokens=4)
    want = caption(model, tok, pixels, **options)
    assert caption(model, tok, images=files, **options) == want
    assert caption(model, tok, images=[f.read_bytes() for f in files], **options) == want
    questions = ["what is it?", "what colour?"]
    assert answer(model, tok, questions, images=files, **options) == answer(model, tok, questions, pixels, **options)
    with pytest.raises(ValueError, match="replace pixels"):
        caption(model, tok, pixels, images=files)


def test_generation_options_are_checked():
    with pytest.raises(ValueError, match="greedy, beam or nucleus"):
        generation_kwargs("topk")
    with pytest.raises(ValueError, match="num_beams"):
        generation_kwargs("beam", num_beams=2, num_captions=3)
    with pytest.raises(ValueError, match="one caption"):
        generation_kwargs("greedy", num_captions=2)
    assert generation_kwargs("nucleus", top_p=0.8)["do_sample"] is True


# ------------------------------------------------------------------ stage-1 init


def test_stage1_checkpoint_initialises_the_query_path(tmp_path):
    torch.manual_seed(0)
    vision = VisionConfig.preset("tiny")
    config = QFormerConfig.preset("tiny", encoder_width=vision.hidden_size)
    if "ln_vision_eps" in {f.name for f in dataclasses.fields(config)}:
        config = dataclasses.replace(config, ln_vision_eps=1e-6)
    stage1 = QFormer(config).eval()
    with torch.no_grad():
        stage1.ln_vision.weight.add_(0.3)
    stage1.ln_vision.eps = 1e-6
    path = save_qformer(stage1, tmp_path / "model.safetensors")
    model, _ = default_stage2_model(path, vision_config=vision)
    model.eval()
    assert model.qformer.ln_vision.eps == 1e-6
    features = torch.randn(2, vision.num_tokens, vision.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(
            model.qformer.encode_image(features).hidden, stage1.encode_image(features).hidden, rtol=0, atol=0
        )

    sd = {f"module.{k}": v for k, v in stage1.state_dict().items()}
    ignored = load_stage1(model, sd)
    text_only = {k for k in stage1.state_dict() if k not in model.qformer.state_dict()}
    assert set(ignored) == {f"module.{k}".removeprefix("module.") for k in text_only}
    assert any(".ffn_text." in k for k in ignored) and "temp" in ignored and "lm_head.dense.weight" in ignored

    with pytest.raises(ValueError, match="does not know"):
        load_stage1(model, {**stage1.state_dict(), "mystery.weight": torch.zeros(1)})
    partial = stage1.state_dict()
    del partial["layers.1.ffn_query.up.weight"]
    with pytest.raises(ValueError, match="lacks"):
        load_stage1(model, partial)


def test_trainable_checkpoint_round_trip_is_bitwise(default, tmp_path):
    model, _ = default
    path = save_trainable(model, tmp_path / "stage2.safetensors")
    torch.manual_seed(123)
    other, _ = default_stage2_model()
    assert not torch.equal(other.llm_proj.weight, model.llm_proj.weight)
    load_trainable(other, path)
    mine, theirs = model.trainable_state_dict(), other.trainable_state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    smaller, _ = default_stage2_model(
        qformer_config=QFormerConfig.preset("tiny", num_hidden_layers=1, encoder_width=48)
    )
    with pytest.raises(ValueError, match="missing|unexpected"):
        load_trainable(smaller, path)


# ------------------------------------------------------------------ the embedded default


def test_default_model_sees_the_image(default):
    model, _ = default
    with torch.no_grad():
        queries = model.query_embeds(_pixels(4, seed=12))  # (4, Q, D)
    spread = (queries.std(dim=0).mean() / queries.std()).item()  # across images, relative to all values
    assert spread > 1e-4, f"the soft prompt barely depends on the image ({spread:.2g})"


def test_default_model_learns_a_fixed_batch(default):
    _, tok = default
    torch.manual_seed(0)
    model, _ = default_stage2_model()
    collate = Stage2Collator(tok, encoder_decoder=False)
    texts = ["a red circle", "a blue square", "a green cross", "a red square"]
    batch = collate([{"pixels": p, "text": t} for p, t in zip(_pixels(4, seed=9), texts, strict=True)])
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    first = model.loss(batch).item()
    for _ in range(6):
        opt.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        opt.step()
    assert loss.item() < 0.6 * first, (first, loss.item())


# ------------------------------------------------------------------ bad input


def test_bad_input_is_named(default):
    model, tok = default
    with pytest.raises(ValueError, match="text_input=False"):
        Blip2Stage2(QFormer(QFormerConfig.preset("tiny")), model.llm)
    with pytest.raises(ValueError, match="encoder_width"):
        Blip2Stage2(QFormerConfig.preset("tiny", text_input=False), model.llm, VisionConfig.preset("small"))
    with pytest.raises(ValueError, match="exactly one of pixels"):
        model.query_embeds()
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model.query_embeds(torch.zeros(1, 3, 16, 16))
    pixels = _pixels(2)
    with pytest.raises(ValueError, match="vocabulary"):
        model(pixels=pixels, input_ids=torch.full((2, 3), 10**6))
    with pytest.raises(ValueError, match="batch size"):
        model(pixels=pixels, input_ids=torch.ones(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="shape of input_ids"):
        model(pixels=pixels, input_ids=torch.ones(2, 3, dtype=torch.long), labels=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown stage-2 batch key"):
        model.loss({"pixels": pixels, "labels": torch.ones(2, 2, dtype=torch.long), "captions": []})
    with pytest.raises(ValueError, match="attention_mask must be a bool"):
        model(pixels=pixels, input_ids=torch.ones(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 3))
    stage2_cfg = dataclasses.replace(model.qformer.config)
    assert not stage2_cfg.text_input


# ------------------------------------------------------------------ fused kernels


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors: the kernels run through Triton's interpreter"
)
def test_triton_backend_matches_reference_on_loss_and_qformer_grads(default):
    """Stage 2 through the fused attention and FFN kernels (Triton interpreter on CPU) against the reference."""
    pytest.importorskip("triton")
    model, tok = default
    batch = Stage2Collator(tok, encoder_decoder=False, prompt="a photo of")(
        [{"pixels": p, "text": t} for p, t in zip(_pixels(2, seed=11), ["a red cross", "a blue circle"], strict=True)]
    )
    results = {}
    for backend in ("reference", "triton"):
        model.set_backend(backend)
        model.zero_grad()
        loss = model.loss(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[backend] = (loss.detach(), grads)
    model.set_backend("reference")
    model.zero_grad()
    (ref_loss, ref_grads), (got_loss, got_grads) = results["reference"], results["triton"]
    torch.testing.assert_close(got_loss, ref_loss, rtol=1e-5, atol=0)
    assert ref_grads.keys() == got_grads.keys()
    largest = max(g.abs().max() for g in ref_grads.values())
    for name, want in ref_grads.items():
        diff = (got_grads[name] - want).abs().max()
        if name.endswith("key.bias"):
            # exactly zero in exact arithmetic (softmax ignores a per-row constant): fp32 noise, judged globally
            assert diff <= 1e-5 * largest, f"{name}: {diff:.3g}"
        else:
            # measured ~4e-6 relative; a 1e-4 relative change of one attention output breaks it
            assert diff <= 3e-5 * want.abs().max(), f"{name}: relative grad error {diff / want.abs().max():.3g}"


def test_shapes_caption_scores():
    from blip2_fast.data import COLOURS, SyntheticShapes

    data = SyntheticShapes(3, image_size=32, seed=0)
    scenes = [data.scene(i) for i in range(3)]
    truth = [s.caption for s in scenes]
    assert shapes_caption_scores(truth, scenes) == {"colour": 1.0, "shape": 1.0, "pair": 1.0, "parsed": 1.0}
    first = scenes[0].first
    wrong_colour = next(c for c in COLOURS if c not in (first.colour, scenes[0].second.colour))
    got = shapes_caption_scores([f"a {wrong_colour} {first.shape}", "nothing here", truth[2]], scenes)
    assert got == {"colour": 1 / 3, "shape": 2 / 3, "pair": 1 / 3, "parsed": 2 / 3}
    with pytest.raises(ValueError, match="one scene per caption"):
        shapes_caption_scores(truth, scenes[:2])


def test_generation_stops_at_the_models_own_end_of_text(default, monkeypatch):
    """caption() stops where the LLM's text ends (its generation config), not at the tokenizer's EOS:
    transformers' BLIP-2 OPT checkpoints end at "\\n", and LAVIS with them."""
    model, tok = default
    assert end_token_id(model, tok) == tok.eos_token_id  # the default model ends at its tokenizer's EOS
    seen = {}
    monkeypatch.setattr(model, "generate", lambda **kw: seen.update(kw) or torch.ones(1, 1, dtype=torch.long))
    monkeypatch.setattr(model.llm.generation_config, "eos_token_id", 7)
    caption(model, tok, image_embeds=torch.zeros(1, 5, model.image_encoder.config.hidden_size), method="greedy")
    assert seen["eos_token_id"] == 7 == end_token_id(model, tok)
    caption(model, tok, image_embeds=torch.zeros(1, 5, model.image_encoder.config.hidden_size), eos_token_id=9)
    assert seen["eos_token_id"] == 9  # an explicit one wins
    # several end tokens: generation stops at any; targets end with the tokenizer's if it is one of them
    monkeypatch.setattr(model.llm.generation_config, "eos_token_id", [5, tok.eos_token_id])
    caption(model, tok, image_embeds=torch.zeros(1, 5, model.image_encoder.config.hidden_size), method="greedy")
    assert seen["eos_token_id"] == [5, tok.eos_token_id] and end_token_id(model, tok) == tok.eos_token_id
    monkeypatch.setattr(model.llm.generation_config, "eos_token_id", [5, 6])
    assert end_token_id(model, tok) == 5


def test_an_opt_from_its_own_folder_ends_at_newline():
    from transformers import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

    def tokenizer(newline):
        return lambda text, add_special_tokens: {"input_ids": newline if text == "\n" else [1, 2]}

    opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, word_embed_proj_dim=16, eos_token_id=2))  # fmt: skip
    end_opt_at_newline(opt, tokenizer([50]))
    assert opt.config.eos_token_id == opt.generation_config.eos_token_id == 50
    end_opt_at_newline(opt, tokenizer([3, 4]))  # no one-token newline: left as it was
    assert opt.config.eos_token_id == 50
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2))
    end_opt_at_newline(t5, tokenizer([50]))
    assert t5.config.eos_token_id == 1  # other LLMs keep theirs


def test_an_encoder_decoder_prompt_closes_with_eos(default):
    _, tok = default
    ids, mask = encode_prompts(tok, ["a b c", "a"], eos_token_id=tok.eos_token_id)
    assert ids[1].tolist()[-2:] == _ids(tok, "a") + [tok.eos_token_id] and mask.sum(1).tolist() == [4, 2]
