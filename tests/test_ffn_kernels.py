"""Fused FFN / residual LayerNorm kernels against their references in blip2_fast.layers (Triton interpreter)."""

import pytest
import torch
import torch.nn.functional as F

from blip2_fast.config import QFormerConfig
from blip2_fast.kernels.ffn import ffn, residual_norm
from blip2_fast.layers import FeedForward, ResidualNorm, ffn_ref, residual_norm_ref
from blip2_fast.qformer import QFormer

from kernel_device import DEVICE, generator

pytestmark = pytest.mark.usefixtures("kernel_device")

EPS = 1e-12
FFN_GRADS = ("x", "up_w", "up_b", "down_w", "down_b", "norm_w", "norm_b")
RN_GRADS = ("x", "residual", "w", "b", "norm_w", "norm_b")


def _ffn_params(batch, seq, hidden, inter, dtype=torch.float32):
    # Weights at BERT-like scales so GELU sees both signs and the LayerNorm weight is not ~1 everywhere.
    g = generator(1)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)
    return [
        r(batch, seq, hidden),
        r(inter, hidden, scale=hidden**-0.5),
        r(inter, scale=0.1),
        r(hidden, inter, scale=inter**-0.5),
        r(hidden, scale=0.1),
        1.0 + r(hidden, scale=0.2),
        r(hidden, scale=0.1),
    ]


def _grads(fn, tensors, dout):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return out.detach(), grads


def _max_err(a, b):
    return (a.float() - b.float()).abs().max().item()


def _check_2x(name, fused, eager, ref, floor):
    """flash-attention's rule: the fused op's error vs fp32 is at most 2x eager's in the same dtype."""
    err, base = _max_err(fused, ref), _max_err(eager, ref)
    assert err <= 2 * base + floor, f"{name}: fused err {err:.3g} > 2 x eager err {base:.3g} + {floor:g}"


# bf16 runs here too: the kernels cast every load to fp32 (the interpreter mishandles bf16 arithmetic), and
# its truncating fp32 -> bf16 stores stay within the 2x rule; the GPU test below checks bf16 at full size.
LOW = [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("seq", [67, 1])
def test_ffn_parity(dtype, seq):
    batch, hidden, inter = 2, 96, 384  # 96: not a power of two, masked columns
    params = _ffn_params(batch, seq, hidden, inter)
    dout = torch.randn(batch, seq, hidden)
    ref_out, ref_g = _grads(lambda *t: ffn_ref(*t, EPS), params, dout)
    fused_out, fused_g = _grads(lambda *t: ffn(*t, EPS), [p.to(dtype) for p in params], dout)
    if dtype == torch.float32:
        torch.testing.assert_close(fused_out, ref_out, rtol=1e-5, atol=1e-5)
        for name, a, b in zip(FFN_GRADS, fused_g, ref_g, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"grad {name}")
        return
    eager_out, eager_g = _grads(lambda *t: ffn_ref(*t, EPS), [p.to(dtype) for p in params], dout)
    _check_2x("out", fused_out, eager_out, ref_out, 1e-3)
    for name, a, e, b in zip(FFN_GRADS, fused_g, eager_g, ref_g, strict=True):
        assert a.dtype == dtype
        _check_2x(f"grad {name}", a, e, b, 1e-3 * max(1.0, b.abs().max().item()))


def test_ffn_parity_minilm_width():
    # hidden 384 / intermediate 1536: the MiniLM init the Q-Former is tested with.
    params = _ffn_params(2, 5, 384, 1536)
    dout = torch.randn(2, 5, 384)
    ref_out, ref_g = _grads(lambda *t: ffn_ref(*t, EPS), params, dout)
    out, g = _grads(lambda *t: ffn(*t, EPS), params, dout)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(FFN_GRADS, g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"grad {name}")


def _rn_params(batch, seq, k, n, dtype=torch.float32):
    g = generator(2)
    r = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)
    return [r(batch, seq, k), r(batch, seq, n), r(n, k, scale=k**-0.5), r(n, scale=0.1), 1 + r(n, scale=0.2), r(n)]


@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("seq", [67, 1])
def test_residual_norm_parity(dtype, seq):
    params = _rn_params(3, seq, 80, 96)
    dout = torch.randn(3, seq, 96)
    ref_out, ref_g = _grads(lambda *t: residual_norm_ref(*t, EPS), params, dout)
    fused_out, fused_g = _grads(lambda *t: residual_norm(*t, EPS), [p.to(dtype) for p in params], dout)
    if dtype == torch.float32:
        torch.testing.assert_close(fused_out, ref_out, rtol=1e-5, atol=1e-5)
        for name, a, b in zip(RN_GRADS, fused_g, ref_g, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"grad {name}")
        return
    eager_out, eager_g = _grads(lambda *t: residual_norm_ref(*t, EPS), [p.to(dtype) for p in params], dout)
    _check_2x("out", fused_out, eager_out, ref_out, 1e-3)
    for name, a, e, b in zip(RN_GRADS, fused_g, eager_g, ref_g, strict=True):
        _check_2x(f"grad {name}", a, e, b, 1e-3 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("n", [1024, 1100])
def test_residual_norm_wide_rows(n):
    # 1024 fills the block exactly (no masked columns); 1100 takes the next, 2048-wide block.
    params = _rn_params(1, 5, 64, n)
    dout = torch.randn(1, 5, n)
    ref_out, ref_g = _grads(lambda *t: residual_norm_ref(*t, EPS, 0.0), params, dout)
    out, g = _grads(lambda *t: residual_norm(*t, EPS, 0.0), params, dout)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(RN_GRADS, g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"grad {name}")


def test_non_contiguous_query_and_text_rows():
    # The Q-Former runs the query FFN on x[:, :32] and the text FFN on x[:, 32:], both views of one tensor.
    params = _ffn_params(2, 40, 96, 384)
    x = params[0].requires_grad_()
    dout = torch.randn(2, 40, 96)
    outs = {}
    for name, fn in (("ref", ffn_ref), ("fused", ffn)):
        q = fn(x[:, :32], *params[1:], EPS)
        t = fn(x[:, 32:], *params[1:], EPS, 0.0, 3)
        out = torch.cat([q, t], 1)
        (gx,) = torch.autograd.grad(out, [x], dout)
        outs[name] = (out, gx)
    torch.testing.assert_close(outs["fused"][0], outs["ref"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["fused"][1], outs["ref"][1], rtol=1e-4, atol=1e-4)
    rn = _rn_params(2, 40, 96, 96)
    got = residual_norm(rn[0][:, 32:], rn[1][:, 32:], *rn[2:], EPS)
    torch.testing.assert_close(got, residual_norm_ref(rn[0][:, 32:], rn[1][:, 32:], *rn[2:], EPS))


def test_chunking_is_invisible():
    params = _ffn_params(2, 67, 96, 384)
    dout = torch.randn(2, 67, 96)
    ref_out, ref_g = _grads(lambda *t: ffn_ref(*t, EPS), params, dout)
    results = {c: _grads(lambda *t, c=c: ffn(*t, EPS, 0.0, c), params, dout) for c in (0, 16, 30)}
    # Chunks only split the GEMMs' rows. On CPU each row's arithmetic is then the same; cuBLAS picks its
    # algorithm, and with it the summation order, by the row count, so on CUDA they agree to rounding.
    same = dict(rtol=0, atol=1e-6) if DEVICE == "cpu" else dict(rtol=1e-5, atol=1e-5)
    for c, (out, g) in results.items():
        torch.testing.assert_close(out, results[0][0], **same, msg=f"chunk {c}")
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
        for name, a, b, b0 in zip(FFN_GRADS, g, ref_g, results[0][1], strict=True):
            torch.testing.assert_close(a, b0, rtol=1e-5, atol=1e-5, msg=f"chunk {c} grad {name} vs unchunked")
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"chunk {c} grad {name} vs reference")


def test_ffn_without_recompute_matches_recompute():
    # recompute=False keeps x @ up.T from the forward; the backward must be the same arithmetic.
    params = _ffn_params(2, 67, 96, 384)
    dout = torch.randn(2, 67, 96)
    a_out, a_g = _grads(lambda *t: ffn(*t, EPS, 0.2, 30, seed=11), params, dout)
    b_out, b_g = _grads(lambda *t: ffn(*t, EPS, 0.2, 30, seed=11, recompute=False), params, dout)
    torch.testing.assert_close(b_out, a_out, rtol=0, atol=0)
    for name, a, b in zip(FFN_GRADS, b_g, a_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"grad {name}")
    ref_out, ref_g = _grads(lambda *t: ffn_ref(*t, EPS), params, dout)
    leaves = [t.clone().requires_grad_() for t in params]
    out = ffn(*leaves, EPS, recompute=False)
    # Twice over one graph: the backward must leave the kept pre-activation intact.
    g = torch.autograd.grad(out, leaves, dout, retain_graph=True)
    g2 = torch.autograd.grad(out, leaves, dout)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, a, a2, b in zip(FFN_GRADS, g, g2, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"grad {name}")
        torch.testing.assert_close(a2, a, rtol=0, atol=0, msg=f"second backward, grad {name}")


@pytest.mark.parametrize("op", ["ffn", "residual_norm"])
def test_autocast_follows_eager_autocast(op):
    """Under torch.autocast the dense layers run in half precision and LayerNorm in fp32, with an fp32 output,
    as eager code does: the fused op is as close to the fp32 result as eager autocast is (the 2x rule)."""
    fused_fn, ref_fn = (ffn, ffn_ref) if op == "ffn" else (residual_norm, residual_norm_ref)
    params = _ffn_params(2, 9, 96, 384) if op == "ffn" else _rn_params(2, 9, 80, 96)
    params = [t.requires_grad_() for t in params]
    names = FFN_GRADS if op == "ffn" else RN_GRADS
    exact_out = ref_fn(*params, EPS)
    exact_grads = torch.autograd.grad(exact_out.sum(), params)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out, ref = fused_fn(*params, EPS), ref_fn(*params, EPS)
    assert out.dtype == ref.dtype == torch.float32
    _check_2x("out", out, ref, exact_out, 1e-4)
    grads, ref_grads = torch.autograd.grad(out.sum(), params), torch.autograd.grad(ref.sum(), params)
    for name, a, b, want in zip(names, grads, ref_grads, exact_grads, strict=True):
        assert a.dtype == torch.float32, name  # fp32 master weights get fp32 grads through the casts
        _check_2x(f"grad {name}", a, b, want, 1e-4 * max(1.0, want.abs().max().item()))


def _ffn_with_mask(x, up_w, up_b, down_w, down_b, norm_w, norm_b, keep, p):
    y = F.linear(F.gelu(F.linear(x, up_w, up_b)), down_w, down_b) * keep / (1 - p)
    return F.layer_norm(x + y, (x.shape[-1],), norm_w, norm_b, EPS)


def test_ffn_dropout_matches_reference_given_the_mask():
    p = 0.25
    params = _ffn_params(2, 67, 96, 384)
    dout = torch.randn(2, 67, 96)
    _, keep = ffn(*params, EPS, p, 16, seed=123, return_mask=True)
    assert keep.dtype == torch.bool and keep.shape == params[0].shape
    ref_out, ref_g = _grads(lambda *t: _ffn_with_mask(*t, keep, p), params, dout)
    # The backward regenerates the mask from the seed; chunking must not change it.
    out, g = _grads(lambda *t: ffn(*t, EPS, p, 30, seed=123), params, dout)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(FFN_GRADS, g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"grad {name}")


def test_residual_norm_dropout_matches_reference_given_the_mask():
    p = 0.1
    x, res, w, b, nw, nb = _rn_params(2, 67, 80, 96)
    dout = torch.randn(2, 67, 96)
    _, keep = residual_norm(x, res, w, b, nw, nb, EPS, p, seed=7, return_mask=True)
    manual = lambda x, res, w, b, nw, nb: F.layer_norm(F.linear(x, w, b) * keep / (1 - p) + res, (96,), nw, nb, EPS)
    ref_out, ref_g = _grads(manual, [x, res, w, b, nw, nb], dout)
    out, g = _grads(lambda *t: residual_norm(*t, EPS, p, seed=7), [x, res, w, b, nw, nb], dout)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(RN_GRADS, g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"grad {name}")


def test_seed_is_drawn_from_the_cpu_generator_whatever_the_default_device():
    # Under torch.set_default_device a bare draw would use that device's generator and sync on .item();
    # meta cannot sync at all, so a draw there fails loudly.
    params, rn = _ffn_params(2, 5, 32, 64), _rn_params(2, 5, 32, 32)
    state = torch.get_rng_state()
    with torch.device("meta"):
        ffn(*params, EPS, 0.1)
        after_ffn = torch.get_rng_state()
        residual_norm(*rn, EPS, 0.1)
    assert not torch.equal(after_ffn, state) and not torch.equal(torch.get_rng_state(), after_ffn)


def test_dropout_rng():
    params = _ffn_params(2, 67, 96, 384)
    p = 0.1
    out_a, keep_a = ffn(*params, EPS, p, seed=5, return_mask=True)
    out_b, keep_b = ffn(*params, EPS, p, seed=5, return_mask=True)
    _, keep_c = ffn(*params, EPS, p, seed=6, return_mask=True)
    assert torch.equal(out_a, out_b) and torch.equal(keep_a, keep_b)
    assert not torch.equal(keep_a, keep_c)
    # 12864 draws: the keep rate's standard deviation is 0.0026.
    assert abs(keep_a.float().mean().item() - (1 - p)) < 0.015
    assert abs(keep_c.float().mean().item() - (1 - p)) < 0.015
    # p = 0 is no dropout at all, whatever the seed.
    _, keep0 = ffn(*params, EPS, 0.0, seed=5, return_mask=True)
    assert keep0.all()
    torch.testing.assert_close(ffn(*params, EPS, 0.0, seed=5), ffn(*params, EPS, 0.0, seed=9), rtol=0, atol=0)
    # Without a seed one is drawn from torch's generator: reproducible under manual_seed.
    torch.manual_seed(3)
    a = ffn(*params, EPS, p)
    torch.manual_seed(3)
    torch.testing.assert_close(ffn(*params, EPS, p), a, rtol=0, atol=0)
    # ...and only when there is dropout: eval passes leave torch's generator where the reference leaves it.
    state = torch.get_rng_state()
    ffn(*params, EPS, 0.0)
    residual_norm(*_rn_params(2, 3, 80, 96), EPS, 0.0)
    assert torch.equal(torch.get_rng_state(), state)
    ffn(*params, EPS, p)
    assert not torch.equal(torch.get_rng_state(), state)


def test_activation_checkpointing_replays_the_same_dropout():
    # torch.utils.checkpoint reruns the forward in the backward; the seed must come out the same there.
    from torch.utils.checkpoint import checkpoint

    params = _ffn_params(2, 9, 96, 384)
    dout = torch.randn(2, 9, 96)
    torch.manual_seed(4)
    plain_out, plain_g = _grads(lambda *t: ffn(*t, EPS, 0.3), params, dout)
    torch.manual_seed(4)
    ckpt_out, ckpt_g = _grads(lambda *t: checkpoint(ffn, *t, EPS, 0.3, use_reentrant=False), params, dout)
    torch.testing.assert_close(ckpt_out, plain_out, rtol=0, atol=0)
    for name, a, b in zip(FFN_GRADS, ckpt_g, plain_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=f"grad {name}")


def test_modules_dispatch_to_the_kernels():
    torch.manual_seed(0)
    ff = FeedForward(96, 384, EPS, dropout=0.1, chunk_size=16).eval()
    rn = ResidualNorm(80, 96, EPS, dropout=0.1).eval()
    x, r = torch.randn(2, 9, 96), torch.randn(2, 9, 80)
    torch.testing.assert_close(ff(x, backend="triton"), ff(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rn(r, x, backend="triton"), rn(r, x), rtol=1e-5, atol=1e-5)


def _saved_activation_bytes(fn, params, skip):
    """Bytes of distinct tensors autograd saves for backward during ``fn``, parameters excluded."""
    skip_ptrs = {t.untyped_storage().data_ptr() for t in skip}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip_ptrs:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*params)
    return sum(seen.values())


def test_ffn_saves_at_most_60_percent_of_reference_activations():
    # A realistic Q-Former text FFN: B=4, 67 tokens, BERT-base widths, fp32, training (dropout 0.1).
    params = [t.requires_grad_() for t in _ffn_params(4, 67, 768, 3072)]
    weights = params[1:]
    ref = _saved_activation_bytes(lambda *t: ffn_ref(*t, EPS, 0.1), params, weights)
    fused = _saved_activation_bytes(lambda *t: ffn(*t, EPS, 0.1), params, weights)
    # Fused keeps x, the pre-norm sum and fp32 (mean, rstd): 2 x 268 x 768 x 4 B + 2 x 268 x 4 B.
    assert fused == 2 * 268 * 768 * 4 + 2 * 268 * 4
    assert fused <= 0.6 * ref, f"fused saves {fused} B, reference {ref} B"
    # Keeping the (rows, 3072) pre-activation instead of recomputing it still saves well under the reference.
    kept = _saved_activation_bytes(lambda *t: ffn(*t, EPS, 0.1, recompute=False), params, weights)
    assert kept == fused + 268 * 3072 * 4
    assert kept <= 0.6 * ref, f"fused (recompute=False) saves {kept} B, reference {ref} B"


def test_qformer_config_chooses_whether_the_ffn_backward_recomputes():
    weights_of = lambda ff: list(ff.parameters())
    x = torch.randn(2, 9, 96, requires_grad=True)
    saved, grads = {}, {}
    for recompute in (True, False):
        config = QFormerConfig.preset("tiny", hidden_size=96, intermediate_size=384, ffn_recompute=recompute)
        torch.manual_seed(0)  # the same weights for both
        layer = QFormer(config).layers[0]
        assert layer.ffn_query.recompute is recompute and layer.ffn_text.recompute is recompute
        ff = layer.ffn_query.eval()
        saved[recompute] = _saved_activation_bytes(lambda t, ff=ff: ff(t, backend="triton"), [x], weights_of(ff))
        grads[recompute] = torch.autograd.grad(ff(x, backend="triton").sum(), [x, *weights_of(ff)])
    assert saved[False] == saved[True] + 2 * 9 * 384 * 4  # the (rows, I) pre-activation, kept
    for a, b in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_input_validation():
    params = _ffn_params(2, 3, 96, 384)
    with pytest.raises(ValueError, match=r"up_weight must have shape \(I, H\) with H = 96"):
        ffn(params[0], params[1][:, :50], *params[2:], EPS)
    with pytest.raises(ValueError, match=r"down_weight must have shape \(H, I\) = \(96, 384\)"):
        ffn(params[0], params[1], params[2], params[3].t(), *params[4:], EPS)
    with pytest.raises(ValueError, match=r"norm_weight must have shape \(96,\)"):
        ffn(*params[:5], params[5][:10], params[6], EPS)
    with pytest.raises(ValueError, match="up_weight must have dtype torch.float32 like the input"):
        ffn(params[0], params[1].half(), *params[2:], EPS)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\)"):
        ffn(*params, EPS, 1.0)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 0"):
        ffn(*params, EPS, 0.0, -1)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        ffn(params[0].double(), *params[1:], EPS)
    with pytest.raises(ValueError, match="seed must be an int"):
        ffn(*params, EPS, 0.1, seed=-1)
    x, res, w, b, nw, nb = _rn_params(2, 3, 80, 96)
    with pytest.raises(ValueError, match=r"residual must have shape \(2, 3\) \+ \(N,\)"):
        residual_norm(x, res[:, :2], w, b, nw, nb, EPS)
    with pytest.raises(ValueError, match=r"weight must have shape \(N, K\) = \(96, 80\)"):
        residual_norm(x, res, w.t(), b, nw, nb, EPS)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="full-size low-precision parity needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_parity_low_precision(dtype):
    dev = "cuda"
    params = [t.to(dev) for t in _ffn_params(8, 67, 768, 3072)]
    dout = torch.randn(8, 67, 768, device=dev)
    ref_out, ref_g = _grads(lambda *t: ffn_ref(*t, EPS), params, dout)
    eager_out, eager_g = _grads(lambda *t: ffn_ref(*t, EPS), [p.to(dtype) for p in params], dout)
    out, g = _grads(lambda *t: ffn(*t, EPS, 0.0, 32), [p.to(dtype) for p in params], dout)
    _check_2x("out", out, eager_out, ref_out, 1e-3)
    for name, a, e, b in zip(FFN_GRADS, g, eager_g, ref_g, strict=True):
        _check_2x(f"grad {name}", a, e, b, 1e-3 * max(1.0, b.abs().max().item()))
    rn = [t.to(dev) for t in _rn_params(8, 67, 768, 768)]
    rdout = torch.randn(8, 67, 768, device=dev)
    ref_out, ref_g = _grads(lambda *t: residual_norm_ref(*t, EPS), rn, rdout)
    eager_out, eager_g = _grads(lambda *t: residual_norm_ref(*t, EPS), [p.to(dtype) for p in rn], rdout)
    out, g = _grads(lambda *t: residual_norm(*t, EPS), [p.to(dtype) for p in rn], rdout)
    _check_2x("out", out, eager_out, ref_out, 1e-3)
    for name, a, e, b in zip(RN_GRADS, g, eager_g, ref_g, strict=True):
        _check_2x(f"grad {name}", a, e, b, 1e-3 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("op", ["ffn", "residual_norm"])
def test_row_slices_are_read_in_place_with_the_reference_numbers(op, monkeypatch):
    """The Q-Former hands these blocks row slices of a longer sequence (x[:, :Q]: the residual of the
    cross-attention output block, the FFN input), and their outputs are concatenated, so the backward gets a
    slice of the concatenation's grad. The kernels read both in place (strided rows); the numbers are the
    reference's."""
    batch, seq, n_query, hidden, inter = 2, 9, 4, 96, 384
    g = generator(7)
    full = torch.randn(batch, seq, hidden, generator=g)
    rest = torch.randn(batch, seq - n_query, hidden, generator=g)
    dout = torch.randn(batch, seq, hidden, generator=g)
    params = _ffn_params(batch, n_query, hidden, inter)[1:] if op == "ffn" else [
        torch.randn(batch, n_query, hidden, generator=g),  # the attention context (the dense layer's input)
        torch.randn(hidden, hidden, generator=g) * hidden**-0.5,
        torch.randn(hidden, generator=g) * 0.1,
        1.0 + 0.2 * torch.randn(hidden, generator=g),
        0.1 * torch.randn(hidden, generator=g),
    ]  # fmt: skip

    def run(fused):
        leaves = [t.detach().clone().requires_grad_() for t in (full, *params)]
        rows = leaves[0][:, :n_query]  # a view: strided rows
        if op == "ffn":
            out = (ffn if fused else ffn_ref)(rows, *leaves[1:], EPS)
        else:
            ctx, w, b, nw, nb = leaves[1:]
            out = (residual_norm if fused else residual_norm_ref)(ctx, rows, w, b, nw, nb, EPS)
        total = torch.cat([out, rest], dim=1)  # its backward hands `out` a slice of dout
        return out.detach(), torch.autograd.grad(total, leaves, dout)

    import blip2_fast.kernels.ffn as kffn

    read_in_place = []

    def rows_of(t, rows, sig):
        got = real_rows_of(t, rows, sig)
        read_in_place.append(got[0] is t and got[1] < rows)
        return got

    want_out, want_grads = run(fused=False)
    real_rows_of = kffn._rows_of
    monkeypatch.setattr(kffn, "_rows_of", rows_of)
    got_out, got_grads = run(fused=True)
    torch.testing.assert_close(got_out, want_out, rtol=1e-5, atol=1e-5)
    for i, (a, b) in enumerate(zip(got_grads, want_grads, strict=True)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"grad {i}")
    # residual (the FFN's is its own contiguous copy of the rows, made for its GEMMs) and the incoming grad
    assert read_in_place == ([False, True] if op == "ffn" else [True, True]), read_in_place
