"""The outbox against a real `mlflow server`: a lost answer or a replay adds no metric point,
a torn last line of records.jsonl loses nothing else, and the folder's lock keeps a run's own
flush and a user's `prunecxr upload` from sending a record twice."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import threading

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from prunecxr import PrunecxrError, tracking
from prunecxr.processes import is_locked
from prunecxr.sources import rebuild_model
from prunecxr.tracking.outbox import Outbox
from prunecxr.tracking.record import _perform
from tests.faulty_proxy import FaultyProxy
from tests.helpers import wait_for


@pytest.fixture
def run_id(server_store, tmp_path) -> str:
    client = MlflowClient(server_store)
    return client.create_run(client.create_experiment(f"outbox-{tmp_path.name}")).info.run_id


def _outbox(folder, run_id: str, uri: str) -> Outbox:
    """The outbox a train run keeps (as record._kept_while_away makes it)."""
    perform = functools.partial(_perform, rebuild_model=rebuild_model)
    return Outbox(folder, run_id, uri, perform, tracking.server_answers)


def _metrics(step: int) -> dict:
    timestamp = 1_700_000_000_000 + 1000 * step
    return dict(kind="metrics", metrics={"loss": 1 / step}, step=step, timestamp=timestamp)


def _points(server: str, run_id: str) -> list[tuple[int, float, int]]:
    history = MlflowClient(server).get_metric_history(run_id, "loss")
    return sorted((m.step, m.value, m.timestamp) for m in history)


def test_a_lost_answer_adds_no_point_retried_or_replayed(server_store, tmp_path, monkeypatch):
    # MLflow's own retries off: the call fails, and the outbox retries or keeps it.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with FaultyProxy(server_store) as proxy:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
        mlflow.set_tracking_uri(proxy.url)
        tracking.use_experiment(f"lost-{tmp_path.name}")
        keep = tracking.KeepWhileAway(tmp_path / "outbox", rebuild_model)
        with tracking.start_run("train", keep_while_away=keep) as run_id:
            proxy.lose_answers = 1  # stored, the answer lost, the server answers: retried now
            tracking.log_metrics({"loss": 1.0}, step=1)
            proxy.lose_answers, proxy.away_once_lost = 1, True  # then away: kept, replayed
            tracking.log_metrics({"loss": 0.5}, step=2)
            assert (tmp_path / "outbox" / run_id / "records.jsonl").exists()
            assert proxy.lose_answers == 0 and proxy.away  # both answers were lost
            proxy.away = False
            tracking.log_metrics({"loss": 0.25}, step=3)  # kept (calls wait), sent at the end
    steps = [(step, value) for step, value, _ in _points(server_store, run_id)]
    assert steps == [(1, 1.0), (2, 0.5), (3, 0.25)]  # each once, none lost
    assert MlflowClient(server_store).get_run(run_id).info.status == "FINISHED"
    assert not (tmp_path / "outbox" / run_id).exists()


def test_a_torn_last_line_is_left_out_with_a_warning_and_the_rest_sent(
    server_store, run_id, tmp_path, prunecxr_warnings
):
    folder = tmp_path / run_id
    box = _outbox(folder, run_id, server_store)
    for step in (1, 2, 3):
        box.keep(_metrics(step))
    records = folder / "records.jsonl"
    with open(records, "a") as out:  # a crash in the middle of appending the 4th
        out.write('{"kind": "metrics", "metrics": {"loss": 0.2')

    assert tracking.upload_kept(folder, rebuild_model, server_store) == (run_id, 3)
    assert f"{records} line 4 is cut short (a crash while it was written): left out" in (
        prunecxr_warnings.text
    )
    assert _points(server_store, run_id) == [
        (step, 1 / step, 1_700_000_000_000 + 1000 * step) for step in (1, 2, 3)
    ]  # with their own timestamps
    assert not folder.exists()


def test_keeping_after_a_torn_line_first_drops_it(run_id, tmp_path, prunecxr_warnings):
    folder = tmp_path / run_id
    box = _outbox(folder, run_id, "http://127.0.0.1:9")
    box.keep(_metrics(1))
    with open(folder / "records.jsonl", "a") as out:  # the process died mid-append...
        out.write('{"kind": "met')
    _outbox(folder, run_id, "http://127.0.0.1:9").keep(_metrics(2))  # ...and its run resumed
    assert [record["step"] for record in box.records] == [1, 2]
    assert (folder / "records.jsonl").read_text().count("\n") == 2


def test_a_torn_line_before_the_last_is_an_error_and_nothing_is_sent(
    server_store, run_id, tmp_path
):
    folder = tmp_path / run_id
    box = _outbox(folder, run_id, server_store)
    box.keep(_metrics(1))
    with open(folder / "records.jsonl", "a") as out:  # not a crash: something else wrote here
        out.write('{"kind": "metrics", "metr\n' + json.dumps({**_metrics(3), "files": {}}) + "\n")
    records = folder / "records.jsonl"
    with pytest.raises(
        PrunecxrError, match=f"^{records} line 2 is not a record .*nothing was sent"
    ):
        tracking.upload_kept(folder, rebuild_model, server_store)
    assert _points(server_store, run_id) == []
    assert records.exists()


def test_an_upload_while_another_process_holds_the_folder_is_refused(
    server_store, run_id, tmp_path
):
    folder = tmp_path / run_id
    _outbox(folder, run_id, server_store).keep(_metrics(1))
    lock = folder / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from prunecxr.processes import file_lock\n"
         "with file_lock(sys.argv[1]): time.sleep(60)", str(lock)]
    )  # fmt: skip
    try:
        wait_for(lambda: is_locked(lock), 30, holder)
        with pytest.raises(PrunecxrError, match=f"another process is writing or sending {folder}"):
            tracking.upload_kept(folder, rebuild_model, server_store)
        assert _points(server_store, run_id) == []
    finally:
        holder.kill()
        holder.wait()
    assert tracking.upload_kept(folder, rebuild_model, server_store) == (run_id, 1)


def test_a_flush_that_waited_for_an_upload_sends_nothing_twice(server_store, run_id, tmp_path):
    folder = tmp_path / run_id
    with FaultyProxy(server_store) as proxy:
        run_side = _outbox(folder, run_id, proxy.url)
        for step in (1, 2, 3):
            run_side.keep(_metrics(step))
        proxy.answer_delay = 0.5  # the upload takes a while: the run's flush comes meanwhile
        upload = threading.Thread(
            target=tracking.upload_kept, args=(folder, rebuild_model, proxy.url)
        )
        upload.start()
        wait_for(lambda: is_locked(folder / ".lock"), 30)
        assert run_side.flush(now=True)  # waited for the upload, then found nothing to send
        upload.join()
        assert run_side.sent == 0
        sent = [path for _, path, _ in proxy.requests if path.endswith("/runs/log-batch")]
    assert len(sent) == 3
    assert [step for step, _, _ in _points(server_store, run_id)] == [1, 2, 3]
    assert not folder.exists()
