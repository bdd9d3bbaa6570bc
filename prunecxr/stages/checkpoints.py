"""Checkpoints of a train run: written on this machine after every epoch, uploaded to the run
when they hold new best weights, every UPLOAD_EVERY_SECONDS and at the end, and read back (the
newer of the two that loads) to resume it."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch

from prunecxr import PrunecxrError, tracking
from prunecxr.fitting import TrainState
from prunecxr.processes import file_lock, write_durably
from prunecxr.specs import TrainConfig

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_DIR}/last.pt"
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
    """After every epoch: metrics logged, the checkpoint written on this machine (durably, to a
    unique temporary name, then renamed, holding `last.pt.lock`: a kill or a power loss never
    leaves half a file, two writers never mix). It is uploaded to the run only when
    it holds new best weights or the last upload is UPLOAD_EVERY_SECONDS old, and at the end:
    a ResNet50 checkpoint is ~380 MB, too much to send every epoch."""

    UPLOAD_EVERY_SECONDS = 900

    def __init__(self, run_id: str, config: TrainConfig):
        self.path = Path(config.data.cache_dir) / "checkpoints" / run_id / "last.pt"
        self.config, self.uploaded_at = config, time.monotonic()
        # A resumed run's local checkpoint may be newer than its upload (it died before it).
        self.pending = self.path.is_file()
        tracking.set_run_tags(run_id, {LOCAL_CHECKPOINT_TAG: str(self.path.resolve())})

    def after_epoch(self, state: TrainState) -> None:
        row = state.history[-1]
        tracking.log_metrics(
            {k: v for k, v in row.items() if k not in ("epoch", "seconds")}, step=row["epoch"]
        )
        checkpoint = state.checkpoint(self.config)
        # Whole or not at all, even after a power loss; one writer at a time.
        with file_lock(self.path.with_name(self.path.name + ".lock")):
            write_durably(self.path, lambda partial: torch.save(checkpoint, partial))
        self.pending = True
        stale = time.monotonic() - self.uploaded_at >= self.UPLOAD_EVERY_SECONDS
        if state.epochs_since_best == 0 or stale:
            self._upload()

    def upload_last(self) -> None:
        """The final checkpoint to the run; the local copy is then no longer needed."""
        if self.pending:
            self._upload(keep_while_away=True)
        self.path.unlink(missing_ok=True)

    def _upload(self, *, keep_while_away: bool = False) -> None:
        """While the tracking server is away, only the last checkpoint is kept to be sent: the
        local file is newer and serves --resume."""
        if tracking.log_file(self.path, CHECKPOINT_DIR, keep_while_away=keep_while_away):
            self.uploaded_at, self.pending = time.monotonic(), False
