"""The whole Q-Former on the triton backend (fused attention + fused FFN / residual-norm) against the reference.

ITC, ITM and ITG losses and every parameter gradient, padded text and padded image tokens included; then a
few training steps under the interpreter.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from blip2_fast import QFormer, QFormerConfig

from kernel_device import DEVICE, generator

pytestmark = pytest.mark.usefixtures("kernel_device")

pytest.importorskip("blip2_fast.kernels.ffn")

B, T, N = 2, 9, 13  # batch, text tokens, image tokens


def batch(cfg: QFormerConfig, seed: int = 0):
    gen = generator(seed)
    image = torch.randn(B, N, cfg.encoder_width, generator=gen)
    ids = torch.randint(1, cfg.vocab_size, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False  # sequence 1 has 3 pads
    image_mask = torch.ones(B, N, dtype=torch.bool)
    image_mask[0, 10:] = False  # and some padded image tokens
    return image, ids, mask, image_mask


def stage1_losses(model: QFormer, image, ids, mask, image_mask) -> dict[str, torch.Tensor]:
    """The three stage-1 objectives on the public API (in-batch negatives only; the losses module owns the rest)."""
    ctx = model.image_context(image, image_mask)
    queries = model.encode_image(ctx)
    image_feat = model.image_features(queries.hidden)  # (B, Q, E)
    text_feat = model.text_features(model.encode_text(ids, mask))  # (B, E)
    sim = torch.einsum("iqe,te->itq", image_feat, text_feat).amax(-1) / model.temp  # (B images, B texts)
    target = torch.arange(B)
    itc = (F.cross_entropy(sim, target) + F.cross_entropy(sim.t(), target)) / 2

    # ITM: each text with its image, then with the next image (a negative)
    ctx2 = model.image_context(torch.cat([image, image.roll(1, 0)]), torch.cat([image_mask, image_mask.roll(1, 0)]))
    logits = model.itm_logits(model.match(ctx2, torch.cat([ids, ids]), torch.cat([mask, mask])))
    itm = F.cross_entropy(logits, torch.cat([torch.ones(B), torch.zeros(B)]).long())

    # ITG: text over the cached query K/V; the loss reaches the query path through the cache
    lm_logits, _ = model.decode(ids, mask, queries.cache)
    labels = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
    itg = F.cross_entropy(lm_logits[:, :-1].flatten(0, 1), labels.flatten())
    return {"itc": itc, "itm": itm, "itg": itg}


def grads_of(model: QFormer, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = QFormer(QFormerConfig.preset("tiny")).eval().to(DEVICE)  # built before kernel_device applies
    fused = copy.deepcopy(ref).set_backend("triton")
    return ref, fused


@pytest.mark.slow
def test_itc_itm_itg_losses_and_parameter_grads_match_reference(models):
    ref, fused = models
    data = batch(ref.config)
    want, got = stage1_losses(ref, *data), stage1_losses(fused, *data)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    want_grads, got_grads = grads_of(ref, sum(want.values())), grads_of(fused, sum(got.values()))
    assert got_grads.keys() == want_grads.keys()
    # every part of the model is trained: query tokens, cross-attention (via ITG too), both FFNs, the heads
    for name in ("query_tokens", "layers.0.cross_attn.key.weight", "layers.1.self_attn.query.weight", "temp"):
        assert want_grads[name].abs().max() > 0, name
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_itg_gradient_flows_into_the_cached_query_keys_and_values(models):
    """Only the LM loss: the query path (query tokens, cross-attention) is trained through the K/V cache."""
    ref, fused = models
    image, ids, mask, image_mask = batch(ref.config, seed=1)
    per_model = []
    for model in (ref, fused):
        queries = model.encode_image(model.image_context(image, image_mask))
        logits, _ = model.decode(ids, mask, queries.cache)
        per_model.append(grads_of(model, logits.float().pow(2).mean()))
    want, got = per_model
    assert want["query_tokens"].abs().max() > 0 and want["layers.0.cross_attn.value.weight"].abs().max() > 0
    for name in ("query_tokens", "layers.0.cross_attn.value.weight", "layers.0.self_attn.key.weight"):
        torch.testing.assert_close(got[name], want[name], atol=2e-5, rtol=1e-4)


@pytest.mark.slow
def test_trains_with_dropout_on_the_triton_backend():
    """Train mode (attention and hidden dropout 0.1 in the kernels): four steps on a fixed batch lower its loss,
    read without dropout before and after (a train-mode loss moves with each step's dropout draw)."""
    torch.manual_seed(0)
    model = QFormer(QFormerConfig.preset("tiny", backend="triton"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = batch(model.config, seed=2)
    with torch.no_grad():
        before = sum(stage1_losses(model.eval(), *data).values()).item()
    model.train()
    for _ in range(4):
        loss = sum(stage1_losses(model, *data).values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        assert torch.isfinite(loss)
    with torch.no_grad():
        after = sum(stage1_losses(model.eval(), *data).values()).item()
    assert after < before - 0.5, (before, after)


def stage1_outputs(model: QFormer, image, ids, mask, image_mask) -> dict[str, torch.Tensor]:
    """What the three objectives read: query outputs, text features, ITM logits, LM logits."""
    ctx = model.image_context(image, image_mask)
    queries = model.encode_image(ctx)
    return {
        "queries": queries.hidden,
        "text": model.text_features(model.encode_text(ids, mask)),
        "itm": model.itm_logits(model.match(ctx, ids, mask)),
        "lm": model.decode(ids, mask, queries.cache)[0],
    }


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["weights", "autocast"])
@pytest.mark.parametrize(
    "dtype",
    [
        torch.float16,
        pytest.param(torch.bfloat16, marks=[pytest.mark.gpu, pytest.mark.skipif(DEVICE != "cuda", reason=(
            "bf16 parity needs a GPU: the interpreter truncates bf16 stores"))]),
    ],
    ids=["fp16", "bf16"],
)  # fmt: skip
def test_half_precision_stays_within_twice_the_eager_error(dtype, mode):
    """Half precision as training runs it, in half-precision weights (DeepSpeed's fp16/bf16 modes) or under
    torch.autocast: what the triton backend computes is as close to fp32 as SDPA in the same set-up (2x rule)."""
    torch.manual_seed(0)
    ref = QFormer(QFormerConfig.preset("tiny")).eval()
    data = batch(ref.config, seed=3)
    got = {}
    with torch.no_grad():
        want = stage1_outputs(ref, *data)
        for backend in ("sdpa", "triton"):
            model = copy.deepcopy(ref).set_backend(backend)
            if mode == "weights":
                got[backend] = stage1_outputs(model.to(dtype), *data)
            else:
                with torch.autocast(DEVICE, dtype=dtype):
                    got[backend] = stage1_outputs(model, *data)
    for name, value in want.items():
        assert got["triton"][name].dtype == got["sdpa"][name].dtype, name
        fused = (got["triton"][name].float() - value).abs().max().item()
        eager = (got["sdpa"][name].float() - value).abs().max().item()
        floor = 1e-3 * value.abs().max().item()
        assert fused <= 2 * eager + floor, f"{name}: triton {dtype} error {fused:.2e}, sdpa {eager:.2e}"


def test_a_training_pass_draws_its_dropout_seeds_at_once_and_each_site_its_own(monkeypatch):
    """In train mode a pass draws every dropout seed of the triton kernels in one launch and hands each
    dropout site (attention probabilities, outputs, FFNs, every layer) a seed of its own."""
    import blip2_fast.kernels.attention as kattn
    import blip2_fast.kernels.ffn as kffn
    import blip2_fast.qformer as qformer_module

    draws, seeds = [], []
    real_draw = qformer_module.dropout_seeds

    def drawing(n, device):
        draws.append(n)
        return real_draw(n, device)

    def recording(fn):
        def call(*args, seed=None, **kwargs):
            seeds.append(seed)
            return fn(*args, seed=seed, **kwargs)

        return call

    monkeypatch.setattr(qformer_module, "dropout_seeds", drawing)
    monkeypatch.setattr(kattn, "attention", recording(kattn.attention))
    monkeypatch.setattr(kffn, "ffn", recording(kffn.ffn))
    monkeypatch.setattr(kffn, "residual_norm", recording(kffn.residual_norm))
    torch.manual_seed(0)
    model = QFormer(QFormerConfig.preset("tiny", backend="triton")).train()
    image, ids, mask, image_mask = batch(model.config)
    model.encode_image(model.image_context(image, image_mask))
    n_layers = model.config.num_hidden_layers
    assert draws == [n_layers * qformer_module.SEEDS_PER_LAYER]
    n_cross = sum(layer.cross_attn is not None for layer in model.layers)
    # per layer: self-attention, its output, the query FFN; per cross-attention layer its attention (masked:
    # the image has padded tokens) and its output
    assert len(seeds) == 3 * n_layers + 2 * n_cross
    assert all(isinstance(s, torch.Tensor) for s in seeds), seeds
    values = [int(s[0]) for s in seeds]
    assert len(set(values)) == len(values), values
    model.eval()
    seeds.clear()
    model.encode_image(model.image_context(image, image_mask))
    assert draws == [n_layers * qformer_module.SEEDS_PER_LAYER] and all(s is None for s in seeds)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_the_itc_itg_pass_equals_the_three_passes_it_replaces(backend):
    """encode_itc_itg against encode_image + encode_text + decode over the query cache, padded text and image
    tokens: the three outputs and every parameter gradient (sharp random weights: LayerNorm gains and biases
    random, attention peaked, so a swapped segment or a wrong mask shows at 1e-2)."""
    from random_weights import randomize

    torch.manual_seed(0)
    model = randomize(QFormer(QFormerConfig.preset("tiny", backend=backend)).eval(), seed=3).to(DEVICE)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.mul_(8.0)  # peaked attention
            elif "norm" in name and name.endswith("bias"):
                p.normal_(0, 0.3)
    image, ids, mask, image_mask = batch(model.config, seed=4)
    decoder_ids = ids.clone()
    decoder_ids[:, 0] = 1
    gen = generator(5)
    got = model.encode_itc_itg(model.image_context(image, image_mask), ids, mask, decoder_ids)
    query = model.encode_image(model.image_context(image, image_mask))
    want = (query.hidden, model.encode_text(ids, mask), model.decode(decoder_ids, mask, query.cache)[0])
    weights = [torch.randn(w.shape, generator=gen, device=w.device) for w in want]
    for name, g, w in zip(("queries", "text", "logits"), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    grads = [grads_of(model, sum((o * r).sum() for o, r in zip(outs, weights, strict=True))) for outs in (got, want)]
    assert grads[0].keys() == grads[1].keys()
    for name in ("query_tokens", "layers.0.cross_attn.key.weight", "layers.1.self_attn.value.weight"):
        assert grads[1][name].abs().max() > 0, name
    for name, g in grads[1].items():
        torch.testing.assert_close(grads[0][name], g, atol=5e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
