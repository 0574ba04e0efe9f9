import pytest

from blip2_fast import QFormer, QFormerConfig, VisionConfig
from blip2_fast.config import load_file


def test_blip2_preset_is_the_blip2_qformer():
    cfg = QFormerConfig.preset("blip2")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        768,
        12,
        12,
        3072,
    )
    assert (cfg.num_query_tokens, cfg.encoder_width, cfg.vocab_size) == (32, 1408, 30523)
    assert [i for i in range(12) if cfg.has_cross_attention(i)] == [0, 2, 4, 6, 8, 10]
    model = QFormer(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    assert 180e6 < n_params < 195e6, n_params  # ~187M with the LM decoder tied to the word embeddings
    assert VisionConfig.preset("eva_vit_g").num_tokens == 257


def test_unknown_key_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown QFormerConfig key\(s\) \['hiden_size'\].*valid keys:.*hidden_size"):
        QFormerConfig.from_dict({"preset": "tiny", "hiden_size": 3})


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=65), "multiple of num_attention_heads"),
        (dict(backend="cuda"), "unknown attention backend 'cuda'"),
        (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
        (dict(num_query_tokens=0), "num_query_tokens"),
    ],
)
def test_invalid_values_are_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        QFormerConfig.preset("tiny", **overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="expected one of blip2, minilm, tiny"):
        QFormerConfig.preset("huge")


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_config_files(tmp_path, suffix):
    path = tmp_path / f"q{suffix}"
    path.write_text(
        "preset: tiny\nnum_query_tokens: 4\n" if suffix == ".yaml" else 'preset = "tiny"\nnum_query_tokens = 4\n'
    )
    cfg = QFormerConfig.from_dict(load_file(path))
    assert cfg.num_query_tokens == 4 and cfg.hidden_size == 64
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_file(tmp_path / "missing.yaml")


def test_values_are_checked_against_the_field_types():
    # YAML 1.1 reads 1e-6 (no dot) as a string: a float field takes it as the number it names
    assert VisionConfig.from_dict({"preset": "tiny", "layer_norm_eps": "1e-6"}).layer_norm_eps == 1e-6
    assert QFormerConfig.from_dict({"preset": "tiny", "hidden_dropout_prob": 0}).hidden_dropout_prob == 0.0
    with pytest.raises(ValueError, match=r"VisionConfig.layer_norm_eps must be a float, got 'small'"):
        VisionConfig.from_dict({"layer_norm_eps": "small"})
    with pytest.raises(ValueError, match=r"QFormerConfig.num_query_tokens must be an int, got '32'"):
        QFormerConfig.from_dict({"num_query_tokens": "32"})
    with pytest.raises(ValueError, match=r"QFormerConfig.ffn_recompute must be a bool, got 1"):
        QFormerConfig.from_dict({"ffn_recompute": 1})
