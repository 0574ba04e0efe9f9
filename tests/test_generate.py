"""Q-Former captioning: the cached decoding loop against full recomputation, beams against teacher forcing."""

from __future__ import annotations

import pytest
import torch

from blip2_fast.config import QFormerConfig
from blip2_fast.generate import caption, generate
from blip2_fast.qformer import QFormer

BOS, EOS, PAD = 100, 3, 0


@pytest.fixture(scope="module")
def model() -> QFormer:
    torch.manual_seed(0)
    m = QFormer(QFormerConfig.preset("tiny", cross_attention_freq=1)).eval()
    with torch.no_grad():
        # large (tied) word embeddings make every step depend on the tokens before it, so a beam
        # that kept another beam's cache would score differently
        m.embeddings.word.weight.normal_(0, 0.5)
        m.lm_head.decoder.bias.normal_(0, 1.0)
    return m


def images(B=3, seed=1):
    return torch.randn(B, 9, 48, generator=torch.Generator().manual_seed(seed))


def logprob_of(model, image, tokens, length):
    """Teacher-forced sum of log-probabilities of ``tokens[:length]`` after [DEC], one pass, no step cache."""
    cache = model.encode_image(image[None]).cache
    seq = torch.cat([torch.tensor([BOS]), tokens[: length - 1]])[None]
    logits, _ = model.decode(seq, None, cache)
    logp = torch.log_softmax(logits[0].float(), dim=-1)
    return logp[torch.arange(length), tokens[:length]].sum()


def test_greedy_equals_recomputing_every_step(model):
    img = images()
    out = generate(model, img, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=6, min_new_tokens=0)
    for b in range(img.shape[0]):
        seq = [BOS]
        for _ in range(6):
            cache = model.encode_image(img[b : b + 1]).cache  # fresh: nothing reused between steps
            logits, _ = model.decode(torch.tensor([seq]), None, cache)
            seq.append(int(logits[0, -1].argmax()))
            if seq[-1] == EOS:
                break
        got = out.tokens[b, : out.lengths[b]].tolist()
        assert got == seq[1:]
        assert out.tokens[b, out.lengths[b] :].eq(PAD).all()


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_scores_are_the_teacher_forced_log_probability(model, num_beams):
    """Reordering the cache rows per beam must keep each hypothesis' own history."""
    img = images()
    out = generate(
        model, img, bos_id=BOS, eos_id=EOS, pad_id=PAD, max_new_tokens=7, min_new_tokens=2, num_beams=num_beams
    )
    for b in range(img.shape[0]):
        length = int(out.lengths[b])
        assert length >= 2
        torch.testing.assert_close(
            out.scores[b], logprob_of(model, img[b], out.tokens[b], length), rtol=1e-4, atol=1e-4
        )


def test_one_beam_is_greedy_and_more_beams_score_no_worse_at_step_one(model):
    img = images()
    greedy = generate(model, img, bos_id=BOS, eos_id=EOS, max_new_tokens=5, min_new_tokens=0)
    beam1 = generate(model, img, bos_id=BOS, eos_id=EOS, max_new_tokens=5, min_new_tokens=0, num_beams=1)
    assert torch.equal(greedy.tokens, beam1.tokens)
    one = generate(model, img, bos_id=BOS, eos_id=EOS, max_new_tokens=1, min_new_tokens=1)
    many = generate(model, img, bos_id=BOS, eos_id=EOS, max_new_tokens=1, min_new_tokens=1, num_beams=3)
    torch.testing.assert_close(one.scores, many.scores)  # one step: the best beam is the argmax


def test_min_and_max_length(model):
    img = images()
    with torch.no_grad():
        model.lm_head.decoder.bias[EOS] += 100.0  # the end token wins whenever allowed
    try:
        out = generate(model, img, bos_id=BOS, eos_id=EOS, max_new_tokens=8, min_new_tokens=4)
        assert out.lengths.tolist() == [5] * 3  # 4 forced tokens + the end
        assert (out.tokens[:, :4] != EOS).all() and (out.tokens[:, 4] == EOS).all()
    finally:
        with torch.no_grad():
            model.lm_head.decoder.bias[EOS] -= 100.0
    out = generate(model, img, bos_id=BOS, eos_id=EOS, max_new_tokens=3, min_new_tokens=3)
    assert out.tokens.shape[1] == 3


def test_bad_arguments(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, images(), bos_id=BOS, eos_id=EOS, max_new_tokens=2, min_new_tokens=3)
    with pytest.raises(ValueError, match="num_beams"):
        generate(model, images(), bos_id=BOS, eos_id=EOS, num_beams=0)
    with pytest.raises(ValueError, match="text_input"):
        generate(QFormer(QFormerConfig.preset("tiny", text_input=False)), images(), bos_id=BOS, eos_id=EOS)


def test_caption_decodes_strings():
    from blip2_fast.text import load_tokenizer

    tokenizer = load_tokenizer()
    torch.manual_seed(0)
    m = QFormer(QFormerConfig.preset("tiny", vocab_size=len(tokenizer))).eval()
    texts = caption(m, images(2), tokenizer, max_new_tokens=4, num_beams=2)
    assert len(texts) == 2 and all(isinstance(t, str) and t for t in texts)
    assert all("[DEC]" not in t and "[SEP]" not in t for t in texts)
