"""Which process owns a run: mine only by this process's random id; another owner is alive by
its lock on this machine or, from elsewhere, by its heartbeat (tests/test_claims.py: real
processes, each PID 1 in its own PID namespace)."""

from __future__ import annotations

import os
import socket
import time

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from prunecxr import PrunecxrError, tracking
from prunecxr.processes import is_locked, process_id
from prunecxr.tracking.ownership import (
    HEARTBEAT_TAG,
    OWNER_TAG,
    STALE_SECONDS,
    _lock_path,
    claimed,
    is_alive,
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


@pytest.mark.parametrize(
    ("owner", "heartbeat_age", "alive"),
    [
        ("elsewhere:1", 5, True),  # a tag from before process ids (host:pid): heartbeat decides
        ("elsewhere:1", STALE_SECONDS + 5, False),
        ("HOST:1:0123456789abcdef", 5, True),  # another container's PID 1, same host name
        ("HOST:1:0123456789abcdef", STALE_SECONDS + 5, False),
        # Same host and PID as this process, another random part: another process (a container
        # that is PID 1 like us), not this one.
        ("HOST:PID:0123456789abcdef", 5, True),
        ("me", STALE_SECONDS + 5, False),  # this very process: not a rival
    ],
)
def test_liveness(run_id, owner, heartbeat_age, alive):
    host, pid = socket.gethostname(), str(os.getpid())
    owner = process_id() if owner == "me" else owner.replace("HOST", host).replace("PID", pid)
    beat = str(int(time.time() - heartbeat_age))
    tracking.set_run_tags(run_id, {OWNER_TAG: owner, HEARTBEAT_TAG: beat})
    assert is_alive(MlflowClient().get_run(run_id)) is alive
    if alive:
        with pytest.raises(PrunecxrError, match=f"already running \\(process {owner}"):
            refuse_if_alive(run_id, "sweep")
    MlflowClient().set_terminated(run_id, "KILLED")  # whatever its owner: not running, not alive
    assert not is_alive(MlflowClient().get_run(run_id))


def test_a_claim_tags_the_run_and_holds_its_lock_here(run_id, monkeypatch):
    monkeypatch.setattr("prunecxr.tracking.ownership.CLAIM_SETTLE_SECONDS", 0.1)
    lock = _lock_path(run_id)
    with claimed(run_id, "sweep"):
        tags = MlflowClient().get_run(run_id).data.tags
        assert tags[OWNER_TAG] == process_id()
        assert float(tags[HEARTBEAT_TAG]) == pytest.approx(time.time(), abs=5)
        assert is_locked(lock) and lock.read_text() == process_id()
        with claimed(run_id, "sweep"):  # claimed again by its owner (a resume, then its stage)
            assert is_locked(lock)
        assert is_locked(lock)  # the inner claim only counted
    assert not is_locked(lock)
    assert lock.read_text() == process_id()  # "let go": a later process may continue it at once
