"""Checkpoint interop: LAVIS .pth files, our safetensors round trip, mapping errors that name keys.

The LAVIS checkpoint is written here from a random transformers model whose
weights are renamed into LAVIS names (the correspondence transformers' BLIP-2
conversion script applies, run backwards); loading it must give the
transformers model's numbers.
"""

import logging
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Blip2Config, Blip2ForImageTextRetrieval, Blip2QFormerConfig, Blip2VisionConfig

from blip2_fast.checkpoint import (
    FORMAT,
    lavis_config,
    load_checkpoint,
    load_lavis,
    load_qformer,
    load_transformers,
    save_qformer,
)
from blip2_fast.config import QFormerConfig
from blip2_fast.qformer import QFormer

import random_weights

TOL = 1e-5
HEADS = 4


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    random_weights.randomize(model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("self_attn.qkv.bias"):
                p[p.shape[0] // 3 : 2 * p.shape[0] // 3] = 0  # EVA has no key bias
    return model


@pytest.fixture(scope="module")
def hf_model():
    config = Blip2Config(
        vision_config=Blip2VisionConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=HEADS, image_size=56,
            patch_size=14,
        ).to_dict(),
        qformer_config=Blip2QFormerConfig(
            hidden_size=48, num_hidden_layers=3, num_attention_heads=HEADS, intermediate_size=80, vocab_size=57,
            max_position_embeddings=24, cross_attention_frequency=2, use_qformer_text_input=True,
        ).to_dict(),
        num_query_tokens=6,
        image_text_hidden_size=20,
    )  # fmt: skip
    model = randomize(Blip2ForImageTextRetrieval(config)).eval()
    # LAVIS' ln_vision is a LayerNorm with the default eps, the EVA blocks use 1e-6
    model.vision_model.post_layernorm.eps = 1e-5
    return model


def to_lavis(hf: Blip2ForImageTextRetrieval, lm_head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers retrieval weights -> LAVIS blip2 (stage 1) state dict."""
    out = {}
    for key, value in hf.state_dict().items():
        if key.startswith("vision_model.post_layernorm."):
            out[key.replace("vision_model.post_layernorm", "ln_vision")] = value
        elif key.startswith("vision_model."):
            name = key.removeprefix("vision_model.")
            name = {
                "embeddings.class_embedding": "cls_token",
                "embeddings.position_embedding": "pos_embed",
                "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
                "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
            }.get(name, name)
            name = (
                name.replace("encoder.layers.", "blocks.")
                .replace("layer_norm1", "norm1")
                .replace("layer_norm2", "norm2")
            )
            name = name.replace("self_attn.projection", "attn.proj").replace("self_attn.qkv", "attn.qkv")
            if name.endswith("attn.qkv.bias"):
                q, _, v = value.chunk(3)
                out["visual_encoder." + name.replace("qkv.bias", "q_bias")] = q
                out["visual_encoder." + name.replace("qkv.bias", "v_bias")] = v
            else:
                out["visual_encoder." + name] = value
        elif key == "qformer.layernorm.weight" or key == "qformer.layernorm.bias":
            out[key.replace("qformer.layernorm", "Qformer.bert.embeddings.LayerNorm")] = value
        elif key.startswith("qformer."):
            name = key.replace("qformer.", "Qformer.bert.", 1)
            out[name.replace("attention.attention.", "attention.self.")] = value
        elif key.startswith("embeddings."):
            out["Qformer.bert." + key] = value
        else:
            out[key.replace("vision_projection", "vision_proj").replace("text_projection", "text_proj")] = value
    out["Qformer.bert.embeddings.position_ids"] = torch.arange(24)[None]
    word = out["Qformer.bert.embeddings.word_embeddings.weight"]
    cls = "Qformer.cls.predictions."
    out[cls + "transform.dense.weight"] = lm_head["dense.weight"]
    out[cls + "transform.dense.bias"] = lm_head["dense.bias"]
    out[cls + "transform.LayerNorm.weight"] = lm_head["norm.weight"]
    out[cls + "transform.LayerNorm.bias"] = lm_head["norm.bias"]
    out[cls + "decoder.weight"] = word  # tied, as in BERT
    out[cls + "decoder.bias"] = out[cls + "bias"] = lm_head["bias"]
    out["temp"] = torch.tensor(0.05)
    return out


@pytest.fixture(scope="module")
def lm_head():
    g = torch.Generator().manual_seed(3)
    return {
        "dense.weight": torch.randn(48, 48, generator=g),
        "dense.bias": torch.randn(48, generator=g),
        "norm.weight": torch.randn(48, generator=g),
        "norm.bias": torch.randn(48, generator=g),
        "bias": torch.randn(57, generator=g),
    }


@pytest.fixture(scope="module")
def lavis_path(hf_model, lm_head, tmp_path_factory):
    path = tmp_path_factory.mktemp("lavis") / "blip2_pretrained.pth"
    torch.save({"model": to_lavis(hf_model, lm_head)}, path)
    return path


def test_lavis_config_is_inferred_from_shapes(lavis_path):
    state = torch.load(lavis_path, weights_only=True)["model"]
    config = lavis_config(state, num_attention_heads=HEADS)
    expected = dict(
        hidden_size=48, num_hidden_layers=3, intermediate_size=80, cross_attention_freq=2, encoder_width=32,
        num_query_tokens=6, vocab_size=57, max_position_embeddings=24, embed_dim=20, tie_word_embeddings=True,
    )  # fmt: skip
    assert {k: getattr(config, k) for k in expected} == expected


def test_lavis_checkpoint_gives_the_transformers_numbers(hf_model, lavis_path, lm_head):
    loaded = load_lavis(lavis_path, num_attention_heads=HEADS, vision=True, vision_heads=HEADS)
    assert loaded.report.fresh == [] and loaded.report.ignored == ["Qformer.bert.embeddings.position_ids"]
    q = loaded.qformer.eval()
    pixels = torch.randn(2, 3, 56, 56)
    ids = torch.randint(1, 57, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 7:] = 0
    with torch.no_grad():
        feats = loaded.vision(pixels)
        itm = q.itm_logits(q.match(feats, ids, mask.bool()))
        image = q.image_features(q.encode_image(feats).hidden)
        itc = torch.einsum("iqd,td->iqt", image, q.text_features(q.encode_text(ids, mask.bool()))).amax(dim=1)
        expected_itm = hf_model(pixels, ids, mask, use_image_text_matching_head=True).logits_per_image
        expected_itc = hf_model(pixels, ids, mask, use_image_text_matching_head=False).logits_per_image
    assert (itm - expected_itm).abs().max() <= TOL
    assert (itc - expected_itc).abs().max() <= TOL
    # the parts transformers' retrieval model lacks come from the LAVIS file
    assert torch.equal(q.lm_head.dense.weight, lm_head["dense.weight"])
    assert torch.equal(q.lm_head.decoder.bias, lm_head["bias"])
    assert q.lm_head.decoder.weight is q.embeddings.word.weight
    assert q.temp.item() == pytest.approx(0.05)


def test_lavis_without_vision_skips_the_eva_encoder_with_a_note(lavis_path):
    loaded = load_lavis(lavis_path, num_attention_heads=HEADS)
    assert loaded.vision is None
    assert any(k.startswith("visual_encoder.blocks.") for k in loaded.report.ignored)
    assert "visual_encoder" in loaded.report.summary()


def test_tied_lm_head_copies_are_reported_as_tied_not_ignored(lavis_path):
    report = load_lavis(lavis_path, num_attention_heads=HEADS).report
    cls = "Qformer.cls.predictions."
    assert report.tied == {
        cls + "bias": cls + "decoder.bias",
        cls + "decoder.weight": "Qformer.bert.embeddings.word_embeddings.weight",
    }
    summary = report.summary()
    assert f"{cls}decoder.weight: tied to Qformer.bert.embeddings.word_embeddings.weight (the same tensor" in summary
    ignored_line = next(line for line in summary.splitlines() if line.startswith("ignored checkpoint keys"))
    assert "cls.predictions" not in ignored_line and not any(k.startswith("Qformer.cls.") for k in report.ignored)
    # without an LM head in the model built, its tied copies go the way of their originals: ignored
    small = load_lavis(lavis_path, num_attention_heads=HEADS, text_input=False).report
    assert small.tied == {} and f"{cls}decoder.weight" in small.ignored


def test_lavis_without_its_vit_says_how_to_supply_one(lavis_path, tmp_path):
    state = torch.load(lavis_path, weights_only=True)["model"]
    path = tmp_path / "blip2_pretrained.pth"  # as LAVIS writes it: no frozen ViT
    torch.save({"model": {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}}, path)
    with pytest.raises(ValueError) as err:
        load_lavis(path, num_attention_heads=HEADS, vision=True)
    message = str(err.value)
    assert message.startswith(f"{path}: no EVA ViT") and "\n" not in message
    for said in ("LAVIS leaves the frozen EVA ViT out of its checkpoints", "eva_vit_g.pth", "--vision",
                 "model.vision_weights", "vision=False"):  # fmt: skip
        assert said in message, said
    assert load_lavis(path, num_attention_heads=HEADS).vision is None


def _sharp_qformer(heads: int) -> QFormer:
    """A stage-2 Q-Former (no text parts) with large random weights: peaked attention, so that the same weights
    split into another number of heads give clearly other numbers."""
    config = QFormerConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=heads, intermediate_size=96, encoder_width=32,
        num_query_tokens=6, cross_attention_freq=1, text_input=False, backend="sdpa",
    )  # fmt: skip
    model = QFormer(config).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name and name.endswith("weight") else 0.5 * noise)
    return model


def _to_lavis_stage2(model: QFormer) -> dict[str, torch.Tensor]:
    from blip2_fast.stage2_convert import qformer_names

    ours, names = model.state_dict(), qformer_names(model.config, "lavis")
    return {theirs: ours[name.removeprefix("qformer.")] for name, theirs in names.items()}


def test_lavis_head_count_is_asked_for_unless_the_layout_is_blip2s(tmp_path):
    """Shapes cannot tell the head count: a 4-head Q-Former loaded with 12 (or 16) heads gives other numbers.
    Without the count it is refused, naming the file; with it, the numbers are the original model's."""
    original = _sharp_qformer(heads=4)
    path = tmp_path / "small_heads.pth"
    torch.save({"model": _to_lavis_stage2(original)}, path)
    for load in (load_lavis, load_checkpoint):
        with pytest.raises(ValueError) as err:
            load(path, text_input=False)
        message = str(err.value)
        assert message.startswith(f"{path}: a Q-Former of hidden size 64, 2 layers, FFN width 96 (not BLIP-2's")
        assert "\n" not in message
        assert "its head count cannot be read from shapes; pass num_attention_heads=N" in message
        assert "model.qformer.num_attention_heads" in message and "--num-heads N" in message

    feats = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = original.encode_image(feats).hidden
        right = load_lavis(path, num_attention_heads=4, text_input=False, backend="sdpa").qformer.eval()
        torch.testing.assert_close(right.encode_image(feats).hidden, want, atol=1e-5, rtol=0)
        wrong = load_lavis(path, num_attention_heads=16, text_input=False, backend="sdpa").qformer.eval()
        assert (wrong.encode_image(feats).hidden - want).abs().max() > 1e-2  # what a silent default would give


def test_blip2_bert_base_layout_keeps_its_12_heads():
    """BLIP-2's Q-Former (BERT-base: hidden 768, 12 layers, FFN 3072) needs no count; shapes alone (meta tensors)."""
    enc = "Qformer.bert.encoder.layer."

    def state(ffn: int) -> dict[str, torch.Tensor]:
        shapes = {"query_tokens": (1, 32, 768), f"{enc}0.intermediate_query.dense.weight": (ffn, 768)}
        for i in range(12):
            shapes[f"{enc}{i}.attention.self.query.weight"] = (768, 768)
            if i % 2 == 0:
                shapes[f"{enc}{i}.crossattention.self.key.weight"] = (768, 1408)
        return {k: torch.empty(v, device="meta") for k, v in shapes.items()}

    config = lavis_config(state(3072))
    assert (config.num_attention_heads, config.intermediate_size, config.cross_attention_freq) == (12, 3072, 2)
    assert lavis_config(state(3072), num_attention_heads=8).num_attention_heads == 8  # a count given is kept
    with pytest.raises(ValueError, match=r"LAVIS state dict: a Q-Former of hidden size 768, 12 layers, FFN width 2048"):
        lavis_config(state(2048))


def test_lavis_stage2_checkpoint_keeps_text_parts_fresh(lavis_path):
    state = torch.load(lavis_path, weights_only=True)["model"]
    # what LAVIS' stage-2 models delete: the MLM head, word/position embeddings, the text FFNs, ITC/ITM heads
    text_only = r"Qformer\.cls\.|embeddings\.(word|position)_|layer\.\d+\.(intermediate|output)\.|_proj\.|itm_|temp"
    stage2 = {k: v for k, v in state.items() if not re.search(text_only, k)}
    stage2["opt_proj.weight"] = torch.randn(16, 48)
    loaded = load_lavis({"model": stage2}, num_attention_heads=HEADS)
    assert "opt_proj.weight" in loaded.report.ignored
    assert {"embeddings.word.weight", "layers.0.ffn_text.up.weight", "lm_head.dense.weight", "temp"} <= set(
        loaded.report.fresh
    )
    small = load_lavis({"model": stage2}, num_attention_heads=HEADS, text_input=False)
    assert small.report.fresh == [] and not small.qformer.config.text_input


def test_lavis_errors_name_the_keys(lavis_path):
    state = torch.load(lavis_path, weights_only=True)["model"]
    broken = dict(state)
    del broken["Qformer.bert.encoder.layer.1.output_query.dense.bias"]
    broken["Qformer.bert.encoder.layer.1.adapter.weight"] = torch.zeros(3)
    with pytest.raises(ValueError) as err:
        load_lavis(broken, num_attention_heads=HEADS)
    message = str(err.value)
    assert "missing keys: Qformer.bert.encoder.layer.1.output_query.dense.bias" in message
    assert "unexpected keys: Qformer.bert.encoder.layer.1.adapter.weight" in message

    bias = dict(state)
    bias["Qformer.cls.predictions.bias"] = bias["Qformer.cls.predictions.bias"] + 1
    with pytest.raises(ValueError, match=r"Qformer\.cls\.predictions\.bias differs from"):
        load_lavis(bias, num_attention_heads=HEADS)

    odd = {k: v for k, v in state.items() if "layer.2.crossattention" not in k}
    odd.update({k.replace("layer.0.cross", "layer.1.cross"): v for k, v in state.items() if "layer.0.cross" in k})
    with pytest.raises(ValueError, match=r"cross-attention in layers \[0, 1\] is not every k-th layer"):
        load_lavis(odd, num_attention_heads=HEADS)

    with pytest.raises(ValueError, match="multiple of num_attention_heads"):
        load_lavis(state, num_attention_heads=5)


# ------------------------------------------------------------------ our format


@pytest.mark.parametrize(
    "overrides, dtype",
    [
        ({}, torch.float32),
        ({"tie_word_embeddings": False}, torch.float32),
        ({"text_input": False}, torch.float32),
        ({}, torch.bfloat16),
    ],
)
def test_safetensors_round_trip_is_bitwise(tmp_path, overrides, dtype):
    model = QFormer(QFormerConfig.preset("tiny", ln_vision_eps=1e-6, **overrides)).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # nothing left at its init value
    path = save_qformer(model, tmp_path / "q.safetensors")
    back = load_qformer(path)
    assert back.config == model.config
    assert back.ln_vision.eps == 1e-6
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype == dtype
        assert torch.equal(ours[key], theirs[key]), key
    if model.config.text_input:
        tied = model.config.tie_word_embeddings
        assert (back.lm_head.decoder.weight is back.embeddings.word.weight) == tied
        assert ("lm_head.decoder.weight" in load_file(path)) == (not tied)  # a tied tensor is stored once
    assert load_checkpoint(path).qformer.config == model.config


def test_own_format_errors_name_the_keys(tmp_path):
    model = QFormer(QFormerConfig.preset("tiny"))
    path = save_qformer(model, tmp_path / "q.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    state = load_file(path)
    del state["layers.1.ffn_query.up.bias"]
    state["layers.1.extra.weight"] = torch.zeros(2)
    state["itm_head.weight"] = torch.zeros(3, 64)
    save_file(state, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(ValueError) as err:
        load_qformer(tmp_path / "bad.safetensors")
    message = str(err.value)
    assert "missing keys: layers.1.ffn_query.up.bias" in message
    assert "unexpected keys: layers.1.extra.weight" in message
    assert "itm_head.weight (checkpoint (3, 64), model (2, 64)" in message

    save_file(load_file(path), str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match=f"expected a {FORMAT} safetensors file"):
        load_qformer(tmp_path / "plain.safetensors")
    with pytest.raises(ValueError, match=r"writes a \.safetensors file"):
        save_qformer(model, tmp_path / "q.pt")


# ------------------------------------------------------------------ transformers folders: errors, report


def test_transformers_folder_errors_name_the_keys(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["qformer.encoder.layer.2.crossattention.output.dense.weight"]
    state["qformer.encoder.layer.0.adapter.bias"] = torch.zeros(4)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        load_transformers(tmp_path)
    message = str(err.value)
    assert "missing keys: qformer.encoder.layer.2.crossattention.output.dense.weight" in message
    assert "unexpected keys: qformer.encoder.layer.0.adapter.bias" in message


def test_transformers_shape_mismatch_names_both_shapes(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"query_tokens \(checkpoint \(1, 6, 48\), model \(1, 7, 48\)"):
        load_transformers(tmp_path, num_query_tokens=7)
    with pytest.raises(ValueError, match="pass architecture= one of"):
        (tmp_path / "config.json").write_text('{"model_type": "blip-2", "architectures": ["Blip2Other"]}')
        load_transformers(tmp_path)


def test_fresh_parts_are_logged(hf_model, tmp_path, caplog):
    hf_model.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger="blip2_fast.checkpoint"):
        loaded = load_transformers(tmp_path, vision=False)
    assert "kept the fresh init of lm_head.decoder, lm_head.dense, lm_head.norm, temp" in caplog.text
    assert loaded.vision is None
    assert any(k.startswith("vision_model.embeddings.") for k in loaded.report.ignored)


def test_split_qkv_bias_of_older_transformers_folders(hf_model, tmp_path):
    """transformers < 5 (and EVA) keep q_bias and v_bias apart; the key bias is zero."""
    hf_model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    for key in [k for k in state if k.endswith("self_attn.qkv.bias")]:
        q, _, v = state.pop(key).chunk(3)
        state[key.replace("qkv.bias", "q_bias")] = q.contiguous()
        state[key.replace("qkv.bias", "v_bias")] = v.contiguous()
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    loaded = load_transformers(tmp_path)
    for ours, theirs in zip(loaded.vision.vit.encoder.layers, hf_model.vision_model.encoder.layers, strict=True):
        assert torch.equal(ours.self_attn.qkv.bias, theirs.self_attn.qkv.bias)


def test_lavis_config_needs_the_keys_it_reads(lavis_path):
    state = torch.load(lavis_path, weights_only=True)["model"]
    del state["Qformer.bert.encoder.layer.0.intermediate_query.dense.weight"]
    with pytest.raises(ValueError, match=r"missing key Qformer\.bert\.encoder\.layer\.0\.intermediate_query"):
        lavis_config(state)


def test_load_checkpoint_picks_the_reader_from_the_path(hf_model, lavis_path, tmp_path):
    assert load_checkpoint(lavis_path, num_attention_heads=HEADS).report.layout == "LAVIS"
    hf_model.save_pretrained(tmp_path / "hf")
    assert load_checkpoint(tmp_path / "hf").report.layout == "Blip2ForImageTextRetrieval"
    with pytest.raises(ValueError, match="expected a transformers folder, a LAVIS .pth or"):
        load_checkpoint(tmp_path / "weights.ckpt")
    # a source that records its head count keeps it: another one asked is refused, the same one accepted
    assert load_checkpoint(tmp_path / "hf", num_attention_heads=HEADS).qformer.config.num_attention_heads == HEADS
    with pytest.raises(ValueError, match=r"hf: its Q-Former has 4 attention heads \(recorded in the checkpoint\), "):
        load_checkpoint(tmp_path / "hf", num_attention_heads=8)


def test_an_interrupted_save_keeps_the_earlier_file(tmp_path, monkeypatch):
    import safetensors.torch

    path = save_qformer(QFormer(QFormerConfig.preset("tiny")), tmp_path / "model.safetensors")
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")  # then the process dies
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="No space left"):
        save_qformer(QFormer(QFormerConfig.preset("tiny")), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no partial file left behind


def test_an_interrupted_folder_export_keeps_the_earlier_folder(hf_model, tmp_path, monkeypatch):
    import safetensors.torch

    from blip2_fast.checkpoint import save_transformers

    hf_model.save_pretrained(tmp_path / "hf")
    loaded = load_transformers(tmp_path / "hf")
    out = tmp_path / "export"
    save_transformers(loaded.qformer, loaded.vision, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(tensors, filename, metadata=None):
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="No space left"):
        save_transformers(loaded.qformer, loaded.vision, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "hf"]  # no scratch folder left behind


# ------------------------------------------------------------------ the image encoder alone


def _vit_features(hf_model, pixels, **kwargs):
    """transformers' ViT output before post_layernorm (which is our ln_vision, not part of the encoder)."""
    with torch.no_grad():
        return hf_model.vision_model(pixels, output_hidden_states=True, **kwargs).hidden_states[-1]


@pytest.fixture(scope="module")
def vision_config(hf_model):
    from blip2_fast.checkpoint import vision_config_from_transformers

    return vision_config_from_transformers(hf_model.config.to_dict())


def test_image_encoder_loads_from_every_source(hf_model, lavis_path, vision_config, tmp_path):
    from blip2_fast.checkpoint import load_vision, save_vision

    pixels = torch.randn(2, 3, 56, 56)
    expected = _vit_features(hf_model, pixels)
    hf_model.save_pretrained(tmp_path / "hf")
    from_transformers = load_vision(tmp_path / "hf")
    assert from_transformers.config == vision_config
    from_lavis = load_vision(lavis_path, vision_config)  # EVA's head count cannot be read from shapes

    # LAVIS' eva_vit_g.pth: the bare EVA state dict, a 40th block BLIP-2 drops, a classifier norm it never runs
    eva = {
        k.removeprefix("visual_encoder."): v
        for k, v in torch.load(lavis_path, weights_only=True)["model"].items()
        if k.startswith("visual_encoder.")
    }
    eva.update({k.replace("blocks.1.", "blocks.2."): v + 1 for k, v in eva.items() if k.startswith("blocks.1.")})
    eva["norm.weight"] = torch.ones(32)
    torch.save(eva, tmp_path / "eva_vit_g.pth")
    from_eva = load_vision(tmp_path / "eva_vit_g.pth", vision_config)

    save_vision(from_transformers, tmp_path / "vision.safetensors")
    from_ours = load_vision(tmp_path / "vision.safetensors")  # the config travels in the metadata
    for encoder in (from_transformers, from_lavis, from_eva, from_ours):
        assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
        assert (encoder(pixels) - expected).abs().max() <= TOL


def test_another_image_size_resizes_the_position_embeddings_as_transformers_does(hf_model, vision_config, tmp_path):
    """BLIP-2 fine-tunes at 364 px from 224 px weights; here 56 px (4 x 4 patches) -> 84 px (6 x 6)."""
    import dataclasses

    from blip2_fast.checkpoint import load_vision, resize_position_embedding

    hf_model.save_pretrained(tmp_path / "hf")
    larger = load_vision(tmp_path / "hf", dataclasses.replace(vision_config, image_size=84))
    assert larger.vit.embeddings.position_embedding.shape == (1, 37, 32)
    pixels = torch.randn(2, 3, 84, 84)
    expected = _vit_features(hf_model, pixels, interpolate_pos_encoding=True)
    assert (larger(pixels) - expected).abs().max() <= TOL

    position = hf_model.vision_model.embeddings.position_embedding.detach()
    assert resize_position_embedding(position, 17) is position
    back = resize_position_embedding(resize_position_embedding(position, 37), 17)
    assert torch.equal(back[:, 0], position[:, 0]) and not torch.equal(back, position)  # a resize, not a copy
    with pytest.raises(ValueError, match=r"1 \+ G\*G; got \(1, 17, 32\) and 30"):
        resize_position_embedding(position, 30)


def test_image_encoder_errors_name_what_does_not_fit(hf_model, vision_config, tmp_path):
    import dataclasses

    from blip2_fast.checkpoint import load_vision

    hf_model.save_pretrained(tmp_path / "hf")
    with pytest.raises(ValueError, match=r"shape mismatches: .*encoder\.layers\.0\.mlp\.fc1\.weight"):
        load_vision(tmp_path / "hf", dataclasses.replace(vision_config, intermediate_size=64))
    with pytest.raises(ValueError, match=r"missing keys: encoder\.layers\.2\."):
        load_vision(tmp_path / "hf", dataclasses.replace(vision_config, num_hidden_layers=3))
    torch.save({"model": {"Qformer.bert.embeddings.LayerNorm.weight": torch.ones(4)}}, tmp_path / "qformer_only.pth")
    with pytest.raises(ValueError, match=r"expected a LAVIS BLIP-2 checkpoint \(visual_encoder\.\* keys\) or a bare"):
        load_vision(tmp_path / "qformer_only.pth")
    with pytest.raises(FileNotFoundError, match="image encoder weights not found"):
        load_vision(tmp_path / "nothing.safetensors")


def test_a_pth_is_read_once_inside_read_each_pth_once(lavis_path, vision_config, monkeypatch):
    from blip2_fast import checkpoint

    reads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, *a, **k: reads.append(f) or real_load(f, *a, **k))

    def both():
        qformer = load_checkpoint(lavis_path, vision=False, num_attention_heads=HEADS).qformer
        return qformer.state_dict(), checkpoint.load_vision(lavis_path, vision_config).state_dict()

    apart = both()
    assert len(reads) == 2
    reads.clear()
    with checkpoint.read_each_pth_once():
        together = both()
        first = checkpoint._read_pth(lavis_path, False, "test")
        first.clear()  # each caller gets a dict of its own
        assert checkpoint._read_pth(lavis_path, False, "test")
    assert len(reads) == 1
    for mine, theirs in zip(apart, together, strict=True):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    checkpoint._read_pth(lavis_path, False, "test")  # the memo ends with the block
    assert len(reads) == 2


def test_damaged_safetensors_and_metadata_name_their_file(tmp_path):
    """Cut short, not safetensors at all, empty, metadata that is not JSON or not a valid config: every reader
    (a Q-Former, a ViT, a stage-2 model's stage-1 init) says which file, where safetensors' own error does not."""
    import json

    from safetensors import safe_open

    from blip2_fast.checkpoint import load_checkpoint, load_vision, save_qformer, save_vision
    from blip2_fast.config import VisionConfig
    from blip2_fast.stage2 import stage1_configs
    from blip2_fast.vision import ImageEncoder

    good = save_qformer(QFormer(QFormerConfig.preset("tiny")), tmp_path / "model.safetensors")
    vit = save_vision(ImageEncoder(VisionConfig.preset("tiny")), tmp_path / "vit.safetensors")
    with safe_open(str(good), "pt") as f:
        metadata = f.metadata()
    state = load_file(str(good))
    damaged = {
        "cut": good.read_bytes()[: good.stat().st_size // 2],
        "garbage": b"not a tensor file, " * 20,
        "empty": b"",
    }
    cases = {name: (data, "not a complete safetensors file") for name, data in damaged.items()}
    bad_configs = {"not_json": ("{hidden", "metadata that is not valid JSON")}
    bad_configs["bad_value"] = (json.dumps({"hidden_size": "wide"}), "hidden_size must be an int")
    for name, (config, said) in bad_configs.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"), metadata={**metadata, "qformer_config": config})
        cases[name] = (None, said)
    for name, (data, said) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        if data is not None:
            path.write_bytes(data)
        for read in (load_checkpoint, stage1_configs):
            with pytest.raises(ValueError, match=re.escape(f"{path}: ") + ".*" + said):
                read(path)
        if data is not None:
            with pytest.raises(ValueError, match=re.escape(f"{path}: {said}")):
                load_vision(path)
    cut_vit = tmp_path / "cut_vit.safetensors"
    cut_vit.write_bytes(vit.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(f"{cut_vit}: not a complete safetensors file")):
        load_vision(cut_vit)
