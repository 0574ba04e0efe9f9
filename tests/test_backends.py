"""Every attention backend computes the reference's numbers through the one functional API."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from blip2_fast.attention import MaskKind, attention, attention_ref

from kernel_device import DEVICE, generator

pytestmark = pytest.mark.usefixtures("kernel_device")

B, H, D = 2, 2, 32
PADDINGS = ("none", "lengths", "vector")
SHAPES = [(32, 67, 67), (32, 35, 67), (32, 1, 67), (7, 12, 12)]
SHAPE_IDS = ["full67", "itg35", "decode1", "q7t5"]
HAS_XFORMERS = importlib.util.find_spec("xformers") is not None


def inputs(n_query, n_rows, n_keys, padding, seed=0, dtype=torch.float32, device=DEVICE):
    gen = generator(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=gen) for n in (n_rows, n_keys, n_keys))
    pad = {}
    if padding == "lengths":
        pad["key_lengths"] = torch.tensor([n_keys, n_query + (n_keys - n_query) // 2])
    elif padding == "vector":
        valid = torch.rand(B, n_keys, generator=gen) > 0.3
        valid[:, 0] = True
        pad["key_padding"] = valid
    g = torch.randn(B, H, n_rows, D, generator=gen)
    move = lambda t: t.to(device)
    return (
        *(move(t).to(dtype) for t in (q, k, v)),
        {name: move(t) for name, t in pad.items()},
        move(g).to(dtype),
    )


def grads(backend, q, k, v, g, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, backend=backend, **kw)
    return (out, *torch.autograd.grad(out, (q, k, v), g))


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("kind", list(MaskKind), ids=lambda k: k.name)
def test_sdpa_matches_reference_with_grads(kind, padding, shape):
    n_query, n_rows, n_keys = shape
    q, k, v, pad, g = inputs(n_query, n_rows, n_keys, padding)
    kw = dict(mask_kind=kind, n_query=n_query, **pad)
    for name, a, b in zip(
        ("out", "dq", "dk", "dv"), grads("sdpa", q, k, v, g, **kw), grads("reference", q, k, v, g, **kw), strict=True
    ):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("kind", list(MaskKind), ids=lambda k: k.name)
def test_flex_forward_matches_reference(kind, padding, shape):
    """On CPU FlexAttention runs the forward only (PyTorch has no CPU flex backward)."""
    n_query, n_rows, n_keys = shape
    q, k, v, pad, _ = inputs(n_query, n_rows, n_keys, padding, seed=1)
    kw = dict(mask_kind=kind, n_query=n_query, **pad)
    torch.testing.assert_close(
        attention(q, k, v, backend="flex", **kw), attention_ref(q, k, v, **kw), atol=2e-5, rtol=0
    )


def test_flex_cross_attention_with_fewer_keys_than_rows():
    q, k, v, pad, _ = inputs(0, 32, 20, "vector", seed=2)
    kw = dict(mask_kind=MaskKind.BIDIRECTIONAL, **pad)
    torch.testing.assert_close(
        attention(q, k, v, backend="flex", **kw), attention_ref(q, k, v, **kw), atol=2e-5, rtol=0
    )


def test_flex_block_mask_is_built_once_per_padding_tensor():
    from blip2_fast.kernels import flex

    flex.clear_block_mask_cache()
    valid = torch.ones(B, 67, dtype=torch.bool)
    valid[1, 50:] = False
    a = flex.block_mask_for(MaskKind.MULTIMODAL_CAUSAL, 32, B, 67, 67, torch.device(DEVICE), key_padding=valid)
    b = flex.block_mask_for(MaskKind.MULTIMODAL_CAUSAL, 32, B, 67, 67, torch.device(DEVICE), key_padding=valid)
    assert a is b  # every layer of one batch reuses it
    c = flex.block_mask_for(MaskKind.MULTIMODAL_CAUSAL, 32, B, 67, 67, torch.device(DEVICE), key_padding=valid.clone())
    assert c is not a  # the next batch's padding tensor
    d = flex.block_mask_for(MaskKind.UNIMODAL, 32, B, 67, 67, torch.device(DEVICE), key_padding=valid)
    assert d is not a
    valid[0, 60:] = False  # changed in place: the cached mask would be stale
    e = flex.block_mask_for(MaskKind.MULTIMODAL_CAUSAL, 32, B, 67, 67, torch.device(DEVICE), key_padding=valid)
    assert e is not a
    q, k, v, _, _ = inputs(32, 67, 67, "none", seed=3)
    kw = dict(mask_kind=MaskKind.MULTIMODAL_CAUSAL, n_query=32, key_padding=valid)
    torch.testing.assert_close(
        attention(q, k, v, backend="flex", **kw), attention_ref(q, k, v, **kw), atol=2e-5, rtol=0
    )


def test_compiled_flex_serves_every_mask_from_one_compile(monkeypatch):
    """A mask kind, n_query or padding of its own must not recompile the compiled flex: dynamo allows a few
    recompiles per function, then runs flex eagerly (its full scores matrix) for every later call."""
    import torch._dynamo

    from blip2_fast.kernels import flex

    # dynamo's guards, not inductor's kernels, decide recompiles: the eager backend keeps this test quick
    monkeypatch.setattr(flex, "_compiled_flex", torch.compile(flex.flex_attention, backend="eager"))
    flex.clear_block_mask_cache()
    torch._dynamo.reset()
    q, k, v, _, _ = inputs(32, 67, 67, "none", seed=4)
    cases = [(kind, n_query, padding) for kind in MaskKind for n_query in (32, 3) for padding in PADDINGS]
    for i, (kind, n_query, padding) in enumerate(cases):
        pad = inputs(n_query, 67, 67, padding, seed=5)[3]
        kw = dict(mask_kind=kind, n_query=n_query, **pad)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            got = flex.attention_flex(q, k, v, compiled=True, **kw)
        torch.testing.assert_close(got, attention_ref(q, k, v, **kw), atol=2e-5, rtol=0, msg=str(kw))


def test_compiled_flex_matches_reference():
    """Inductor's flex kernel built from our mask_mod (its tensors read inside the kernel), per mask kind;
    on CPU a compile of ~10 s, on a GPU the Triton template training uses."""
    from blip2_fast.kernels import flex

    for kind, n_query, n_rows, n_keys, padding in [
        (MaskKind.MULTIMODAL_CAUSAL, 32, 67, 67, "vector"),
        (MaskKind.UNIMODAL, 32, 67, 67, "none"),
        (MaskKind.BIDIRECTIONAL, 0, 32, 257, "lengths"),
    ]:
        q, k, v, pad, _ = inputs(n_query, n_rows, n_keys, padding, seed=6)
        kw = dict(mask_kind=kind, n_query=n_query, **pad)
        got = flex.attention_flex(q, k, v, compiled=True, **kw)
        torch.testing.assert_close(got, attention_ref(q, k, v, **kw), atol=2e-5, rtol=0, msg=str(kw))


def test_flex_rejects_dropout_clearly():
    q, k, v, _, _ = inputs(7, 12, 12, "none")
    with pytest.raises(ValueError, match="no attention dropout"):
        attention(q, k, v, mask_kind=MaskKind.BIDIRECTIONAL, dropout_p=0.1, backend="flex")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs a GPU")
@pytest.mark.parametrize("kind", list(MaskKind), ids=lambda k: k.name)
def test_flex_grads_match_reference_gpu(kind):
    q, k, v, pad, g = inputs(32, 67, 67, "vector", seed=4, device="cuda")
    kw = dict(mask_kind=kind, n_query=32, **pad)
    for a, b in zip(grads("flex", q, k, v, g, **kw), grads("reference", q, k, v, g, **kw), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)


@pytest.mark.skipif(not HAS_XFORMERS, reason="xformers is not installed (no CPU wheel); runs on GPU machines with it")
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("kind", list(MaskKind), ids=lambda k: k.name)
def test_xformers_matches_reference(kind, padding):
    if not torch.cuda.is_available():
        pytest.skip("xformers' kernels need a GPU")
    q, k, v, pad, g = inputs(32, 67, 67, padding, seed=5, dtype=torch.float16, device="cuda")
    kw = dict(mask_kind=kind, n_query=32, **pad)
    want = grads("reference", q.float(), k.float(), v.float(), g.float(), **kw)
    for a, b in zip(grads("xformers", q, k, v, g, **kw), want, strict=True):
        torch.testing.assert_close(a.float(), b, atol=5e-3, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
@pytest.mark.parametrize("kind", list(MaskKind), ids=lambda k: k.name)
def test_rows_that_see_nothing_are_zero_on_every_backend(kind, backend):
    q, k, v, _, g = inputs(4, 12, 12, "none", seed=6)
    lengths = torch.tensor([12, 4])  # sequence 1 has no text key: its text rows see nothing under UNIMODAL
    kw = dict(mask_kind=kind, n_query=4, key_lengths=lengths)
    got, want = grads(backend, q, k, v, g, **kw), grads("reference", q, k, v, g, **kw)
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    flex_out = attention(q, k, v, backend="flex", **kw)
    torch.testing.assert_close(flex_out, want[0], atol=2e-5, rtol=0)


def test_unknown_backend_is_rejected():
    q, k, v, _, _ = inputs(7, 12, 12, "none")
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'; expected one of"):
        attention(q, k, v, mask_kind=MaskKind.BIDIRECTIONAL, backend="cuda")
