"""The image's pinned requirements agree with pyproject.toml (no Docker needed)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

from tests.helpers import PROJECT_ROOT


def pins(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    requirements = [Requirement(line) for line in lines if line and not line.startswith("#")]
    return {r.name.lower(): str(r.specifier).removeprefix("==") for r in requirements}


def test_image_pins_every_runtime_dependency_within_pyproject_ranges():
    pinned = pins(PROJECT_ROOT / "docker" / "requirements.txt")
    runtime = [r for r in map(Requirement, metadata.requires("prunecxr")) if not r.marker]
    for requirement in runtime:  # pyproject.toml's dependencies, as installed
        if requirement.name in ("torch", "torchvision"):  # the base image's
            assert requirement.name not in pinned
            continue
        assert requirement.name.lower() in pinned, f"{requirement.name} is not pinned"
        assert requirement.specifier.contains(pinned[requirement.name.lower()]), requirement


def test_tracking_server_runs_the_mlflow_the_image_logs_with():
    tracking = pins(PROJECT_ROOT / "docker" / "tracking" / "requirements.txt")
    assert tracking["mlflow"] == pins(PROJECT_ROOT / "docker" / "requirements.txt")["mlflow"]
