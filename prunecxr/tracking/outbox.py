"""What a tracking server that went away mid-run could not take, kept on this machine and sent,
in order, when it answers again. A folder per run: `meta.json` (run id, tracking URI),
`records.jsonl` (one logging call per line) and `files/` (the files those calls log). A run that
ends while the server is still away leaves its folder behind: `prunecxr upload FOLDER` sends it.

Everything is written durably (processes.py), and whoever writes or sends a folder holds its
`.lock`: the run's own flushes and a user's `prunecxr upload` never send a record twice. What a
folder holds is checked before anything is sent (it may come from elsewhere: upload trusts
nothing in it). The calls themselves are made by `perform` (record.py; this module knows
nothing of MLflow)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from prunecxr import PrunecxrError
from prunecxr.processes import append_durably, file_lock, write_durably

log = logging.getLogger(__name__)
RETRY_SECONDS = 20  # while records wait: how often the server is asked again


class _Away(Exception):
    """The tracking server does not answer."""


Record = dict  # {"kind": "metrics" | "artifact" | "model" | "end", ...; "files": {name: path}}

# What each kind of record holds besides "kind" and "files": field -> accepted types.
_FIELDS = {
    "metrics": {"metrics": dict, "step": int, "timestamp": int},
    "artifact": {"artifact_dir": (str, type(None))},
    "model": {},
    "end": {"status": str},
}
_FILES = {"metrics": set(), "artifact": {"file"}, "model": {"weights", "example"}, "end": set()}
_END_STATUSES = ("FINISHED", "FAILED", "KILLED")


class Outbox:
    def __init__(
        self,
        folder: Path,
        run_id: str,
        tracking_uri: str,
        perform: Callable[[str, Record], None],
        server_answers: Callable[[str], bool],
    ):
        self.folder, self.run_id, self.tracking_uri = Path(folder), run_id, tracking_uri
        self._perform, self._server_answers = perform, server_answers
        self._asked_at = float("-inf")
        self.sent = 0  # records the last flush sent

    @classmethod
    def open(cls, folder: Path, perform, server_answers) -> Outbox:
        """The outbox a run left in `folder` (its meta.json checked, not trusted further)."""
        path = Path(folder) / "meta.json"
        try:
            meta = json.loads(path.read_text())
            run_id, uri = meta["run_id"], meta["tracking_uri"]
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise PrunecxrError(f"{path} is not an outbox's meta.json ({error})") from None
        if not (isinstance(run_id, str) and re.fullmatch(r"[\w-]+", run_id)):
            raise PrunecxrError(f"{path}: run_id {run_id!r} is not a run id")
        if not isinstance(uri, str):
            raise PrunecxrError(f"{path}: tracking_uri {uri!r} is not a URI")
        return cls(folder, run_id, uri, perform, server_answers)

    @property
    def _records_path(self) -> Path:
        return self.folder / "records.jsonl"

    def waiting(self) -> bool:
        """Whether records wait to be sent."""
        return self._records_path.exists()

    @property
    def records(self) -> list[Record]:
        """The records, checked (see _read); a torn last line left out with a warning."""
        return self._read()[0]

    def _read(self) -> tuple[list[Record], bool]:
        """-> (records, whether the last line is torn). A last line cut short (a crash while it
        was appended: no newline, or not JSON) is left out with a warning; any other line that
        does not read, or a record that is not one this package writes, is an error."""
        path = self._records_path
        if not path.exists():
            return [], False
        lines = path.read_bytes().split(b"\n")
        torn = lines.pop() != b""  # every whole line ends with a newline
        if torn:
            log.warning(
                "%s line %d is cut short (a crash while it was written): left out",
                path,
                len(lines) + 1,
            )
        records = [self._checked(line, number, path) for number, line in enumerate(lines, 1)]
        return records, torn

    def _checked(self, line: bytes, number: int, path: Path) -> Record:
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except ValueError as error:
            raise PrunecxrError(f"{where} is not a record ({error}); nothing was sent") from None
        problem = _record_problem(record) or self._files_problem(record)
        if problem:
            raise PrunecxrError(f"{where}: {problem}; nothing was sent")
        return record

    def _files_problem(self, record: Record) -> str | None:
        """Why a record's files are not files of this folder (None when they are): each path
        must be relative, without `..`, and resolve (symlinks followed) to a file inside it."""
        inside = self.folder.resolve()
        for name, path in record["files"].items():
            if not isinstance(path, str):
                return f"file {name!r} is not a path: {path!r}"
            parts = PurePosixPath(path)
            if parts.is_absolute() or ".." in parts.parts:
                return f"file {path} is not a relative path inside the folder"
            resolved = (self.folder / path).resolve()
            if not resolved.is_relative_to(inside):
                return f"file {path} leads out of the folder (to {resolved})"
            if not resolved.is_file():
                return f"file {path} does not exist"
        return None

    def server_answers(self) -> bool:
        self._asked_at = time.monotonic()
        return self._server_answers(self.tracking_uri)

    def call(self, direct: Callable[[], None], record: Record) -> bool:
        """`direct()` now if nothing waits and the server answers, else keep `record` (its
        files copied) to be sent later. `direct()` must make the same call each time it is
        called (metrics with their own timestamps): a retry after a lost answer repeats it.
        -> whether it was sent now."""
        if self.flush() and self.server_answers():
            try:
                self._twice_if_answering(direct)
                return True
            except _Away:
                pass
        self.keep(record)
        return False

    def _twice_if_answering(self, call: Callable[[], None]) -> None:
        """`call()`; if it fails while the server answers, once more (it may have been
        restarting); a second failure is a real error. Raises _Away when the server is away."""
        for attempt in (1, 2):
            try:
                call()
                return
            except Exception:
                if not self.server_answers():
                    raise _Away from None
                if attempt == 2:
                    raise

    @contextlib.contextmanager
    def _locked(self, *, wait: bool = True) -> Iterator[bool]:
        """Hold the folder's lock (yields False at once, without `wait`, while another process
        holds it)."""
        lock = self.folder / ".lock"
        while True:
            with file_lock(lock, wait=wait) as held:
                # The process we waited for sent everything and removed the folder: the lock we
                # got is on its removed file, which no one else will ask for. Take a new one.
                if held and not lock.exists():
                    continue
                yield held
                return

    def keep(self, record: Record) -> None:
        with self._locked():
            if not self.waiting():
                log.warning(
                    "the tracking server %s does not answer: the run goes on, what it logs is "
                    "kept in %s and sent when the server is back",
                    self.tracking_uri,
                    self.folder,
                )
            meta = self.folder / "meta.json"
            if not meta.exists():
                write_durably(
                    meta, json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri})
                )
            records, torn = self._read()
            if torn:  # a crash cut the last line short: appending after it would corrupt the next
                self._rewrite(records)
            kept = {name: self._copy(path) for name, path in record.get("files", {}).items()}
            append_durably(self._records_path, json.dumps({**record, "files": kept}) + "\n")

    def _copy(self, path: str) -> str:
        """A durable copy of `path` under files/ (its name kept); -> its path in the folder."""
        files = self.folder / "files"
        files.mkdir(parents=True, exist_ok=True)
        copy = files / f"{len(list(files.iterdir())):05d}" / Path(path).name
        write_durably(copy, functools.partial(shutil.copyfile, path))
        return str(copy.relative_to(self.folder))

    def flush(self, *, now: bool = False, wait: bool = True) -> bool:
        """Send what waits, in order, if the server answers (asked at most every RETRY_SECONDS
        unless `now`). Every record is checked before the first is sent. While another process
        sends or writes the folder, wait for it (or, without `wait`, refuse). -> True when
        nothing waits any more."""
        self.sent = 0
        if not self.waiting():
            return True
        if not now and time.monotonic() - self._asked_at < RETRY_SECONDS:
            return False
        with self._locked(wait=wait) as held:
            if not held:
                raise PrunecxrError(
                    f"another process is writing or sending {self.folder} (the run that kept it, "
                    f"still going, or another upload): run this again when it is done"
                )
            records = self.records  # again: the process we waited for may have sent them
            if records and not self.server_answers():
                return False
            return self._send_all(records)

    def _send_all(self, records: list[Record]) -> bool:
        for done, record in enumerate(records):
            files = {name: str(self.folder / path) for name, path in record["files"].items()}
            try:  # a server that goes away midway makes the call fail: _Away
                kept = {**record, "files": files}
                self._twice_if_answering(functools.partial(self._perform, self.run_id, kept))
            except BaseException as error:
                self._rewrite(records[done:])  # what was sent is never sent again
                if isinstance(error, _Away):
                    return False
                raise
            self.sent = done + 1
        shutil.rmtree(self.folder)  # the lock's file too: a waiter takes a new one (_locked)
        if records:
            log.warning(
                "the tracking server %s is back: %d kept calls sent",
                self.tracking_uri,
                len(records),
            )
        return True

    def wait(self, seconds: float) -> bool:
        """Flush, asking every few seconds for up to `seconds` (Ctrl-C stops waiting). -> True
        when all was sent."""
        deadline = time.monotonic() + seconds
        try:
            while not self.flush(now=True):
                if time.monotonic() >= deadline:
                    return False
                time.sleep(min(5.0, max(0.0, deadline - time.monotonic())))
        except KeyboardInterrupt:
            return False
        return True

    def _rewrite(self, records: list[Record]) -> None:
        text = "".join(json.dumps(record) + "\n" for record in records)
        write_durably(self._records_path, text)


def _record_problem(record) -> str | None:
    """Why `record` is not a record this package writes (None when it is one)."""
    if not isinstance(record, dict) or record.get("kind") not in _FIELDS:
        kind = record.get("kind") if isinstance(record, dict) else record
        return f"unknown kind of record {kind!r} (known: {', '.join(_FIELDS)})"
    kind = record["kind"]
    for field, types in _FIELDS[kind].items():
        value = record.get(field)
        if not isinstance(value, types) or isinstance(value, bool):
            return f"a {kind} record's {field} is {value!r}"
    files = record.get("files")
    if not isinstance(files, dict) or set(files) != _FILES[kind]:
        return f"a {kind} record's files are {files!r} (expected: {sorted(_FILES[kind])})"
    if kind == "metrics":
        return _metrics_problem(record["metrics"])
    if kind == "artifact" and record["artifact_dir"] is not None:
        folder = PurePosixPath(record["artifact_dir"])
        if folder.is_absolute() or ".." in folder.parts:
            return f"artifact_dir {record['artifact_dir']} is not a folder inside the run"
    if kind == "end" and record["status"] not in _END_STATUSES:
        return f"status {record['status']!r} (known: {', '.join(_END_STATUSES)})"
    return None


def _metrics_problem(metrics: dict) -> str | None:
    for key, value in metrics.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"metric {key!r} is {value!r}, not a number"
    return None
