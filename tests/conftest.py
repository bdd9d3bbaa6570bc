"""Shared fixtures: tiny synthetic datasets, an isolated MLflow store, a real MLflow server."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from prunecxr.data import get_schema
from prunecxr.data.synthetic import write_synthetic

TINY_SPLITS = {"train": 96, "val": 48, "test": 64}


def pytest_collection_modifyitems(config, items) -> None:
    """`gpu` tests run where torch sees a CUDA device and are skipped elsewhere, unless
    PRUNECXR_REQUIRE_GPU=1 (on a GPU machine, a broken CUDA setup then fails them)."""
    import torch

    if torch.cuda.is_available() or os.environ.get("PRUNECXR_REQUIRE_GPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_nih(tmp_path_factory) -> Path:
    """A 32 px synthetic NIH-CXR-LT with ~200 images (seconds to train a ResNet18 on)."""
    out = tmp_path_factory.mktemp("tiny-nih")
    write_synthetic(get_schema("nih-cxr-lt"), out, TINY_SPLITS, image_size=32, seed=1)
    return out


@pytest.fixture(scope="session")
def tiny_mimic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-mimic")
    write_synthetic(get_schema("mimic-cxr-lt"), out, TINY_SPLITS, image_size=32, seed=2)
    return out


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """An embedded sqlite store of this test's own (what users get with no server)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # file-based artifacts land under the test's directory
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` on 127.0.0.1 with server-served artifacts; stopped afterwards."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.start()
    finally:
        server.stop()


class MlflowServer:
    """A real `mlflow server` with its store and artifacts in `root`; it can be stopped and
    started again on the same port with the same data (a server that goes away)."""

    def __init__(self, root: Path):
        self.root, self.port, self.process = root, _free_port(), None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> str:
        command = [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"),
            *("--port", str(self.port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{self.root / 'server.db'}"),
            *("--artifacts-destination", str(self.root / "artifacts")),
        ]
        with open(self.root / "server.log", "a") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True
            )
        if not wait_until_ok(f"{self.url}/health", 90, lambda: self.process.poll() is None):
            tail = (self.root / "server.log").read_text()[-2000:]
            self.stop()
            raise RuntimeError(f"mlflow server did not start: {tail}")
        return self.url

    def stop(self) -> None:
        """Stop the server and its workers (their process group)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)
        self.process = None


def wait_until_ok(url: str, timeout: float, still_starting=lambda: True) -> bool:
    """Poll `url` until it answers 200 (True), `timeout` passes or still_starting() is False."""
    deadline = time.monotonic() + timeout
    # No proxies: urllib's global opener may have cached a proxy an earlier test set.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while time.monotonic() < deadline and still_starting():
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.5)
    return False


@pytest.fixture
def server_store(mlflow_server, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(mlflow_server)
    yield mlflow_server
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a subprocess: this interpreter's, plus `extra`, less the experiment and
    run that mlflow.set_experiment() exported for children of this process."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")
    }
    # `python` in MLproject commands must be this interpreter, as in an activated environment.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, **extra}


def spawn_prunecxr(*args: str, log: Path) -> subprocess.Popen:
    """`prunecxr ARGS` in the background (output to `log`), to be killed by a test."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "prunecxr", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=cli_env(),
        )


def wait_for(condition, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Poll `condition()` until it is true; fail if `timeout` passes or `process` ends first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended (exit code {process.returncode}) too early")
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s")
        time.sleep(0.3)


def kill(process: subprocess.Popen) -> None:
    """SIGKILL, as a crash or an out-of-memory kill would, and reap it."""
    process.kill()
    process.wait(timeout=30)
