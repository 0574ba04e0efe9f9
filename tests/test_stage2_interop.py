"""Stage 2 against transformers' Blip2ForConditionalGeneration, and checkpoint interop.

Tiny random Blip2 models (OPT and T5 LLMs) are saved with save_pretrained and
loaded into ours; same weights in, same numbers out (fp32).
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    OPTConfig,
    T5Config,
)

from blip2_fast.stage2 import IGNORE_INDEX, _gather_rows, pack_rows
from blip2_fast.stage2_convert import (
    lavis_model,
    load_lavis,
    load_transformers,
    save_transformers,
    transformers_state_dict,
)

V, IMAGE_TOKEN, Q, B = 120, 119, 8, 3
PROMPT_LENGTHS = (5, 2, 4)


def _configs(llm: str) -> Blip2Config:
    vision = Blip2VisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8
    )
    qformer = Blip2QFormerConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        encoder_hidden_size=48,
        vocab_size=101,
        max_position_embeddings=64,
    )
    if llm == "opt":
        text = OPTConfig(
            vocab_size=V,
            hidden_size=32,
            word_embed_proj_dim=32,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=128,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=3,
        )
    else:
        text = T5Config(
            vocab_size=V,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
            feed_forward_proj="gated-gelu",
        )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=Q,
        image_token_index=IMAGE_TOKEN,
    )


def _reference(llm: str, folder) -> Blip2ForConditionalGeneration:
    torch.manual_seed(0)
    model = Blip2ForConditionalGeneration(_configs(llm)).eval()
    with torch.no_grad():
        model.query_tokens.normal_(std=0.02)  # transformers starts them equal, which hides the key/value weights
        for name, p in model.named_parameters():
            if re.search(r"layer_?norm", name, re.IGNORECASE):
                p.add_(0.1 * torch.randn_like(p))  # LayerNorms start at (1, 0): give their mapping something to check
        # Random OPT at init std 0.02 repeats one token forever; sharper logits make greedy decoding informative.
        if llm == "opt":
            for p in model.language_model.parameters():
                if p.dim() == 2:
                    p.mul_(10.0)
    model.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module", params=["opt", "t5"])
def pair(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"blip2_{request.param}")
    theirs = _reference(request.param, folder)
    ours = load_transformers(folder).eval()
    return request.param, theirs, ours, folder


def _prompts(pad: int, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    width = max(PROMPT_LENGTHS)
    ids = torch.full((B, width), pad)
    mask = torch.zeros(B, width, dtype=torch.long)
    for i, n in enumerate(PROMPT_LENGTHS):
        cols = slice(width - n, width) if left else slice(0, n)
        ids[i, cols] = torch.randint(4, 100, (n,))
        mask[i, cols] = 1
    return ids, mask


def _hf_inputs(ids: torch.Tensor, mask: torch.Tensor, *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' layout: Q placeholder tokens before the prompt, the whole row padded on one side."""
    hf_ids = torch.cat([torch.full((B, Q), IMAGE_TOKEN), ids], dim=1)
    hf_mask = torch.cat([torch.ones(B, Q, dtype=torch.long), mask], dim=1)
    order = pack_rows(hf_mask.bool(), left=left)
    return _gather_rows(hf_ids, order), _gather_rows(hf_mask, order)


def _pixels() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(B, 3, 32, 32)


def test_logits_and_loss_match_transformers(pair):
    llm, theirs, ours, _ = pair
    pixels = _pixels()
    pad = theirs.config.text_config.pad_token_id
    ids, mask = _prompts(pad, left=False)
    hf_ids, hf_mask = _hf_inputs(ids, mask, left=False)
    with torch.no_grad():
        if llm == "opt":
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
            ref = theirs(
                pixel_values=pixels,
                input_ids=hf_ids,
                attention_mask=hf_mask,
                labels=torch.cat([torch.full((B, Q), IGNORE_INDEX), labels], dim=1),
            )
            out = ours(pixels=pixels, input_ids=ids, attention_mask=mask, labels=labels)
            real = hf_mask.bool()
            diff = (out.logits - ref.logits)[real].abs().max().item()
        else:
            labels = torch.randint(4, 100, (B, 5))
            labels[1, 3:] = IGNORE_INDEX
            ref = theirs(
                pixel_values=pixels,
                input_ids=hf_ids,
                attention_mask=hf_mask,
                labels=labels,
                decoder_attention_mask=(labels != IGNORE_INDEX).long(),
            )
            out = ours(pixels=pixels, input_ids=ids, attention_mask=mask, labels=labels)
            diff = (out.logits - ref.logits).abs().max().item()
    assert diff <= 1e-5, f"{llm}: LM logits differ by {diff:.3g}"
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)


def test_greedy_generation_matches_transformers(pair):
    llm, theirs, ours, _ = pair
    pixels = _pixels()
    pad = theirs.config.text_config.pad_token_id
    left = llm == "opt"  # transformers' processor pads decoder-only prompts on the left
    ids, mask = _prompts(pad, left=left)
    hf_ids, hf_mask = _hf_inputs(ids, mask, left=left)
    # pad (= T5's decoder start) would win every step of the random T5: keep it out on both sides
    kwargs = dict(max_new_tokens=6, do_sample=False, num_beams=1, suppress_tokens=[pad])
    ref = theirs.generate(pixel_values=pixels, input_ids=hf_ids, attention_mask=hf_mask, **kwargs)
    ref = ref[:, 1:] if llm == "t5" else ref[:, hf_ids.shape[1] :]
    got = ours.generate(pixels, input_ids=ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, ref), f"{llm}:\n{got}\n{ref}"
    assert len({tuple(row.tolist()) for row in got}) > 1, "degenerate generations prove nothing"


def test_round_trip_through_transformers_folder_is_bitwise(pair, tmp_path):
    llm, theirs, ours, _ = pair
    save_transformers(ours, tmp_path / "export")
    reloaded, info = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path / "export"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    mine = transformers_state_dict(ours)
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, mine[key]), key
    back = load_transformers(tmp_path / "export")
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert back.image_token_index == IMAGE_TOKEN
    assert back.qformer.ln_vision.eps == ours.qformer.ln_vision.eps


def test_a_wrong_mapping_breaks_parity(pair):
    """The parity above depends on every mapped tensor: swap two Q-Former tensors and the logits move."""
    llm, theirs, ours, folder = pair
    model = load_transformers(folder).eval()
    with torch.no_grad():
        layer = model.qformer.layers[0]
        layer.self_attn.key.weight.copy_(layer.self_attn.query.weight)
        pixels = _pixels()
        assert not torch.allclose(model.query_embeds(pixels), ours.query_embeds(pixels), atol=1e-4)


def _lavis_state_dict(theirs: Blip2ForConditionalGeneration, proj: str) -> dict[str, torch.Tensor]:
    """LAVIS names, written out from transformers' own conversion rules (the inverse of its renames)."""
    sd = {}
    for key, value in theirs.state_dict().items():
        if key.startswith(("language_model.", "vision_model.")) and "post_layernorm" not in key:
            continue
        name = key.replace("vision_model.post_layernorm.", "ln_vision.")
        name = name.replace("language_projection.", f"{proj}.")
        name = name.replace("qformer.layernorm.", "Qformer.bert.embeddings.LayerNorm.")
        name = name.replace("qformer.encoder.", "Qformer.bert.encoder.")
        name = name.replace("attention.attention.", "attention.self.")
        sd[name] = value.clone()
    return sd


def test_lavis_checkpoint_loads(pair, tmp_path):
    llm, theirs, ours, _ = pair
    sd = _lavis_state_dict(theirs, "opt_proj" if llm == "opt" else "t5_proj")
    # text-only parts a stage-1-initialised LAVIS model may still carry
    sd["Qformer.bert.encoder.layer.0.intermediate.dense.weight"] = torch.zeros(128, 64)
    sd["Qformer.cls.predictions.bias"] = torch.zeros(101)
    torch.save({"model": sd}, tmp_path / "lavis.pth")
    theirs.language_model.save_pretrained(str(tmp_path / "llm"))
    # an OPT folder without tokenizer files cannot tell where LAVIS ends text: said once, as a warning
    said = pytest.warns(UserWarning, match="has no tokenizer files") if llm == "opt" else contextlib.nullcontext()
    with said:
        model, skipped = lavis_model(
            tmp_path / "lavis.pth", tmp_path / "llm", ours.qformer.config, image_encoder=ours.image_encoder
        )
    assert skipped == ["Qformer.bert.encoder.layer.0.intermediate.dense.weight", "Qformer.cls.predictions.bias"]
    model.qformer.ln_vision.eps = ours.qformer.ln_vision.eps  # LAVIS's 1e-5 vs the transformers config's value
    a, b = model.state_dict(), ours.state_dict()
    for key in b:
        assert torch.equal(a[key], b[key]), key

    sd["Qformer.bert.encoder.layer.0.mystery.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="mystery"):
        load_lavis(model, {"model": sd})
    del sd["Qformer.bert.encoder.layer.0.mystery.weight"], sd["query_tokens"]
    with pytest.raises(ValueError, match="query_tokens"):
        load_lavis(model, {"model": sd})


def test_export_needs_an_image_token(pair, tmp_path):
    _, _, ours, folder = pair
    model = load_transformers(folder, with_vision=False)
    with pytest.raises(ValueError, match="vision model"):
        save_transformers(model, tmp_path / "x")
    model = load_transformers(folder)
    model.image_token_index = None
    with pytest.raises(ValueError, match="image_token_index"):
        save_transformers(model, tmp_path / "x")


def test_a_file_without_a_state_dict_is_named(tmp_path):
    from blip2_fast.stage2_convert import read_lavis

    for i, content in enumerate(({"model": [1, 2]}, [1, 2], {"model": torch.zeros(2)})):
        torch.save(content, tmp_path / f"bad{i}.pth")
        with pytest.raises(ValueError, match=rf"bad{i}.pth: expected a LAVIS checkpoint .* holds no state dict"):
            read_lavis(tmp_path / f"bad{i}.pth")
    with pytest.raises(ValueError, match="'model' is not a mapping"):
        read_lavis({"model": [1, 2]})
