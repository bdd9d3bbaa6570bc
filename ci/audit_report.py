"""Judge pip-audit's JSON reports, one per audited set of pins (ci/audit.sh).

Prints every known vulnerability; exits 1 when one has a fixed release newer than the pin and
the allowlist does not accept its id with a reason (exit 2: the allowlist itself is malformed).
What pip-audit could not look up is audited from PyPI's project JSON, whose `vulnerabilities`
are those of the newest release: so only a pin at the newest release is audited that way, and
older pins are named as not audited.

usage: python audit_report.py ALLOWLIST OUT.json NAME=REPORT.json [NAME=REPORT.json ...]
"""

from __future__ import annotations

import functools
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import requests
from packaging.version import InvalidVersion, Version

OURSELVES = {"prunecxr"}  # the editable project in the venv


@dataclass(frozen=True)
class Finding:
    target: str  # which set of pins
    package: str
    version: str
    id: str
    aliases: tuple[str, ...]
    fixed_in: tuple[str, ...]

    @property
    def ids(self) -> set[str]:
        return {self.id, *self.aliases}

    @property
    def fix_released(self) -> bool:
        """Whether a release newer than the pin fixes it (an unparsable version counts)."""
        try:
            return any(Version(fixed) > Version(self.version) for fixed in self.fixed_in)
        except InvalidVersion:
            return bool(self.fixed_in)


@dataclass
class Audit:
    target: str
    findings: list[Finding]
    audited: int
    not_audited: list[str]


def read_allowlist(path: Path) -> dict[str, tuple[str, str]]:
    """{vulnerability id: (package, reason)} from lines `ID package reason`; `#` starts a
    comment line. A line without a reason ends the audit (exit 2)."""
    accepted = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = line.split(maxsplit=2)
        if len(fields) < 3:
            print(
                f"pip-audit: error: {path}:{number}: expected `ID package reason`, got {line!r}",
                file=sys.stderr,
            )
            sys.exit(2)
        accepted[fields[0]] = (normalized(fields[1]), fields[2])
    return accepted


def normalized(package: str) -> str:
    return re.sub(r"[-_.]+", "-", package).lower()


def acceptance(finding: Finding, accepted: dict[str, tuple[str, str]]) -> str | None:
    """The allowlist's reason for `finding` (its id or an alias, for its package), if any."""
    for vuln_id in sorted(finding.ids):
        package, reason = accepted.get(vuln_id, (None, None))
        if package == normalized(finding.package):
            return reason
    return None


@functools.cache
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
        {"id": v["id"], "aliases": v.get("aliases") or [], "fix_versions": v.get("fixed_in") or []}
        for v in project["vulnerabilities"]
    ]


def audit(target: str, report_path: str) -> Audit:
    result = Audit(target, [], 0, [])
    for dependency in json.loads(Path(report_path).read_text())["dependencies"]:
        name = dependency["name"]
        if name in OURSELVES:
            continue
        if "skip_reason" in dependency:  # "...could not be audited: NAME (VERSION)"
            pinned = re.search(r"\(([^()]+)\)\s*$", dependency["skip_reason"])
            version = pinned.group(1) if pinned else "(version unknown)"
            vulns = newest_release_vulns(name, version) if pinned else None
        else:
            version, vulns = dependency["version"], dependency["vulns"]
        if vulns is None:
            result.not_audited.append(f"{name} {version}")
            continue
        result.audited += 1
        for vuln in vulns:
            aliases, fixed = tuple(vuln.get("aliases", ())), tuple(vuln["fix_versions"])
            result.findings.append(Finding(target, name, version, vuln["id"], aliases, fixed))
    return result


def describe(finding: Finding, accepted: dict[str, tuple[str, str]]) -> str:
    fixed = f"fixed in {', '.join(finding.fixed_in)}" if finding.fixed_in else "no fixed release"
    line = f"{finding.target}: {finding.package} {finding.version}: {finding.id} ({fixed})"
    reason = acceptance(finding, accepted)
    return line + (f"; accepted: {reason}" if reason else "")


def main(allowlist_path: str, out_path: str, *reports: str) -> int:
    allowlist = Path(allowlist_path)
    accepted = read_allowlist(allowlist)
    audits = [audit(*spec.split("=", 1)) for spec in reports]
    findings = [finding for each in audits for finding in each.findings]
    for finding in findings:
        print(f"pip-audit: {describe(finding, accepted)}")
    for each in audits:
        print(
            f"pip-audit: {each.target}: {len(each.findings)} known vulnerabilities in "
            f"{each.audited} audited packages"
        )
        if each.not_audited:
            print(
                f"pip-audit: {each.target}: not audited (older than PyPI's newest release, "
                f"which is all this machine can look up): {', '.join(each.not_audited)}"
            )
    Path(out_path).write_text(
        json.dumps([{**asdict(f), "fix_released": f.fix_released} for f in findings], indent=1)
    )
    seen = {i for finding in findings for i in finding.ids}
    for stale in sorted(accepted.keys() - seen):
        print(f"pip-audit: note: {allowlist} accepts {stale}, which no audited package has")
    if not any(each.audited for each in audits):
        print(
            "pip-audit: WARNING: NOTHING WAS AUDITED: no advisory service answered; the "
            "dependencies' vulnerabilities are unknown (not failing: CI cannot fix its network)"
        )
    blocking = [f for f in findings if f.fix_released and acceptance(f, accepted) is None]
    if blocking:
        print(
            f"pip-audit: FAILED: {len(blocking)} known vulnerabilities have a fixed release: "
            f"upgrade the pin, or accept the id in {allowlist} (`ID package reason`)"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
