#!/usr/bin/env bash
# Audit every pinned set of dependencies for known vulnerabilities with pip-audit (run from its
# own venv, so that its dependencies are not audited as ours):
#   venv       the packages installed in the project's venv ($PRUNECXR_VENV, default .venv)
#   image      docker/requirements.txt, the prunecxr image's pins
#   tracking   docker/tracking/requirements.txt, the tracking server image's pins
# Fails (exit 1) on a known vulnerability that a newer release fixes, unless
# ci/audit-allowlist.txt accepts its id with a reason (ci/audit_report.py judges; exit 2: the
# allowlist is malformed). Where pip-audit's services are out of reach (this CI machine reaches
# PyPI's package index and project JSON but neither its per-version JSON nor OSV), a pin at PyPI's
# newest release is audited from the advisories PyPI lists for that release, and older pins are
# named as not audited. When nothing can be audited at all (pip-audit cannot be installed, or no
# service answers) it says so loudly and exits 0: CI cannot repair its network, and a red CI for
# that would block every change. Findings as JSON: $PRUNECXR_AUDIT_REPORT.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${PRUNECXR_VENV:-.venv}"
AUDIT_VENV="${PRUNECXR_AUDIT_VENV:-$HOME/.cache/prunecxr-audit-venv}"
REPORT="${PRUNECXR_AUDIT_REPORT:-audit.json}"
ALLOWLIST=ci/audit-allowlist.txt
if [ ! -x "$AUDIT_VENV/bin/pip-audit" ]; then
    if ! { python3 -m venv "$AUDIT_VENV" && "$AUDIT_VENV/bin/pip" install -q pip-audit; }; then
        echo "pip-audit: WARNING: NOTHING WAS AUDITED: pip-audit could not be installed"
        exit 0
    fi
fi
REPORTS=$(mktemp -d)
trap 'rm -rf "$REPORTS"' EXIT
audit() {  # audit NAME PIP-AUDIT-ARGS...: NAME=its JSON report, where pip-audit wrote one
    "$AUDIT_VENV/bin/pip-audit" --progress-spinner off --format json \
        --output "$REPORTS/$1.json" "${@:2}" 2>"$REPORTS/$1.log"
    if [ -s "$REPORTS/$1.json" ]; then
        echo "$1=$REPORTS/$1.json"
    else
        echo "pip-audit: $1: no report (not audited): $(tail -n 1 "$REPORTS/$1.log")" >&2
    fi
}
# Pinned files: their pins only (--no-deps: every dependency is pinned in them), never installed.
targets=(
    "$(PIPAPI_PYTHON_LOCATION="$VENV/bin/python" audit venv --skip-editable)"
    "$(audit image -r docker/requirements.txt --no-deps --disable-pip)"
    "$(audit tracking -r docker/tracking/requirements.txt --no-deps --disable-pip)"
)
targets=($(printf '%s\n' "${targets[@]}" | grep .))
if [ ${#targets[@]} -eq 0 ]; then
    echo "pip-audit: WARNING: NOTHING WAS AUDITED: pip-audit wrote no report"
    exit 0
fi
"$AUDIT_VENV/bin/python" ci/audit_report.py "$ALLOWLIST" "$REPORT" "${targets[@]}"
