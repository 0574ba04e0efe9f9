"""The fused Triton attention against the spec (``attention_ref``), under the Triton interpreter on CPU.

Outputs and dQ/dK/dV for every mask kind x key padding x odd lengths, head dims 16-128, fp32 and fp16 (the 2x
rule), dropout through the debug keep-mask, whole tiles a mask hides never read, bad input rejected, and every
shipped kernel config compiled ahead of time for sm_80 and sm_90 without spills.
"""

from __future__ import annotations

import math

import pytest
import torch

from blip2_fast.attention import MaskKind, attention_ref, dense_mask, key_valid_mask
from blip2_fast.kernels import attention as kattn
from blip2_fast.kernels.attention import AttnConfig, attention

from kernel_device import generator

pytestmark = pytest.mark.usefixtures("kernel_device")

B, H = 2, 2
PADDINGS = ("none", "lengths", "vector")
# (n_query, Lq, Lk): 32 queries + 35 text; one decode row over a cache; 7 queries + 5 text
SHAPES = [(32, 67, 67), (32, 1, 67), (7, 12, 12)]
SHAPE_IDS = ["full67", "decode1", "q7t5"]


def param_id(x) -> str:
    return x.name if isinstance(x, MaskKind) else str(x)


def make_padding(kind: str, n_query: int, n_keys: int, gen: torch.Generator) -> dict:
    if kind == "none":
        return {}
    if kind == "lengths":
        # sequence 0 unpadded, sequence 1 keeps only part of its text (at least one text key when there is text)
        short = n_query + max(1, (n_keys - n_query) // 3) if n_keys > n_query else n_keys
        return {"key_lengths": torch.tensor([n_keys, min(short, n_keys)])}
    valid = torch.rand(B, n_keys, generator=gen) > 0.3  # holes anywhere, queries included
    valid[:, 0] = True
    valid[1, -1] = False  # a padded last key: the loop bound comes from the last valid key
    return {"key_padding": valid}


def qkv(n_rows, n_keys, d, dtype=torch.float32, gen=None):
    q = torch.randn(B, H, n_rows, d, generator=gen).to(dtype)
    k = torch.randn(B, H, n_keys, d, generator=gen).to(dtype)
    v = torch.randn(B, H, n_keys, d, generator=gen).to(dtype)
    return q, k, v


def run_with_grads(fn, q, k, v, grad_out, **kw):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, **kw)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), grad_out)
    return out, dq, dk, dv


def assert_parity(got, want, atol, rtol=0.0, names=("out", "dq", "dk", "dv")):
    for name, a, b in zip(names, got, want, strict=True):
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------------ fp32 parity


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("kind", list(MaskKind), ids=lambda k: k.name)
def test_fp32_parity_every_mask_padding_shape(kind, padding, shape):
    n_query, n_rows, n_keys = shape
    gen = generator(1)
    q, k, v = qkv(n_rows, n_keys, 32, gen=gen)
    pad = make_padding(padding, n_query, n_keys, gen)
    g = torch.randn(B, H, n_rows, 32, generator=gen)
    kw = dict(mask_kind=kind, n_query=n_query, **pad)
    assert_parity(run_with_grads(attention, q, k, v, g, **kw), run_with_grads(attention_ref, q, k, v, g, **kw), 2e-5)


@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("kind", list(MaskKind), ids=lambda k: k.name)
def test_fp32_parity_itg_rows_over_a_query_cache(kind, padding):
    """35 text rows over [32 cached query keys ; 35 text keys]: the gradients reach the cached K/V."""
    gen = generator(14)
    q, k, v = qkv(35, 67, 32, gen=gen)
    g = torch.randn(B, H, 35, 32, generator=gen)
    kw = dict(mask_kind=kind, n_query=32, **make_padding(padding, 32, 67, gen))
    got = run_with_grads(attention, q, k, v, g, **kw)
    assert_parity(got, run_with_grads(attention_ref, q, k, v, g, **kw), 2e-5)
    if kind != MaskKind.UNIMODAL:  # UNIMODAL text rows never see the queries
        assert got[2][:, :, :32].abs().max() > 0 and got[3][:, :, :32].abs().max() > 0


@pytest.mark.parametrize(
    "kind, d",
    [
        (MaskKind.UNIMODAL, 64),
        (MaskKind.BIDIRECTIONAL, 128),
        (MaskKind.MULTIMODAL_CAUSAL, 16),
        (MaskKind.MULTIMODAL_CAUSAL, 128),
    ],
    ids=param_id,
)
def test_fp32_parity_head_dims(kind, d):
    gen = generator(2)
    q, k, v = qkv(67, 67, d, gen=gen)
    g = torch.randn(B, H, 67, d, generator=gen)
    kw = dict(mask_kind=kind, n_query=32, key_lengths=torch.tensor([67, 45]))
    assert_parity(run_with_grads(attention, q, k, v, g, **kw), run_with_grads(attention_ref, q, k, v, g, **kw), 3e-5)


@pytest.mark.parametrize("n_rows, n_keys", [(32, 257), (32, 20)], ids=["image257", "fewer_keys"])
def test_cross_attention_with_image_padding(n_rows, n_keys):
    gen = generator(3)
    q, k, v = qkv(n_rows, n_keys, 64, gen=gen)
    valid = torch.ones(B, n_keys, dtype=torch.bool)
    valid[1, n_keys // 2 :] = False
    g = torch.randn(B, H, n_rows, 64, generator=gen)
    kw = dict(mask_kind=MaskKind.BIDIRECTIONAL, n_query=0, key_padding=valid)
    assert_parity(run_with_grads(attention, q, k, v, g, **kw), run_with_grads(attention_ref, q, k, v, g, **kw), 2e-5)


# Small tiles put tile boundaries inside the query block and the text, so the tile-skipping ranges are exercised.
SMALL = AttnConfig(block_m=16, block_n=16, num_warps=4, num_stages=1)


@pytest.mark.parametrize("shape", [(32, 67, 67), (32, 35, 67), (32, 20, 67), (20, 45, 45)], ids=str)
@pytest.mark.parametrize("kind", list(MaskKind), ids=lambda k: k.name)
def test_small_tiles_parity(kind, shape):
    n_query, n_rows, n_keys = shape
    gen = generator(4)
    q, k, v = qkv(n_rows, n_keys, 32, gen=gen)
    g = torch.randn(B, H, n_rows, 32, generator=gen)
    kw = dict(mask_kind=kind, n_query=n_query, key_lengths=torch.tensor([n_keys, n_keys - 3]))
    got = run_with_grads(attention, q, k, v, g, config=SMALL, **kw)
    assert_parity(got, run_with_grads(attention_ref, q, k, v, g, **kw), 2e-5)


def test_hidden_tiles_are_never_read():
    """NaN in whole key tiles a mask hides: 0 * NaN would poison any tile that were visited anyway."""
    gen = generator(5)
    q, k, v = qkv(67, 67, 32, gen=gen)
    lengths = torch.tensor([67, 50])
    clean = dict(q=q, k=k, v=v)

    # UNIMODAL: query rows (tiles 0, 1 of 16) never read the text keys 32..66
    v_text_nan = v.clone()
    v_text_nan[:, :, 32:] = float("nan")
    out = attention(q, k, v_text_nan, mask_kind=MaskKind.UNIMODAL, n_query=32, config=SMALL)
    ref = attention_ref(**clean, mask_kind=MaskKind.UNIMODAL, n_query=32)
    torch.testing.assert_close(out[:, :, :32], ref[:, :, :32], atol=2e-5, rtol=0)
    # ... and text rows never read the query keys below the first text tile (key 32 starts tile 2)
    v_query_nan = v.clone()
    v_query_nan[:, :, :32] = float("nan")
    out = attention(q, k, v_query_nan, mask_kind=MaskKind.UNIMODAL, n_query=32, config=SMALL)
    torch.testing.assert_close(out[:, :, 32:], ref[:, :, 32:], atol=2e-5, rtol=0)

    # MULTIMODAL_CAUSAL: rows 32..47 (one 16-row tile) stop at key 47
    v_future_nan = v.clone()
    v_future_nan[:, :, 48:] = float("nan")
    out = attention(q, k, v_future_nan, mask_kind=MaskKind.MULTIMODAL_CAUSAL, n_query=32, config=SMALL)
    ref = attention_ref(**clean, mask_kind=MaskKind.MULTIMODAL_CAUSAL, n_query=32)
    torch.testing.assert_close(out[:, :, :48], ref[:, :, :48], atol=2e-5, rtol=0)

    # key padding: nothing past a sequence's length is read, by any row, forward or backward
    v_pad_nan, k_pad_nan = v.clone(), k.clone()
    v_pad_nan[1, :, 50:] = float("nan")
    k_pad_nan[1, :, 50:] = float("nan")
    g = torch.randn(B, H, 67, 32, generator=gen)
    kw = dict(mask_kind=MaskKind.BIDIRECTIONAL, key_lengths=lengths)
    got = run_with_grads(attention, q, k_pad_nan, v_pad_nan, g, **kw)
    want = run_with_grads(attention_ref, q, k, v, g, **kw)
    assert_parity(got, want, 2e-5)


def test_rows_that_see_nothing_are_zero_with_zero_grads():
    gen = generator(6)
    q, k, v = qkv(12, 12, 32, gen=gen)
    lengths = torch.tensor([12, 4])  # sequence 1: 4 query keys, no text key
    g = torch.randn(B, H, 12, 32, generator=gen)
    kw = dict(mask_kind=MaskKind.UNIMODAL, n_query=4, key_lengths=lengths)
    out, dq, dk, dv = run_with_grads(attention, q, k, v, g, **kw)
    assert out[1, :, 4:].abs().max() == 0 and dq[1, :, 4:].abs().max() == 0
    assert_parity((out, dq, dk, dv), run_with_grads(attention_ref, q, k, v, g, **kw), 2e-5)


@pytest.mark.parametrize("n_rows, n_keys", [(0, 12), (5, 0)])
def test_empty_rows_or_keys(n_rows, n_keys):
    q, k, v = qkv(n_rows, n_keys, 32)
    g = torch.randn(B, H, n_rows, 32)
    kw = dict(mask_kind=MaskKind.BIDIRECTIONAL)
    got = run_with_grads(attention, q, k, v, g, **kw)
    assert_parity(got, run_with_grads(attention_ref, q, k, v, g, **kw), 0.0)


def test_key_lengths_outside_zero_to_lk_are_clamped_like_the_reference():
    q, k, v = qkv(12, 12, 32)
    g = torch.randn(B, H, 12, 32)
    kw = dict(mask_kind=MaskKind.MULTIMODAL_CAUSAL, n_query=7, key_lengths=torch.tensor([100, -3]))
    assert_parity(run_with_grads(attention, q, k, v, g, **kw), run_with_grads(attention_ref, q, k, v, g, **kw), 2e-5)


def test_padding_vector_changed_in_place_is_seen():
    """The loop bound derived from a padding vector is cached per tensor; an in-place edit must not go stale."""
    q, k, v = qkv(12, 40, 32)
    valid = torch.ones(B, 40, dtype=torch.bool)
    valid[1, 5:] = False
    kw = dict(mask_kind=MaskKind.BIDIRECTIONAL, key_padding=valid)
    torch.testing.assert_close(attention(q, k, v, **kw), attention_ref(q, k, v, **kw), atol=2e-5, rtol=0)
    valid[1, 30] = True  # a valid key past the cached bound: it must be read
    torch.testing.assert_close(attention(q, k, v, **kw), attention_ref(q, k, v, **kw), atol=2e-5, rtol=0)


def test_non_contiguous_inputs_are_read_in_place():
    """The Q-Former hands (B, L, H, D) storage viewed as (B, H, L, D); also a strided head dim."""
    gen = generator(7)
    q = torch.randn(B, 67, H, 32, generator=gen).transpose(1, 2)
    k = torch.randn(B, 67, H, 64, generator=gen)[..., ::2].transpose(1, 2)  # stride 2 along D
    v = torch.randn(B, H, 32, 67, generator=gen).transpose(2, 3)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    g = torch.randn(B, H, 67, 32, generator=gen)
    kw = dict(mask_kind=MaskKind.MULTIMODAL_CAUSAL, n_query=32)
    got = run_with_grads(attention, q, k, v, g, **kw)
    assert_parity(got, run_with_grads(attention_ref, q.contiguous(), k.contiguous(), v.contiguous(), g, **kw), 2e-5)
    # the output is stored (B, L, H, D): merging the heads back is a view
    assert got[0].transpose(1, 2).is_contiguous()


def test_decode_reads_a_preallocated_cache_in_place():
    """A cache buffer with room to grow, viewed up to its current length: no concatenation, no copy."""
    gen = generator(15)
    k_buf = torch.full((B, H, 80, 32), float("nan"))  # unwritten slots must never be read
    v_buf = torch.full((B, H, 80, 32), float("nan"))
    k_buf[:, :, :68], v_buf[:, :, :68] = torch.randn(2, B, H, 68, 32, generator=gen)
    q = torch.randn(B, H, 1, 32, generator=gen)
    lengths = torch.tensor([68, 60])  # sequence 1 has padded text in the cache
    kw = dict(mask_kind=MaskKind.MULTIMODAL_CAUSAL, n_query=32, key_lengths=lengths)
    out = attention(q, k_buf[:, :, :68], v_buf[:, :, :68], **kw)
    torch.testing.assert_close(out, attention_ref(q, k_buf[:, :, :68], v_buf[:, :, :68], **kw), atol=2e-5, rtol=0)


def test_backend_switch_reaches_the_kernel():
    from blip2_fast.attention import attention as functional

    gen = generator(8)
    q, k, v = qkv(12, 12, 32, gen=gen)
    kw = dict(mask_kind=MaskKind.MULTIMODAL_CAUSAL, n_query=7)
    torch.testing.assert_close(functional(q, k, v, backend="triton", **kw), attention(q, k, v, **kw), atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------------ fp16: 2x rule


def eager_low_precision(q, k, v, *, mask_kind, n_query, key_lengths=None, key_padding=None):
    """Plain PyTorch attention computed in the inputs' dtype: the error budget of the 2x rule."""
    valid = key_valid_mask(q.shape[0], k.shape[2], key_padding, key_lengths, q.device)
    allowed = dense_mask(mask_kind, n_query, q.shape[2], k.shape[2], valid, q.device)
    scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return probs @ v


@pytest.mark.parametrize(
    "kind, d, padding, shape",
    [
        (MaskKind.UNIMODAL, 32, "vector", (32, 67, 67)),
        (MaskKind.BIDIRECTIONAL, 64, "lengths", (32, 67, 67)),
        (MaskKind.MULTIMODAL_CAUSAL, 64, "vector", (32, 67, 67)),
        (MaskKind.MULTIMODAL_CAUSAL, 128, "lengths", (32, 35, 67)),
    ],
    ids=param_id,
)
def test_fp16_two_x_rule(kind, d, padding, shape):
    n_query, n_rows, n_keys = shape
    gen = generator(9)
    q, k, v = qkv(n_rows, n_keys, d, torch.float16, gen)
    g = torch.randn(B, H, n_rows, d, generator=gen).half()
    kw = dict(mask_kind=kind, n_query=n_query, **make_padding(padding, n_query, n_keys, gen))
    want = run_with_grads(attention_ref, q.float(), k.float(), v.float(), g.float(), **kw)
    got = run_with_grads(attention, q, k, v, g, **kw)
    eager = run_with_grads(eager_low_precision, q, k, v, g, **kw)
    for name, a, e, w in zip(("out", "dq", "dk", "dv"), got, eager, want, strict=True):
        assert a.dtype == torch.float16
        err = (a.float() - w).abs().max().item()
        budget = 2 * (e.float() - w).abs().max().item() + 1e-4
        assert err <= budget, f"{name}: fp16 kernel error {err:.2e} exceeds 2x eager fp16 error + 1e-4 = {budget:.2e}"


def test_bf16_runs_under_the_interpreter():
    """The upcast-after-load path: bf16 inputs give bf16 results within the 2x rule (stores truncate here)."""
    gen = generator(16)
    q, k, v = qkv(67, 67, 64, torch.bfloat16, gen)
    g = torch.randn(B, H, 67, 64, generator=gen).bfloat16()
    kw = dict(mask_kind=MaskKind.MULTIMODAL_CAUSAL, n_query=32, key_lengths=torch.tensor([67, 45]))
    want = run_with_grads(attention_ref, q.float(), k.float(), v.float(), g.float(), **kw)
    got = run_with_grads(attention, q, k, v, g, **kw)
    eager = run_with_grads(eager_low_precision, q, k, v, g, **kw)
    for name, a, e, w in zip(("out", "dq", "dk", "dv"), got, eager, want, strict=True):
        assert a.dtype == torch.bfloat16
        err, budget = (a.float() - w).abs().max().item(), 2 * (e.float() - w).abs().max().item() + 1e-3
        assert err <= budget, f"{name}: bf16 kernel error {err:.2e} exceeds {budget:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 parity needs a GPU: the interpreter misreads bf16")
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("kind", list(MaskKind), ids=lambda k: k.name)
def test_bf16_two_x_rule_gpu(kind, d):
    gen = generator(10)
    q, k, v = (t.cuda() for t in qkv(67, 67, d, torch.bfloat16, gen))
    g = torch.randn(B, H, 67, d, generator=gen).bfloat16().cuda()
    kw = dict(mask_kind=kind, n_query=32, key_lengths=torch.tensor([67, 45], device="cuda"))
    want = run_with_grads(attention_ref, q.float(), k.float(), v.float(), g.float(), **kw)
    got = run_with_grads(attention, q, k, v, g, **kw)
    eager = run_with_grads(eager_low_precision, q, k, v, g, **kw)
    for name, a, e, w in zip(("out", "dq", "dk", "dv"), got, eager, want, strict=True):
        err = (a.float() - w).abs().max().item()
        assert err <= 2 * (e.float() - w).abs().max().item() + 1e-3, name


# ------------------------------------------------------------------------------------- the short-sequence backward


@pytest.fixture
def backward_launches(monkeypatch):
    """The backward kernels each launch runs, by name; the plans cached for signatures are forgotten first (a
    test may change what they decide) and again after."""
    from blip2_fast.kernels.launch import clear_all

    clear_all()
    seen = []
    for name in ("_SHORT_BWD", "_DELTA", "_DKDV", "_DQ"):
        launcher = getattr(kattn, name)
        launch = launcher.launch
        monkeypatch.setattr(launcher, "launch", lambda *a, _n=name, _f=launch, **kw: (seen.append(_n), _f(*a, **kw))[1])
    yield seen
    clear_all()


@pytest.fixture
def short_fp32(monkeypatch, backward_launches):
    """The short-sequence backward in fp32 too: it ships for 16-bit inputs only (IEEE fp32 dot products spill
    there), so this is how its parity is held tight."""
    monkeypatch.setattr(kattn, "SHORT_BWD_DTYPES", (torch.float32, *kattn.SHORT_BWD_DTYPES))
    return backward_launches


SHORT_SHAPES = [*SHAPES, (32, 35, 102), (32, 67, 128)]  # ITG over the query cache; the most keys it takes


@pytest.mark.parametrize("shape", SHORT_SHAPES, ids=str)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize("kind", list(MaskKind), ids=lambda k: k.name)
def test_short_backward_fp32_parity(short_fp32, kind, padding, shape):
    n_query, n_rows, n_keys = shape
    gen = generator(21)
    q, k, v = qkv(n_rows, n_keys, 32, gen=gen)
    g = torch.randn(B, H, n_rows, 32, generator=gen)
    kw = dict(mask_kind=kind, n_query=n_query, **make_padding(padding, n_query, n_keys, gen))
    got = run_with_grads(attention, q, k, v, g, **kw)
    assert short_fp32 == ["_SHORT_BWD"]  # one launch for dQ, dK and dV
    assert_parity(got, run_with_grads(attention_ref, q, k, v, g, **kw), 2e-5)


@pytest.mark.parametrize("kind", list(MaskKind), ids=lambda k: k.name)
def test_short_backward_equals_the_tiled_one_with_dropout(short_fp32, kind):
    """The same Philox keep-mask as the tiled kernels (which the reference holds to, given the mask)."""
    gen = generator(22)
    q, k, v = qkv(67, 67, 64, gen=gen)
    g = torch.randn(B, H, 67, 64, generator=gen)
    kw = dict(mask_kind=kind, n_query=32, key_lengths=torch.tensor([67, 50]), dropout_p=0.2, seed=7)
    short = run_with_grads(attention, q, k, v, g, **kw)
    tiled = run_with_grads(attention, q, k, v, g, config=kattn.BWD_CONFIGS["default"], **kw)
    assert short_fp32 == ["_SHORT_BWD", "_DELTA", "_DKDV", "_DQ"]
    assert_parity(short, tiled, 1e-5)


def test_the_backward_picks_its_kernels_by_key_count_and_dtype(backward_launches):
    """Up to 128 keys in 16-bit (64 at head dim 128): the short kernel; more keys (cross-attention to 257 image
    tokens), or fp32: the tiled three."""
    tiled = ["_DELTA", "_DKDV", "_DQ"]
    for n_keys, d, dtype, kernels in (
        (67, 64, torch.float16, ["_SHORT_BWD"]),
        (128, 32, torch.float16, ["_SHORT_BWD"]),
        (64, 128, torch.float16, ["_SHORT_BWD"]),
        (65, 128, torch.float16, tiled),
        (129, 32, torch.float16, tiled),
        (67, 64, torch.float32, tiled),
    ):
        q, k, v = qkv(32, n_keys, d, dtype)
        run_with_grads(attention, q, k, v, torch.randn(B, H, 32, d).to(dtype), mask_kind=MaskKind.BIDIRECTIONAL)
        assert backward_launches == kernels, (n_keys, d, dtype)
        backward_launches.clear()


# ------------------------------------------------------------------------------------------------------ dropout


def test_dropout_zero_is_the_no_dropout_path_exactly():
    gen = generator(11)
    q, k, v = qkv(67, 67, 32, gen=gen)
    g = torch.randn(B, H, 67, 32, generator=gen)
    kw = dict(mask_kind=MaskKind.MULTIMODAL_CAUSAL, n_query=32, key_lengths=torch.tensor([67, 50]))
    plain = run_with_grads(attention, q, k, v, g, **kw)
    zero = run_with_grads(attention, q, k, v, g, dropout_p=0.0, seed=123, **kw)
    for a, b in zip(plain, zero, strict=True):
        assert torch.equal(a, b)
    out, mask = attention(q, k, v, dropout_p=0.0, return_dropout_mask=True, **kw)
    assert mask is None and torch.equal(out, plain[0])


@pytest.mark.parametrize("kind", [MaskKind.UNIMODAL, MaskKind.MULTIMODAL_CAUSAL], ids=lambda k: k.name)
def test_dropout_matches_reference_given_the_kernel_mask(kind):
    gen = generator(12)
    q, k, v = qkv(67, 67, 32, gen=gen)
    g = torch.randn(B, H, 67, 32, generator=gen)
    p = 0.25
    kw = dict(mask_kind=kind, n_query=32, key_padding=make_padding("vector", 32, 67, gen)["key_padding"])
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out, mask = attention(qr, kr, vr, dropout_p=p, seed=77, return_dropout_mask=True, **kw)
    got = (out, *torch.autograd.grad(out, (qr, kr, vr), g))
    want = run_with_grads(attention_ref, q, k, v, g, dropout_p=p, dropout_mask=mask, **kw)
    assert_parity(got, want, 2e-5)
    # dropout changed something: the same call without it differs
    assert (out - attention(q, k, v, **kw)).abs().max() > 1e-3


def test_dropout_is_deterministic_per_seed_and_keeps_one_minus_p():
    gen = generator(13)
    q, k, v = qkv(35, 67, 32, gen=gen)
    kw = dict(mask_kind=MaskKind.BIDIRECTIONAL, n_query=32, dropout_p=0.1)
    a, mask_a = attention(q, k, v, seed=5, return_dropout_mask=True, **kw)
    b, mask_b = attention(q, k, v, seed=5, return_dropout_mask=True, **kw)
    c, mask_c = attention(q, k, v, seed=6, return_dropout_mask=True, **kw)
    assert torch.equal(a, b) and torch.equal(mask_a, mask_b)
    assert not torch.equal(mask_a, mask_c) and not torch.equal(a, c)
    # each (batch, head) plane draws its own numbers
    assert not torch.equal(mask_a[0, 0], mask_a[0, 1]) and not torch.equal(mask_a[0, 0], mask_a[1, 0])
    n = mask_a.numel()  # 9380 draws: 1 - p within 5 standard deviations
    assert abs(mask_a.float().mean().item() - 0.9) < 5 * math.sqrt(0.09 / n)
    # without a seed, torch's generator picks it: repeatable after torch.manual_seed
    torch.manual_seed(3)
    d = attention(q, k, v, **kw)
    torch.manual_seed(3)
    assert torch.equal(d, attention(q, k, v, **kw))
    # ...its CPU generator, whatever the default device: a draw on another would sync there (meta: fail)
    state = torch.get_rng_state()
    with torch.device("meta"):
        attention(q, k, v, **kw)
    assert not torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_raise_clear_errors():
    q, k, v = qkv(8, 8, 32)
    kw = dict(mask_kind=MaskKind.BIDIRECTIONAL)
    with pytest.raises(ValueError, match="dtype"):
        attention(q.double(), k.double(), v.double(), **kw)
    with pytest.raises(ValueError, match="share one dtype"):
        attention(q.half(), k, v, **kw)
    with pytest.raises(ValueError, match="head dim must be at most 128"):
        attention(*qkv(8, 8, 160), **kw)
    with pytest.raises(ValueError, match="dropout_p"):
        attention(q, k, v, dropout_p=1.0, **kw)
    with pytest.raises(ValueError, match=r"key_padding must have shape \(B, Lk\)"):
        attention(q, k, v, key_padding=torch.ones(B, 9, dtype=torch.bool), **kw)
    with pytest.raises(ValueError, match="key_lengths must be an integer tensor"):
        attention(q, k, v, key_lengths=torch.ones(B), **kw)
    with pytest.raises(ValueError, match="needs Lq <= Lk"):
        attention(*qkv(9, 8, 32), mask_kind=MaskKind.UNIMODAL)
    with pytest.raises(ValueError, match="at least 16 x 16"):
        attention(q, k, v, config=AttnConfig(8, 16, 4, 1), **kw)


# ------------------------------------------------------------------------------------------------------ AOT compile


@pytest.fixture(scope="module")
def aot_results():
    """Both archs compiled in one child process (importing torch there is the slow part)."""
    aot = pytest.importorskip("blip2_fast.kernels.aot")
    jobs = [
        aot.AOTJob.of(fn, sig, consts, arch, warps, stages)
        for arch in (80, 90)
        for fn, sig, consts, warps, stages in kattn.kernel_configs()
    ]
    return list(zip(jobs, aot.compile_many(jobs), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_shipped_config_compiles_without_spills(aot_results, arch):
    results = [(job, r) for job, r in aot_results if job.arch == arch]
    assert len(results) == len(kattn.kernel_configs())
    spilled = [
        (job.name, dict(job.constexprs), r.spill_stores, r.spill_loads, r.local_bytes)
        for job, r in results
        if r.spills or r.local_bytes
    ]
    assert not spilled, f"configs spill on sm_{arch}: {spilled}"
    for _, r in results:
        assert 0 < r.registers <= 255 and r.shared_bytes <= 227 * 1024
