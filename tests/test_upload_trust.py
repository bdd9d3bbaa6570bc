"""`prunecxr upload FOLDER` trusts nothing in FOLDER: the server is the one the user chose (never
the one meta.json names), and every record and file path is checked before anything is sent.
Each crafted folder is refused with one line, and a real `mlflow server` (and the server the
folder names) got nothing."""

from __future__ import annotations

import json
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from prunecxr import PrunecxrError, tracking
from prunecxr.sources import rebuild_model
from tests.faulty_proxy import FaultyProxy
from tests.helpers import cli_env

METRICS = {"kind": "metrics", "metrics": {"loss": 0.5}, "step": 1, "timestamp": 1, "files": {}}


@pytest.fixture
def server(mlflow_server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # Credentials for the chosen server: they must never go to the one the folder names.
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret-password")
    mlflow.set_tracking_uri(mlflow_server)
    yield mlflow_server
    mlflow.set_tracking_uri(None)


@pytest.fixture
def run_id(server, tmp_path) -> str:
    client = MlflowClient(server)
    return client.create_run(client.create_experiment(f"trust-{tmp_path.name}")).info.run_id


@pytest.fixture
def elsewhere():
    """Another server (one that only notes what it gets), named by a crafted meta.json."""
    with FaultyProxy(None) as recorder:
        yield recorder


def _folder(tmp_path, run_id: str, uri: str, *records: dict):
    folder = tmp_path / "kept" / run_id
    (folder / "files" / "00000").mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _nothing_sent(server: str, run_id: str) -> bool:
    client = MlflowClient(server)
    return not client.get_metric_history(run_id, "loss") and not client.list_artifacts(run_id)


def _artifact(path: str, artifact_dir: str | None = None) -> dict:
    return {"kind": "artifact", "artifact_dir": artifact_dir, "files": {"file": path}}


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.txt"  # a file outside the folder
    path.write_text("password")
    return path


CRAFTED = {
    "absolute path": (lambda secret, folder: _artifact(str(secret)), "is not a relative path"),
    "..": (lambda s, f: _artifact("files/../../../secret.txt"), "is not a relative path"),
    "symlink out": (
        lambda secret, folder: _artifact(_link(folder / "files/00000/notes.txt", secret)),
        "leads out of the folder",
    ),
    "artifact dir out of the run": (
        lambda secret, folder: _artifact(_copy(folder / "files/00000/a.txt"), "../../x"),
        "artifact_dir ../../x is not a folder inside the run",
    ),
    "unknown kind": (lambda s, f: {"kind": "shell", "files": {}}, "unknown kind of record"),
    "not a number": (
        lambda s, f: {**METRICS, "metrics": {"loss": "1; DROP TABLE"}},
        "metric 'loss' is '1; DROP TABLE', not a number",
    ),
    "missing file": (lambda s, f: _artifact("files/00000/gone.txt"), "does not exist"),
}


def _link(link, target) -> str:
    link.symlink_to(target)
    return "files/00000/notes.txt"


def _copy(path) -> str:
    path.write_text("fine")
    return "files/00000/a.txt"


@pytest.mark.parametrize("case", CRAFTED)
def test_a_record_out_of_bounds_is_refused_before_anything_is_sent(
    case, server, run_id, tmp_path, secret
):
    folder = _folder(tmp_path, run_id, server, METRICS)  # line 1 is fine
    craft, problem = CRAFTED[case]
    with open(folder / "records.jsonl", "a") as out:
        out.write(json.dumps(craft(secret, folder)) + "\n")
    with pytest.raises(PrunecxrError) as refused:
        tracking.upload_kept(folder, rebuild_model, server)
    message = str(refused.value)
    assert message.startswith(f"{folder / 'records.jsonl'} line 2: ") and "\n" not in message
    assert problem in message and message.endswith("; nothing was sent")
    assert _nothing_sent(server, run_id)  # not even line 1
    assert (folder / "records.jsonl").exists()


def test_the_server_a_folder_names_is_not_used_unless_chosen(server, run_id, tmp_path, elsewhere):
    folder = _folder(tmp_path, run_id, elsewhere.url, METRICS)
    with pytest.raises(PrunecxrError) as refused:
        tracking.upload_kept(folder, rebuild_model)  # MLFLOW_TRACKING_URI: the real server
    assert str(refused.value) == (
        f"{folder} was kept for the tracking server {elsewhere.url}, not {server}; pass "
        f"--to-other-server to send it to {server} (a server that moved)"
    )
    assert _nothing_sent(server, run_id)

    assert tracking.upload_kept(folder, rebuild_model, to_other_server=True) == (run_id, 1)
    assert [m.value for m in MlflowClient(server).get_metric_history(run_id, "loss")] == [0.5]
    assert elsewhere.requests == []  # never asked, no credentials sent there


def test_upload_without_a_chosen_server_refuses_and_names_the_folders(run_id, tmp_path, elsewhere):
    folder = _folder(tmp_path, run_id, elsewhere.url, METRICS)
    env = {k: v for k, v in cli_env().items() if k != "MLFLOW_TRACKING_URI"}
    upload = [sys.executable, "-m", "prunecxr", "upload", str(folder)]
    refused = subprocess.run(upload, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.strip().splitlines()[-1] == (
        f"error: which tracking server? pass --tracking-uri or set MLFLOW_TRACKING_URI ({folder} "
        f"was kept for {elsewhere.url}; it is not used unless you choose it)"
    )
    assert elsewhere.requests == []
