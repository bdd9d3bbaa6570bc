"""Which process works on a run, so that re-running a command continues a dead process's run
but a second process started while the first is alive is refused (it would duplicate work).

A study, sweep or train run records its owner (`processes.process_id()`: random, new in every
process, so two containers that are each PID 1 on hosts of the same name are told apart) and a
heartbeat (Unix time) as tags. A run is mine only when its owner tag is my id. Another owner is
alive:

- when it works on this machine (or one sharing its temporary folder): while it holds the run's
  lock file there (the kernel drops a dead process's lock at once, however it died);
- else while its heartbeat is younger than STALE_SECONDS (the only way to tell across machines
  and containers; a tag in the older `host:pid` form is judged this way too).

A run that is not RUNNING (finished, failed, killed) is never alive.

The heartbeat is renewed every HEARTBEAT_SECONDS by a background thread, and every
RETRY_SECONDS while the tracking server does not answer, so that it lands within seconds of the
server's return. A server away for longer than about STALE_SECONDS - HEARTBEAT_SECONDS lets a
process on another machine take the run over; each beat also reads the owner tag, and a process
that finds another's id there stops at its stage's next safe point (`ensure_mine`: after an
epoch, between sweep cells and between a study's stages) without logging more, and leaves the
run RUNNING for its new owner."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from prunecxr import PrunecxrError
from prunecxr.processes import is_locked, process_id
from prunecxr.tracking.record import set_run_tags
from prunecxr.tracking.store import end_unfinished_children, get_run, server_answers

OWNER_TAG = "prunecxr.owner"
HEARTBEAT_TAG = "prunecxr.heartbeat"
HEARTBEAT_SECONDS = 30.0
RETRY_SECONDS = 5.0  # a beat that did not reach the server is tried again this soon
# Compares the writer's clock with the reader's: keep hosts in sync (NTP). Long enough that a
# tracking server restarted or briefly unreachable (minutes) does not hand a live run over.
STALE_SECONDS = 300.0
# Two processes that take over one run at the same moment both write their id, wait this long
# and read it back: the one whose id is not there stops. It must exceed the time between a
# claimer's liveness check and its write (one request).
CLAIM_SETTLE_SECONDS = 2.0

log = logging.getLogger(__name__)


class RunTakenOver(PrunecxrError):
    """Another process took over a run this one worked on (see the module's docstring)."""


@dataclass
class _Claim:
    what: str  # how messages name the run ("train run", "sweep", ...)
    lock_fd: int | None  # this machine's lock on the run (None: no lock folder here)
    depth: int = 1  # claimed() entered this many times (a resume, then its stage)
    lost_to: str | None = None  # the owner found in the tag instead of this process
    # Each run beats on its own schedule, the first a full period after its claim wrote one.
    beat_due: float = field(default_factory=lambda: time.monotonic() + HEARTBEAT_SECONDS)


_claims: dict[str, _Claim] = {}  # run id -> this process's claim on it
_lock = threading.Lock()
_thread: threading.Thread | None = None
_claims_changed = threading.Event()  # wakes the heartbeat thread to see a new claim's schedule


@contextlib.contextmanager
def claimed(run_id: str, what: str, *, contested: bool = True) -> Iterator[None]:
    """Make `run_id` this process's inside the block: owner tag, heartbeat, lock. A
    `contested` run (an unfinished one being continued) is refused while another process
    lives on it; of two that take it over at the same moment, one is refused; the runs a dead
    owner left RUNNING underneath are marked KILLED. Enter it before any slow work on an
    existing run. Entered again for a run this process holds, it only counts. On leaving, a run
    that was taken over meanwhile is left RUNNING for its new owner."""
    with _lock:
        held = _claims.get(run_id)
        if held is not None:
            held.depth += 1
    if held is not None:
        try:
            yield
        finally:
            with _lock:
                held.depth -= 1
        return
    claim = _claim(run_id, what, contested)
    try:
        if contested:
            end_unfinished_children(run_id, still_alive=is_alive)
        yield
    finally:
        _release(run_id, claim)


def ensure_mine(run_id: str | None) -> None:
    """A RunTakenOver error if another process took over `run_id` (as this process's heartbeat
    found): call it at a stage's safe points, before logging more."""
    claim = _claims.get(run_id) if run_id else None
    if claim is not None and claim.lost_to is not None:
        raise RunTakenOver(
            f"process {claim.lost_to} took over {claim.what} {run_id} (this process's heartbeat "
            f"had not reached the tracking server for {STALE_SECONDS:.0f} s, or both claimed it "
            f"at once); this process stops here and leaves the run to it"
        )


def refuse_if_alive(run_id: str, what: str) -> None:
    """A clear error when another live process works on `run_id` (a study, sweep or train)."""
    run = get_run(run_id)
    if is_alive(run):
        _refuse(run, what)


def is_alive(run) -> bool:
    owner = run.data.tags.get(OWNER_TAG)
    if run.info.status != "RUNNING" or owner is None or owner == process_id():
        return False
    here = _works_here(run.info.run_id, owner)
    if here is not None:
        return here
    return _heartbeat_age(run) < STALE_SECONDS


def _claim(run_id: str, what: str, contested: bool) -> _Claim:
    """Check, then write the owner tag at once (the gap is what CLAIM_SETTLE_SECONDS covers)."""
    if contested:
        refuse_if_alive(run_id, what)
    lock_fd = _lock_here(run_id)
    if lock_fd is False:  # a process on this machine took the lock since the check
        _refuse(get_run(run_id), what)
    claim = _Claim(what, lock_fd)
    try:
        set_run_tags(run_id, {OWNER_TAG: process_id(), HEARTBEAT_TAG: str(int(time.time()))})
        if contested:
            time.sleep(CLAIM_SETTLE_SECONDS)
            owner = get_run(run_id).data.tags.get(OWNER_TAG)
            if owner != process_id():
                raise PrunecxrError(
                    f"process {owner} took over {what} {run_id} at the same moment; let it"
                )
    except BaseException:
        _unlock(claim.lock_fd)
        raise
    with _lock:
        _claims[run_id] = claim
        _start_heartbeat()
    return claim


def _release(run_id: str, claim: _Claim) -> None:
    with _lock:
        _claims.pop(run_id, None)
    # A server away now (a run whose end is kept for `prunecxr upload`): the beat's finding
    # stands; asking would hold this process in MLflow's retries for minutes.
    if server_answers(mlflow.get_tracking_uri()):
        with contextlib.suppress(Exception):
            _check_owner(run_id, claim)
    _unlock(claim.lock_fd)
    if claim.lost_to is not None:
        _leave_to_new_owner(run_id, claim)


def _leave_to_new_owner(run_id: str, claim: _Claim) -> None:
    """MLflow ended the run as this process's stage ended; its new owner works on it still."""
    with contextlib.suppress(Exception):
        if get_run(run_id).info.status != "RUNNING":
            MlflowClient().update_run(run_id, "RUNNING")
    log.warning("left %s %s RUNNING for process %s", claim.what, run_id, claim.lost_to)


def _refuse(run, what: str) -> None:
    owner = run.data.tags.get(OWNER_TAG, "?")
    raise PrunecxrError(
        f"{what} {run.info.run_id} is already running (process {owner}, heartbeat "
        f"{_heartbeat_age(run):.0f} s ago); a second process would duplicate its work: wait for "
        f"it to end, or stop it and run this again to continue it"
    )


def _heartbeat_age(run) -> float:
    return time.time() - float(run.data.tags.get(HEARTBEAT_TAG, 0))


# --- the heartbeat ---


def _start_heartbeat() -> None:
    global _thread
    _claims_changed.set()
    if _thread is None or not _thread.is_alive():
        _thread = threading.Thread(target=_beat, name="prunecxr-heartbeat", daemon=True)
        _thread.start()


def _beat() -> None:
    while True:
        _claims_changed.clear()
        with _lock:
            claims = list(_claims.items())
        now = time.monotonic()
        due = [(run_id, claim) for run_id, claim in claims if claim.beat_due <= now]
        if not due:
            next_due = min((claim.beat_due for _, claim in claims), default=now + HEARTBEAT_SECONDS)
            _claims_changed.wait(next_due - now)
            continue
        for run_id, claim in due:
            reached = _beat_once(run_id, claim)
            claim.beat_due = time.monotonic() + (HEARTBEAT_SECONDS if reached else RETRY_SECONDS)


def _beat_once(run_id: str, claim: _Claim) -> bool:
    """Renew the heartbeat if the run is still mine. -> whether the server answered."""
    # A server that is away would hold the call in MLflow's retries for minutes.
    if not server_answers(mlflow.get_tracking_uri()):
        return False
    try:
        if _check_owner(run_id, claim):
            set_run_tags(run_id, {HEARTBEAT_TAG: str(int(time.time()))})
    except Exception as error:
        log.debug("heartbeat of %s failed: %s", run_id, error)
        return False
    return True


def _check_owner(run_id: str, claim: _Claim) -> bool:
    """Whether the owner tag still holds this process's id; if not, the claim is lost."""
    owner = get_run(run_id).data.tags.get(OWNER_TAG)
    if owner != process_id() and claim.lost_to is None:
        claim.lost_to = owner
        log.error("process %s took over %s %s", owner, claim.what, run_id)
    return claim.lost_to is None


# --- this machine's locks: a dead owner here is known dead at once ---

_OWNER_FORM = re.compile(r"[\w.-]+:\d+:[0-9a-f]+")  # processes.process_id()'s form


def _lock_path(run_id: str) -> Path:
    # One folder per user of the machine (another's files could not be written); containers
    # with their own temporary folder do not see each other's: the heartbeat decides there.
    return Path(tempfile.gettempdir()) / f"prunecxr-runs-{os.getuid()}" / f"{run_id}.lock"


def _works_here(run_id: str, owner: str) -> bool | None:
    """Whether `owner` works on the run on this machine now (True), worked on it here and has
    let go or died (False), or is not known here (None)."""
    path = _lock_path(run_id)
    if not _OWNER_FORM.fullmatch(owner) or not path.exists():
        return None
    if is_locked(path):
        return True
    with contextlib.suppress(OSError):
        if path.read_text() == owner:
            return False
    return None


def _lock_here(run_id: str) -> int | None | bool:
    """This machine's lock on the run, with this process's id in its file: its descriptor;
    False when another process here holds it; None when there is no lock folder to use."""
    path = _lock_path(run_id)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as error:
        log.debug("no lock for %s here: %s", run_id, error)
        return None
    for _ in range(10):  # another process may be probing it (is_locked) for an instant
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(0.1)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, process_id().encode(), 0)
        return fd
    os.close(fd)
    return False


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # the file stays: "unlocked, with its id" tells later readers it let go


def _forget_claims_in_child() -> None:
    """A forked child is another process: it owns nothing, and its copies of the lock
    descriptors must not keep the parent's locks held after the parent dies."""
    global _thread, _lock, _claims_changed
    for claim in _claims.values():
        _unlock(claim.lock_fd)
    _claims.clear()
    _thread, _lock, _claims_changed = None, threading.Lock(), threading.Event()


os.register_at_fork(after_in_child=_forget_claims_in_child)
