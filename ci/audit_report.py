"""Summarize pip-audit's JSON report; audit what it could not reach from PyPI's project JSON
(its `vulnerabilities` are those of the newest release, so only a newest release is audited)."""

import json
import sys
from importlib.metadata import version as installed_version

import requests


def newest_release_vulns(name: str, version: str) -> list[dict] | None:
    """PyPI's advisories for `name` if `version` is its newest release, else None."""
    try:
        response = requests.get(f"https://pypi.org/pypi/{name}/json", timeout=20)
        project = response.json() if response.ok else None
    except (requests.RequestException, ValueError):
        return None
    if not project or project["info"]["version"] != version:
        return None
    return [
        {"id": v["id"], "fix_versions": v.get("fixed_in") or []} for v in project["vulnerabilities"]
    ]


def main(report_path: str) -> None:
    with open(report_path) as file:
        dependencies = json.load(file)["dependencies"]
    found, audited, not_audited = [], 0, []
    for dependency in dependencies:  # this script runs in the audited venv
        if dependency["name"] == "prunecxr":  # ourselves (editable)
            continue
        name, version = dependency["name"], installed_version(dependency["name"])
        vulns = dependency.get("vulns")
        if "skip_reason" in dependency:
            vulns = newest_release_vulns(name, version)
        if vulns is None:
            not_audited.append(f"{name} {version}")
            continue
        audited += 1
        found += [(name, version, vuln) for vuln in vulns]
    for name, version, vuln in found:
        fixed = ", ".join(vuln["fix_versions"]) or "no release yet"
        print(f"pip-audit: {name} {version}: {vuln['id']} (fixed in {fixed})")
    print(f"pip-audit: {len(found)} known vulnerabilities in {audited} audited packages")
    if not_audited:
        print(
            f"pip-audit: not audited (older than PyPI's newest release): {', '.join(not_audited)}"
        )


if __name__ == "__main__":
    main(sys.argv[1])
