"""The embedded stage-2 default's frozen LLM: a small OPT that already reads its context.

BLIP-2 bridges a frozen *pretrained* LLM: one that speaks the captions' language and conditions on what
comes before them, so that stage 2 only has to put the image there in a form the LLM reads. No pretrained
LLM ships offline, and a random frozen one makes stage 2 another task: the soft prompt has to steer noise,
which a small fresh Q-Former at a high rate does best and which stage 1's representation does not help
(300 default steps: held-out LM loss 5.4 to 7.6 from a stage-1 run's Q-Former at every rate tried, 2.3
from a fresh tiny one).

So the default LLM is first taught, from text alone, what a pretrained LLM brings: each training caption
follows the same scene told the other way round ("a blue square below a red circle [DEC] a red circle
above a blue square"), and the loss is on the caption only. The LLM learns the captions' language and to
restate what its context says; stage 2 then teaches the Q-Former to say it from the image. It sees the
training split's scenes only, never a held-out one. Training takes about a minute on 2 CPU cores, from
its own generator (the caller's random streams are left as they were); the result is cached, keyed by
everything it depends on, so later runs load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

READER_STEPS = 200  # held-out restatement loss under 0.1 per token (the context decides every word)
_BATCH = 64
_LR = 1e-3
_VERSION = 1  # bump when the recipe changes: a new cache key


def opt_config(tokenizer, *, layers: int, hidden: int, heads: int, max_positions: int, init_std: float):
    """The tiny OPT's configuration over ``tokenizer`` (its BOS, EOS and pad ids)."""
    from transformers import OPTConfig

    return OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        word_embed_proj_dim=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        ffn_dim=4 * hidden,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dropout=0.0,
        init_std=init_std,
    )


def retellings(n: int, seed: int) -> list[tuple[str, str]]:
    """(the scene told the other way round, its caption) for the first ``n`` synthetic training scenes."""
    from blip2_fast.data import SyntheticShapes

    shapes = SyntheticShapes(n, seed=seed)
    return [(scene.retold, scene.caption) for scene in map(shapes.scene, range(n))]


def _batch(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """``context [BOS] caption [EOS]`` rows, right-padded; labels on the caption and EOS only."""
    rows, starts = [], []
    for context, caption in pairs:
        head = tokenizer(context, add_special_tokens=False)["input_ids"] + [tokenizer.bos_token_id]
        tail = tokenizer(caption, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(head + tail)
        starts.append(len(head))
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for r, (row, start) in enumerate(zip(rows, starts, strict=True)):
        ids[r, : len(row)] = torch.tensor(row)
        labels[r, start : len(row)] = ids[r, start : len(row)]
        mask[r, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def restatement_loss(llm, tokenizer, pairs: list[tuple[str, str]]) -> float:
    """Mean caption-token loss of ``llm`` given each pair's context."""
    with torch.no_grad():
        return float(llm(**_batch(tokenizer, pairs)).loss)


def _cache_file(config, steps: int, seed: int, train_size: int) -> Path:
    root = Path(os.environ.get("BLIP2_FAST_CACHE") or Path.home() / ".cache" / "blip2_fast")
    key = json.dumps(
        {"config": config.to_dict(), "steps": steps, "seed": seed, "train_size": train_size, "v": _VERSION,
         "torch": torch.__version__.split("+")[0]},
        sort_keys=True,
    )  # fmt: skip
    return root / f"tiny-llm-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"


def reader_llm(config, tokenizer, *, steps: int = READER_STEPS, seed: int = 0, train_size: int = 4000):
    """The OPT of ``config`` taught for ``steps`` to restate its context (see the module text), from the
    cache when it was built before. ``train_size`` training scenes, drawn as the synthetic training split
    of ``seed`` draws them."""
    from safetensors.torch import load_file, save_file
    from transformers import OPTForCausalLM

    path = _cache_file(config, steps, seed, train_size)
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        llm = OPTForCausalLM(config)
        if path.is_file():
            missing, unexpected = llm.load_state_dict(load_file(str(path)), strict=False)
            if unexpected or set(missing) - {"lm_head.weight"}:  # the head is tied to the input embeddings
                raise ValueError(f"{path}: not this LLM's weights (delete it to rebuild): {missing + unexpected}")
            return llm
        pairs = retellings(train_size, seed)
        optimizer = torch.optim.AdamW(llm.parameters(), lr=_LR, weight_decay=0.01)
        draw = torch.Generator().manual_seed(seed)
        llm.train()
        for _ in range(steps):
            picked = torch.randint(len(pairs), (_BATCH,), generator=draw).tolist()
            loss = llm(**_batch(tokenizer, [pairs[i] for i in picked])).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        llm.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    # written beside, then renamed: a run that reads the cache meanwhile never sees half a file
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    state = {k: v.contiguous() for k, v in llm.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(state, tmp)
    os.replace(tmp, path)
    return llm
