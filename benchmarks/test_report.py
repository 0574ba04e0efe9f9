"""report.py on synthetic results: the ratios it prints and the file it picks as the newest."""

from __future__ import annotations

import json

import pytest
import report


def result(case: str, backend: str, ms: float, **extra) -> dict:
    info = {"case": case, "backend": backend, "ms": ms, "device": "Test GPU", "torch": "t", "triton": "x", **extra}
    return {"name": f"{case}[{backend}]", "group": case, "stats": {"median": ms / 1e3}, "extra_info": info}


def write(path, when: str, benchmarks: list[dict]):
    path.write_text(json.dumps({"datetime": when, "benchmarks": benchmarks}))
    return path


@pytest.fixture
def results(tmp_path):
    attn = "self-attn unimodal fwd dense B=8 bf16"
    return write(
        tmp_path / "gpu.json",
        "2026-01-02T00:00:00",
        [
            result(attn, "reference", 3.0),
            result(attn, "sdpa", 1.5),
            result(attn, "triton", 0.5, cuda_graph_ms=0.004),
            result("caption minilm 8 tokens B=2 bf16", "sdpa/cached", 8.0),
            result("caption minilm 8 tokens B=2 bf16", "triton/cached", 2.0),
            result("caption minilm 8 tokens B=2 bf16", "sdpa/recompute", 20.0),
            result("stage-1 step blip2 B=2 fp32", "reference", 900.0),
            result("qformer forward blip2 B=2 fp32", "transformers", 30.0),
            result("qformer forward blip2 B=2 fp32", "reference", 36.0),
        ],
    )


def test_triton_speedups_are_other_time_over_triton_time(results):
    _, cases = report.load(results)
    lines = report.fused_ratios(cases)
    assert "- self-attn unimodal fwd dense B=8 bf16, triton: 6.00x vs reference, 3.00x vs sdpa" in lines
    # a cached triton decode is compared with cached decodes only
    assert "- caption minilm 8 tokens B=2 bf16, triton/cached: 4.00x vs sdpa/cached" in lines


def test_step_over_transformers_forward(results):
    _, cases = report.load(results)
    lines = report.step_vs_transformers(cases)
    assert any("reference step 0.9 s = 30.00 x transformers'" in line for line in lines), lines
    assert any("reference forward / transformers forward = 1.20" in line for line in lines), lines


def test_table_has_every_result_and_the_graph_figure(results):
    text = report.render(results)
    assert text.startswith("Device: Test GPU")
    assert "| self-attn unimodal fwd dense B=8 bf16 | triton | 0.5 (graph 4.0 us) | 6.00x vs reference |" in text
    assert text.count("\n| ") == 1 + 9  # the header and one row per result


def test_newest_is_by_recorded_date_not_name(tmp_path):
    write(tmp_path / "b-old.json", "2026-01-01T00:00:00", [])
    newer = write(tmp_path / "a-new.json", "2026-02-01T00:00:00", [])
    assert report.newest(tmp_path) == newer
    with pytest.raises(SystemExit, match="no results file"):
        report.newest(tmp_path / "missing")
