#!/usr/bin/env bash
# One device call on a lent GPU machine (the `device` tool) that always returns numbers, within
# PRUNECXR_GPU_CHECK_SECONDS (540 s; a device call may run 600): the benchmark first, its JSON
# saved after every section, then the gpu-marked tests (stopping at the first failure) in the
# time left. Everything lands in $OUT. Prepare here with `bash ../shared/device/wheels.sh`
# (mlflow and torch-pruning as wheels in .whl/), carry `.whl`, run `bash ci/gpu_check.sh` there,
# then paste `gpu-tables.md` into docs/PERFORMANCE.md (GPU section) and commit `gpu.json`.
# `bash ci/gpu_check.sh --device cpu --small` runs the same steps on any machine at tiny sizes
# (tests/test_bench.py does, on every change); the gpu tests are then only collected.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/prunecxr-gpu}"
PYTHON="${PYTHON:-python3}"
DEADLINE=$((SECONDS + ${PRUNECXR_GPU_CHECK_SECONDS:-540}))
left() { echo $((DEADLINE - SECONDS)); }
mkdir -p "$OUT"
on_cpu=false
[[ " $* " == *" --device cpu "* ]] && on_cpu=true
if [ -d .whl ]; then
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
        >"$OUT/install.txt" 2>&1; then
        echo "error: installing .whl/ failed (log: install.txt): $(tail -n 1 "$OUT/install.txt")"
        exit 1
    fi
    export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH"
fi
if ! missing=$("$PYTHON" -c "import mlflow, torch_pruning, prunecxr" 2>&1); then
    echo "error: prunecxr cannot be imported here: $(echo "$missing" | tail -n 1)"
    exit 1
fi
$on_cpu || nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
# The benchmark may use all but a minute of the time (the tests get what it leaves).
timeout --kill-after=10 $(( $(left) - 60 )) "$PYTHON" bench/gpu.py "$@" --out "$OUT/gpu.json" \
    >"$OUT/bench.txt" 2>&1
bench=$?
echo "bench/gpu.py: exit $bench (log: bench.txt)"
if [ -s "$OUT/gpu.json" ]; then
    "$PYTHON" bench/gpu.py --tables "$OUT/gpu.json" >"$OUT/gpu-tables.md" 2>>"$OUT/bench.txt"
    tail -n 25 "$OUT/gpu-tables.md"
fi
tests=(tests/test_runtime.py tests/test_gpu_path.py)
if $on_cpu; then
    "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu --collect-only "${tests[@]}" \
        >"$OUT/gpu-tests.txt" 2>&1
else
    PRUNECXR_REQUIRE_GPU=1 timeout --kill-after=5 $(( $(left) - 5 )) "$PYTHON" -m pytest -q -x \
        -p no:cacheprovider -m gpu "${tests[@]}" >"$OUT/gpu-tests.txt" 2>&1
fi
status=$?
echo "gpu tests: exit $status (log: gpu-tests.txt)"
[ "$bench" -eq 0 ] && [ "$status" -eq 0 ]
