"""The README's Python examples run as written."""

import re
from pathlib import Path

import torch

from blip2_fast.data import SyntheticShapes

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
    """In a folder holding what the example names: a (small, untrained) run folder and two image files."""
    qformer, _ = make_run_folder(tmp_path / "runs" / "stage1-default")
    (tmp_path / "shapes").mkdir()
    shapes = SyntheticShapes(2, image_size=32)
    for i in range(2):
        shapes[i]["image"].save(tmp_path / "shapes" / f"{i}.png")
    monkeypatch.chdir(tmp_path)

    scope = run(EXAMPLES[1])
    assert scope["sims"].shape == (2, 2) and scope["match"].shape == (2,)
    assert ((scope["match"] >= 0) & (scope["match"] <= 1)).all()
    assert scope["feats"].proj.shape == (2, qformer.config.num_query_tokens, qformer.config.embed_dim)
    assert len(scope["captions"]) == 2
