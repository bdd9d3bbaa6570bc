"""Helpers that several test modules share: running `prunecxr` as a user would, a real
`mlflow server`, polling and killing processes, and a tiny training configuration."""

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prunecxr.specs import TrainConfig

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """Environment for a subprocess: this interpreter's, plus `extra`, less the experiment and
    run that mlflow.set_experiment() exported for children of this process."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_RUN_ID")
    }
    # `python` in MLproject commands must be this interpreter, as in an activated environment.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return {**env, **extra}


def prunecxr(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`prunecxr ARGS` run to its end (environment: cli_env(**env)), its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "prunecxr", *args],
        capture_output=True,
        text=True,
        env=cli_env(**env),
        timeout=900,
    )


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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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


class MlflowServer:
    """A real `mlflow server` with its store and artifacts in `root`; it can be stopped and
    started again on the same port with the same data (a server that goes away)."""

    def __init__(self, root: Path):
        self.root, self.port, self.process = root, free_port(), None
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


def tiny_config(data_dir: Path, cache_dir: Path, **overrides) -> TrainConfig:
    """A ResNet18 on 32 px images for 2 epochs on the CPU: seconds on the tiny datasets."""
    # Imported here, not at the top, so that conftest (which imports this module) does not
    # load the training code and torch for every test.
    from prunecxr.specs import TrainConfig

    settings = dict(
        dataset="nih-cxr-lt",
        data_dir=str(data_dir),
        label_dir=str(data_dir),
        arch="resnet18",
        pretrained="none",
        image_size=32,
        batch_size=32,
        lr=1e-3,
        max_epochs=2,
        patience=5,
        device="cpu",
        cache_dir=str(cache_dir),
    )
    return TrainConfig.from_flat(**{**settings, **overrides})


def tiny_cli_options(data_dir: Path, cache_dir: Path, device: str = "cpu") -> list[str]:
    """tiny_config's settings as command-line options (max_epochs and patience aside)."""
    return [
        *("--data-dir", str(data_dir), "--arch", "resnet18", "--image-size", "32"),
        *("--batch-size", "32", "--lr", "1e-3", "--device", device),
        *("--cache-dir", str(cache_dir)),
    ]
