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
"$VENV/bin/python" -m pytest "$@"
