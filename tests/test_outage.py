"""A tracking server that goes away mid-run: a real `mlflow server` stopped while `prunecxr
train` runs, then started again on the same port with the same store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from prunecxr.sources import load_source
from tests.helpers import MlflowServer, cli_env, tiny_cli_options, wait_for

pytestmark = pytest.mark.slow
EPOCHS = 8  # enough for the server to be stopped well before the last one


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A server of this test's own; this process (load_source) and its commands use it."""
    server = MlflowServer(tmp_path / "server")
    server.root.mkdir()
    server.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    mlflow.set_tracking_uri(server.url)
    yield server
    mlflow.set_tracking_uri(None)
    server.stop()


def _train(server: MlflowServer, data: Path, cache: Path, wait_seconds: int) -> subprocess.Popen:
    options = tiny_cli_options(data, cache)
    env = cli_env(PRUNECXR_OUTAGE_WAIT_SECONDS=str(wait_seconds))
    return subprocess.Popen(
        [sys.executable, "-m", "prunecxr", "train", *options, "--max-epochs", str(EPOCHS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _stop_after_first_epoch(server: MlflowServer, training: subprocess.Popen) -> str:
    """Stop the server once epoch 1's metrics are in; -> the train run's id."""
    client = MlflowClient(server.url)

    def first_epoch_logged() -> bool:
        runs = client.search_runs(
            [e.experiment_id for e in client.search_experiments()], "metrics.train_loss > 0"
        )
        return bool(runs)

    wait_for(first_epoch_logged, 240, training)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    server.stop()
    return run.info.run_id


def _assert_complete(server: MlflowServer, run_id: str) -> None:
    """Every epoch's metrics, the final results and the model arrived; the run is FINISHED."""
    client = MlflowClient(server.url)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "val_loss")]
    assert sorted(steps) == list(range(1, EPOCHS + 1))  # each epoch once, none lost
    assert {"test_mAP", "test_mAUC", "best_epoch"} <= set(run.data.metrics)
    names = {item.path for item in client.list_artifacts(run_id)}
    assert {"history.csv", "predictions.parquet", "per_class_metrics.csv"} <= names
    assert "model_weights.pt" in names and "checkpoints" in names
    assert load_source(f"runs:/{run_id}/model").model.fc.out_features == 20


def _train_through_an_outage(server, data, cache, wait_seconds, while_away=lambda *_: None):
    """`prunecxr train` with the server stopped once epoch 1 is logged; `while_away(run_id,
    training)` runs then. -> (run id, exit code, stderr)."""
    training = _train(server, data, cache, wait_seconds)
    try:
        run_id = _stop_after_first_epoch(server, training)
        while_away(run_id, training)
        _, stderr = training.communicate(timeout=300)
    finally:
        training.kill()
    return run_id, training.returncode, stderr


def test_training_goes_on_while_the_server_is_away_and_sends_everything_when_it_is_back(
    server, tiny_nih, tmp_path
):
    cache = tmp_path / "cache"

    def back_after_calls_were_kept(run_id: str, training: subprocess.Popen) -> None:
        kept = cache / "outbox" / run_id / "records.jsonl"
        wait_for(kept.exists, 120, training)  # the run logs on while the server is away
        server.start()

    run_id, code, stderr = _train_through_an_outage(
        server, tiny_nih, cache, 240, back_after_calls_were_kept
    )
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "does not answer: the run goes on" in stderr and "is back:" in stderr
    _assert_complete(server, run_id)
    assert not (cache / "outbox" / run_id).exists()


def test_a_server_that_stays_away_leaves_a_folder_and_the_command_that_sends_it(
    server, tiny_nih, tmp_path
):
    cache = tmp_path / "cache"
    run_id, code, stderr = _train_through_an_outage(server, tiny_nih, cache, wait_seconds=2)
    folder = cache / "outbox" / run_id
    assert code == 1
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: the tracking server {server.url} went away during run {run_id} and has not come "
        f"back: what the run logged since is kept in {folder}; when the server is back, send it "
        f"with: prunecxr upload {folder}"
    )
    upload = [sys.executable, "-m", "prunecxr", "upload", str(folder)]
    refused = subprocess.run(upload, capture_output=True, text=True, env=cli_env())
    assert refused.returncode == 1 and "does not answer" in refused.stderr
    assert folder.exists()  # nothing lost while the server is still away

    server.start()
    assert MlflowClient(server.url).get_run(run_id).info.status == "RUNNING"
    sent = subprocess.run(upload, capture_output=True, text=True, env=cli_env())
    assert sent.returncode == 0, sent.stderr
    assert f"run {run_id}: " in sent.stdout
    _assert_complete(server, run_id)
    assert not folder.exists()
