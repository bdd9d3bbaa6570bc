"""Scale out for real: a Ray cluster of two nodes on loopback addresses (a head and a worker
node, as `ray start` makes them on two machines, with token authentication) against a real
`mlflow server`; a node killed in the middle of a sweep; a driver and a node without the token
refused."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from prunecxr import tracking
from prunecxr.stages.prune import CELL_TAG
from prunecxr.stages.train import run_training
from tests.helpers import (
    cli_env,
    free_port,
    prunecxr,
    spawn_prunecxr,
    tiny_cli_options,
    tiny_config,
    wait_for,
)

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"  # Ray turns 127.0.0.1 into the outward address
RAY_ENV = {  # every node and driver of the tests' cluster (docs/scale-out.md)
    "RAY_AUTH_MODE": "token",
    "RAY_AUTH_TOKEN": secrets.token_hex(32),  # this test session's cluster's own
    "RAY_USAGE_STATS_ENABLED": "0",
    # A lost node is declared dead after 3 missed 1-second health checks (default: 5 x 3 s).
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def _ray(*args: str, **env: str) -> subprocess.CompletedProcess:
    ray = Path(sys.executable).parent / "ray"
    environment = cli_env(**{**RAY_ENV, **env})
    return subprocess.run(
        [str(ray), *args], capture_output=True, text=True, env=environment, timeout=120
    )


def _ray_ok(*args: str) -> None:
    result = _ray(*args)
    assert result.returncode == 0, result.stdout + result.stderr


def _ray_pids(marker: str = "") -> set[int]:
    """Ray's processes (those whose command line holds `marker`, e.g. a node's address)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            is_ray = "ray::" in command or "/ray/" in command or "raylet" in command
            if is_ray and marker in command:
                pids.add(int(entry.name))
    return pids


def _with_children(pids: set[int]) -> set[int]:
    """`pids` and every process below them (a raylet's workers are its children)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = set(pids)
    while True:
        more = {pid for pid, parent in parents.items() if parent in found} - found
        if not more:
            return found
        found |= more


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _start_worker_node(address: str) -> None:
    _ray_ok("start", "--address", address, "--node-ip-address", WORKER_IP, "--num-cpus", "1")


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node and a worker node (1 CPU each); every process of theirs is stopped after."""
    temp = tempfile.mkdtemp(prefix="rayt", dir="/tmp")  # short: Ray's socket paths are limited
    address = f"{HEAD_IP}:{free_port()}"
    before = _ray_pids()
    try:
        _ray_ok(
            "start",
            "--head",
            "--node-ip-address",
            HEAD_IP,
            "--port",
            address.split(":")[1],
            "--num-cpus",
            "1",
            "--include-dashboard=false",
            "--temp-dir",
            temp,
        )
        _start_worker_node(address)
        yield address
    finally:
        _kill(_ray_pids() - before)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def trained_on_server(tiny_nih, cache_dir, server_store) -> str:
    tracking.use_experiment("scale-out")
    return run_training(tiny_config(tiny_nih, cache_dir, max_epochs=1))


def _cells(sweep_id: str) -> list:
    runs = MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("scale-out").experiment_id],
        f"tags.`mlflow.parentRunId` = '{sweep_id}'",
    )
    return [run for run in runs if run.data.tags.get("prunecxr.stage") == "prune"]


def _finished_by_cell(sweep_id: str) -> dict[str, list]:
    finished: dict[str, list] = {}
    for run in _cells(sweep_id):
        if run.info.status == "FINISHED":
            finished.setdefault(run.data.tags[CELL_TAG], []).append(run)
    return finished


def _sweep_args(model: str, cache_dir: Path, sparsities: str, *extra: str) -> list[str]:
    return [
        "sweep",
        "--model-uri",
        model,
        "--methods",
        "l1,random",
        "--sparsities",
        sparsities,
        "--device",
        "cpu",
        "--batch-size",
        "64",
        "--cache-dir",
        str(cache_dir),
        "--experiment",
        "scale-out",
        *extra,
    ]


def test_a_sweep_on_ray_logs_the_same_runs_and_numbers_as_a_local_one(
    ray_cluster, trained_on_server, cache_dir
):
    model = f"runs:/{trained_on_server}/model"
    on_ray = prunecxr(
        *_sweep_args(model, cache_dir, "0,0.5,0.9"),
        "--executor",
        "ray",
        "--ray-address",
        ray_cluster,
        "--cells-per-task",
        "2",
        **RAY_ENV,
    )
    assert on_ray.returncode == 0, on_ray.stderr[-3000:]
    local = prunecxr(*_sweep_args(model, cache_dir, "0,0.5,0.9"), "--max-retries", "0")
    assert local.returncode == 0, local.stderr[-3000:]
    # The same sweep key: the local run continues nothing (the Ray sweep finished) but makes its
    # own sweep; both hold every cell once, with the same names and numbers.
    ray_id, local_id = (r.stdout.split("sweep run ")[1].split()[0] for r in (on_ray, local))
    assert ray_id != local_id
    by_executor = [_finished_by_cell(ray_id), _finished_by_cell(local_id)]
    for cells in by_executor:
        assert len(cells) == 6 and all(len(runs) == 1 for runs in cells.values())
    for key, (ray_run,) in by_executor[0].items():
        (local_run,) = by_executor[1][key]
        assert ray_run.info.run_name == local_run.info.run_name
        for metric in ("test_mAP", "test_mAUC", "achieved_sparsity", "nonzero_params"):
            assert ray_run.data.metrics[metric] == local_run.data.metrics[metric], (key, metric)


def test_a_worker_node_lost_mid_sweep_loses_no_cell_and_duplicates_none(
    ray_cluster, trained_on_server, cache_dir, tmp_path
):
    model = f"runs:/{trained_on_server}/model"
    args = _sweep_args(model, cache_dir, "0:0.6:0.1")
    args += ["--executor", "ray", "--ray-address", ray_cluster, "--cells-per-task", "1"]
    os.environ.update(RAY_ENV)  # spawn_prunecxr passes this process's environment
    sweep = spawn_prunecxr(*args, log=tmp_path / "sweep.log")
    sweep_id = None

    def some_cells_done() -> bool:
        nonlocal sweep_id
        runs = mlflow.search_runs(
            experiment_names=["scale-out"],
            filter_string="tags.`prunecxr.stage` = 'sweep' and attributes.status = 'RUNNING'",
            output_format="list",
        )
        sweep_id = runs[0].info.run_id if runs else None
        return sweep_id is not None and len(_finished_by_cell(sweep_id)) >= 3

    wait_for(some_cells_done, timeout=300, process=sweep)
    _kill(_with_children(_ray_pids(f"={WORKER_IP}")))  # the node and its tasks: a machine lost
    assert sweep.wait(timeout=600) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    output = (tmp_path / "sweep.log").read_text()
    cells = _finished_by_cell(sweep_id)
    assert len(cells) == 14, output[-3000:]
    assert all(len(runs) == 1 for runs in cells.values())  # nothing duplicated
    assert "retrying" in output and "14 cells done" in output
    assert not [run for run in _cells(sweep_id) if run.info.status == "RUNNING"]
    _start_worker_node(ray_cluster)  # for the tests after this one


def test_train_seeds_run_as_ray_tasks_one_train_run_each_and_continue(
    ray_cluster, tiny_nih, cache_dir, server_store
):
    command = [
        "train",
        *tiny_cli_options(tiny_nih, cache_dir),
        "--max-epochs",
        "1",
        "--experiment",
        "seeds",
        "--seeds",
        "2",
        "--executor",
        "ray",
        "--ray-address",
        ray_cluster,
    ]
    result = prunecxr(*command, **RAY_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["seeds"], output_format="list")
    assert sorted(run.data.params["seed"] for run in runs) == ["0", "1"]
    assert {run.info.status for run in runs} == {"FINISHED"}
    for run in runs:
        assert f"train run {run.info.run_id} (seed {run.data.params['seed']})" in result.stdout
    again = prunecxr(*command, **RAY_ENV)  # the same command: both seeds are done
    assert again.returncode == 0, again.stderr[-3000:]
    lines = [
        [x for x in r.stdout.splitlines() if x.startswith("train run")] for r in (result, again)
    ]
    assert lines[0] == lines[1] and len(lines[0]) == 2
    assert len(mlflow.search_runs(experiment_names=["seeds"], output_format="list")) == 2


# Strangers to the cluster give up after 2 connection attempts, not Ray's 20 (seconds).
STRANGER = {"RAY_gcs_server_port_wait_time_s": "2"}


def test_a_driver_or_a_node_without_the_clusters_token_is_refused(
    ray_cluster, tiny_nih, cache_dir, server_store
):
    command = ["train", *tiny_cli_options(tiny_nih, cache_dir), "--max-epochs", "1"]
    command += ["--experiment", "stranger", "--seeds", "2", "--executor", "ray"]
    # A driver without a token (authentication off, as Ray's default is).
    no_token = {**RAY_ENV, "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN": "", **STRANGER}
    driver = prunecxr(*command, "--ray-address", ray_cluster, **no_token)
    assert driver.returncode == 1, driver.stderr[-3000:]
    last_line = driver.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"error: cannot connect to the Ray cluster at {ray_cluster}")
    runs = mlflow.search_runs(experiment_names=["stranger"], output_format="list")
    assert not [run for run in runs if run.info.status == "FINISHED"]
    # A node with another token.
    node = _ray(
        *("start", "--address", ray_cluster, "--node-ip-address", "127.0.0.4", "--num-cpus", "1"),
        RAY_AUTH_TOKEN=secrets.token_hex(32),
        **STRANGER,
    )
    assert node.returncode != 0
    assert (
        "InvalidAuthToken: Authentication token is missing or incorrect"
        in node.stdout + node.stderr
    )
