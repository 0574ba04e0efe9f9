"""Stage-1 losses of BLIP-2 with LAVIS semantics: ITC + ITM (hard negatives) + ITG.

All three share one image side: ``QFormer.image_context`` (ln_vision and the
cross-attention K/V projections) is computed once per batch and reused by the
ITC query pass and by the ITM groups; ITG decodes over the query pass's cached
self-attention K/V instead of re-running the queries.

Across ranks (B rows per rank, G = world * B rows in the global batch):

- ITC compares the local rows with the features of the whole global batch;
  other ranks' features carry no gradient.
- ITM samples hard negatives from the global batch. Every rank builds the same
  (G, G) similarity matrix and draws from one seeded generator in the same
  order, then keeps its own rows: the negatives do not depend on how the global
  batch is split, so one rank and several ranks give the same losses.
- Negative images owned by other ranks get their image context recomputed from
  the gathered frozen ViT features with this rank's weights; after the
  data-parallel gradient average that is the gradient LAVIS gets by gathering
  the ln_vision output with gradient, for less traffic (E floats per token
  instead of two projections per cross-attention layer).

Every loss is computed in fp32 whatever the model dtype: logits over the
vocabulary and similarities divided by a temperature of 0.001 overflow fp16.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from blip2_fast import distributed
from blip2_fast.qformer import ImageContext, QFormer

TEMP_MIN, TEMP_MAX = 0.001, 0.5  # LAVIS clamps the learnable temperature to this range
LABEL_SMOOTHING = 0.1


class Stage1Output(NamedTuple):
    """A named tuple, not a dataclass: ZeRO-3 hooks backward only onto tensors it finds in tuples and dicts."""

    loss: torch.Tensor  # itc + itm + itg, fp32 scalar
    itc: torch.Tensor
    itm: torch.Tensor
    itg: torch.Tensor
    temp: torch.Tensor

    def terms(self) -> torch.Tensor:
        """(loss, itc, itm, itg, temp) as one detached fp32 vector on the device: read it when logging."""
        terms = (self.loss, self.itc, self.itm, self.itg, self.temp)
        return torch.stack([t.detach().float().reshape(()) for t in terms])


def clamped_temp(temp: torch.Tensor) -> torch.Tensor:
    """The temperature as LAVIS uses it, clamped to [0.001, 0.5].

    LAVIS clamps the parameter in place; under ZeRO the optimizer holds its own
    fp32 copy that an in-place edit would not reach, so the clamp is applied
    where the value is used.
    """
    return temp.float().clamp(TEMP_MIN, TEMP_MAX)


def positive_mask(ids_rows: torch.Tensor, ids_cols: torch.Tensor) -> torch.Tensor:
    """(R, C) bool: True where row and column share an image id."""
    return ids_rows[:, None] == ids_cols[None, :]


def similarity(image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
    """Image-text similarity, max over queries. image_feats (I, Q, D), text_feats (T, D) -> (I, T)."""
    return torch.einsum("iqd,td->itq", image_feats.float(), text_feats.float()).amax(dim=-1)


def itc_loss(
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    image_feats_all: torch.Tensor,
    text_feats_all: torch.Tensor,
    image_ids: torch.Tensor,
    image_ids_all: torch.Tensor,
    temp: torch.Tensor,
    label_smoothing: float = LABEL_SMOOTHING,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contrastive loss of the local rows against the global batch.

    image_feats (B, Q, D), text_feats (B, D): this rank's normalised features;
    ``*_all`` (G, ...) the global batch; image_ids (B,), image_ids_all (G,).
    Pairs that share an image id are all positives (the target mass is split
    among them), then label smoothing as in LAVIS. Returns the loss and the
    local (B, G) similarity rows ``sim_i2t`` and ``sim_t2i`` (already / temp).
    """
    sim_i2t = similarity(image_feats, text_feats_all) / temp  # (B, G)
    sim_t2i = similarity(image_feats_all, text_feats).t() / temp  # (B, G)
    pos = positive_mask(image_ids, image_ids_all).float()
    targets = pos / pos.sum(dim=1, keepdim=True)
    loss = (
        F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
        + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)
    ) / 2
    return loss, sim_i2t, sim_t2i


_U32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _U32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _U32
    return x ^ (x >> 16)


class HardNegativeSampler:
    """Draws one negative per row from softmax(similarity) with positives masked out.

    Gumbel-max on the similarity's device: the argmax of logits plus Gumbel noise is a draw from their
    softmax, with no host sync and no data-dependent branch (a compiled step captures it), and no underflow
    (a row whose negatives' softmax weights all round to zero still draws among them). The noise is a
    counter-based hash of (seed, draw, row, column): the same on every rank and device, and checkpointed as
    two integers. A row without any negative (every candidate shares its image id) fails the step.
    """

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self.draws = torch.zeros((), dtype=torch.int64)  # on the similarity's device once used

    def _uniform(self, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
        if self.draws.device != device:
            self.draws = self.draws.to(device)
        cells = torch.arange(shape[0] * shape[1], device=device, dtype=torch.int64).view(shape)
        x = _mix32((cells + _mix32(self.draws + ((self.seed * 0x9E3779B9) & _U32))) & _U32)
        self.draws.add_(1)
        return (x.to(torch.float64) + 0.5) / 2.0**32  # in (0, 1), never 0 or 1

    def sample(self, sim: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        """sim (R, C) logits, positives (R, C) bool -> (R,) int64 column indices, never a positive."""
        if sim.shape != positives.shape:
            raise ValueError(f"sim {tuple(sim.shape)} and positives {tuple(positives.shape)} must have the same shape")
        torch._assert_async(
            (~positives.all(dim=1)).all(),
            "a row has no negative: every candidate in the global batch shares its image_id; "
            "use a larger batch or distinct image ids",
        )
        gumbel = -torch.log(-torch.log(self._uniform(tuple(sim.shape), sim.device)))
        scores = sim.detach().double().masked_fill(positives.to(sim.device), float("-inf")) + gumbel
        return scores.argmax(dim=1)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "draws": int(self.draws)}

    def load_state_dict(self, state: dict) -> None:
        if "draws" not in state:
            raise ValueError(
                f"hard-negative sampler state {sorted(state)} is not this version's (seed, draws): the checkpoint "
                "was written by an older blip2-fast; start the run anew"
            )
        self.seed = int(state["seed"])
        self.draws = torch.tensor(int(state["draws"]), dtype=torch.int64, device=self.draws.device)


def _pad_to(ids: torch.Tensor, mask: torch.Tensor, length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - ids.shape[1]
    if extra == 0:
        return ids, mask
    return F.pad(ids, (0, extra), value=pad_id), F.pad(mask, (0, extra), value=False)


class Stage1Loss(nn.Module):
    """The trainable stage-1 model as one module: Q-Former + the three losses.

    ``forward(image_embeds (B, N, E) frozen ViT features, input_ids (B, T) with
    [CLS] first, attention_mask (B, T) bool, image_ids (B,))`` -> Stage1Output.
    Being one module lets DeepSpeed wrap it (ZeRO-3 gathers parameters around
    ``forward``).
    """

    def __init__(self, qformer: QFormer, bos_token_id: int, seed: int = 0, share_fused_weights: bool = True):
        super().__init__()
        if not qformer.config.text_input:
            raise ValueError("stage-1 training needs a Q-Former with text_input=True")
        if not 0 <= bos_token_id < qformer.config.vocab_size:
            raise ValueError(
                f"bos_token_id ({bos_token_id}) must lie in [0, vocab_size={qformer.config.vocab_size}): "
                "the tokenizer's [DEC] must have a row in the Q-Former's embeddings"
            )
        self.qformer = qformer
        self.bos_token_id = bos_token_id
        self.sampler = HardNegativeSampler(seed)
        # each layer's concatenated q/k/v weights made once per step and shared by both passes (eager only; off
        # under ZeRO-3, whose gathered weights should not outlive the module that gathered them)
        self.share_fused_weights = share_fused_weights

    def forward(
        self,
        image_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_ids: torch.Tensor,
    ) -> Stage1Output:
        model = self.qformer
        B = input_ids.shape[0]
        if image_embeds.shape[0] != B or attention_mask.shape != input_ids.shape or image_ids.shape != (B,):
            raise ValueError(
                "expected image_embeds (B, N, E), input_ids (B, T), attention_mask (B, T), image_ids (B,); got "
                f"{tuple(image_embeds.shape)}, {tuple(input_ids.shape)}, {tuple(attention_mask.shape)}, "
                f"{tuple(image_ids.shape)}"
            )
        mask = attention_mask.bool()
        rank, world = distributed.get_rank(), distributed.get_world_size()
        temp = clamped_temp(model.temp)

        # ---------------------------------------------------------------- ITC (and ITG's pass with it)
        weights = {} if self.share_fused_weights and not torch.compiler.is_compiling() else None
        ctx = model.image_context(image_embeds)
        decoder_ids, itg_labels = itg_targets(input_ids, mask, self.bos_token_id)
        query_hidden, text_hidden, lm_logits = model.encode_itc_itg(ctx, input_ids, mask, decoder_ids, weights)
        image_feats = model.image_features(query_hidden)  # (B, Q, D)
        text_feats = model.text_features(text_hidden)  # (B, D)
        image_feats_all = distributed.all_gather_no_grad(image_feats)
        text_feats_all = distributed.all_gather_no_grad(text_feats)
        image_ids_all = distributed.all_gather_no_grad(image_ids)
        itc, _, _ = itc_loss(image_feats, text_feats, image_feats_all, text_feats_all, image_ids, image_ids_all, temp)

        # ---------------------------------------------------------------- ITM
        with torch.no_grad():
            sim_i2t_all = similarity(image_feats_all, text_feats_all) / temp  # (G, G), same on every rank
            pos_all = positive_mask(image_ids_all, image_ids_all)
            neg_image = self.sampler.sample(sim_i2t_all.t(), pos_all)  # per text, a negative image
            neg_text = self.sampler.sample(sim_i2t_all, pos_all)  # per image, a negative text
        local = slice(rank * B, (rank + 1) * B)
        neg_image, neg_text = neg_image[local].to(input_ids.device), neg_text[local].to(input_ids.device)

        if world == 1:
            ctx_neg = ctx.index_select(neg_image)
            ids_all, mask_all = input_ids, mask
        else:
            # a trainable ViT gets the gradient of its images wherever they served as negatives (LAVIS)
            gather = distributed.all_gather_with_grad if image_embeds.requires_grad else distributed.all_gather_no_grad
            embeds_all = gather(image_embeds)
            ctx_neg = model.image_context(embeds_all.index_select(0, neg_image))
            length = int(distributed.all_reduce_max(torch.tensor(input_ids.shape[1], device=input_ids.device)))
            ids, m = _pad_to(input_ids, mask, length, model.config.pad_token_id)
            ids_all, mask_all = distributed.all_gather_no_grad(ids), distributed.all_gather_no_grad(m)
            input_ids, mask = ids, m
        itm_ctx = ImageContext.cat([ctx, ctx_neg, ctx])  # pos, neg image, pos
        itm_ids = torch.cat([input_ids, input_ids, ids_all.index_select(0, neg_text)])  # pos, pos, neg text
        itm_mask = torch.cat([mask, mask, mask_all.index_select(0, neg_text)])
        itm_logits = model.itm_logits(model.match(itm_ctx, itm_ids, itm_mask, weights)).float()
        itm_labels = torch.cat([itm_logits.new_ones(B), itm_logits.new_zeros(2 * B)]).long()
        itm = F.cross_entropy(itm_logits, itm_labels)

        # ---------------------------------------------------------------- ITG
        itg = itg_loss_of(lm_logits, itg_labels)
        return Stage1Output(itc + itm + itg, itc, itm, itg, temp.detach())


def itg_targets(input_ids: torch.Tensor, mask: torch.Tensor, bos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder input: the caption with [DEC] in place of [CLS], labels: the next token, pads -100) for ITG."""
    ids = input_ids.clone()
    ids[:, 0] = bos_token_id
    return ids, ids.masked_fill(~mask, -100)[:, 1:]


def itg_loss(
    model: QFormer,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    cache,
    bos_token_id: int,
    label_smoothing: float = LABEL_SMOOTHING,
) -> torch.Tensor:
    """LM loss of the caption over the cached query K/V (``model.decode``): see :func:`itg_loss_of`."""
    ids, labels = itg_targets(input_ids, mask, bos_token_id)
    logits, _ = model.decode(ids, mask, cache)
    return itg_loss_of(logits, labels, label_smoothing)


def itg_loss_of(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = LABEL_SMOOTHING) -> torch.Tensor:
    """LM loss of the decoder's logits (B, T, V) against ``labels`` (B, T - 1): pads ignored, shifted by one.

    The mean is over the tokens of the *global* batch: each rank divides its sum
    by the global count / world, so that the average over ranks (what
    data-parallel training optimises) is the loss of the whole batch, whatever
    the split. A per-rank mean would weight the tokens of short-caption ranks more.
    """
    total = F.cross_entropy(
        logits[:, :-1].float().flatten(0, 1),
        labels.flatten(),
        ignore_index=-100,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    count = distributed.all_reduce_sum((labels != -100).sum().float().detach())
    return total / (count / distributed.get_world_size()).clamp(min=1.0)
