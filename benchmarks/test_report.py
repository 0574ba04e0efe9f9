"""report.py on synthetic results: the ratios it prints and the file it picks as the newest."""

from __future__ import annotations

import json
import re

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


def test_merge_joins_per_file_runs_and_names_the_empty_ones(tmp_path, capsys):
    attn, ffn = "self-attn unimodal fwd dense B=8 bf16", "ffn 768x3072 fwd rows=256 bf16"
    later = write(
        tmp_path / "attn.json", "2026-01-02T00:05:00", [result(attn, "sdpa", 1.5), result(attn, "triton", 0.5)]
    )
    earlier = write(tmp_path / "ffn.json", "2026-01-02T00:01:00", [result(ffn, "eager", 2.0)])
    killed = tmp_path / "kv.json"
    killed.write_text("")  # a run stopped by a signal
    merged = tmp_path / "merged.json"
    assert (
        report.main(["--merge", str(merged), str(later), str(killed), str(earlier), str(tmp_path / "none.json")]) == 0
    )
    data = json.loads(merged.read_text())
    assert data["datetime"] == "2026-01-02T00:01:00"  # the earliest run's header
    assert sorted(b["extra_info"]["backend"] for b in data["benchmarks"]) == ["eager", "sdpa", "triton"]
    out = capsys.readouterr()
    assert "3.00x vs sdpa" in out.out and "merged.json" in out.out
    assert out.err.splitlines() == [
        f"report: no results in {killed}",
        f"report: no results in {tmp_path / 'none.json'}",
    ]
    with pytest.raises(SystemExit, match="no results in any"):
        report.merge([killed], tmp_path / "nothing.json")
    with pytest.raises(SystemExit, match="one results file at a time"):
        report.main([str(later), str(earlier)])


def test_readme_table_is_the_summary_of_the_newest_gpu_results():
    root = report.RESULTS.parents[1]
    readme = (root / "README.md").read_text()
    found = re.search(
        r"<!-- report.py --summary (\S+): begin -->\n(.*?)<!-- report.py --summary: end -->", readme, re.S
    )
    assert found, "README.md lost its report.py --summary markers"
    named = root / found.group(1)
    assert found.group(2) == report.render(named, brief=True), (
        f"README's benchmark table is stale: paste `python benchmarks/report.py --summary {found.group(1)}`"
    )

    def recorded(path):
        env, _ = report.load(path)
        return env["datetime"], str(env.get("device"))

    newer_gpu = [
        path.name
        for path in report.RESULTS.glob("*.json")
        if recorded(path)[0] > recorded(named)[0] and not recorded(path)[1].startswith("cpu")
    ]
    assert not newer_gpu, f"newer GPU results than the README's {named.name}: {newer_gpu}"


def test_summary_has_a_row_per_triton_result_against_each_backend(results):
    rows = report.render(results, brief=True).splitlines()
    assert "| self-attn unimodal fwd dense B=8 bf16 | 0.5 | 6.00x | 3.00x |  |  |" in rows
    # KV-cache: cached against cached only (sdpa/recompute is another mode)
    assert "| caption minilm 8 tokens B=2 bf16, cached | 2 |  | 4.00x |  |  |" in rows
    assert sum(row.startswith("| ") for row in rows) == 1 + 2  # the header and two triton results
