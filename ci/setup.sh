#!/usr/bin/env bash
# Create (or reuse) a virtual environment and install prunecxr with its dev extras into it.
# PRUNECXR_VENV picks its place (default .venv); CI keeps one outside the clone to reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PRUNECXR_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# torch comes from the machine's local wheel files when pip is capped there (fast); elsewhere PyPI.
"$VENV/bin/python" -m pip install -q -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
"$VENV/bin/python" -c "import prunecxr, torch, mlflow; print('prunecxr', prunecxr.__version__, '| torch', torch.__version__, '| mlflow', mlflow.__version__)"
