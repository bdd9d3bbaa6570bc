#!/usr/bin/env bash
# The project's test command (README Quickstart): install, lint, then the whole pytest suite.
# Extra arguments go to pytest, e.g. `bash ci/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
VENV="${PRUNECXR_VENV:-.venv}"
export PATH="$(cd "$VENV/bin" && pwd):$PATH"  # as if activated: MLproject commands call `python`
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
# Two workers by default, each running one test file at a time (a file's tests share fixtures);
# PRUNECXR_TEST_WORKERS=1 runs the suite in this process.
WORKERS="${PRUNECXR_TEST_WORKERS:-2}"
if [ "$WORKERS" -gt 1 ]; then
    # each worker, and the processes its tests start, gets its share of the cores (torch threads
    # on every core in every worker thrash a small machine)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / WORKERS > 0 ? $(nproc) / WORKERS : 1 ))}"
    "$VENV/bin/python" -m pytest -n "$WORKERS" --dist loadfile --no-loadscope-reorder "$@"
else
    "$VENV/bin/python" -m pytest "$@"
fi
