"""The CPU figure anyone can reproduce: a reference stage-1 step vs transformers' Q-Former forward.

    python benchmarks/cpu_figure.py                   # BLIP-2 size, batch 2, 5 rounds
    python benchmarks/cpu_figure.py --batch 4 --rounds 7 --preset blip2

Same config, same weights (checked to agree first). The three calls (transformers'
``Blip2QFormerModel`` forward, our reference query pass, our reference stage-1
step: ITC + ITM + ITG forward + backward + AdamW) run interleaved, round by round,
so a change in the load of a shared machine hits all three alike; medians are
reported. Writes ``benchmarks/results/cpu-<model>-<date>.json`` in
pytest-benchmark's layout, so ``benchmarks/report.py`` renders it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_e2e import N_IMAGE, text_batch, transformers_twin  # noqa: E402
from benchutil import environment  # noqa: E402

from blip2_fast import QFormer, QFormerConfig  # noqa: E402
from blip2_fast.losses import Stage1Loss  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="blip2", help="QFormerConfig preset (default blip2)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/cpu-<model>-<date>.json")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.rounds < 1:
        raise SystemExit("--batch and --rounds must be positive integers")

    torch.manual_seed(0)
    model = QFormer(QFormerConfig.preset(args.preset, backend="reference"))
    hf = transformers_twin(model)
    cfg = model.config
    image = torch.randn(args.batch, N_IMAGE, cfg.encoder_width)
    ids, mask = text_batch(args.batch, cfg.vocab_size)
    objective = Stage1Loss(model, bos_token_id=cfg.vocab_size - 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.05)

    @torch.no_grad()
    def theirs():
        queries = model.query_tokens.expand(args.batch, -1, -1)
        return hf(query_embeds=queries, encoder_hidden_states=model.ln_vision(image)).last_hidden_state

    @torch.no_grad()
    def ours():
        return model.encode_image(image).hidden

    def step():
        optimizer.zero_grad(set_to_none=True)
        objective(image, ids, mask, torch.arange(args.batch)).loss.backward()
        optimizer.step()

    model.eval()
    torch.testing.assert_close(ours(), theirs(), rtol=1e-4, atol=1e-4)
    calls = {"transformers forward": theirs, "reference forward": ours, "reference stage-1 step": step}
    times: dict[str, list[float]] = {name: [] for name in calls}
    loads = []
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, fn in calls.items():
            model.train(name.endswith("step"))
            t = timed(fn)
            if r:
                times[name].append(t)
        loads.append(environment()["loadavg_1m"])
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in calls if r), flush=True)

    env = environment()
    env["loadavg_1m_per_round"] = loads
    median = {name: statistics.median(ts) for name, ts in times.items()}
    ratio_step = median["reference stage-1 step"] / median["transformers forward"]
    ratio_fwd = median["reference forward"] / median["transformers forward"]
    suffix = f"{args.preset} B={args.batch} fp32"
    cases = {
        "transformers forward": (f"qformer forward {suffix}", "transformers"),
        "reference forward": (f"qformer forward {suffix}", "reference"),
        "reference stage-1 step": (f"stage-1 step {suffix}", "reference"),
    }
    benchmarks = []
    for name, ts in times.items():
        case, backend = cases[name]
        info = {**env, "case": case, "backend": backend, "ms": median[name] * 1e3, "batch": args.batch}
        info["step_over_transformers_forward"] = ratio_step
        info["forward_over_transformers_forward"] = ratio_fwd
        stats = {"min": min(ts), "max": max(ts), "median": median[name], "mean": statistics.fmean(ts)}
        stats["rounds"] = len(ts)
        benchmarks.append({"name": name, "group": case, "stats": stats, "extra_info": info})

    now = datetime.datetime.now(datetime.timezone.utc)
    model_name = re.sub(r"[^a-z0-9]+", "-", env["device"].removeprefix("cpu: ").lower()).strip("-")
    out = args.out or HERE / "results" / f"cpu-{model_name}-{now:%Y%m%d-%H%M}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"datetime": now.isoformat(), "source": "benchmarks/cpu_figure.py", "benchmarks": benchmarks}
    out.write_text(json.dumps(record, indent=1))
    print(f"reference stage-1 step / transformers forward = {ratio_step:.2f}")
    print(f"reference forward / transformers forward = {ratio_fwd:.2f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
