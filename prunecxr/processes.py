"""What many processes sharing a machine or a folder need (containers on one volume, pods,
Ray workers, `torchrun` ranks): who this process is, advisory file locks, and writes that a
crash or power loss never leaves half done (docs/ARCHITECTURE.md, "Many processes")."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import socket
from collections.abc import Callable, Iterator
from pathlib import Path


def _new_process_id() -> str:
    # host:pid for people reading tags; the random part is what tells two processes apart
    # (containers each have their PID 1, and a restarted container its predecessor's PID).
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(8)}"


PROCESS_ID = _new_process_id()


def _renew_process_id() -> None:
    global PROCESS_ID
    PROCESS_ID = _new_process_id()


os.register_at_fork(after_in_child=_renew_process_id)  # a forked worker is another process


def process_id() -> str:
    """This process's identity: `host:pid:random`, new in every process (forks included)."""
    return PROCESS_ID


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive advisory lock (`flock`) on `path` (created if need be) while inside; the
    kernel drops it when the process dies, however it dies. Yields True when held; with
    `wait=False`, False at once if another process holds it. Works across PID namespaces and
    containers sharing a volume (one kernel); on NFS only where the client maps flock to NFS
    locks (Linux does since 2.6.12)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as error:
            if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def is_locked(path: Path) -> bool:
    """Whether a live process holds `file_lock(path)` now (a missing file: no)."""
    if not Path(path).exists():
        return False
    with file_lock(path, wait=False) as held:
        return not held


def temporary_name(path: Path) -> Path:
    """A name beside `path`, unique to this process and call, for writing before renaming."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial")


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in `folder` survive a power loss."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def durable_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path to write `path`'s new content to; on leaving without error it is
    fsynced and renamed over `path` and the folder fsynced, so readers see the old file or the
    whole new one, never a part, even after a crash. On an error the temporary file goes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = temporary_name(path)
    try:
        yield partial
        fsync_file(partial)
        partial.replace(path)
        fsync_dir(path.parent)
    finally:
        partial.unlink(missing_ok=True)


def write_durably(path: Path, content: bytes | str | Callable[[Path], None]) -> None:
    """`path` holds `content` (bytes, text, or what `content(temporary path)` writes), all of
    it or none, durably (see durable_path)."""
    with durable_path(path) as partial:
        if isinstance(content, bytes):
            partial.write_bytes(content)
        elif isinstance(content, str):
            partial.write_text(content)
        else:
            content(partial)


def append_durably(path: Path, text: str) -> None:
    """Append `text` (whole lines) to `path` and fsync it (and the folder when it is new)."""
    path = Path(path)
    new = not path.exists()
    with open(path, "a") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    if new:
        fsync_dir(path.parent)
