"""The direct launch path (kernels/launch.py) hands Triton's launcher exactly what ``kernel[grid](...)`` does.

The interpreter never takes that path, so it runs here against the compiled kernels: Triton compiles for
sm_90 on this CPU and the stand-in driver of benchmarks/hostcost.py records what reaches the final C launch
(tensors on ``meta``). Each launcher of the attention and FFN kernels is called twice with the same
arguments: the first call goes through ``JITFunction.run`` (and keeps the compiled kernel), the second is
launched directly; both must reach the launch with the same kernel, grid and arguments. Runs in a
subprocess: the rest of the suite imports Triton under the interpreter.
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
sys.path.insert(0, "benchmarks")
import torch
import hostcost

calls = []
hostcost._stub_launch = lambda *args: calls.append(args)  # read when each kernel's stand-in launcher is built

import blip2_fast.kernels.attention as kattn
import blip2_fast.kernels.ffn as kffn
from blip2_fast.attention import MaskKind

meta = torch.device("meta")
B, H, L, D = 2, 3, 37, 64


def heads(rows):
    return torch.empty(B, rows, H, D, device=meta, dtype=torch.bfloat16).transpose(1, 2)


def described(args, names):
    # a launch's arguments with each tensor named: an input by its name, a fresh output by its layout;
    # the launch metadata Triton builds per call for its hooks by its type
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            out.append(names.get(id(a), f"new {a.dtype} {tuple(a.shape)} {a.stride()}"))
        elif isinstance(a, tuple):
            out.append(tuple(described(a, names)))
        elif type(a).__name__ == "LazyDict":
            out.append("launch metadata")
        else:
            out.append(a)
    return out


q, k, v, do = heads(L), heads(L), heads(L), heads(L)
padding = torch.ones(B, L, device=meta, dtype=torch.bool)
seed = torch.zeros(1, dtype=torch.int64, device=meta)
rows, hidden, inter = 48, 768, 3072
y, res = torch.empty(rows, hidden, device=meta), torch.empty(rows, hidden, device=meta)
w, b = torch.empty(hidden, device=meta), torch.empty(hidden, device=meta)
u, ub = torch.empty(rows, inter, device=meta), torch.empty(inter, device=meta)
kffn._num_programs = lambda device: 132 * 4  # the CUDA branch, an H200's SM count


def launches():
    for kind in MaskKind:
        for pad in (kattn._padding_args(q, L, None, None), kattn._padding_args(q, L, padding, None)):
            out, lse = kattn.attention_forward(q, k, v, int(kind), 16, pad, 0.1, seed, 0.125)
            yield kattn.attention_backward(do, q, k, v, out, lse, int(kind), 16, pad, 0.1, seed, 0.125)
    yield kattn.attention_forward(heads(1), k, v, int(MaskKind.MULTIMODAL_CAUSAL), 16, (0, q, q), 0.0, q, 0.125)
    yield kffn.bias_gelu(u, ub)
    yield kffn.gelu_forward_backward_(u, ub, torch.empty_like(u), torch.empty_like(u))
    _, pre, mean, rstd, _ = kffn.res_norm_forward(y, b, res, w, b, 1e-12, 0.1, seed)
    yield kffn.res_norm_forward(y, b, res, w, b, 1e-12, 0.0, None)
    yield kffn.res_norm_backward(y, pre, mean, rstd, w, 0.1, seed)


inputs = dict(q=q, k=k, v=v, do=do, padding=padding, seed=seed, y=y, res=res, w=w, b=b, u=u, ub=ub)
with hostcost.stand_in_driver(kattn, kffn):
    passes = []
    for _ in range(2):  # the first pass compiles and keeps each kernel, the second launches them directly
        for _ in launches():
            pass
        names = {id(t): name for name, t in inputs.items()}
        passes.append([described(c, names) for c in calls])
        calls.clear()
    kept = sum(len(launcher.compiled) for launcher in hostcost._launchers(kattn, kffn))
jit, direct = passes
print("LAUNCHES", len(jit), len(direct), "KEPT", kept)
assert len(jit) == len(direct) > 20 and kept > 20
print("MISMATCHED", [(i, a, b) for i, (a, b) in enumerate(zip(jit, direct)) if a != b])
"""


def test_direct_launches_pass_what_the_jit_path_passes():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MISMATCHED []" in proc.stdout, proc.stdout
