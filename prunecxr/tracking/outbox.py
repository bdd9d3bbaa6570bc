"""What a tracking server that went away mid-run could not take, kept on this machine and sent,
in order, when it answers again. A folder per run: `meta.json` (run id, tracking URI),
`records.jsonl` (one logging call per line) and `files/` (the files those calls log). A run that
ends while the server is still away leaves its folder behind: `prunecxr upload FOLDER` sends it.

The calls themselves are made by `perform` (record.py; this module knows nothing of MLflow)."""

from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)
RETRY_SECONDS = 20  # while records wait: how often the server is asked again


class _Away(Exception):
    """The tracking server does not answer."""


Record = dict  # {"kind": "metrics" | "artifact" | "model" | "end", ...; "files": {name: path}}


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

    @classmethod
    def open(cls, folder: Path, perform, server_answers) -> Outbox:
        meta = json.loads((Path(folder) / "meta.json").read_text())
        return cls(folder, meta["run_id"], meta["tracking_uri"], perform, server_answers)

    @property
    def records(self) -> list[Record]:
        path = self.folder / "records.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    def server_answers(self) -> bool:
        self._asked_at = time.monotonic()
        return self._server_answers(self.tracking_uri)

    def call(self, direct: Callable[[], None], record: Record) -> bool:
        """`direct()` now if nothing waits and the server answers, else keep `record` (its
        files copied) to be sent later. -> whether it was sent now."""
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

    def keep(self, record: Record) -> None:
        files = self.folder / "files"
        files.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "meta.json"
        if not meta.exists():
            meta.write_text(json.dumps({"run_id": self.run_id, "tracking_uri": self.tracking_uri}))
        if not (self.folder / "records.jsonl").exists():
            log.warning(
                "the tracking server %s does not answer: the run goes on, what it logs is kept "
                "in %s and sent when the server is back",
                self.tracking_uri,
                self.folder,
            )
        kept = {}
        for name, path in record.get("files", {}).items():
            copy = files / f"{len(list(files.iterdir())):05d}" / Path(path).name  # name kept
            copy.parent.mkdir()
            shutil.copyfile(path, copy)
            kept[name] = str(copy.relative_to(self.folder))
        with open(self.folder / "records.jsonl", "a") as out:
            out.write(json.dumps({**record, "files": kept}) + "\n")

    def flush(self, *, now: bool = False) -> bool:
        """Send what waits, in order, if the server answers (asked at most every RETRY_SECONDS
        unless `now`). -> True when nothing waits any more."""
        records = self.records
        if not records:
            return True
        if not now and time.monotonic() - self._asked_at < RETRY_SECONDS:
            return False
        if not self.server_answers():
            return False
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
        shutil.rmtree(self.folder)
        log.warning(
            "the tracking server %s is back: %d kept calls sent", self.tracking_uri, len(records)
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
        partial = self.folder / "records.jsonl.partial"
        partial.write_text("".join(json.dumps(record) + "\n" for record in records))
        partial.replace(self.folder / "records.jsonl")
