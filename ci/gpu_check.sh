#!/usr/bin/env bash
# One device call on a lent GPU machine (the `device` tool) that always returns numbers, within
# PRUNECXR_GPU_CHECK_SECONDS (540 s; a device call may run 600): the benchmark first, its JSON
# saved after every section, then the precision measurement (bench/precision.py, which decides
# the TF32 default; 150 s at most), then the gpu-marked tests (stopping at the first failure)
# in the time left. Everything lands in $OUT. Prepare here with `bash ../shared/device/wheels.sh`
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
# The precision measurement decides the TF32 default (docs/PRECISION.md); at tiny sizes on a CPU.
if $on_cpu; then
    precision_seconds=60 precision_args=(--device cpu --seeds 1 --epochs 1 --n-test 120)
else
    precision_seconds=150 precision_args=(--device cuda)
fi
# The benchmark may use all but the precision's time and a minute (the tests get what is left).
timeout --kill-after=10 $(( $(left) - precision_seconds - 60 )) "$PYTHON" bench/gpu.py "$@" \
    --out "$OUT/gpu.json" >"$OUT/bench.txt" 2>&1
bench=$?
echo "bench/gpu.py: exit $bench (log: bench.txt)"
if [ -s "$OUT/gpu.json" ]; then
    "$PYTHON" bench/gpu.py --tables "$OUT/gpu.json" >"$OUT/gpu-tables.md" 2>>"$OUT/bench.txt"
    tail -n 30 "$OUT/gpu-tables.md"
fi
timeout --kill-after=10 "$precision_seconds" "$PYTHON" bench/precision.py "${precision_args[@]}" \
    --json "$OUT/precision.json" >"$OUT/precision.txt" 2>&1
precision=$?
echo "bench/precision.py: exit $precision (log: precision.txt)"
[ -s "$OUT/precision.json" ] && "$PYTHON" -c 'import json, sys
print(json.dumps(json.load(open(sys.argv[1]))["decision"]))' "$OUT/precision.json"
tests=(tests/test_runtime.py tests/test_pruning.py tests/test_gpu_path.py)
if $on_cpu; then
    "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu --collect-only "${tests[@]}" \
        >"$OUT/gpu-tests.txt" 2>&1
else
    per_test=()  # a test that hangs is stopped alone where pytest-timeout is installed
    "$PYTHON" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=150)
    PRUNECXR_REQUIRE_GPU=1 timeout --kill-after=5 $(( $(left) - 5 )) "$PYTHON" -m pytest -q -x \
        -p no:cacheprovider "${per_test[@]}" -m gpu "${tests[@]}" >"$OUT/gpu-tests.txt" 2>&1
fi
status=$?
echo "gpu tests: exit $status (log: gpu-tests.txt)"
[ "$bench" -eq 0 ] && [ "$precision" -eq 0 ] && [ "$status" -eq 0 ]
