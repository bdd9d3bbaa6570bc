"""Training: what lands in MLflow, repeatability, resume, early stopping."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from prunecxr import PrunecxrError, tracking
from prunecxr.data import get_schema, load_split
from prunecxr.data.schemas import class_slug
from prunecxr.evaluate import predict_logits, sigmoid
from prunecxr.runtime import resolve_runtime
from prunecxr.train import TrainConfig, resume_training, run_training

NIH = get_schema("nih-cxr-lt")
pytestmark = pytest.mark.slow


def tiny_config(data_dir: Path, cache_dir: Path, **overrides) -> TrainConfig:
    settings = dict(
        dataset="nih-cxr-lt",
        data_dir=str(data_dir),
        label_dir=str(data_dir),
        arch="resnet18",
        pretrained="none",
        image_size=32,
        batch_size=32,
        lr=1e-3,
        max_epochs=2,
        patience=5,
        device="cpu",
        cache_dir=str(cache_dir),
    )
    return TrainConfig(**{**settings, **overrides})


def _history(run_id: str) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="history.csv")
    return pd.read_csv(path)


def _predictions(run_id: str) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions.parquet")
    return pd.read_parquet(path)


def test_train_run_logs_the_designs_names(tiny_nih, cache_dir, mlflow_store):
    tracking.use_experiment("prunecxr")
    run_id = run_training(tiny_config(tiny_nih, cache_dir))
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.tags["prunecxr.stage"] == "train" and run.info.status == "FINISHED"
    for param, value in [
        ("dataset", "nih-cxr-lt"),
        ("arch", "resnet18"),
        ("seed", "0"),
        ("image_size", "32"),
        ("pretrained", "none"),
    ]:
        assert run.data.params[param] == value
    for metric in ("train_loss", "val_loss", "val_mAUC", "val_mAP"):
        assert [m.step for m in client.get_metric_history(run_id, metric)] == [1, 2]
    for name in NIH.classes:
        for metric in ("auc", "ap", "f1"):
            assert f"test_{metric}_{class_slug(name)}" in run.data.metrics
    assert {"test_mAUC", "test_mAP", "test_mF1"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"history.csv", "predictions.parquet", "per_class_metrics.csv"} <= artifacts
    assert mlflow.models.get_model_info(f"runs:/{run_id}/model").run_id == run_id
    assert len(_history(run_id)) == 2


def test_logged_model_reproduces_the_logged_predictions(tiny_nih, cache_dir, mlflow_store):
    tracking.use_experiment("prunecxr")
    run_id = run_training(tiny_config(tiny_nih, cache_dir, max_epochs=1))
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    test = load_split(NIH, tiny_nih, tiny_nih, "test", 32, cache_dir=cache_dir)
    probs = sigmoid(predict_logits(model, test.images, runtime=resolve_runtime("cpu")))
    predictions = _predictions(run_id)
    assert list(predictions["image"]) == list(test.image_ids)
    np.testing.assert_allclose(predictions[list(NIH.classes)].to_numpy(), probs, atol=1e-5)
    truth = predictions[[f"label_{class_slug(c)}" for c in NIH.classes]].to_numpy()
    np.testing.assert_array_equal(truth, test.labels)
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 3, 32, 32)


def test_same_seed_same_run_and_resume_continues_exactly(tiny_nih, cache_dir, mlflow_store):
    tracking.use_experiment("prunecxr")
    straight = run_training(tiny_config(tiny_nih, cache_dir, max_epochs=2, seed=3))
    again = run_training(tiny_config(tiny_nih, cache_dir, max_epochs=2, seed=3))
    other_seed = run_training(tiny_config(tiny_nih, cache_dir, max_epochs=2, seed=4))
    columns = ["train_loss", "val_loss", "val_mAUC"]
    pd.testing.assert_frame_equal(_history(straight)[columns], _history(again)[columns])
    assert not _history(straight)[columns].equals(_history(other_seed)[columns])

    first_half = run_training(tiny_config(tiny_nih, cache_dir, max_epochs=1, seed=3))
    resumed = resume_training(first_half, max_epochs=2)
    assert resumed == first_half
    pd.testing.assert_frame_equal(_history(straight)[columns], _history(resumed)[columns])
    steps = [m.step for m in MlflowClient().get_metric_history(resumed, "val_loss")]
    assert steps == [1, 2]
    with pytest.raises(PrunecxrError, match="already finished training at epoch 2"):
        resume_training(resumed, max_epochs=2)


def test_early_stopping_keeps_the_best_weights(tiny_nih, cache_dir, mlflow_store):
    tracking.use_experiment("prunecxr")
    # At this learning rate the tiny model's validation loss jumps up after epoch 1 (seen on CPU).
    config = tiny_config(tiny_nih, cache_dir, lr=1e-2, max_epochs=8, patience=1)
    run_id = run_training(config)
    history = _history(run_id)
    assert len(history) < 8
    best = history.loc[history.val_loss.idxmin()]
    assert MlflowClient().get_run(run_id).data.metrics["best_epoch"] == best.epoch
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    val = load_split(NIH, tiny_nih, tiny_nih, "val", 32, cache_dir=cache_dir)
    logits = predict_logits(model, val.images, runtime=resolve_runtime("cpu"))
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(val.labels)
    )
    assert loss.item() == pytest.approx(best.val_loss, rel=1e-4)


def test_training_against_a_real_mlflow_server(tiny_mimic, cache_dir, server_store):
    tracking.use_experiment("prunecxr-server")
    config = tiny_config(tiny_mimic, cache_dir, dataset="mimic-cxr-lt", max_epochs=1)
    run_id = run_training(config)
    run = MlflowClient(server_store).get_run(run_id)
    assert run.data.params["dataset"] == "mimic-cxr-lt"
    assert "test_auc_pleural_other" in run.data.metrics
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")  # artifacts through the server
    assert model.fc.out_features == 19
    resumed = resume_training(run_id, max_epochs=2)
    assert len(_history(resumed)) == 2
