"""Checkpoints of a train run: written on this machine after every epoch, the best weights
uploaded to the run when they improve, the full checkpoint every few epochs and at the end, all
in a background thread; read back (the newer of the two that loads) to resume it."""

from __future__ import annotations

import logging
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from prunecxr import PrunecxrError, tracking
from prunecxr.fitting import TrainState
from prunecxr.processes import file_lock, write_durably
from prunecxr.specs import TrainConfig
from prunecxr.tracking import ownership

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_DIR}/last.pt"
BEST_ARTIFACT = f"{CHECKPOINT_DIR}/best.pt"  # the best weights so far, uploaded when they improve
LOCAL_CHECKPOINT_TAG = "prunecxr.local_checkpoint"  # where this machine keeps the newest one
log = logging.getLogger(__name__)


def has_checkpoint(run_id: str) -> bool:
    return tracking.has_artifact(run_id, CHECKPOINT_ARTIFACT)


def checkpoint_config(checkpoint: dict) -> TrainConfig:
    """The settings a checkpoint was trained with; a setting added since it was written has its
    default (what that training used)."""
    return TrainConfig.from_flat(**checkpoint["config"])


def fetch_checkpoint(run_id: str) -> dict:
    """The run's latest checkpoint: the one kept on this machine if it is newer than the one
    uploaded to the run (uploads are rate-limited, see Checkpoints), or the only one that loads
    (a copy that does not, half-written or damaged, is passed over with a warning)."""
    if tracking.stage_of(tracking.get_run(run_id)) != "train":
        raise PrunecxrError(f"run {run_id} is not a train run; --resume takes a train run id")
    local = Path(tracking.get_run(run_id).data.tags.get(LOCAL_CHECKPOINT_TAG, "/nonexistent"))
    kept = _load(local, str(local)) if local.is_file() else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = tracking.download_artifact(run_id, CHECKPOINT_ARTIFACT, Path(tmp))
            uploaded = _load(path, f"runs:/{run_id}/{CHECKPOINT_ARTIFACT}")
    except (PrunecxrError, OSError):
        if kept is None:
            raise
        uploaded = None
    loaded = [checkpoint for checkpoint in (uploaded, kept) if checkpoint is not None]
    if not loaded:
        raise PrunecxrError(f"no checkpoint of run {run_id} loads (the warnings above say why)")
    return max(loaded, key=lambda checkpoint: checkpoint["epoch"])  # a tie: the uploaded one


def _load(path: Path, name: str) -> dict | None:
    """The checkpoint in `path` (called `name`), or None with a warning when it does not load."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, garbage, not a checkpoint: whatever torch says
        reason = f"{type(error).__name__}: {error}".splitlines()[0]
        log.warning("the checkpoint %s does not load (%s): not used", name, reason)
        return None


class Checkpoints:
    """After every epoch the metrics are logged; then, in a background thread (training goes
    on meanwhile), the checkpoint is written on this machine (durably, to a unique temporary
    name, then renamed, holding `last.pt.lock`: a kill or a power loss never leaves half a
    file, two writers never mix), the best weights are uploaded when they improved
    (BEST_ARTIFACT, weights only) and the full checkpoint (optimizer state included: ~380 MB for
    a ResNet50) every FULL_UPLOAD_EVERY epochs from the first, when the last upload is
    UPLOAD_EVERY_SECONDS old, and at the end. The state is copied to host memory without
    waiting for the device; a copy still waiting for the thread is replaced by the next epoch's
    (which takes over its uploads), so at most two are held. As a context manager, leaving it
    waits for the thread."""

    FULL_UPLOAD_EVERY = 5
    UPLOAD_EVERY_SECONDS = 900

    def __init__(self, run_id: str, config: TrainConfig):
        self.run_id = run_id
        self.path = Path(config.data.cache_dir) / "checkpoints" / run_id / "last.pt"
        self.config, self.uploaded_at = config, time.monotonic()
        # A resumed run's local checkpoint may be newer than its upload (it died before it).
        self.pending = self.path.is_file()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="prunecxr-checkpoints")
        self._work: list[tuple[Future, set[str]]] = []  # handed to the thread, not yet waited for
        tracking.set_run_tags(run_id, {LOCAL_CHECKPOINT_TAG: str(self.path.resolve())})

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.close(raise_failure=kind is None)

    def after_epoch(self, state: TrainState) -> None:
        self._raise_failure()
        row = state.history[-1]
        tracking.log_metrics(
            {k: v for k, v in row.items() if k not in ("epoch", "seconds")}, step=row["epoch"]
        )
        uploads = set()
        if state.epochs_since_best == 0:
            uploads.add("best")
        stale = time.monotonic() - self.uploaded_at >= self.UPLOAD_EVERY_SECONDS
        if (state.epoch - 1) % self.FULL_UPLOAD_EVERY == 0 or stale:
            uploads.add("full")
        snapshot, ready = state.snapshot(self.config)
        if self._work and self._work[-1][0].cancel():  # still waiting: this one replaces it
            uploads |= self._work.pop()[1]
        self._work.append((self._thread.submit(self._save, snapshot, ready, uploads), uploads))

    def wait(self) -> None:
        """Until what was handed to the thread is written and uploaded; its error raised here."""
        while self._work:
            future, _ = self._work.pop(0)
            future.result()

    def close(self, *, raise_failure: bool = True) -> None:
        try:
            self.wait()
        except Exception as error:
            if raise_failure:
                raise
            log.error("writing a checkpoint failed: %s", error)
        finally:
            self._thread.shutdown(wait=True)

    def upload_last(self) -> None:
        """The final checkpoint to the run; the local copy is then no longer needed."""
        self.wait()
        if self.pending:
            self._upload(keep_while_away=True)
        self.path.unlink(missing_ok=True)

    def _raise_failure(self) -> None:
        """An error of the thread's finished work (a full disk), raised in the training."""
        for future, _ in self._work:
            if future.done() and not future.cancelled() and future.exception():
                self.wait()

    def _save(self, snapshot: dict, ready, uploads: set[str]) -> None:
        ready()
        # Whole or not at all, even after a power loss; one writer at a time.
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            write_durably(self.path, lambda partial: torch.save(snapshot, partial))
        self.pending = True
        if "full" in uploads:
            self._upload_in_background(self.path)
        if "best" in uploads:
            best = {
                key: snapshot[key] for key in ("epoch", "best_val_loss", "best_weights", "config")
            }
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / BEST_ARTIFACT.rsplit("/", 1)[1]
                torch.save(best, path)
                self._upload_in_background(path)

    def _upload_in_background(self, path: Path) -> None:
        """Sent only while the server answers and the run is still this process's (a
        takeover stops the training at its next epoch); a failure is a warning: the local
        checkpoint serves --resume, and the end uploads it again."""
        try:
            ownership.ensure_mine(self.run_id)
            sent = tracking.upload_file(self.run_id, path, CHECKPOINT_DIR)
        except ownership.RunTakenOver:
            return
        except Exception as error:
            log.warning("uploading %s failed (kept on this machine): %s", path.name, error)
            return
        if sent and path == self.path:
            self.uploaded_at, self.pending = time.monotonic(), False

    def _upload(self, *, keep_while_away: bool = False) -> None:
        """While the tracking server is away, only the last checkpoint is kept to be sent: the
        local file is newer and serves --resume."""
        if tracking.log_file(self.path, CHECKPOINT_DIR, keep_while_away=keep_while_away):
            self.uploaded_at, self.pending = time.monotonic(), False
