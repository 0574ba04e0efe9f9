"""End to end at the BLIP-2 size (BERT-base Q-Former, 32 queries, 35 text tokens, 257 x 1408 image features;
the CPU ``--quick`` set uses the ``minilm`` preset cut to 2 layers, hidden 384, to fit its time budget).

- ``stage-1 step``: ITC + ITM + ITG forward, backward and an AdamW step, per
  backend, through ``blip2_fast.losses.Stage1Loss`` (the training objective).
- ``qformer forward``: the query pass over an image (``encode_image``) per
  backend, and transformers' ``Blip2QFormerModel`` forward on the same weights,
  the outside baseline. The two are checked to agree before they are timed.

The ratio of the reference stage-1 step to the transformers forward is the CPU
figure anyone can reproduce (``benchmarks/report.py`` prints it).
"""

from __future__ import annotations

import pytest
import torch
from benchutil import CUDA, DEVICE, DTYPE_NAMES, measure, require_backend, sizes

from blip2_fast import QFormer

N_IMAGE, N_TEXT, CLS = 257, 35, 101


def transformers_twin(model: QFormer) -> torch.nn.Module:
    """transformers' Blip2QFormerModel with ``model``'s weights (query pass only: no text embeddings)."""
    from transformers import Blip2QFormerModel

    from blip2_fast.checkpoint import bert_encoder_names, qformer_config_to_transformers

    config = qformer_config_to_transformers(model.config)
    config.use_qformer_text_input = False
    hf = Blip2QFormerModel(config)
    theirs_to_ours = {
        theirs: ours for ours, theirs in bert_encoder_names(model.config, style="hf", text_ffn=True).items()
    }
    ours = model.state_dict()
    hf.load_state_dict({key: ours[theirs_to_ours[key]] for key in hf.state_dict()})
    return hf.to(DEVICE, next(model.parameters()).dtype).eval()


def qformer(request: pytest.FixtureRequest, dtype: torch.dtype, backend: str) -> QFormer:
    torch.manual_seed(0)
    return QFormer(sizes(request.config).qformer_config(backend=backend)).to(DEVICE, dtype)


def text_batch(batch: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    # ordinary word pieces (ids >= 1000 in BERT's vocabulary), [CLS] first; small test vocabularies shrink both
    ids = torch.randint(min(1000, vocab // 2), vocab - 1, (batch, N_TEXT), device=DEVICE)
    ids[:, 0] = CLS if CLS < vocab - 1 else 1
    lengths = torch.randint(8, N_TEXT + 1, (batch,), device=DEVICE)
    lengths[0] = N_TEXT
    mask = torch.arange(N_TEXT, device=DEVICE)[None, :] < lengths[:, None]
    return ids.masked_fill(~mask, 0), mask


# The query pass first: quick, and the outside baseline; a spent --time-budget skips what comes last.
@pytest.mark.parametrize("impl", ["transformers", "ours"])
def test_qformer_forward(benchmark, request, rounds, impl, backend, dtype, e2e_batch):
    """The query pass; ``transformers`` runs once per size (its own attention), listed under backend 'reference'."""
    if impl == "transformers" and backend != "reference":
        pytest.skip("transformers' Q-Former has no attention backend switch: measured once, beside 'reference'")
    require_backend(request, backend)
    model = qformer(request, torch.float32, backend).eval()
    hf = transformers_twin(model)
    image = torch.randn(e2e_batch, N_IMAGE, model.config.encoder_width, device=DEVICE)

    @torch.no_grad()
    def theirs():
        queries = model.query_tokens.expand(e2e_batch, -1, -1)
        return hf(query_embeds=queries, encoder_hidden_states=model.ln_vision(image)).last_hidden_state

    @torch.no_grad()
    def ours():
        return model.encode_image(image).hidden

    # same weights, same numbers, or there is no baseline; checked in fp32, where both are exact to ~1e-6
    torch.testing.assert_close(ours(), theirs(), rtol=1e-4, atol=1e-4)
    model.to(dtype)
    hf.to(dtype)
    image = image.to(dtype)
    measure(
        benchmark,
        theirs if impl == "transformers" else ours,
        case=f"qformer forward {sizes(request.config).model_label} B={e2e_batch} {DTYPE_NAMES[dtype]}",
        backend="transformers" if impl == "transformers" else backend,
        rounds=rounds if CUDA else 3,
        batch=e2e_batch,
    )


COMPILE_MODES = {"compile": None, "cudagraphs": "reduce-overhead"}  # label -> torch.compile mode


def stage1_step(request: pytest.FixtureRequest, backend: str, dtype: torch.dtype, batch: int, compiled: str | None):
    """One training step's callable: ITC + ITM + ITG forward, backward and AdamW (fused on CUDA, as training
    runs it). ``compiled`` names a key of ``COMPILE_MODES``: the whole loss, forward and backward, as one
    inductor graph (``fullgraph=True``, as ``--train.compile`` builds it), ``cudagraphs`` replayed from CUDA
    graphs."""
    require_backend(request, backend, backward=True)
    try:
        from blip2_fast.losses import Stage1Loss
    except ImportError as exc:
        pytest.skip(f"blip2_fast.losses does not import: {exc}")
    model = qformer(request, dtype, backend).train()
    cfg = model.config
    if backend == "flex" and cfg.attention_probs_dropout_prob > 0:
        pytest.skip(
            f"flex has no attention dropout and the step trains with BLIP-2's "
            f"attention_probs_dropout_prob={cfg.attention_probs_dropout_prob}"
        )
    objective = Stage1Loss(model, bos_token_id=cfg.vocab_size - 1)
    if compiled:
        objective.compile(fullgraph=True, mode=COMPILE_MODES[compiled])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05, fused=CUDA or None)
    image = torch.randn(batch, N_IMAGE, cfg.encoder_width, device=DEVICE, dtype=dtype)
    ids, mask = text_batch(batch, cfg.vocab_size)
    image_ids = torch.arange(batch, device=DEVICE)

    def step():
        optimizer.zero_grad(set_to_none=True)
        out = objective(image, ids, mask, image_ids)
        out.loss.backward()
        optimizer.step()
        return out.loss

    return step


def _measure_step(benchmark, request, rounds, step, label: str, dtype: torch.dtype, batch: int, warmup: int) -> None:
    ms = measure(
        benchmark,
        step,
        case=f"stage-1 step {sizes(request.config).model_label} B={batch} {DTYPE_NAMES[dtype]}",
        backend=label,
        rounds=rounds if CUDA else 2,
        warmup=warmup,
        batch=batch,
    )
    benchmark.extra_info["samples_per_s"] = batch / (ms * 1e-3)


def test_stage1_step(benchmark, request, rounds, backend, dtype, e2e_batch):
    step = stage1_step(request, backend, dtype, e2e_batch, compiled=None)
    _measure_step(benchmark, request, rounds, step, backend, dtype, e2e_batch, warmup=1)


# Last: the step is host-bound at small batches (~10,000 eager ops); how much compiling the whole loss (and
# replaying it from CUDA graphs) takes off is measured where a time budget allows. GPU only: inductor on CPU
# compiles for minutes, and CPU is not where anyone trains.
@pytest.mark.parametrize("mode", list(COMPILE_MODES))
@pytest.mark.parametrize("compiled_backend", ["triton", "sdpa"])  # its own axis: triton first, within each batch
def test_stage1_step_compiled(benchmark, request, rounds, compiled_backend, dtype, e2e_batch, mode):
    if not CUDA:
        pytest.skip("compiled step: GPU only (inductor on CPU compiles for minutes)")
    step = stage1_step(request, compiled_backend, dtype, e2e_batch, compiled=mode)
    # three warm-up steps: the first compiles, CUDA graphs record on the second, the third shows any recompile
    _measure_step(benchmark, request, rounds, step, f"{compiled_backend}+{mode}", dtype, e2e_batch, warmup=3)
