"""Kernel launches per stage-1 step at BLIP-2 size, per phase and backend, on any CPU.

    python benchmarks/launch_count.py [--batch 32] [--backends sdpa triton]

The step (ITC + ITM + ITG forward, backward, AdamW's update; the second of two, past AdamW's state
creation) runs on ``meta`` tensors: the fused kernels really compile for sm_90 and their launches are
counted at the stand-in driver's stub (``hostcost``), and every other aten op that is neither a view nor
an allocation counts as one launch (a proxy: cuBLAS and torch's fused kernels launch one or a few). The
same narrow patches as ``bench_host.py`` let meta tensors through the kernels' CUDA checks.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_host  # noqa: E402
import hostcost  # noqa: E402
import torch  # noqa: E402

from blip2_fast.config import QFormerConfig  # noqa: E402
from blip2_fast.losses import Stage1Loss  # noqa: E402
from blip2_fast.qformer import QFormer  # noqa: E402


def _patched_kernels():
    kattn = importlib.import_module("blip2_fast.kernels.attention")
    kffn = importlib.import_module("blip2_fast.kernels.ffn")
    meta_torch = bench_host._torch_autocast_meta_as_cuda()
    kattn._check_inputs = bench_host._with_globals(kattn._check_inputs, _INTERPRET=True)
    kffn._autocast_dtype = bench_host._with_globals(kffn._autocast_dtype, torch=meta_torch)
    kffn.ffn = bench_host._with_globals(kffn.ffn, torch=meta_torch)
    kffn.residual_norm = bench_host._with_globals(kffn.residual_norm, torch=meta_torch)
    kffn._num_programs = bench_host._num_programs
    import blip2_fast.attention as battn

    functional = types.ModuleType(torch.nn.functional.__name__)
    functional.__dict__.update(vars(torch.nn.functional), scaled_dot_product_attention=hostcost.sdpa_as_on_cuda)
    battn.F = functional  # sdpa as CUDA runs it (on meta it would take the math decomposition)
    return kattn, kffn


def count_step(backend: str, batch: int, text: int = 35) -> dict[str, int]:
    with torch.device("meta"):
        qformer = QFormer(QFormerConfig.preset("blip2", backend=backend)).to(torch.bfloat16).train()
        loss_module = Stage1Loss(qformer, bos_token_id=1)
        image = torch.empty(batch, 257, qformer.config.encoder_width, dtype=torch.bfloat16)
        ids = torch.ones(batch, text, dtype=torch.long)
        mask = torch.ones(batch, text, dtype=torch.bool)
        image_ids = torch.arange(batch)
    # foreach: the fused AdamW that training runs on CUDA (a few launches in all) does not run on meta
    optimizer = torch.optim.AdamW(qformer.parameters(), lr=1e-4, foreach=True)
    counts = {}
    out = {}

    def forward():
        out["loss"] = loss_module(image, ids, mask, image_ids).loss

    phases = (("forward", forward), ("backward", lambda: out["loss"].backward()), ("optimizer", optimizer.step))
    # the first step creates AdamW's state (a zeros_like per parameter) and compiles: count the second
    for _ in range(2):
        for phase, fn in phases:
            c = hostcost.count_call(fn)
            counts[phase] = c["launches"] + c["aten_ops"]
        optimizer.zero_grad(set_to_none=True)
    counts["step"] = sum(counts.values())
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backends", nargs="+", default=["sdpa", "triton"])
    args = parser.parse_args(argv)
    problem = hostcost.triton_problem()
    if problem:
        raise SystemExit(f"launch_count: {problem}")
    kattn, kffn = _patched_kernels()
    print(f"launches per stage-1 step, BLIP-2 size, batch {args.batch}, bf16, meta tensors (sm_90 compile)")
    print("| backend | forward | backward | optimizer | step |\n|---|---:|---:|---:|---:|")
    with hostcost.stand_in_driver(kattn, kffn):  # counts only: torch's own meta functions, Python ones included
        for backend in args.backends:
            c = count_step(backend, args.batch)
            print(f"| {backend} | {c['forward']} | {c['backward']} | {c['optimizer']} | {c['step']} |")


if __name__ == "__main__":
    main()
