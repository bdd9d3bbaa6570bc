"""A study or sweep that dies is continued, not redone; a second process on a live one is
refused. Processes are really killed (SIGKILL), as a crash or the OOM killer would."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from prunecxr import tracking
from prunecxr.data import get_schema
from prunecxr.data.synthetic import write_synthetic
from prunecxr.stages.train import run_training
from tests.helpers import kill, prunecxr, spawn_prunecxr, tiny_config, wait_for

pytestmark = pytest.mark.slow
SPLITS = {"train": 400, "val": 60, "test": 60}


def _runs(stage: str) -> pd.DataFrame:
    if mlflow.get_experiment_by_name("prunecxr") is None:
        return pd.DataFrame({"run_id": [], "status": []})
    return mlflow.search_runs(
        experiment_names=["prunecxr"], filter_string=f"tags.`prunecxr.stage` = '{stage}'"
    )


def _train_checkpointed(seed: str) -> bool:
    runs = _runs("train")
    if "params.seed" not in runs:  # a run tagged an instant before its params are logged
        return False
    mine = runs[runs["params.seed"] == seed]
    return any(tracking.has_artifact(run_id, "checkpoints/last.pt") for run_id in mine.run_id)


def test_a_killed_study_is_continued_and_a_second_process_is_refused(tmp_path, mlflow_store):
    data = tmp_path / "data"  # big enough that an epoch takes a second or two
    write_synthetic(get_schema("nih-cxr-lt"), data, SPLITS, image_size=48, seed=5)
    study = ["study", "--data-dir", str(data), "--cache-dir", str(tmp_path / "c")]
    study += ["--arch", "resnet18", "--image-size", "48", "--batch-size", "32"]
    study += ["--seeds", "2", "--max-epochs", "2", "--methods", "l1,random"]
    study += ["--sparsities", "0,0.5,0.9", "--device", "cpu"]
    first = spawn_prunecxr(*study, log=tmp_path / "first.log")
    try:
        wait_for(lambda: _train_checkpointed("0"), 600, first)
        second = prunecxr(*study)  # the same command while the first runs
        assert second.returncode == 1
        assert "is already running" in second.stderr and "duplicate" in second.stderr
        wait_for(lambda: _train_checkpointed("1"), 600, first)  # seed 0 done, seed 1 half
    finally:
        kill(first)
    trains = _runs("train").set_index("params.seed")
    seed0, seed1 = trains.loc["0", "run_id"], trains.loc["1", "run_id"]
    assert trains.loc["0", "status"] == "FINISHED" and trains.loc["1", "status"] == "RUNNING"

    again = prunecxr(*study)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing study" in again.stderr
    (study_id,) = _runs("study").run_id
    assert MlflowClient().get_run(study_id).info.status == "FINISHED"
    trains = _runs("train")
    assert set(trains.run_id) == {seed0, seed1}  # seed 0 reused, seed 1 resumed in its run
    assert set(trains.status) == {"FINISHED"}
    history = mlflow.artifacts.download_artifacts(run_id=seed1, artifact_path="history.csv")
    assert len(pd.read_csv(history)) == 2
    cells = _runs("prune")
    assert len(cells) == 2 * 2 * 3 and set(cells.status) == {"FINISHED"}
    assert len(_runs("sweep")) == 1 and len(_runs("analyze")) == 1


def test_a_killed_sweep_is_continued_without_redoing_cells(
    tiny_nih, cache_dir, tmp_path, mlflow_store
):
    tracking.use_experiment("prunecxr")
    run_training(tiny_config(tiny_nih, cache_dir, max_epochs=1))
    sweep = ["sweep", "--methods", "l1,random", "--sparsities", "0:0.95:0.05", "--device", "cpu"]
    first = spawn_prunecxr(*sweep, log=tmp_path / "first.log")
    try:
        wait_for(lambda: (_runs("prune").status == "FINISHED").sum() >= 3, 600, first)
        second = prunecxr(*sweep)
        assert second.returncode == 1 and "is already running" in second.stderr
    finally:
        kill(first)
    before = _runs("prune")
    done_before = set(before[before.status == "FINISHED"].run_id)

    again = prunecxr(*sweep)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(done_before)} of 40 cells were done" in again.stderr
    cells = _runs("prune")
    finished = cells[cells.status == "FINISHED"]
    assert len(finished) == 40 and finished["tags.prunecxr.cell"].nunique() == 40
    assert done_before <= set(finished.run_id)  # nothing finished was redone
    assert set(cells.status) <= {"FINISHED", "KILLED"}  # the cell that was cut off: KILLED
    assert len(_runs("sweep")) == 1
