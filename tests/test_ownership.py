"""Which process owns a run: alive by heartbeat, dead at once when its process is gone here."""

from __future__ import annotations

import os
import socket
import subprocess
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from prunecxr import PrunecxrError, tracking
from prunecxr.tracking.ownership import (
    HEARTBEAT_TAG,
    OWNER_TAG,
    STALE_SECONDS,
    is_alive,
    owned,
    refuse_if_alive,
)


@pytest.fixture
def run_id(mlflow_store) -> str:
    tracking.use_experiment("prunecxr")
    return (
        MlflowClient()
        .create_run(mlflow.get_experiment_by_name("prunecxr").experiment_id)
        .info.run_id
    )


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.parametrize(
    ("owner", "heartbeat_age", "alive"),
    [
        ("elsewhere:1", 5, True),  # another host, fresh heartbeat
        ("elsewhere:1", STALE_SECONDS + 5, False),  # another host, heartbeat gone stale
        ("here:dead", 5, False),  # this host, its process is gone: no need to wait
        ("here:live", 5, True),  # this host, a live process (pid 1)
        ("me", 5, False),  # this very process: a restarted container, not a rival
    ],
)
def test_liveness(run_id, owner, heartbeat_age, alive):
    host = socket.gethostname()
    owner = {
        "here:dead": f"{host}:{_dead_pid()}",
        "here:live": f"{host}:1",
        "me": f"{host}:{os.getpid()}",
    }.get(owner, owner)
    beat = str(int(time.time() - heartbeat_age))
    tracking.set_run_tags(run_id, {OWNER_TAG: owner, HEARTBEAT_TAG: beat})
    assert is_alive(MlflowClient().get_run(run_id)) is alive
    if alive:
        with pytest.raises(PrunecxrError, match=f"already running \\(process {owner}"):
            refuse_if_alive(run_id, "sweep")
    MlflowClient().set_terminated(run_id, "KILLED")  # whatever its owner: not running, not alive
    assert not is_alive(MlflowClient().get_run(run_id))


def test_owned_marks_the_run_and_a_contested_claim_settles(run_id, monkeypatch):
    monkeypatch.setattr("prunecxr.tracking.ownership.CLAIM_SETTLE_SECONDS", 0.1)
    with owned(run_id, contested=True):
        tags = MlflowClient().get_run(run_id).data.tags
        assert tags[OWNER_TAG].endswith(":" + str(os.getpid()))
        assert float(tags[HEARTBEAT_TAG]) == pytest.approx(time.time(), abs=5)
