"""Turn a pytest-benchmark JSON of this suite into markdown: the README performance table and the ratios.

    python benchmarks/report.py                      # newest benchmarks/results/*.json -> stdout
    python benchmarks/report.py RESULTS.json --out benchmarks/results/README_table.md
    python benchmarks/report.py --merge RESULTS.json PART.json ...   # per-file runs -> one results file
    python benchmarks/report.py RESULTS.json --summary   # the README's table (triton against each backend)

Every result carries ``extra_info['case']`` (what is compared) and
``extra_info['backend']``; ``extra_info['ms']`` is the time ratios use (CUDA
events on a GPU, the fastest round on CPU). Ratios are speed-ups:
other backend's time / this backend's time, so > 1 means faster.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def newest(folder: Path = RESULTS) -> Path:
    """The results file written last, by the date pytest-benchmark records inside it."""
    files = sorted(folder.glob("*.json"))
    if not files:
        raise SystemExit(f"no results file (*.json) in {folder}")
    return max(files, key=lambda p: (json.loads(p.read_text()).get("datetime", ""), p.name))


def load(path: Path) -> tuple[dict, dict[str, dict[str, dict]]]:
    """(environment of the run, {case: {backend: extra_info}})."""
    data = json.loads(path.read_text())
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    env: dict = {"datetime": data.get("datetime", "?")}
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info", {}))
        if "case" not in info:
            continue
        info.setdefault("ms", bench["stats"]["median"] * 1e3)
        cases[info["case"]][info["backend"]] = info
        env.setdefault("device", info.get("device"))
        env.setdefault("torch", info.get("torch"))
        env.setdefault("triton", info.get("triton"))
    return env, dict(cases)


def _mem(info: dict) -> str:
    value = info.get("peak_mem_bytes", info.get("saved_for_backward_bytes"))
    return "" if value is None else f"{value / 2**20:.1f}"


def _rate(info: dict) -> str:
    if "tflops" in info:
        return f"{info['tflops']:.3g} TFLOP/s"
    if "tokens_per_s" in info:
        return f"{info['tokens_per_s']:.3g} tok/s"
    if "samples_per_s" in info:
        return f"{info['samples_per_s']:.3g} samples/s"
    return ""


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x" if ratio >= 0.1 else f"{ratio:.2g}x"


def baseline_of(backends: dict[str, dict]) -> str | None:
    for name in ("reference", "eager", "reference/recompute", "transformers"):
        if name in backends:
            return name
    return None


def table(cases: dict[str, dict[str, dict]]) -> list[str]:
    mem_kind = "peak MiB" if any("peak_mem_bytes" in i for b in cases.values() for i in b.values()) else "saved MiB"
    lines = [
        f"| case | backend | ms | speed-up vs baseline | throughput | {mem_kind} |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for case in sorted(cases):
        backends = cases[case]
        base = baseline_of(backends)
        for name in sorted(backends, key=lambda n: backends[n]["ms"]):
            info = backends[name]
            ratio = f"{_x(backends[base]['ms'] / info['ms'])} vs {base}" if base and name != base else ""
            graph = f" (graph {info['cuda_graph_ms'] * 1e3:.1f} us)" if "cuda_graph_ms" in info else ""
            lines.append(f"| {case} | {name} | {info['ms']:.4g}{graph} | {ratio} | {_rate(info)} | {_mem(info)} |")
    return lines


def fused_ratios(cases: dict[str, dict[str, dict]]) -> list[str]:
    """Speed-up of the fused backend (triton) over every other backend, per case."""
    lines = []
    for case in sorted(cases):
        backends = cases[case]
        fused = [n for n in backends if n.split("/")[0] == "triton"]
        for name in fused:
            suffix = name.partition("/")[2]
            others = [n for n in backends if n.split("/")[0] != "triton" and n.partition("/")[2] == suffix]
            parts = [f"{_x(backends[o]['ms'] / backends[name]['ms'])} vs {o}" for o in sorted(others)]
            if parts:
                lines.append(f"- {case}, {name}: " + ", ".join(parts))
    return lines or ["- no triton results in this file (the triton backend did not run here)"]


def _speedup_over(backends: dict[str, dict], fused: str, *others: str) -> str:
    """The first of ``others`` present, in the fused result's mode (KV-cache: cached against cached): its time /
    the fused time."""
    mode = fused.partition("/")[2]
    for other in others:
        other = f"{other}/{mode}" if mode else other
        if other in backends:
            return _x(backends[other]["ms"] / backends[fused]["ms"])
    return ""


def summary(cases: dict[str, dict[str, dict]]) -> list[str]:
    """The README's table: one row per triton result, its time and its speed-up over each other backend."""
    lines = [
        "| case | triton ms | vs reference / eager | vs sdpa | vs flex | vs xformers |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case in sorted(cases):
        backends = cases[case]
        for name in sorted(n for n in backends if n.split("/")[0] == "triton"):
            mode = name.partition("/")[2]
            ratios = [
                _speedup_over(backends, name, *o) for o in (("reference", "eager"), ("sdpa",), ("flex",), ("xformers",))
            ]
            label = f"{case}, {mode}" if mode else case
            lines.append(f"| {label} | {backends[name]['ms']:.4g} | " + " | ".join(ratios) + " |")
    return lines if len(lines) > 2 else ["No triton results in this file (the triton backend did not run here)."]


def step_vs_transformers(cases: dict[str, dict[str, dict]]) -> list[str]:
    """The reproducible figure: reference stage-1 step / transformers' Q-Former forward at the same size."""
    lines = []
    for case, backends in sorted(cases.items()):
        if not case.startswith("stage-1 step "):
            continue
        forward = cases.get("qformer forward " + case.removeprefix("stage-1 step "), {})
        theirs = forward.get("transformers")
        for name in sorted(backends):
            if theirs is None:
                continue
            ratio = backends[name]["ms"] / theirs["ms"]
            lines.append(
                f"- {case}: {name} step {backends[name]['ms'] / 1e3:.3g} s = {ratio:.2f} x transformers' "
                f"Blip2QFormerModel forward ({theirs['ms'] / 1e3:.3g} s)"
            )
        ours = forward.get("reference")
        if theirs and ours:
            lines.append(
                f"- {case.replace('stage-1 step', 'qformer forward')}: reference forward / transformers forward "
                f"= {ours['ms'] / theirs['ms']:.2f}"
            )
    return lines


def render(path: Path, *, brief: bool = False) -> str:
    env, cases = load(path)
    out = [
        f"Device: {env.get('device')}; torch {env.get('torch')}, triton {env.get('triton')}; "
        f"run {env['datetime'][:19]} UTC; file `{path.name}`.",
        "",
    ]
    if brief:
        return "\n".join([*out, *summary(cases)]) + "\n"
    out += [
        *table(cases),
        "",
        "Triton speed-ups (other backend's time / triton's time):",
        "",
        *fused_ratios(cases),
    ]
    e2e = step_vs_transformers(cases)
    if e2e:
        out += ["", "Stage-1 step vs transformers' Q-Former forward (same config, same weights):", "", *e2e]
    return "\n".join(out) + "\n"


def merge(parts: list[Path], out: Path) -> list[Path]:
    """Write one results file from runs of separate benchmark files on one machine: the earliest run's
    header (machine, commit, date), every run's results. Returns the parts that held none: a run stopped
    by a signal leaves its JSON empty, and one that measured nothing leaves none."""
    runs, empty = [], []
    for part in parts:
        try:
            data = json.loads(part.read_text())
        except (OSError, ValueError):
            data = {}
        if data.get("benchmarks"):
            runs.append(data)
        else:
            empty.append(part)
    if not runs:
        raise SystemExit(f"no results in any of {', '.join(str(p) for p in parts)}")
    runs.sort(key=lambda d: d.get("datetime", ""))
    merged = dict(runs[0], benchmarks=[bench for run in runs for bench in run["benchmarks"]])
    out.write_text(json.dumps(merged, indent=2) + "\n")
    return empty


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "results",
        nargs="*",
        type=Path,
        help="pytest-benchmark JSON (default: newest in results/); with --merge, the parts",
    )
    parser.add_argument("--out", type=Path, help="write the markdown here as well as to stdout")
    parser.add_argument("--summary", action="store_true", help="only the README's table: triton against each backend")
    parser.add_argument("--merge", type=Path, metavar="JSON", help="first merge the results files given into this one")
    args = parser.parse_args(argv)
    if args.merge:
        for part in merge(args.results, args.merge):
            print(f"report: no results in {part}", file=sys.stderr)
        paths = [args.merge]
    else:
        paths = args.results or [newest()]
    if len(paths) > 1:
        raise SystemExit("one results file at a time (several parts: --merge them into one)")
    path = paths[0]
    if not path.is_file():
        raise SystemExit(f"results file not found: {path}")
    text = render(path, brief=args.summary)
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
