"""SIGTERM, as `docker stop` or Kubernetes sends it, to a `prunecxr` that is PID 1 in its own PID
namespace (as in a container, where the kernel gives PID 1 no default action for it)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from tests.helpers import cli_env, kill, tiny_cli_options, wait_for

UNSHARE = shutil.which("unshare")
pytestmark = pytest.mark.skipif(
    UNSHARE is None or os.geteuid() != 0, reason="needs unshare and root (a PID namespace)"
)


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
        except (OSError, ValueError):
            continue  # a process that ended meanwhile
    return children


def _pid_in_namespace(pid: int) -> int:
    """`pid`'s number in its own PID namespace (the last of /proc/PID/status's NSpid)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    raise AssertionError(f"no NSpid for {pid}")


def _training_runs(experiment: str) -> list:
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


def test_sigterm_ends_a_pid_1_training_with_its_run_killed_and_exit_code_143(
    tiny_nih, cache_dir, mlflow_store, tmp_path
):
    command = [UNSHARE, "--pid", "--fork", "--mount-proc", sys.executable, "-m", "prunecxr"]
    command += ["train", *tiny_cli_options(tiny_nih, cache_dir), "--experiment", "sigterm"]
    command += ["--max-epochs", "1000", "--patience", "1000"]
    log = tmp_path / "train.log"
    with open(log, "w") as out:
        unshare = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=cli_env())
    try:

        def training() -> bool:  # an epoch logged: the run is in the middle of its work
            runs = _training_runs("sigterm")
            return bool(runs) and bool(mlflow.get_run(runs[0].info.run_id).data.metrics)

        wait_for(training, timeout=180, process=unshare)
        (pid_1,) = _children(unshare.pid)
        assert _pid_in_namespace(pid_1) == 1
        os.kill(pid_1, signal.SIGTERM)
        assert unshare.wait(timeout=30) == 143, log.read_text()[-3000:]
    finally:
        if unshare.poll() is None:
            kill(unshare)
    (run,) = _training_runs("sigterm")
    assert run.info.status == "KILLED"
    assert log.read_text().rstrip().endswith("terminated (SIGTERM)")


def test_an_interrupted_sweep_and_its_study_end_killed_not_failed(mlflow_store):
    """SIGTERM reaches the stages as KeyboardInterrupt (cli.main); every run open around the
    work ends KILLED, which MLflow's own context would mark FAILED."""
    from prunecxr import tracking

    mlflow.set_experiment("interrupted")  # this store's (an earlier test may have set another)
    with pytest.raises(KeyboardInterrupt):
        with tracking.start_run("study", run_name="study") as study_id:
            with tracking.start_run("sweep", run_name="sweep") as sweep_id:
                raise KeyboardInterrupt
    statuses = [mlflow.get_run(run_id).info.status for run_id in (study_id, sweep_id)]
    assert statuses == ["KILLED", "KILLED"]
