"""The Q-Former's passes are capturable: whole-graph torch.compile with no graph break, and no host sync.

Every backend, in training mode (dropout on), through the four passes of a stage-1 step (query pass,
text pass, matching, decoding over the query cache) and their backward. The triton kernels run under the
interpreter here; under torch.compile they are the custom ops ``blip2_fast::*`` (aot_eager runs them as is).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blip2_fast.config import QFormerConfig
from blip2_fast.qformer import QFormer

from random_weights import randomize

BACKENDS = ["reference", "sdpa", "triton"]
HOST_SYNCS = {"_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal"}


def _model(backend: str) -> QFormer:
    model = QFormer(QFormerConfig.preset("tiny", backend=backend))
    return randomize(model, seed=1).train()


def _inputs():
    g = torch.Generator().manual_seed(0)
    image = torch.randn(2, 9, QFormerConfig.preset("tiny").encoder_width, generator=g)
    ids = torch.randint(1, 100, (2, 7), generator=g)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 5:] = False
    return image, ids, mask


def _step(model: QFormer):
    def step(image, ids, mask):
        query = model.encode_image(image)
        text = model.encode_text(ids, mask)
        matched = model.match(image, ids, mask)
        logits, _ = model.decode(ids, mask, query.cache)
        return query.hidden.square().mean() + text.square().mean() + matched.square().mean() + logits.square().mean()

    return step


class _CountSyncs(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in HOST_SYNCS:
            self.seen.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_training_step_syncs_nothing_with_the_host(backend):
    model = _model(backend)
    with _CountSyncs() as syncs:
        _step(model)(*_inputs()).backward()
    assert syncs.seen == [], syncs.seen


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_matches_eager(backend):
    """fullgraph=True fails on any break; without dropout the compiled step gives the eager numbers and grads."""
    torch._dynamo.reset()
    model = _model(backend).eval()
    step = _step(model)
    eager = step(*_inputs())
    eager_grads = torch.autograd.grad(eager, list(model.parameters()), allow_unused=True)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*_inputs())
    grads = torch.autograd.grad(compiled, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(compiled, eager)
    for got, want in zip(grads, eager_grads, strict=True):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    model.train()  # and with dropout: it compiles the same way and trains
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(*_inputs())
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_stage1_loss_compiles_whole_and_syncs_nothing(backend):
    """ITC + ITM (hard negatives sampled on the device) + ITG, forward and backward."""
    from blip2_fast.losses import Stage1Loss

    torch._dynamo.reset()
    loss_module = Stage1Loss(_model(backend), bos_token_id=1, seed=3)
    image, ids, mask = _inputs()
    image_ids = torch.tensor([0, 1])

    def step(image, ids, mask, image_ids):
        return loss_module(image, ids, mask, image_ids).loss

    with _CountSyncs() as syncs:
        step(image, ids, mask, image_ids).backward()
    assert syncs.seen == [], syncs.seen
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(image, ids, mask, image_ids)  # fails on a break
    loss.backward()
    assert torch.isfinite(loss)
