#!/usr/bin/env bash
# One run on a lent GPU machine (the `device` tool): the gpu-marked tests, then bench/gpu.py at
# full size; everything lands in $OUT. Prepare here with `bash ../shared/device/wheels.sh` (mlflow
# and torch-pruning as wheels in .whl/), carry `.whl`, run `bash ci/gpu_check.sh` there, then
# paste `gpu-tables.md` into docs/PERFORMANCE.md (GPU section) and commit `gpu.json`.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/prunecxr-gpu}"
mkdir -p "$OUT"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH"
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
PRUNECXR_REQUIRE_GPU=1 timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_runtime.py tests/test_gpu_path.py >"$OUT/gpu-tests.txt" 2>&1
echo "gpu tests: exit $? (log: gpu-tests.txt)"
timeout 480 python3 bench/gpu.py --out "$OUT/gpu.json" >"$OUT/bench.txt" 2>&1
echo "bench/gpu.py: exit $? (log: bench.txt)"
python3 bench/gpu.py --tables "$OUT/gpu.json" >"$OUT/gpu-tables.md" 2>>"$OUT/bench.txt"
tail -n 25 "$OUT/gpu-tables.md"
