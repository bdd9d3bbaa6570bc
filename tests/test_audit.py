"""ci/audit_report.py, the judge of ci/audit.sh: which pip-audit findings fail CI. Reports in
pip-audit's JSON format, each package with its vulnerabilities (no network needed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import PROJECT_ROOT

FIXED_LATER = {"id": "GHSA-aaaa-bbbb-cccc", "aliases": ["CVE-2026-1"], "fix_versions": ["2.0.1"]}
NO_FIX = {"id": "PYSEC-2026-7", "aliases": [], "fix_versions": []}


def judge(tmp_path: Path, allowlist: str, **reports: list[dict]) -> subprocess.CompletedProcess:
    (tmp_path / "allow.txt").write_text(allowlist)
    specs = []
    for target, dependencies in reports.items():
        path = tmp_path / f"{target}.json"
        path.write_text(json.dumps({"dependencies": dependencies, "fixes": []}))
        specs.append(f"{target}={path}")
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "ci" / "audit_report.py"), str(tmp_path / "allow.txt")]
        + [str(tmp_path / "out.json"), *specs],
        capture_output=True,
        text=True,
        timeout=60,
    )


def package(name: str, version: str, *vulns: dict) -> dict:
    return {"name": name, "version": version, "vulns": list(vulns)}


def test_a_vulnerability_with_a_fixed_release_fails_unless_accepted_with_a_reason(tmp_path):
    image = [package("torch", "2.0.0", FIXED_LATER), package("numpy", "2.4.6")]
    failed = judge(tmp_path, "", venv=[package("numpy", "2.4.6")], image=image)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "image: torch 2.0.0: GHSA-aaaa-bbbb-cccc (fixed in 2.0.1)" in failed.stdout
    assert "FAILED: 1 known vulnerabilities have a fixed release" in failed.stdout
    assert json.loads((tmp_path / "out.json").read_text())[0]["fix_released"] is True

    # Accepted by an alias, for its package: passes, and says why.
    accepted = judge(tmp_path, "CVE-2026-1 torch capped at 2.0.0 until tested\n", image=image)
    assert accepted.returncode == 0, accepted.stdout
    assert "accepted: capped at 2.0.0 until tested" in accepted.stdout
    # The same id accepted for another package does not count.
    other = judge(tmp_path, "CVE-2026-1 numpy not this one\n", image=image)
    assert other.returncode == 1


def test_no_fixed_release_is_reported_not_fatal_and_an_entry_without_reason_is_an_error(
    tmp_path,
):
    unfixed = judge(tmp_path, "# comment\n", tracking=[package("mlflow", "3.17.2", NO_FIX)])
    assert unfixed.returncode == 0, unfixed.stdout
    assert "tracking: mlflow 3.17.2: PYSEC-2026-7 (no fixed release)" in unfixed.stdout
    # Fix versions no newer than the pin (another branch) fix nothing for it.
    old_branch = dict(FIXED_LATER, fix_versions=["1.9.9"])
    assert judge(tmp_path, "", venv=[package("torch", "2.0.0", old_branch)]).returncode == 0

    malformed = judge(tmp_path, "GHSA-aaaa-bbbb-cccc torch\n", venv=[package("numpy", "2.4.6")])
    assert malformed.returncode == 2
    assert "allow.txt:1: expected `ID package reason`" in malformed.stderr


def test_the_allowlist_in_the_repository_is_well_formed(tmp_path):
    allowlist = (PROJECT_ROOT / "ci" / "audit-allowlist.txt").read_text()
    result = judge(tmp_path, allowlist, venv=[package("numpy", "2.4.6")])
    assert result.returncode == 0, result.stdout + result.stderr
