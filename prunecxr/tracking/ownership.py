"""Which process works on a run, so that re-running a command continues a dead process's run
but a second process started while the first is alive is refused (it would duplicate work).

A study, sweep or train run records its owner (`host:pid`) and a heartbeat (Unix time, renewed
every HEARTBEAT_SECONDS by a background thread) as tags. A run is alive while its heartbeat is
younger than STALE_SECONDS; on the owner's host, a run whose process is gone is dead at once.
A run that is not RUNNING (finished, failed, killed) is never alive."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator

from prunecxr import PrunecxrError
from prunecxr.processes import process_alive
from prunecxr.tracking.record import set_run_tags
from prunecxr.tracking.store import end_unfinished_children, get_run

OWNER_TAG = "prunecxr.owner"
HEARTBEAT_TAG = "prunecxr.heartbeat"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 120.0  # compares the writer's clock with the reader's: keep hosts in sync (NTP)
CLAIM_SETTLE_SECONDS = 2.0

log = logging.getLogger(__name__)

_beating: set[str] = set()
_lock = threading.Lock()
_thread: threading.Thread | None = None


def _me() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def take_over(run_id: str, what: str) -> None:
    """Before continuing `run_id` (a study or sweep a process left unfinished): refused while
    that process lives; the runs it left RUNNING underneath are marked KILLED."""
    refuse_if_alive(run_id, what)
    end_unfinished_children(run_id, still_alive=is_alive)
    log.info("continuing %s %s", what, run_id)


@contextlib.contextmanager
def owned(run_id: str, *, contested: bool = False) -> Iterator[None]:
    """Mark `run_id` as this process's and keep its heartbeat going inside the block. A
    `contested` run (an unfinished one being continued) is re-read after a moment: of two
    processes that took it over at the same time, the one whose claim was overwritten stops."""
    set_run_tags(run_id, {OWNER_TAG: _me(), HEARTBEAT_TAG: str(int(time.time()))})
    if contested:
        time.sleep(CLAIM_SETTLE_SECONDS)
        owner = get_run(run_id).data.tags.get(OWNER_TAG)
        if owner != _me():
            raise PrunecxrError(f"process {owner} took over {run_id} at the same moment; let it")
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
                set_run_tags(run_id, {HEARTBEAT_TAG: str(int(time.time()))})


def refuse_if_alive(run_id: str, what: str) -> None:
    """A clear error when another live process works on `run_id` (a study, sweep or train)."""
    run = get_run(run_id)
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
    owner = run.data.tags.get(OWNER_TAG)
    if run.info.status != "RUNNING" or owner is None or owner == _me():
        return False  # a restarted container can be its dead predecessor's pid on its host
    host, _, pid = owner.rpartition(":")
    if host == socket.gethostname() and not process_alive(int(pid)):
        return False  # it died on this host: no need to wait for its heartbeat to go stale
    # A pid that exists may still be another process (containers sharing a host name each
    # number their own processes), so the heartbeat decides; hosts' clocks must roughly agree.
    heartbeat = float(run.data.tags.get(HEARTBEAT_TAG, 0))
    return time.time() - heartbeat < STALE_SECONDS
