"""Print exact pins of prunecxr's runtime dependencies, as installed in this environment.

The Docker image installs these over its base image's torch and torchvision, so the image gets
the versions this environment was tested with. Run from the repository root:
    python docker/pin_requirements.py > docker/requirements.txt
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

HEADER = """\
# Exact versions of prunecxr's runtime dependencies for the Docker image (torch and torchvision
# come from the base image). Regenerate after changing pyproject.toml, from a tested environment:
#   python docker/pin_requirements.py > docker/requirements.txt"""


def from_base_image(name: str) -> bool:
    """torch, its CUDA libraries and the package itself are not pinned here."""
    if name == "nvidia-ml-py":  # NVML bindings for MLflow's GPU metrics: ours, not CUDA's
        return False
    return name in {"prunecxr", "torch", "torchvision", "triton", "setuptools"} or name.startswith(
        ("nvidia-", "cuda-")
    )


def runtime_closure() -> set[str]:
    """Names of every package `pip install .` needs, as pip resolves them."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", ".", "--dry-run", "--ignore-installed"]
            + ["--quiet", "--report", str(report)],
            check=True,
        )
        installs = json.loads(report.read_text())["install"]
    return {normalize(item["metadata"]["name"]) for item in installs}


def normalize(name: str) -> str:
    return name.lower().replace("_", "-")


def main() -> None:
    installed = {
        normalize(dist.metadata["Name"]): dist.version for dist in metadata.distributions()
    }
    print(HEADER)
    for name in sorted(runtime_closure()):
        if not from_base_image(name):
            print(f"{name}=={installed[name]}")


if __name__ == "__main__":
    main()
