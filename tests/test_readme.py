"""The README's Python example runs as written."""

import re
from pathlib import Path

import torch


def test_readme_example_runs():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    scope: dict = {}
    with torch.no_grad():
        exec(compile(code, "README.md", "exec"), scope)
    assert scope["sim"].shape == (2, 2) and scope["itm"].shape == (2, 2)
    assert scope["logits"].shape[:2] == scope["text"].input_ids.shape
    assert scope["model"].backend == "triton"
