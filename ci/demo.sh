#!/usr/bin/env bash
# The demo (README Quickstart): install, then the whole study on bundled synthetic data, tracked
# in MLflow's embedded store (./mlflow.db). Extra arguments go to `prunecxr study`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash ci/setup.sh
VENV="${PRUNECXR_VENV:-.venv}"
"$VENV/bin/prunecxr" study "$@"
echo "browse the runs: $VENV/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db  (http://127.0.0.1:5000)"
echo "prune the newest model again: source $VENV/bin/activate && mlflow run . -e prune --env-manager local -P sparsity=0.9"
