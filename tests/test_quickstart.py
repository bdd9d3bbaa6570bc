"""The README's Quickstart as a new user types it, in a fresh copy of the project: `bash
ci/demo.sh` (the whole default demo), then the design's headline command in the same folder,
`mlflow run . -e prune -P sparsity=0.9` (with --env-manager local: no conda here) and no
--experiment-name, which must find the demo's model."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import PROJECT_ROOT, cli_env

pytestmark = pytest.mark.slow


def fresh_copy(destination: Path) -> Path:
    """The project's files as a clone would have them (tracked and not ignored), nothing else."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, listed):
        source = PROJECT_ROOT / name.decode()
        if source.is_file():
            target = destination / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            target.chmod(source.stat().st_mode)
    return destination


def layered_venv(path: Path) -> Path:
    """A new virtual environment that sees this one's packages (torch, mlflow, ...) through a
    .pth file, so that ci/setup.sh installs only the copy's own package into it: the
    Quickstart's install step for real, without 5 GB of torch again."""
    subprocess.run([sys._base_executable, "-m", "venv", str(path)], check=True)
    site = path / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    (site / "site-packages" / "outer-environment.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    return path


def test_quickstart_demo_then_the_headline_prune_command(tmp_path):
    project = fresh_copy(tmp_path / "prunecxr")
    venv = layered_venv(tmp_path / "venv")
    env = cli_env(PRUNECXR_VENV=str(venv), PRUNECXR_CACHE=str(tmp_path / "cache"))
    env.pop("MLFLOW_TRACKING_URI", None)  # the embedded store, ./mlflow.db, as on a new machine
    demo = subprocess.run(
        ["bash", "ci/demo.sh"], cwd=project, env=env, capture_output=True, text=True, timeout=2400
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert (project / "mlflow.db").exists() and (project / "prunecxr-demo").is_dir()
    assert "mlflow run . -e prune" in demo.stdout

    # The environment demo.sh made, activated, as the README says; then the headline command.
    activated = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"}
    command = ["mlflow", "run", ".", "-e", "prune", "--env-manager", "local", "-P", "sparsity=0.9"]
    prune = subprocess.run(
        command, cwd=project, env=activated, capture_output=True, text=True, timeout=1200
    )
    assert prune.returncode == 0, prune.stderr[-3000:]

    client = MlflowClient(f"sqlite:///{project / 'mlflow.db'}")
    demo_runs = client.search_runs([client.get_experiment_by_name("prunecxr").experiment_id])
    by_stage: dict[str, list] = {}
    for run in demo_runs:
        by_stage.setdefault(run.data.tags["prunecxr.stage"], []).append(run)
    assert {stage: len(runs) for stage, runs in by_stage.items()} == {
        "study": 1,
        "train": 2,
        "sweep": 1,
        "prune": 54,
        "analyze": 1,
    }
    assert {run.info.status for run in demo_runs} == {"FINISHED"}
    # The paper's headline finding appears in the demo (docs/demo.md, "The demo's findings").
    analyze_id = by_stage["analyze"][0].info.run_id
    correlations = pd.read_csv(
        client.download_artifacts(analyze_id, "tables/correlations.csv", str(tmp_path))
    )
    correlations = correlations.fillna({"definition": ""}).set_index(["x", "y", "definition"])
    headline = [("log_train_freq", "k20", ""), ("log_train_freq", "rel_ap_change_0.95", "")]
    for row in [*headline, ("log_freq_diff", "fcd", "paper")]:
        assert correlations.loc[row, "spearman_rho"] > 0, row
        assert correlations.loc[row, "spearman_p"] < 0.05, row
    # The demo's report opens with the replication table, marked illustrative (synthetic data).
    report = Path(client.download_artifacts(analyze_id, "report.html", str(tmp_path))).read_text()
    assert report.index("Did it replicate?") < report.index("Findings of the paper")
    assert "synthetic data (prunecxr synth)" in report
    newest_train = max(by_stage["train"], key=lambda run: run.info.start_time)
    (pruned,) = client.search_runs(["0"])  # MLflow's Default experiment: no --experiment-name
    assert pruned.info.status == "FINISHED"
    assert pruned.data.params["source_run_id"] == newest_train.info.run_id
    assert pruned.data.params["sparsity"] == "0.9"
    assert pruned.data.metrics["achieved_sparsity"] == pytest.approx(0.9, abs=1e-6)

    # The demo's sweep, analyzed again the same way (its cells are in experiment prunecxr).
    command = ["mlflow", "run", ".", "-e", "analyze", "--env-manager", "local"]
    analyze = subprocess.run(
        command, cwd=project, env=activated, capture_output=True, text=True, timeout=1200
    )
    assert analyze.returncode == 0, analyze.stderr[-3000:]
    analyzed = client.search_runs(["0"], "tags.`prunecxr.stage` = 'analyze'")
    assert analyzed[0].data.params["sweep_run_id"] == by_stage["sweep"][0].info.run_id
