"""The embedded stage-2 default's LLM: taught from text alone to restate what it reads, then cached."""

import os
from pathlib import Path

import torch

from blip2_fast.data import SyntheticShapes
from blip2_fast.text import load_tokenizer
from blip2_fast.tiny_llm import READER_STEPS, opt_config, reader_llm, restatement_loss, retellings


def _tokenizer():
    tokenizer = load_tokenizer(max_length=24)
    tokenizer.eos_token = tokenizer.sep_token
    return tokenizer


def test_a_retelling_is_the_same_scene_told_the_other_way_round():
    """Samples of one scene told both ways: each one's retelling is the other's caption."""
    shapes = SyntheticShapes(400, seed=3)
    by_scene: dict[int, dict[str, object]] = {}
    for scene in map(shapes.scene, range(len(shapes))):
        by_scene.setdefault(scene.combination, {})[scene.caption] = scene
    pairs = [told for told in by_scene.values() if len(told) == 2]
    assert len(pairs) >= 5
    for told in pairs:
        a, b = told.values()
        assert a.retold == b.caption and b.retold == a.caption, (a.caption, b.caption)


def test_the_default_llm_restates_held_out_scenes_and_is_cached():
    # the session's cache (conftest.py): the slow stage-2 runs later load this same LLM
    cache = Path(os.environ["BLIP2_FAST_CACHE"])
    files = set(cache.glob("tiny-llm-*.safetensors"))
    tokenizer = _tokenizer()
    config = opt_config(tokenizer, layers=2, hidden=128, heads=4, max_positions=58, init_std=0.02)
    before = torch.random.get_rng_state()
    llm = reader_llm(config, tokenizer, steps=READER_STEPS, seed=0, train_size=4000)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random stream is left alone

    held_out = retellings(64, seed=1_000_003)  # the held-out split's seed: scenes told in other layouts
    assert restatement_loss(llm, tokenizer, held_out) < 0.1  # a random OPT of this shape: about 10
    right = 0
    for context, caption in held_out[:16]:
        ids = tokenizer(context, add_special_tokens=False)["input_ids"] + [tokenizer.bos_token_id]
        out = llm.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids) :]
        right += tokenizer.decode(out, skip_special_tokens=True) == caption
    assert right >= 15, right

    (cached,) = set(cache.glob("tiny-llm-*.safetensors")) - files or files  # this run's, or an earlier test's
    stamp = cached.stat().st_mtime_ns
    again = reader_llm(config, tokenizer, steps=READER_STEPS, seed=0, train_size=4000)  # loaded, not trained
    assert cached.stat().st_mtime_ns == stamp and not list(cache.glob("*.tmp"))
    for (name, a), b in zip(llm.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    other = reader_llm(config, tokenizer, steps=1, seed=0, train_size=4000)  # another recipe, another file
    assert len(set(cache.glob("tiny-llm-*.safetensors")) - files - {cached}) == 1
    assert restatement_loss(other, tokenizer, held_out) > 1.0
