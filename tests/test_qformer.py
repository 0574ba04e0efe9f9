"""The reference Q-Former: mask semantics, the KV cache, input validation."""

import pytest
import torch

from blip2_fast import MaskKind, QFormer, QFormerConfig

B, T, N = 2, 9, 13  # batch, text tokens, image tokens


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return QFormer(QFormerConfig.preset("tiny")).eval()


@pytest.fixture
def inputs(model):
    cfg = model.config
    image = torch.randn(B, N, cfg.encoder_width)
    ids = torch.randint(1, cfg.vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False  # row 1 has 3 pads
    return image, ids, mask


def joint_pass(model, image, ids, mask, kind):
    """One pass over [queries ; text] under ``kind``, cross-attention for the query rows."""
    nq = model.config.num_query_tokens
    embeds = model.embeddings(ids, query_embeds=model.query_tokens.expand(ids.shape[0], -1, -1))
    valid = torch.cat([torch.ones(ids.shape[0], nq, dtype=torch.bool), mask], dim=1)
    hidden, _ = model._encode(
        embeds, n_query_rows=nq, mask_kind=kind, row_valid=valid, image=model.image_context(image)
    )
    return hidden[:, :nq], hidden[:, nq:]


def perturb_token(ids, row, col, vocab):
    ids = ids.clone()
    ids[row, col] = (ids[row, col] % (vocab - 2)) + 1  # a different non-pad id
    return ids


@torch.no_grad()
def test_unimodal_pass_equals_separate_image_and_text_passes(model, inputs):
    image, ids, mask = inputs
    queries, text = joint_pass(model, image, ids, mask, MaskKind.UNIMODAL)
    torch.testing.assert_close(queries, model.encode_image(image).hidden, rtol=0, atol=1e-6)
    real = mask[..., None]
    torch.testing.assert_close(text * real, model.encode_text(ids, mask) * real, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", list(MaskKind))
@torch.no_grad()
def test_what_each_mask_kind_lets_rows_see(model, inputs, kind):
    image, ids, mask = inputs
    vocab = model.config.vocab_size
    queries, text = joint_pass(model, image, ids, mask, kind)
    col = 3
    q2, t2 = joint_pass(model, image, perturb_token(ids, 0, col, vocab), mask, kind)
    changed_rows = (t2[0] - text[0]).abs().amax(-1) > 1e-6  # which text rows of sequence 0 moved
    queries_moved = (q2 - queries).abs().max() > 1e-6
    if kind == MaskKind.UNIMODAL:
        assert not queries_moved  # queries never see text
        assert changed_rows.all()  # every text row sees every text token
    elif kind == MaskKind.BIDIRECTIONAL:
        assert queries_moved
        assert changed_rows.all()
    else:  # MULTIMODAL_CAUSAL
        assert not queries_moved
        assert not changed_rows[:col].any() and changed_rows[col:].all()
    # the image is seen by the queries and, through them, by text except under UNIMODAL
    # (a random change: ln_vision would cancel a constant shift)
    q3, t3 = joint_pass(model, image + torch.randn_like(image), ids, mask, kind)
    assert (q3 - queries).abs().max() > 1e-6
    text_moved = (t3 - text)[0].abs().max() > 1e-6
    assert text_moved == (kind != MaskKind.UNIMODAL)


@pytest.mark.parametrize("kind", list(MaskKind))
@torch.no_grad()
def test_pad_tokens_are_never_seen(model, inputs, kind):
    image, ids, mask = inputs
    queries, text = joint_pass(model, image, ids, mask, kind)
    q2, t2 = joint_pass(model, image, perturb_token(ids, 1, 7, model.config.vocab_size), mask, kind)
    torch.testing.assert_close(q2, queries, rtol=0, atol=0)
    real = mask[..., None]
    torch.testing.assert_close(t2 * real, text * real, rtol=0, atol=0)


@torch.no_grad()
def test_decode_over_cache_equals_full_multimodal_causal_pass(model, inputs):
    image, ids, mask = inputs
    _, text = joint_pass(model, image, ids, mask, MaskKind.MULTIMODAL_CAUSAL)
    logits, cache = model.decode(ids, mask, model.encode_image(image).cache)
    real = mask[..., None]
    torch.testing.assert_close(logits * real, model.lm_head(text) * real, rtol=0, atol=1e-5)
    assert cache.length == model.config.num_query_tokens + T


def test_itg_gradient_reaches_the_query_path_through_the_cache(model, inputs):
    image, ids, mask = inputs
    model.zero_grad()
    logits, _ = model.decode(ids, mask, model.encode_image(image).cache)
    logits.square().mean().backward()
    assert model.query_tokens.grad.abs().sum() > 0
    assert model.layers[0].ffn_query.up.weight.grad.abs().sum() > 0
    assert model.layers[0].cross_attn.key.weight.grad.abs().sum() > 0
    model.zero_grad()


@torch.no_grad()
def test_token_by_token_generation_with_cache_equals_recomputation(model, inputs):
    image, _, _ = inputs
    query_cache = model.encode_image(image).cache
    ids = torch.full((B, 1), 5)
    logits, cache = model.decode(ids, None, query_cache)
    for _ in range(6):
        next_ids = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, next_ids], dim=1)
        logits, cache = model.decode(next_ids, None, cache)  # one new token over the grown cache
        full, _ = model.decode(ids, None, query_cache)  # the whole text again
        torch.testing.assert_close(logits[:, -1], full[:, -1], rtol=0, atol=1e-5)
    assert cache.length == model.config.num_query_tokens + ids.shape[1]


@torch.no_grad()
def test_preallocated_cache_grows_in_place_and_matches_concatenation(model, inputs):
    image, _, _ = inputs
    query_cache = model.encode_image(image).cache
    grown, plain = query_cache.reserve(4), query_cache
    storage = grown.buffer.keys[0]
    tokens = torch.randint(1, model.config.vocab_size, (B, 4))
    for t in range(4):
        step = tokens[:, t : t + 1]
        a, grown = model.decode(step, None, grown)
        b, plain = model.decode(step, None, plain)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert grown.layers[0][0].data_ptr() == storage.data_ptr()  # a view of the buffer, no copy
    assert grown.buffer.filled == grown.length == query_cache.length + 4
    # the buffer is full and an older cache must not overwrite the newer one: both fall back to copies
    c, extra = model.decode(tokens[:, :1], None, grown)
    assert extra.buffer is None and extra.length == grown.length + 1
    again, _ = model.decode(tokens[:, :1], None, query_cache.reserve(4))
    torch.testing.assert_close(again, model.decode(tokens[:, :1], None, query_cache)[0], rtol=0, atol=1e-6)
    beams, plain_beams = grown.index_select(torch.tensor([1, 1, 0])), plain.index_select(torch.tensor([1, 1, 0]))
    for (k, v), (k2, v2) in zip(beams.layers, plain_beams.layers, strict=True):
        torch.testing.assert_close((k, v), (k2, v2), rtol=0, atol=1e-6)


@torch.no_grad()
def test_branching_from_an_older_cache_never_overwrites_a_newer_one(model, inputs):
    image, _, _ = inputs
    start = model.encode_image(image).cache.reserve(3)
    _, first = model.decode(torch.full((B, 1), 7), None, start)
    kept = first.layers[-1][0].clone()
    model.decode(torch.full((B, 1), 9), None, start)  # a second branch from the same older cache
    torch.testing.assert_close(first.layers[-1][0], kept, rtol=0, atol=0)


@torch.no_grad()
def test_image_context_is_reusable_and_selectable(model, inputs):
    image, ids, mask = inputs
    ctx = model.image_context(image)
    picked = torch.tensor([1, 0])
    direct = model.itm_logits(model.match(image[picked], ids, mask))
    reused = model.itm_logits(model.match(ctx.index_select(picked), ids, mask))
    torch.testing.assert_close(reused, direct, rtol=0, atol=1e-6)


def test_chunked_feed_forward_matches_unchunked(inputs):
    torch.manual_seed(1)
    whole = QFormer(QFormerConfig.preset("tiny")).eval()
    chunked = QFormer(QFormerConfig.preset("tiny", chunk_size_feed_forward=4)).eval()
    chunked.load_state_dict(whole.state_dict())
    image, ids, mask = inputs
    with torch.no_grad():
        torch.testing.assert_close(chunked.match(image, ids, mask), whole.match(image, ids, mask), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, i, t, k: m.encode_image(torch.randn(B, N, 47)), r"\(B, N, 48\)"),
        (lambda m, i, t, k: m.match(i, t[:1], k[:1]), "batch sizes must match"),
        (lambda m, i, t, k: m.encode_text(torch.ones(B, 65, dtype=torch.long)), "max_position_embeddings=64"),
        (lambda m, i, t, k: m.encode_text(t, k.float()), "bool"),
        (lambda m, i, t, k: m.encode_text(t, k[:, :-1]), r"shape \(2, 9\)"),
        (lambda m, i, t, k: m.encode_text(t.float(), k), "int64"),
    ],
    ids=["image-width", "batch-mismatch", "too-long", "float-mask", "mask-shape", "float-ids"],
)
def test_bad_input_is_a_clear_error(model, inputs, call, message):
    with pytest.raises(ValueError, match=message):
        call(model, *inputs)


def test_stage2_qformer_has_no_text_parts():
    model = QFormer(QFormerConfig.preset("tiny", text_input=False))
    names = {n for n, _ in model.named_parameters()}
    assert not any(n.startswith(("embeddings.word", "lm_head", "text_proj", "itm_head")) for n in names)
    assert not any("ffn_text" in n for n in names)
    with pytest.raises(ValueError, match="text_input=False"):
        model.encode_text(torch.ones(1, 3, dtype=torch.long))
