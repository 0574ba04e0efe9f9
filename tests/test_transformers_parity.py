"""Same random weights in, same numbers out: our Q-Former against transformers' BLIP-2 models.

Tiny random configs are built and saved locally (nothing is downloaded), loaded
into our model through blip2_fast.checkpoint, and compared in eval mode, fp32.
Odd sizes on purpose: 5 queries, text length 35 with padded rows, 257 image
tokens (224 px images in 14 px patches).
"""

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Blip2Config,
    Blip2ForImageTextRetrieval,
    Blip2Model,
    Blip2QFormerConfig,
    Blip2QFormerModel,
    Blip2TextModelWithProjection,
    Blip2VisionConfig,
    Blip2VisionModelWithProjection,
    OPTConfig,
)

from blip2_fast.checkpoint import load_transformers, save_transformers

from random_weights import randomize

TOL = 1e-5
VISION = dict(
    hidden_size=40, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=224, patch_size=14
)
QFORMER = dict(
    hidden_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=96,
    vocab_size=99,
    max_position_embeddings=40,
    cross_attention_frequency=2,
)


def retrieval_config(**vision) -> Blip2Config:
    return Blip2Config(
        vision_config=Blip2VisionConfig(**{**VISION, **vision}).to_dict(),
        qformer_config=Blip2QFormerConfig(**QFORMER, use_qformer_text_input=True).to_dict(),
        num_query_tokens=5,
        image_text_hidden_size=24,
    )


def text_inputs(batch: int = 3, length: int = 35, vocab: int = 99):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 20:] = 0  # a padded row
    mask[2, 9:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.fixture(scope="module")
def retrieval_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf_retrieval")
    randomize(Blip2ForImageTextRetrieval(retrieval_config())).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ours(retrieval_folder):
    loaded = load_transformers(retrieval_folder)
    loaded.qformer.eval()
    return loaded


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))


def hf_retrieval(folder, attn):
    model = Blip2ForImageTextRetrieval.from_pretrained(folder, attn_implementation=attn).eval()
    assert model.qformer.config._attn_implementation == attn
    return model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_itm_logits_match_blip2_for_image_text_retrieval(retrieval_folder, ours, pixels, attn):
    hf = hf_retrieval(retrieval_folder, attn)
    ids, mask = text_inputs()
    with torch.no_grad():
        expected = hf(pixels, ids, mask, use_image_text_matching_head=True).logits_per_image  # (B, 2)
        feats = ours.vision(pixels)
        assert feats.shape == (3, 257, 40)
        got = ours.qformer.itm_logits(ours.qformer.match(feats, ids, mask.bool()))
    assert max_diff(got, expected) <= TOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_itc_similarities_match_blip2_for_image_text_retrieval(retrieval_folder, ours, pixels, attn):
    hf = hf_retrieval(retrieval_folder, attn)
    ids, mask = text_inputs()
    with torch.no_grad():
        expected = hf(pixels, ids, mask, use_image_text_matching_head=False).logits_per_image  # (B_img, B_txt)
        q = ours.qformer
        image = q.image_features(q.encode_image(ours.vision(pixels)).hidden)  # (B, Q, D)
        text = q.text_features(q.encode_text(ids, mask.bool()))  # (B, D)
        got = torch.einsum("iqd,td->iqt", image, text).amax(dim=1)
    assert max_diff(got, expected) <= TOL


def test_retrieval_layout_reports_what_it_lacks(ours):
    assert ours.report.layout == "Blip2ForImageTextRetrieval"
    fresh = set(ours.report.fresh)
    assert fresh == {"temp", *(n for n, _ in ours.qformer.named_parameters() if n.startswith("lm_head."))}
    assert ours.report.ignored == []
    assert ours.qformer.ln_vision.eps == 1e-6  # the vision config's eps, as transformers' post_layernorm


@pytest.mark.parametrize("text_input", [True, False])
def test_query_outputs_match_blip2_qformer_model(tmp_path, text_input):
    config = Blip2QFormerConfig(**QFORMER, encoder_hidden_size=40, use_qformer_text_input=text_input)
    hf = randomize(Blip2QFormerModel(config)).eval()
    hf.save_pretrained(tmp_path)
    loaded = load_transformers(tmp_path, num_query_tokens=7)
    q = loaded.qformer.eval()
    assert loaded.report.layout == "Blip2QFormerModel" and loaded.vision is None
    fresh = set(loaded.report.fresh)
    assert {"query_tokens", "ln_vision.weight", "embeddings.word.weight"} <= fresh
    assert ("layers.0.ffn_text.up.weight" in fresh) == (not text_input)
    feats = torch.randn(2, 257, 40)
    with torch.no_grad():
        queries = q.query_tokens.expand(2, -1, -1)
        expected = hf(query_embeds=queries, encoder_hidden_states=q.ln_vision(feats)).last_hidden_state
        got = q.encode_image(feats).hidden
    assert max_diff(got, expected) <= TOL


def test_sharded_blip2_model_query_features(tmp_path, pixels):
    text = OPTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        vocab_size=50,
        word_embed_proj_dim=16,
        max_position_embeddings=64,
    )
    config = Blip2Config(
        vision_config=Blip2VisionConfig(**VISION).to_dict(),
        qformer_config=Blip2QFormerConfig(**QFORMER).to_dict(),  # use_qformer_text_input=False: no text FFN
        text_config=text.to_dict(),
        num_query_tokens=5,
    )
    hf = randomize(Blip2Model(config)).eval()
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_transformers(tmp_path)
    report = loaded.report
    assert any(k.startswith("language_model.") for k in report.ignored)
    assert any(k.startswith("language_projection.") for k in report.ignored)
    assert {"layers.*.ffn_text.up", "embeddings.word", "itm_head", "vision_proj", "temp"} <= set(
        report.summary().split("fresh init (not in the checkpoint): ")[1].split("\n")[0].split(", ")
    )
    with torch.no_grad():
        expected = hf.get_qformer_features(pixels)
        feats = loaded.vision(pixels)
        got = loaded.qformer.eval().encode_image(feats).hidden
    assert max_diff(got, expected) <= TOL

    stage2 = load_transformers(tmp_path, text_input=False, vision=False)
    assert stage2.vision is None and not stage2.qformer.config.text_input
    assert any(k.startswith("vision_model.encoder.") for k in stage2.report.ignored)
    with torch.no_grad():
        got = stage2.qformer.eval().encode_image(feats).hidden
    assert max_diff(got, expected) <= TOL


def test_text_features_match_blip2_text_model_with_projection(tmp_path):
    hf = randomize(Blip2TextModelWithProjection(retrieval_config())).eval()
    hf.save_pretrained(tmp_path)
    loaded = load_transformers(tmp_path)
    assert loaded.vision is None and "ln_vision.weight" in loaded.report.fresh
    ids, mask = text_inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).text_embeds  # (B, T, D), every token projected
        q = loaded.qformer.eval()
        got = F.normalize(q.text_proj(q.encode_text(ids, mask.bool())), dim=-1)
    real = mask.bool()
    assert max_diff(got[real], expected[real]) <= TOL


def test_image_features_match_blip2_vision_model_with_projection(tmp_path, pixels):
    hf = randomize(Blip2VisionModelWithProjection(retrieval_config())).eval()
    hf.save_pretrained(tmp_path)
    loaded = load_transformers(tmp_path)
    assert "text_proj.weight" in loaded.report.fresh and "vision_proj.weight" not in loaded.report.fresh
    with torch.no_grad():
        expected = hf(pixel_values=pixels).image_embeds  # (B, Q, D), normalised
        q = loaded.qformer.eval()
        got = q.image_features(q.encode_image(loaded.vision(pixels)).hidden)
    assert max_diff(got, expected) <= TOL


def test_export_to_transformers_round_trips_bitwise(retrieval_folder, ours, tmp_path):
    left_out = save_transformers(ours.qformer, ours.vision, tmp_path)
    assert set(left_out) == set(ours.report.fresh)  # what the layout lacks going in, it lacks going out
    back, info = Blip2ForImageTextRetrieval.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = Blip2ForImageTextRetrieval.from_pretrained(retrieval_folder).state_dict()
    exported = back.state_dict()
    assert original.keys() == exported.keys()
    for key in original:
        assert torch.equal(original[key], exported[key]), key
