#!/usr/bin/env bash
# Audit the installed dependencies (the project's venv) for known vulnerabilities with pip-audit,
# run from its own venv so that its dependencies are not audited as ours. Where its services are
# out of reach (this CI machine reaches PyPI's package index but not its per-version JSON API nor
# OSV), a package whose installed version is PyPI's newest release is audited from the
# vulnerabilities PyPI lists for that release. Findings are reported, not fatal: an advisory for
# a capped dependency (torch) must not block every landing. Report: $PRUNECXR_AUDIT_REPORT.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV="${PRUNECXR_VENV:-.venv}"
AUDIT_VENV="${PRUNECXR_AUDIT_VENV:-$HOME/.cache/prunecxr-audit-venv}"
REPORT="${PRUNECXR_AUDIT_REPORT:-audit.json}"
if [ ! -x "$AUDIT_VENV/bin/pip-audit" ]; then
    if ! { python3 -m venv "$AUDIT_VENV" && "$AUDIT_VENV/bin/pip" install -q pip-audit; }; then
        echo "pip-audit: could not be installed; dependencies not audited"
        exit 0
    fi
fi
rm -f "$REPORT"
PIPAPI_PYTHON_LOCATION="$VENV/bin/python" "$AUDIT_VENV/bin/pip-audit" --skip-editable \
    --progress-spinner off --format json --output "$REPORT" 2>/dev/null
if [ ! -s "$REPORT" ]; then
    echo "pip-audit: no report written; dependencies not audited"
    exit 0
fi
"$VENV/bin/python" "$(dirname "$0")/audit_report.py" "$REPORT" || echo "pip-audit: report unreadable"
