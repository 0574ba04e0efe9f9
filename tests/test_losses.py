"""Stage-1 losses against plain re-derivations of LAVIS' arithmetic (tiny Q-Former, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from blip2_fast.attention import MaskKind
from blip2_fast.config import QFormerConfig
from blip2_fast.losses import (
    TEMP_MAX,
    TEMP_MIN,
    HardNegativeSampler,
    Stage1Loss,
    clamped_temp,
    itc_loss,
    itg_loss,
    similarity,
)
from blip2_fast.qformer import QFormer

BOS = 100  # the tiny vocab's last id stands in for [DEC]


def tiny_model(**overrides) -> QFormer:
    config = QFormerConfig.preset(
        "tiny", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, cross_attention_freq=1, **overrides
    )
    model = QFormer(config)
    with torch.no_grad():  # a fresh init barely looks at the image: make swapped images change the numbers
        for name, p in model.named_parameters():
            if "cross_attn" in name and name.endswith("weight") and p.ndim == 2:
                p.normal_(0, 0.5)
    return model


def batch(B=5, T=7, N=9, E=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, N, E, generator=g)
    ids = torch.randint(1, 100, (B, T), generator=g)
    lengths = torch.randint(3, T + 1, (B,), generator=g)
    lengths[0] = T
    mask = torch.arange(T)[None] < lengths[:, None]
    ids = ids.masked_fill(~mask, 0)
    return image, ids, mask


# ------------------------------------------------------------------ ITC


def test_similarity_is_max_over_queries():
    img, txt = torch.randn(3, 4, 6), torch.randn(5, 6)
    want = torch.stack([torch.stack([(img[i] @ txt[t]).max() for t in range(5)]) for i in range(3)])
    torch.testing.assert_close(similarity(img, txt), want)


def test_itc_unique_ids_is_lavis_cross_entropy():
    B, Q, D = 6, 4, 8
    img = F.normalize(torch.randn(B, Q, D), dim=-1)
    txt = F.normalize(torch.randn(B, D), dim=-1)
    temp = torch.tensor(0.07)
    loss, _, _ = itc_loss(img, txt, img, txt, torch.arange(B), torch.arange(B), temp)
    sim_i2t = torch.stack([torch.stack([(img[i] @ txt[t]).max() for t in range(B)]) for i in range(B)])
    targets = torch.arange(B)
    want = (
        F.cross_entropy(sim_i2t / temp, targets, label_smoothing=0.1)
        + F.cross_entropy(sim_i2t.t() / temp, targets, label_smoothing=0.1)
    ) / 2
    torch.testing.assert_close(loss, want)


def test_itc_shared_image_ids_split_the_target():
    B, Q, D = 5, 3, 8
    img = F.normalize(torch.randn(B, Q, D), dim=-1)
    txt = F.normalize(torch.randn(B, D), dim=-1)
    ids = torch.tensor([7, 3, 7, 9, 3])
    temp = torch.tensor(0.1)
    loss, sim_i2t, sim_t2i = itc_loss(img, txt, img, txt, ids, ids, temp)
    # by hand: smoothed soft targets q = 0.9 * pos / npos + 0.1 / G, loss = -sum q log p
    pos = (ids[:, None] == ids[None, :]).float()
    q = 0.9 * pos / pos.sum(1, keepdim=True) + 0.1 / B
    want = 0.0
    for sim in (sim_i2t, sim_t2i):
        want = want + (-(q * torch.log_softmax(sim, dim=1)).sum(1)).mean() / 2
    torch.testing.assert_close(loss, want)
    # and it differs from treating only the diagonal as positive
    hard = (F.cross_entropy(sim_i2t, torch.arange(B), label_smoothing=0.1) * 2) / 2
    assert not torch.allclose(loss, hard)


def test_itc_local_rows_against_global_batch():
    """Rank 1 of 2 sees rows 3..5 of the global batch: its loss is the mean of those rows of the global loss."""
    G, Q, D = 6, 3, 8
    img = F.normalize(torch.randn(G, Q, D), dim=-1)
    txt = F.normalize(torch.randn(G, D), dim=-1)
    ids = torch.arange(G)
    temp = torch.tensor(0.05)
    full = []
    for half in (slice(0, 3), slice(3, 6)):
        loss, _, _ = itc_loss(img[half], txt[half], img, txt, ids[half], ids, temp)
        full.append(loss)
    whole, _, _ = itc_loss(img, txt, img, txt, ids, ids, temp)
    torch.testing.assert_close((full[0] + full[1]) / 2, whole)


def test_temperature_is_clamped_like_lavis():
    assert float(clamped_temp(torch.tensor(5.0))) == TEMP_MAX
    assert float(clamped_temp(torch.tensor(1e-6))) == pytest.approx(TEMP_MIN)
    t = torch.tensor(0.07, requires_grad=True)
    clamped_temp(t).backward()
    assert t.grad == 1.0


# ------------------------------------------------------------------ hard negatives


def test_sampler_never_picks_a_positive():
    g = torch.Generator().manual_seed(1)
    sampler = HardNegativeSampler(seed=3)
    for trial in range(30):
        n = 8
        ids = torch.randint(0, 4, (n,), generator=g)  # many shared image ids
        ids[0] = 100  # at least one row with a single positive
        pos = ids[:, None] == ids[None, :]
        if pos.all(dim=1).any():
            continue
        # similarities that strongly favour the positives: a sampler that forgot the mask would pick them
        sim = torch.randn(n, n, generator=g) + 50.0 * pos.float()
        for _ in range(5):
            picked = sampler.sample(sim, pos)
            assert not pos[torch.arange(n), picked].any(), f"trial {trial}: picked a positive"


def test_sampler_prefers_hard_negatives_and_is_seeded():
    sim = torch.tensor([[9.0, 5.0, 0.0, 0.0], [0.0, 9.0, 0.0, 0.0]])
    pos = torch.tensor([[True, False, False, False], [False, True, False, False]])
    draws = torch.stack([HardNegativeSampler(seed=s).sample(sim, pos) for s in range(200)])
    assert (draws[:, 0] == 1).float().mean() > 0.9  # softmax weight of column 1 is ~0.98
    assert set(draws[:, 1].tolist()) <= {0, 2, 3}
    a, b = HardNegativeSampler(seed=5), HardNegativeSampler(seed=5)
    sim = torch.randn(6, 6)
    pos = torch.eye(6, dtype=torch.bool)
    assert torch.equal(a.sample(sim, pos), b.sample(sim, pos))
    state = a.state_dict()
    first = a.sample(sim, pos)
    a.load_state_dict(state)
    assert torch.equal(a.sample(sim, pos), first)


def test_sampler_draws_from_the_softmax_over_negatives():
    """Gumbel-max draws follow softmax(sim) over the negatives, also where their weights underflow in fp32."""
    sampler = HardNegativeSampler(seed=7)
    sim = torch.tensor([[2.0, 1.0, 0.0, 5.0], [-200.0, -201.0, 0.0, -202.0]])
    pos = torch.tensor([[False, False, False, True], [False, False, True, False]])
    draws = torch.stack([sampler.sample(sim, pos) for _ in range(4000)])  # (4000, 2)
    for row in range(2):
        want = torch.softmax(sim[row].double().masked_fill(pos[row], float("-inf")), 0)
        got = torch.bincount(draws[:, row], minlength=4).double() / len(draws)
        torch.testing.assert_close(got, want, atol=0.03, rtol=0)  # ~4 standard errors at 4000 draws


def test_sampler_without_any_negative_is_a_clear_error():
    sampler = HardNegativeSampler()
    with pytest.raises(RuntimeError, match="no negative"):  # a device-side assert: no host sync on CUDA
        sampler.sample(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="same shape"):
        sampler.sample(torch.zeros(2, 3), torch.ones(2, 2, dtype=torch.bool))


# ------------------------------------------------------------------ the full module


def test_stage1_matches_a_from_scratch_computation():
    """Shared image context, index_select/cat of contexts and the cached ITG against a plain recomputation."""
    torch.manual_seed(0)
    model = tiny_model()
    loss_module = Stage1Loss(model, BOS, seed=11)
    image, ids, mask = batch()
    image_ids = torch.tensor([0, 1, 2, 1, 4])  # rows 1 and 3 share an image
    out = loss_module(image, ids, mask, image_ids)

    B = ids.shape[0]
    temp = model.temp.clamp(TEMP_MIN, TEMP_MAX)
    q_hidden = model.encode_image(image).hidden  # context recomputed from the raw features
    img_f = F.normalize(model.vision_proj(q_hidden), dim=-1)
    txt_f = F.normalize(model.text_proj(model.encode_text(ids, mask)[:, 0]), dim=-1)
    itc, sim_i2t, _ = itc_loss(img_f, txt_f, img_f, txt_f, image_ids, image_ids, temp)
    torch.testing.assert_close(out.itc, itc)

    sampler = HardNegativeSampler(seed=11)
    pos = image_ids[:, None] == image_ids[None, :]
    neg_img = sampler.sample(sim_i2t.t(), pos)
    neg_txt = sampler.sample(sim_i2t, pos)
    assert not pos[torch.arange(B), neg_img].any() and not pos[torch.arange(B), neg_txt].any()
    logits = []
    for images, texts in ((image, ids), (image[neg_img], ids), (image, ids[neg_txt])):
        m = mask if texts is ids else mask[neg_txt]
        hidden = model.match(images, texts, m)
        logits.append(model.itm_head(hidden[:, : model.config.num_query_tokens]).mean(1))
    labels = torch.tensor([1] * B + [0] * (2 * B))
    torch.testing.assert_close(out.itm, F.cross_entropy(torch.cat(logits), labels))

    # ITG without the cache: one MULTIMODAL_CAUSAL pass over [queries ; text] with the image
    dec = ids.clone()
    dec[:, 0] = BOS
    embeds = model.embeddings(dec, query_embeds=model.query_tokens.expand(B, -1, -1))
    Q = model.config.num_query_tokens
    row_valid = torch.cat([torch.ones(B, Q, dtype=torch.bool), mask], dim=1)
    hidden, _ = model._encode(
        embeds,
        n_query_rows=Q,
        mask_kind=MaskKind.MULTIMODAL_CAUSAL,
        row_valid=row_valid,
        image=model.image_context(image),
    )
    logits = model.lm_head(hidden[:, Q:])
    labels = dec.masked_fill(~mask, -100)
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(out.itg, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, out.itc + out.itm + out.itg)


def test_every_trainable_part_gets_a_gradient():
    model = tiny_model()
    image, ids, mask = batch()
    Stage1Loss(model, BOS)(image, ids, mask, torch.arange(5)).loss.backward()
    for name in (
        "temp",
        "query_tokens",
        "ln_vision.weight",
        "layers.0.cross_attn.key.weight",
        "layers.1.cross_attn.value.weight",
        "itm_head.weight",
        "vision_proj.weight",
        "text_proj.weight",
        "lm_head.dense.weight",
        "embeddings.word.weight",
    ):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_losses_are_fp32_for_a_half_precision_model():
    """fp16 logits over the vocabulary must not reach the loss in fp16 (LAVIS users saw ITG overflow)."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.decoder.bias.fill_(0.0)
        model.lm_head.decoder.bias[5] = 6.0e4  # a logit near fp16's limit: exp-sums in fp16 would overflow
    half = copy.deepcopy(model).half()
    image, ids, mask = batch()
    cache = half.encode_image(image.half()).cache
    loss = itg_loss(half, ids, mask, cache, BOS)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    ref = itg_loss(model, ids, mask, model.encode_image(image).cache, BOS)
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=0.5)


def test_bad_inputs_are_clear_errors():
    model = tiny_model()
    image, ids, mask = batch()
    with pytest.raises(ValueError, match="image_ids"):
        Stage1Loss(model, BOS)(image, ids, mask, torch.arange(4))
    with pytest.raises(ValueError, match="bos_token_id"):
        Stage1Loss(model, 10_000)
    stage2 = QFormer(QFormerConfig.preset("tiny", text_input=False))
    with pytest.raises(ValueError, match="text_input"):
        Stage1Loss(stage2, BOS)


# ------------------------------------------------------------------ collectives


def _gather_worker(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    from blip2_fast import distributed

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        g = distributed.all_gather_with_grad(x)
        # rank r weights slice s by (r + 1) * (s + 1): the owner of slice s gets sum_r (r + 1) * (s + 1)
        weights = torch.cat([torch.full((2, 3), float((rank + 1) * (s + 1))) for s in range(world)])
        (g * weights).sum().backward()
        y = torch.full((2, 3), float(rank + 1), requires_grad=True)
        h = distributed.all_gather_no_grad(y)
        (h * weights).sum().backward()
        out[rank] = (g.detach().clone(), x.grad.clone(), h.detach().clone(), y.grad.clone())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gathers_across_two_ranks():
    import torch.multiprocessing as mp

    from blip2_fast.train import _free_port

    world, port = 2, _free_port()
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_gather_worker, args=(world, port, out), nprocs=world, join=True)
    expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])
    for rank in range(world):
        gathered, grad, gathered_ng, grad_ng = out[rank]
        assert torch.equal(gathered, expected) and torch.equal(gathered_ng, expected)
        # with grad: every rank's weight on my slice, summed (1 + 2) * (rank + 1)
        assert torch.equal(grad, torch.full((2, 3), 3.0 * (rank + 1)))
        # without grad: only my own weight on my own slice
        assert torch.equal(grad_ng, torch.full((2, 3), float((rank + 1) * (rank + 1))))


def _itm_vit_setup():
    """A trainable tiny ViT under the tiny Q-Former, and a global batch of 8 (the same in every process)."""
    from blip2_fast.config import VisionConfig
    from blip2_fast.vision import ImageEncoder

    torch.manual_seed(0)
    vision = ImageEncoder(VisionConfig.preset("tiny")).unfreeze()
    stage1 = Stage1Loss(tiny_model(), BOS, seed=5)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(8, 3, 32, 32, generator=g)
    ids = torch.randint(2, 100, (8, 6), generator=g)
    return vision, stage1, pixels, ids, torch.ones(8, 6, dtype=torch.bool), torch.arange(8)


def _itm_vit_grads(vision, stage1, pixels, ids, mask, image_ids):
    out = stage1(vision(pixels), ids, mask, image_ids)
    out.itm.backward()
    return out.itm.detach(), [p.grad for p in vision.parameters()]


def _itm_vit_worker(rank: int, world: int, port: int, out: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        vision, stage1, *batch = _itm_vit_setup()
        share = slice(rank * 4, (rank + 1) * 4)
        itm, grads = _itm_vit_grads(vision, stage1, *(t[share] for t in batch))
        for grad in grads:  # what data-parallel training applies: the mean over ranks
            dist.all_reduce(grad)
            grad /= world
        dist.all_reduce(itm)
        out[rank] = (itm / world, [g.clone() for g in grads])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_trainable_vit_gets_the_itm_gradient_of_its_images_on_other_ranks():
    """A rank's images serve as hard negatives on other ranks too: with a trainable ViT, the ITM gradient of
    2 ranks x 4 (averaged, as data-parallel training does) equals that of one rank x 8."""
    import torch.multiprocessing as mp

    from blip2_fast.train import _free_port

    itm, grads = _itm_vit_grads(*_itm_vit_setup())
    out = mp.Manager().dict()
    mp.spawn(_itm_vit_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    for rank in range(2):
        itm2, grads2 = out[rank]
        torch.testing.assert_close(itm2, itm, atol=1e-6, rtol=1e-5)
        for a, b in zip(grads2, grads, strict=True):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
