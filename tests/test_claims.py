"""Claims on a run by real processes: each PID 1 in its own PID namespace (as containers sharing a
volume are), one MLflow store; two resumes of one train run; a heartbeat across a tracking
server's outage and a takeover on the far side of it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from prunecxr import tracking
from prunecxr.data import get_schema
from prunecxr.fitting import create_state
from prunecxr.processes import is_locked
from prunecxr.runtime import resolve_runtime
from prunecxr.stages.checkpoints import Checkpoints
from prunecxr.stages.kernel import Stage, open_stage
from prunecxr.tracking import ownership
from prunecxr.tracking.ownership import HEARTBEAT_TAG, OWNER_TAG, RunTakenOver
from tests.helpers import cli_env, kill, spawn_prunecxr, tiny_config, wait_for

needs_unshare = pytest.mark.skipif(
    shutil.which("unshare") is None or os.geteuid() != 0,
    reason="needs unshare(1) and root for a PID namespace per process",
)

# One process's claim on a run: holds it for argv[2] seconds.
CLAIMER = """
import os, sys, time
from prunecxr import PrunecxrError, tracking
from prunecxr.processes import process_id
from prunecxr.tracking import ownership
ownership.CLAIM_SETTLE_SECONDS = 1.0
if os.environ.get("WAIT_FOR_START"):  # the Unix time to claim at, on stdin
    tracking.get_run(sys.argv[1])  # the store opened: both claims start at the same instant
    print("ready", flush=True)
    time.sleep(max(0.0, float(sys.stdin.readline()) - time.time()))
try:
    with ownership.claimed(sys.argv[1], "sweep"):
        print(f"claimed by pid {os.getpid()} as {process_id()}", flush=True)
        time.sleep(float(sys.argv[2]))
except PrunecxrError as error:
    sys.exit(str(error))
"""


@pytest.fixture
def run_id(mlflow_store) -> str:
    tracking.use_experiment("prunecxr")
    experiment_id = mlflow.get_experiment_by_name("prunecxr").experiment_id
    return MlflowClient().create_run(experiment_id).info.run_id


def _claimer(run_id: str, hold: float, tmp: Path, **env: str) -> subprocess.Popen:
    """CLAIMER as PID 1 of a PID namespace of its own; `tmp` is its temporary folder (shared:
    one machine; its own: another container). Killing the returned process kills it."""
    tmp.mkdir(exist_ok=True)
    command = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
    command += [sys.executable, "-c", CLAIMER, run_id, str(hold)]
    return subprocess.Popen(
        command,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(TMPDIR=str(tmp), **env),
    )


def _claimed_line(process: subprocess.Popen) -> str:
    line = process.stdout.readline()
    assert line.startswith("claimed by pid 1 as "), (line, process.stderr.read())
    return line.split(" as ")[1].strip()


@needs_unshare
@pytest.mark.parametrize("machine", ["same", "other"])
def test_two_pid1_processes_on_one_run_one_is_refused(run_id, tmp_path, machine):
    """Both are `host:1`; the second is refused whether it sees the first's lock (same machine)
    or only its heartbeat (another container: its own temporary folder)."""
    first = _claimer(run_id, 60, tmp_path / "tmp-a")
    try:
        owner = _claimed_line(first)
        second = _claimer(run_id, 0, tmp_path / ("tmp-a" if machine == "same" else "tmp-b"))
        _, error = second.communicate(timeout=120)
        assert second.returncode == 1
        assert f"sweep {run_id} is already running (process {owner}" in error
        assert MlflowClient().get_run(run_id).data.tags[OWNER_TAG] == owner
    finally:
        kill(first)


@needs_unshare
def test_a_killed_owner_is_known_dead_at_once_here_and_by_its_heartbeat_elsewhere(run_id, tmp_path):
    first = _claimer(run_id, 60, tmp_path / "tmp-a")
    owner = _claimed_line(first)
    kill(first)  # SIGKILL: its heartbeat is fresh, its lock is gone
    elsewhere = _claimer(run_id, 0, tmp_path / "tmp-b")
    _, error = elsewhere.communicate(timeout=120)
    assert elsewhere.returncode == 1 and f"already running (process {owner}" in error
    here = _claimer(run_id, 0, tmp_path / "tmp-a")
    assert _claimed_line(here) != owner
    assert here.wait(timeout=60) == 0


@needs_unshare
def test_two_claims_at_the_same_moment_one_proceeds(run_id, tmp_path):
    """Two containers (no shared lock) claim at the same instant: the claim settles on one."""
    claimers = [_claimer(run_id, 3, tmp_path / f"tmp-{i}", WAIT_FOR_START="1") for i in (1, 2)]
    for claimer in claimers:
        assert claimer.stdout.readline() == "ready\n"
    start_at = f"{time.time() + 0.5}\n"
    for claimer in claimers:
        claimer.stdin.write(start_at)
        claimer.stdin.close()
    for claimer in claimers:
        claimer.wait(timeout=120)
    outcomes = [(claimer.stdout.read(), claimer.stderr.read()) for claimer in claimers]
    codes = sorted(claimer.returncode for claimer in claimers)
    assert codes == [0, 1], outcomes
    (refused,) = [error for claimer, (_, error) in zip(claimers, outcomes) if claimer.returncode]
    assert "at the same moment" in refused or "is already running" in refused


def test_two_resumes_of_one_run_one_is_refused_before_loading_data(
    tiny_nih, cache_dir, tmp_path, mlflow_store
):
    tracking.use_experiment("prunecxr")
    run_id = _train_run_with_a_checkpoint(tiny_config(tiny_nih, cache_dir))
    resume = ["train", "--resume", run_id, "--max-epochs", "2"]
    resume += ["--cache-dir", str(tmp_path / "fresh-cache")]  # a resume builds caches anew
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    processes = [spawn_prunecxr(*resume, log=logs[0])]
    time.sleep(1)
    processes.append(spawn_prunecxr(*resume, log=logs[1]))
    try:
        wait_for(lambda: any(p.poll() is not None for p in processes), 300)
        refused = next(i for i, p in enumerate(processes) if p.poll() is not None)
        winner = 1 - refused
        assert processes[refused].returncode == 1, logs[refused].read_text()
        assert f"train run {run_id} is already running" in logs[refused].read_text()
        wait_for(lambda: "caching" in logs[winner].read_text(), 300, processes[winner])
        assert "caching" not in logs[refused].read_text()  # refused before any cache build
    finally:
        for process in processes:
            kill(process)


def _train_run_with_a_checkpoint(config) -> str:
    """A train run whose uploaded checkpoint is that of its first epoch (without training)."""
    state = create_state(config, len(get_schema("nih-cxr-lt").classes), resolve_runtime("cpu"))
    state.epoch, state.epochs_since_best = 1, 0
    state.history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_mAUC": 0.5}]
    with tracking.start_run("train") as run_id, Checkpoints(run_id, config) as keeper:
        keeper.after_epoch(state)
    return run_id


def test_the_heartbeat_outlives_an_outage_and_a_takeover_stops_the_owner(
    mlflow_server, tmp_path, monkeypatch
):
    """The network between a sweep's process and its tracking server goes down; on the server's
    side another process takes the run over. When the line is back, the owner's retried beat
    finds the takeover within seconds; the owner stops and leaves the run RUNNING."""
    line = Line(int(mlflow_server.rsplit(":", 1)[1]))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", line.url)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(line.url)
    monkeypatch.setattr(ownership, "HEARTBEAT_SECONDS", 6.0)
    monkeypatch.setattr(ownership, "RETRY_SECONDS", 0.2)
    tracking.use_experiment("prunecxr")
    rival = {OWNER_TAG: "elsewhere:1:0123456789abcdef", HEARTBEAT_TAG: str(int(time.time()))}
    try:
        with pytest.raises(RunTakenOver, match="took over sweep"):
            with open_stage(Stage("sweep", "sweep", key=f"outage-{time.time()}")) as run_id:
                claimed_at = time.monotonic()
                line.cut()
                for key, value in rival.items():  # the far side of the partition
                    MlflowClient(tracking_uri=mlflow_server).set_tag(run_id, key, value)
                time.sleep(max(0.0, claimed_at + 6.5 - time.monotonic()))  # a beat has failed
                line.restore()
                back = time.monotonic()
                wait_for(lambda: _taken_over(run_id), 30)
                # retried: a beat that waited for the next regular one would come ~5.5 s after this
                assert time.monotonic() - back < 4.0
                ownership.ensure_mine(run_id)
        run = MlflowClient().get_run(run_id)
        assert run.info.status == "RUNNING"  # left to its new owner
        assert {k: run.data.tags[k] for k in rival} == rival  # no heartbeat written over it
    finally:
        mlflow.set_tracking_uri(None)
        line.close()


class Line:
    """A TCP line to a local server that can be cut (every connection dropped, new ones closed
    at once) and restored: a network outage between a client and its server."""

    def __init__(self, port: int):
        self.port, self.down, self.open = port, threading.Event(), []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def cut(self) -> None:
        self.down.set()
        for connection in self.open:
            connection.close()

    def restore(self) -> None:
        self.down.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                if self.down.is_set():
                    client.close()
                    continue
                server = socket.create_connection(("127.0.0.1", self.port))
                self.open += [client, server]
                for source, target in ((client, server), (server, client)):
                    threading.Thread(target=_pipe, args=(source, target), daemon=True).start()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
    with contextlib.suppress(OSError):
        target.shutdown(socket.SHUT_WR)


def _taken_over(run_id: str) -> bool:
    try:
        ownership.ensure_mine(run_id)
    except RunTakenOver:
        return True
    return False


def test_claims_do_not_outlive_their_process_in_forked_children(run_id, monkeypatch):
    """A forked child (a cache builder, a data loader worker) left behind by a killed owner
    must not keep the run's lock: its copy of the descriptor is closed at fork."""
    monkeypatch.setattr(ownership, "CLAIM_SETTLE_SECONDS", 0.1)
    with ownership.claimed(run_id, "sweep"):
        child = os.fork()
        if child == 0:
            time.sleep(30)
            os._exit(0)
    try:
        assert not is_locked(ownership._lock_path(run_id))  # the child lives, the lock is free
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_each_claim_beats_on_its_own_schedule(mlflow_store, monkeypatch):
    """A run claimed while the heartbeat thread waits out another run's long period still gets
    its first beat one period after its own claim (a beat that missed an outage would not be
    retried within seconds of the server's return)."""
    tracking.use_experiment("prunecxr")
    experiment_id = mlflow.get_experiment_by_name("prunecxr").experiment_id
    first, second = (MlflowClient().create_run(experiment_id).info.run_id for _ in range(2))
    monkeypatch.setattr(ownership, "CLAIM_SETTLE_SECONDS", 0.0)
    with ownership.claimed(first, "sweep", contested=False):
        time.sleep(0.5)  # the thread now waits out the first run's 30 s
        monkeypatch.setattr(ownership, "HEARTBEAT_SECONDS", 1.0)
        with ownership.claimed(second, "sweep", contested=False):
            claimed_at = _heartbeat(second)
            wait_for(lambda: _heartbeat(second) > claimed_at, 10)
        assert _heartbeat(first) <= claimed_at  # its own period has not come


def _heartbeat(run_id: str) -> int:
    return int(MlflowClient().get_run(run_id).data.tags[HEARTBEAT_TAG])
