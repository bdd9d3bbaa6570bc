"""Checkpoints of a train run: written on this machine after every epoch, uploaded to the run
when they hold new best weights, every UPLOAD_EVERY_SECONDS and at the end, and read back (the
newer of the two) to resume it."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from prunecxr import PrunecxrError, tracking
from prunecxr.fitting import TrainState
from prunecxr.specs import TrainConfig

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_DIR}/last.pt"
LOCAL_CHECKPOINT_TAG = "prunecxr.local_checkpoint"  # where this machine keeps the newest one


def has_checkpoint(run_id: str) -> bool:
    return tracking.has_artifact(run_id, CHECKPOINT_ARTIFACT)


def checkpoint_config(checkpoint: dict) -> TrainConfig:
    """The settings a checkpoint was trained with; a setting added since it was written has its
    default (what that training used)."""
    return TrainConfig.from_flat(**checkpoint["config"])


def fetch_checkpoint(run_id: str) -> dict:
    """The run's latest checkpoint: the one kept on this machine if it is newer than the one
    uploaded to the run (uploads are rate-limited, see Checkpoints), or the only one readable."""
    if tracking.stage_of(tracking.get_run(run_id)) != "train":
        raise PrunecxrError(f"run {run_id} is not a train run; --resume takes a train run id")
    local = Path(tracking.get_run(run_id).data.tags.get(LOCAL_CHECKPOINT_TAG, "/nonexistent"))
    kept = torch.load(local, map_location="cpu", weights_only=True) if local.is_file() else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = tracking.download_artifact(run_id, CHECKPOINT_ARTIFACT, Path(tmp))
            uploaded = torch.load(path, map_location="cpu", weights_only=True)
    except (PrunecxrError, OSError, RuntimeError):
        if kept is None:
            raise
        return kept
    return kept if kept is not None and kept["epoch"] > uploaded["epoch"] else uploaded


class Checkpoints:
    """After every epoch: metrics logged, the checkpoint written on this machine (to a temporary
    name, then renamed: a kill never leaves half a file). It is uploaded to the run only when
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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save(state.checkpoint(self.config), partial)
        partial.replace(self.path)
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
