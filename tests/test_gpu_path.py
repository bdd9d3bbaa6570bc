"""The GPU's code path end to end: channels_last + bf16 + torch.compile + the data held on the
device, through train -> sweep -> analyze.

CI runs it on the CPU (every switch is selectable there); the `gpu`-marked case runs the same
study on CUDA where there is one (`bash ci/test.sh -m gpu`) and is skipped elsewhere."""

from __future__ import annotations

import mlflow
import pytest
import torch

from tests.helpers import prunecxr, tiny_cli_options

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_study_on_the_gpu_code_path_finishes(device, tiny_nih, tmp_path, mlflow_store):
    result = prunecxr(
        "study",
        *tiny_cli_options(tiny_nih, tmp_path / "cache", device),
        "--channels-last",
        "--precision",
        "bf16",
        "--compile",
        "--resident-data",
        "--seeds",
        "2",
        "--max-epochs",
        "4",
        "--methods",
        "l1,random,structured",
        "--sparsities",
        "0,0.5,0.9",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["prunecxr"])
    stages = runs["tags.prunecxr.stage"].value_counts().to_dict()
    assert stages == {"study": 1, "train": 2, "sweep": 1, "prune": 2 * 3 * 3, "analyze": 1}
    assert set(runs["status"]) == {"FINISHED"}
    assert f"mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}" in result.stdout
    by_stage = {stage: runs[runs["tags.prunecxr.stage"] == stage] for stage in stages}
    study_id, sweep_id = by_stage["study"].run_id.iloc[0], by_stage["sweep"].run_id.iloc[0]
    for stage in ("train", "sweep", "analyze"):  # nested: study -> train, sweep, analyze
        assert set(by_stage[stage]["tags.mlflow.parentRunId"]) == {study_id}
    assert set(by_stage["prune"]["tags.mlflow.parentRunId"]) == {sweep_id}
    assert set(by_stage["prune"]["params.source_run_id"]) == set(by_stage["train"].run_id)
    assert (by_stage["train"]["metrics.test_mAUC"] > 0.5).all()  # bf16 still learns
    ran = runs[runs["tags.prunecxr.stage"].isin(["train", "prune"])]
    assert set(ran["params.device_resolved"]) == {device}
    assert set(ran["params.channels_last_resolved"]) == {"true"}
    assert set(ran["params.precision_resolved"]) == {"bf16"}
    assert set(ran["params.compile_resolved"]) == {"true"}
    assert set(ran["params.resident_data_resolved"]) == {"true"}
    pruned = runs[runs["params.method"] == "l1"]
    assert pruned["metrics.achieved_sparsity"].round(3).tolist() == pytest.approx(
        pruned["params.sparsity"].astype(float).round(3).tolist()
    )
    # Trained channels_last, logged in the standard layout: loads and prunes anywhere.
    train_id = runs[runs["tags.prunecxr.stage"] == "train"].run_id.iloc[0]
    model = mlflow.pytorch.load_model(f"runs:/{train_id}/model", map_location="cpu")
    assert all(p.is_contiguous() for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32
