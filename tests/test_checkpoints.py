"""Checkpoints a crash or a power loss cannot leave half-written, one writer at a time, and a
resume that takes the copy that loads: the uploaded one when the local one is damaged, and the
other way round."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from prunecxr import PrunecxrError, tracking
from prunecxr.data import get_schema
from prunecxr.fitting import TrainState, create_state
from prunecxr.processes import is_locked
from prunecxr.runtime import resolve_runtime
from prunecxr.stages.checkpoints import (
    CHECKPOINT_ARTIFACT,
    Checkpoints,
    fetch_checkpoint,
)
from prunecxr.stages.train import resume_training
from tests.helpers import tiny_config, wait_for

pytestmark = pytest.mark.slow
NIH = get_schema("nih-cxr-lt")


def _one_epoch(config, run_id: str) -> tuple[Checkpoints, TrainState]:
    """Epoch 1 of a run: a new best, so its checkpoint is written here and uploaded."""
    state = create_state(config, len(NIH.classes), resolve_runtime("cpu"))
    row = {"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_mAUC": 0.5, "val_mAP": 0.1}
    state.epoch, state.epochs_since_best, state.history = 1, 0, [row]
    keeper = Checkpoints(run_id, config)
    keeper.after_epoch(state)
    keeper.wait()
    return keeper, state


def test_a_half_written_local_checkpoint_resumes_from_the_uploaded_one(
    tiny_nih, cache_dir, mlflow_store, prunecxr_warnings
):
    tracking.use_experiment("prunecxr")
    with tracking.start_run("train") as run_id:
        keeper, _ = _one_epoch(tiny_config(tiny_nih, cache_dir, max_epochs=1), run_id)
    # The process dies while it writes epoch 2 here (as it could before writes were durable).
    whole = keeper.path.read_bytes()
    keeper.path.write_bytes(whole[: len(whole) // 2])

    assert resume_training(run_id, max_epochs=2) == run_id
    assert f"the checkpoint {keeper.path.resolve()} does not load (" in prunecxr_warnings.text
    steps = [m.step for m in MlflowClient().get_metric_history(run_id, "val_loss")]
    assert steps == [1, 2]  # epoch 1 from the uploaded copy, epoch 2 trained on
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_a_damaged_upload_resumes_from_the_local_one_and_none_is_an_error(
    tiny_nih, cache_dir, mlflow_store, tmp_path, prunecxr_warnings
):
    tracking.use_experiment("prunecxr")
    config = tiny_config(tiny_nih, cache_dir)
    with tracking.start_run("train") as run_id:
        keeper, _ = _one_epoch(config, run_id)
        garbage = tmp_path / "last.pt"
        garbage.write_bytes(b"PK\x03\x04 not a checkpoint")
        tracking.log_file(garbage, "checkpoints")  # the upload damaged
        assert fetch_checkpoint(run_id)["epoch"] == 1  # the local one
        assert f"the checkpoint runs:/{run_id}/{CHECKPOINT_ARTIFACT} does not load (" in (
            prunecxr_warnings.text
        )
        keeper.path.write_bytes(keeper.path.read_bytes()[:100])  # and now the local one too
        with pytest.raises(PrunecxrError, match=f"no checkpoint of run {run_id} loads"):
            fetch_checkpoint(run_id)


def test_a_checkpoint_is_written_whole_by_one_writer_at_a_time_and_the_training_never_waits(
    tiny_nih, cache_dir, mlflow_store
):
    tracking.use_experiment("prunecxr")
    config = tiny_config(tiny_nih, cache_dir)
    with tracking.start_run("train") as run_id:
        keeper, state = _one_epoch(config, run_id)
        lock = keeper.path.with_name("last.pt.lock")
        holder = subprocess.Popen(  # another writer of this checkpoint, for 2 s
            [sys.executable, "-c", "import sys, time; from prunecxr.processes import file_lock\n"
             "with file_lock(sys.argv[1]): time.sleep(2)", str(lock)]
        )  # fmt: skip
        try:
            wait_for(lambda: is_locked(lock), 30, holder)
            state.epoch, state.epochs_since_best = 2, 1
            state.history.append({**state.history[0], "epoch": 2})
            keeper.after_epoch(state)  # the training goes on at once ...
            assert holder.poll() is None
            keeper.wait()  # ... while the thread waits for the other writer
            assert holder.poll() == 0  # which had finished
        finally:
            holder.kill()
            holder.wait()
    assert torch.load(keeper.path, weights_only=True)["epoch"] == 2
    assert sorted(p.name for p in keeper.path.parent.iterdir()) == ["last.pt", "last.pt.lock"]
