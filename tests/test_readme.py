"""The README's Python examples run as written."""

import json
import re
from pathlib import Path

import torch

from blip2_fast.data import SyntheticShapes
from blip2_fast.data import main as data_main

README = (Path(__file__).parents[1] / "README.md").read_text()
EXAMPLES = re.findall(r"```python\n(.*?)```", README, re.S)


def run(code: str) -> dict:
    scope: dict = {}
    with torch.no_grad():
        exec(compile(code, "README.md", "exec"), scope)
    return scope


def test_readme_has_two_examples():
    assert len(EXAMPLES) == 2


def test_model_example_runs():
    scope = run(EXAMPLES[0])
    assert scope["sim"].shape == (2, 2) and scope["itm"].shape == (2, 2)
    assert scope["logits"].shape[:2] == scope["text"].input_ids.shape
    assert scope["model"].backend == "triton"


def test_trained_model_example_runs(tmp_path, monkeypatch, make_run_folder):
    """In a folder holding what the example names: a (small, untrained) run folder and the scenes the README's
    command writes."""
    qformer, _ = make_run_folder(tmp_path / "runs" / "stage1-default")
    monkeypatch.chdir(tmp_path)
    command = re.search(r"`(python -m blip2_fast\.data shapes [^`]*)`", README).group(1)
    data_main(command.split()[3:])
    captions = json.loads((tmp_path / "shapes" / "captions.json").read_text())
    assert len(captions) == 8 and all((tmp_path / "shapes" / name).is_file() for name in captions)
    assert SyntheticShapes(8, seed=1234)[0]["caption"] == captions["0.png"]

    scope = run(EXAMPLES[1])
    assert scope["sims"].shape == (2, 2) and scope["match"].shape == (2,)
    assert ((scope["match"] >= 0) & (scope["match"] <= 1)).all()
    assert scope["feats"].proj.shape == (2, qformer.config.num_query_tokens, qformer.config.embed_dim)
    assert len(scope["captions"]) == 2
