"""Which process works on a run, so that re-running a command continues a dead process's run
but a second process started while the first is alive is refused (it would duplicate work).

A study, sweep or train run records its owner (`host:pid`) and a heartbeat (Unix time, renewed
every HEARTBEAT_SECONDS by a background thread) as tags. A run is alive while its heartbeat is
younger than STALE_SECONDS; on the owner's host, a run whose process is gone is dead at once.
A run that is not RUNNING (finished, failed, killed) is never alive."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

from prunecxr import PrunecxrError, tracking

OWNER_TAG = "prunecxr.owner"
HEARTBEAT_TAG = "prunecxr.heartbeat"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 120.0

_beating: set[str] = set()
_lock = threading.Lock()
_thread: threading.Thread | None = None


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def owned(run_id: str) -> Iterator[None]:
    """Mark `run_id` as this process's and keep its heartbeat going inside the block."""
    tracking.set_run_tags(run_id, {OWNER_TAG: _me(), HEARTBEAT_TAG: str(int(time.time()))})
    with _lock:
        _beating.add(run_id)
        _start_heartbeat()
    try:
        yield
    finally:
        with _lock:
            _beating.discard(run_id)


def _start_heartbeat() -> None:
    global _thread
    if _thread is None or not _thread.is_alive():
        _thread = threading.Thread(target=_beat, name="prunecxr-heartbeat", daemon=True)
        _thread.start()


def _beat() -> None:
    while True:
        time.sleep(HEARTBEAT_SECONDS)
        with _lock:
            run_ids = list(_beating)
        for run_id in run_ids:
            # A tracking server that is briefly away must not end the run: try again next beat.
            with contextlib.suppress(Exception):
                tracking.set_run_tags(run_id, {HEARTBEAT_TAG: str(int(time.time()))})


def refuse_if_alive(run_id: str, what: str) -> None:
    """A clear error when another live process works on `run_id` (a study, sweep or train)."""
    run = tracking.get_run(run_id)
    if not is_alive(run):
        return
    owner = run.data.tags.get(OWNER_TAG, "?")
    age = time.time() - float(run.data.tags.get(HEARTBEAT_TAG, 0))
    raise PrunecxrError(
        f"{what} {run_id} is already running (process {owner}, heartbeat {age:.0f} s ago); a "
        f"second process would duplicate its work: wait for it to end, or stop it and run this "
        f"again to continue it"
    )


def is_alive(run) -> bool:
    if run.info.status != "RUNNING" or OWNER_TAG not in run.data.tags:
        return False
    host, _, pid = run.data.tags[OWNER_TAG].rpartition(":")
    if host == socket.gethostname() and not _process_exists(int(pid)):
        return False  # it died on this host: no need to wait for its heartbeat to go stale
    # A pid that exists may still be another process (containers sharing a host name each
    # number their own processes), so the heartbeat decides.
    heartbeat = float(run.data.tags.get(HEARTBEAT_TAG, 0))
    return time.time() - heartbeat < STALE_SECONDS


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True
