#!/usr/bin/env bash
# The GPU check, in one command, from the repository root of a machine with a CUDA GPU and no network:
#
#   bash benchmarks/gpu_check.sh            # ~7 minutes: installs, parity (~2), benchmarks (~4.5); limits ~10
#
# 1. installs what the machine's Python lacks from benchmarks/wheels/ (filled beforehand by
#    benchmarks/fetch_wheels.sh) and the project itself, editable, so blip2_fast.kernels resolves;
# 2. GPU parity: the kernel test files on CUDA, compiled kernels instead of the interpreter (tests/kernel_device.py):
#    every `gpu`-marked test (bf16 included) lives in them, beside the fp32/fp16 parity and dropout tests and
#    the whole Q-Former on the triton backend (not the AOT checks, which CI runs); in parallel with pytest-xdist;
# 3. the benchmark suite (--quick unless BENCH_SIZE=full), one run per file, each within its share of
#    BENCH_TIMEOUT, their JSONs merged into one (report.py --merge);
# 4. writes benchmarks/results/<device>-<date>.json and .md (report.py: ratios of triton to every
#    other backend, and what each file's run measured or skipped). With $OUT set, the logs and results go
#    there as each step ends, so a run stopped from outside still returns what it measured.
#
# Without a GPU it stops at once with one line on stderr and exit status 2. Every step has a time
# limit, so it never hangs. Environment: PYTHON (default python3), BENCH_SIZE (quick|full),
# PARITY_TIMEOUT / BENCH_TIMEOUT / BENCH_GRACE (seconds), PARITY_TESTS (test files to run on CUDA), BENCH_FILES (in order),
# BENCH_SELECT (a pytest -k expression applied to every benchmark file, e.g. "not flex and not xformers").
set -uo pipefail

cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-python3}
wheels=benchmarks/wheels
results=benchmarks/results
parity_timeout=${PARITY_TIMEOUT:-150}
bench_timeout=${BENCH_TIMEOUT:-260} # all benchmark files together
grace=${BENCH_GRACE:-60}             # how long a test begun inside the benchmark time may run on past it
# most telling first: a file's share is a weighted part of the benchmark time the files before it left
bench_files=${BENCH_FILES:-benchmarks/bench_e2e.py benchmarks/bench_mask.py benchmarks/bench_kvcache.py \
    benchmarks/bench_cross.py benchmarks/bench_ffn.py benchmarks/bench_tiles.py}
parity_tests=${PARITY_TESTS:-tests/test_attention_kernels.py tests/test_ffn_kernels.py tests/test_backends.py \
    tests/test_qformer_triton.py}

fail() {
    echo "gpu_check: $*" >&2
    exit 2
}
say() { echo "gpu_check: $*"; }

# ---------------------------------------------------------------- 0. a GPU, or stop now
command -v "$python" >/dev/null || fail "no $python on PATH (set PYTHON)"
probe=$(timeout 60 "$python" -c "import torch; print(int(torch.cuda.is_available()))" 2>&1 | tail -1)
case "$probe" in
    1) ;;
    0) fail "no CUDA device: torch.cuda.is_available() is False (this check needs a GPU)" ;;
    *) fail "torch does not import or hangs under $python: $probe" ;;
esac
export BLIP2_FAST_GPU_TESTS=1 # tests/conftest.py leaves TRITON_INTERPRET unset; kernel tests run on CUDA
unset TRITON_INTERPRET
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1
device=$("$python" -c "import torch; print(torch.cuda.get_device_name())")
slug=$(echo "$device" | tr '[:upper:]' '[:lower:]' | sed -E 's/^nvidia //; s/[^a-z0-9]+/-/g; s/^-+|-+$//g')
stamp=$(date -u +%Y%m%d-%H%M)
name="$slug-$stamp"
logs=$(mktemp -d)
say "device: $device; results as $results/$name.*"

# ---------------------------------------------------------------- 1. install what is missing
has() { "$python" -c "import $1" >/dev/null 2>&1; }
install() {
    [ -d "$wheels" ] && ls "$wheels"/*.whl >/dev/null 2>&1 ||
        fail "$1 is missing and $wheels/ has no wheels: run benchmarks/fetch_wheels.sh where there is network"
    timeout 180 "$python" -m pip install --quiet --no-index --find-links "$wheels" "$@" ||
        fail "pip could not install $* from $wheels/"
}
has pytest || install pytest
has pytest_benchmark || install pytest-benchmark
if ! has blip2_fast.kernels; then
    # an editable install maps blip2_fast.kernels onto kernels/ (pyproject's package-dir); it needs
    # setuptools >= 70.1, which older interpreters lack
    "$python" -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 71)" 2>/dev/null ||
        install "setuptools>=70.1"
    timeout 180 "$python" -m pip install --quiet --no-deps --no-build-isolation --no-index -e . ||
        fail "editable install of the project failed"
fi
# DeepSpeed only serves the training tests; install it when its wheel is at hand, never fatally.
has deepspeed || DS_BUILD_OPS=0 timeout 180 "$python" -m pip install --quiet --no-index --find-links "$wheels" \
    deepspeed >/dev/null 2>&1 || say "DeepSpeed not installed (no wheel in $wheels/?): the GPU check does not need it"
versions=$("$python" -c "import torch, triton; print(f'torch {torch.__version__}, triton {triton.__version__}')")
say "$versions"

# ---------------------------------------------------------------- 2. GPU parity
status=0
run_step() { # name, timeout, command...
    local step=$1 limit=$2
    shift 2
    say "$step (limit ${limit}s)"
    # SIGINT, not SIGTERM: pytest stops as on Ctrl-C and prints its summary (pytest-benchmark still writes no JSON)
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$logs/$step.log" 2>&1
    local rc=$?
    tail -n 15 "$logs/$step.log"
    [ $rc -eq 124 ] && say "$step: timed out after ${limit}s"
    [ $rc -ne 0 ] && [ $rc -ne 5 ] && status=1 # 5: nothing collected
    return 0
}
workers=
has xdist && workers="-n 8"
# the ahead-of-time compile checks need no GPU and run in CI: here they would only take time
# -v -rf: one line per test as it ends, so a run stopped at its limit (xdist's workers outlive the SIGINT,
# and the kill leaves no summary) still names what failed
# shellcheck disable=SC2086  # lists on purpose
run_step parity "$parity_timeout" "$python" -m pytest $parity_tests -v -rf -p no:cacheprovider $workers \
    -k "not compiles_without_spills"
[ -n "${OUT:-}" ] && cp "$logs/parity.log" "$OUT"/ # what each step leaves reaches $OUT at once: the caller may stop us

# ---------------------------------------------------------------- 3. benchmarks
# One pytest run per file, each with its own JSON: a run stopped by a signal writes none, so each gets a
# share of the benchmark time (by weight; what one leaves unused goes to those after it) as --time-budget,
# which skips the tests left once spent and lets the run end normally. A hard limit backs it up, never past
# the benchmark time's end by more than BENCH_GRACE seconds (a compile begun late must be let finish: a file
# stopped by the limit leaves no results). After each file the parts so far are merged into the results.
mkdir -p "$results" "$logs/parts"
size_flag=--quick
[ "${BENCH_SIZE:-quick}" = full ] && size_flag=
select=()
[ -n "${BENCH_SELECT:-}" ] && select=(-k "$BENCH_SELECT")
# shares by weight: the eager stage-1 steps (bench_e2e) took 82 s on a warm H100, the mask paths 30 s, ffn 5 s;
# the compiled steps add an inductor compile each
weight() { case $(basename "$1" .py) in bench_e2e) echo 6 ;; bench_ffn | bench_cross | bench_tiles) echo 1 ;; *) echo 3 ;; esac; }
bench_end=$((SECONDS + bench_timeout))
weights_left=0
for file in $bench_files; do weights_left=$((weights_left + $(weight "$file"))); done
for file in $bench_files; do
    stem=$(basename "$file" .py)
    share=$(((bench_end - SECONDS) * $(weight "$file") / weights_left))
    weights_left=$((weights_left - $(weight "$file")))
    [ "$share" -lt 10 ] && share=10
    limit=$((share + grace))
    [ $((SECONDS + limit)) -gt $((bench_end + grace)) ] && limit=$((bench_end + grace - SECONDS))
    [ "$limit" -lt $((share + 10)) ] && limit=$((share + 10))
    # shellcheck disable=SC2086  # an empty $size_flag must vanish
    run_step "$stem" "$limit" "$python" -m pytest "$file" --benchmark-only $size_flag "${select[@]}" -q -rs \
        -p no:cacheprovider --time-budget "$share" --benchmark-json="$logs/parts/$stem.json" \
        --benchmark-columns=median,rounds
    "$python" benchmarks/report.py --merge "$results/$name.json" "$logs"/parts/*.json >/dev/null 2>"$logs/merge.log"
    if [ -n "${OUT:-}" ]; then
        { echo "=== $stem"; cat "$logs/$stem.log"; } >>"$OUT/benchmarks.log"
        [ -s "$results/$name.json" ] && cp "$results/$name.json" "$OUT"/
    fi
done
cat "$logs/merge.log" # the parts that held no results
[ -n "${OUT:-}" ] && cat "$logs/merge.log" >>"$OUT/benchmarks.log"

# ---------------------------------------------------------------- 4. summary
if [ -s "$results/$name.json" ]; then
    {
        echo "# GPU check: $device, $stamp UTC"
        echo
        summary=$(grep -hE '^=+ .*(passed|failed|error)' "$logs"/parity.log | tail -1)
        [ -z "$summary" ] && summary="stopped at the limit before its summary: $(grep -c PASSED "$logs"/parity.log) \
passed, $(grep -c FAILED "$logs"/parity.log) failed so far"
        echo "$versions. GPU parity tests: $summary"
        grep -h "FAILED" "$logs"/parity.log | sed 's/^/    /' | sort -u
        echo
        echo "Benchmark runs (\`--quick\` unless BENCH_SIZE=full; each file's last line, tests skipped by its time budget included):"
        echo
        for file in $bench_files; do
            stem=$(basename "$file" .py)
            echo "- $stem: $(grep -hE '(passed|failed|error|skipped)' "$logs/$stem.log" | tail -1)"
        done
        echo
        "$python" benchmarks/report.py "$results/$name.json"
    } >"$results/$name.md"
    say "wrote $results/$name.json and $results/$name.md"
else
    say "the benchmark runs left no results"
    status=1
fi
[ -n "${OUT:-}" ] && cp "$results/$name.md" "$OUT"/ 2>/dev/null
exit $status
