"""Training: what lands in MLflow, repeatability, resume, early stopping."""

from __future__ import annotations

import hashlib
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
from prunecxr.data.synthetic import write_synthetic
from prunecxr.evaluate import predict_logits, sigmoid
from prunecxr.fitting import create_state, restore_state
from prunecxr.runtime import portable_state_dict, resolve_runtime
from prunecxr.specs import TrainConfig, train_key
from prunecxr.stages.checkpoints import (
    BEST_ARTIFACT,
    CHECKPOINT_ARTIFACT,
    Checkpoints,
    fetch_checkpoint,
)
from prunecxr.stages.study import StudyConfig, study_key
from prunecxr.stages.train import resume_note, resume_training, run_training
from tests.helpers import kill, prunecxr, spawn_prunecxr, tiny_config, wait_for

NIH = get_schema("nih-cxr-lt")
pytestmark = pytest.mark.slow


def _history(run_id: str) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="history.csv")
    return pd.read_csv(path)


def _predictions(run_id: str) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions.parquet")
    return pd.read_parquet(path)


def test_train_run_logs_the_designs_names(tiny_nih, cache_dir, mlflow_store, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
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
    for metric in ("train_loss", "val_loss", "val_mAUC", "val_mAP", "train_images_per_s"):
        assert [m.step for m in client.get_metric_history(run_id, metric)] == [1, 2]
    # What the machine did while it trained (GPU metrics too where there is one).
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        run.data.metrics
    )
    # The label files it saw, as run inputs (the UI's Dataset column), by split and digest.
    inputs = {
        i.tags[0].value: (i.dataset.name, i.dataset.digest) for i in run.inputs.dataset_inputs
    }
    for split in ("train", "val", "test"):
        digest = hashlib.sha256((tiny_nih / NIH.label_file(split)).read_bytes()).hexdigest()
        assert inputs[split] == (f"nih-cxr-lt-{split}", digest[:16])
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
    requirements = mlflow.pyfunc.get_model_dependencies(f"runs:/{run_id}/model")
    pins = Path(requirements).read_text().split()  # given, not inferred (10-20 s per model)
    assert {"torch", "torchvision", "cloudpickle"} <= {pin.split("==")[0] for pin in pins}


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


def _runs_in(experiment: str) -> pd.DataFrame:
    return mlflow.search_runs(experiment_names=[experiment])


def test_resume_after_a_kill_keeps_the_runs_own_settings(tmp_path, mlflow_store):
    """A run started with --max-epochs 4 and killed continues to epoch 4, not to the CLI's
    default 60; only typed options override; it stays in its own experiment."""
    data = tmp_path / "data"  # big enough that an epoch takes a second or two
    write_synthetic(NIH, data, {"train": 400, "val": 60, "test": 60}, image_size=48, seed=5)
    common = ["--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    process = spawn_prunecxr(
        *("train", "--data-dir", str(data), "--arch", "resnet18", "--image-size", "48"),
        *("--batch-size", "32", "--max-epochs", "4", "--experiment", "nih", *common),
        log=tmp_path / "train.log",
    )
    try:
        wait_for(lambda: _checkpointed("nih"), 300, process)
    finally:
        kill(process)
    run_id = _runs_in("nih").run_id.iloc[0]
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"  # what a kill leaves

    resumed = prunecxr("train", "--resume", run_id, *common)  # default --experiment differs
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and len(_history(run_id)) == 4
    assert run.data.tags["prunecxr.resumed"].startswith("from epoch ")

    longer = prunecxr("train", "--resume", run_id, "--max-epochs", "5", *common)
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert len(_history(run_id)) == 5
    for typed, message in [
        (["--arch", "resnet50"], "--resume keeps the run's own arch (arch=resnet18)"),
        (["--experiment", "other"], f"run {run_id} belongs to experiment 'nih', not 'other'"),
    ]:
        refused = prunecxr("train", "--resume", run_id, "--max-epochs", "6", *typed, *common)
        assert refused.returncode == 1 and message in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    assert len(_history(run_id)) == 5

    moved = data.rename(tmp_path / "moved")  # images and labels together, at another place
    elsewhere = prunecxr("train", "--resume", run_id, "--max-epochs", "6", "--data-dir", str(moved))
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    assert len(_history(run_id)) == 6
    assert f"label_dir={moved}" in MlflowClient().get_run(run_id).data.tags["prunecxr.resumed"]


def _checkpointed(experiment: str) -> bool:
    runs = _runs_in(experiment) if mlflow.get_experiment_by_name(experiment) else []
    return len(runs) > 0 and tracking.has_artifact(runs.run_id.iloc[0], "checkpoints/last.pt")


def test_a_run_that_died_while_logging_its_results_logs_them_on_resume(
    tiny_nih, cache_dir, mlflow_store, monkeypatch
):
    tracking.use_experiment("prunecxr")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patched:  # the fault: logging the model fails
        patched.setattr(tracking, "log_model", disk_full)
        with pytest.raises(OSError, match="No space left"):
            run_training(tiny_config(tiny_nih, cache_dir, max_epochs=1))
    (run_id,) = _runs_in("prunecxr").run_id
    assert MlflowClient().get_run(run_id).info.status == "FAILED"
    with pytest.raises(Exception, match="model"):
        mlflow.models.get_model_info(f"runs:/{run_id}/model")

    assert resume_training(run_id) == run_id  # epochs done: only the final results are logged
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and "test_mAP" in run.data.metrics
    assert mlflow.models.get_model_info(f"runs:/{run_id}/model").run_id == run_id
    assert len(_history(run_id)) == 1  # no epoch trained again


def test_restoring_a_checkpoint_downloads_nothing(tmp_path, monkeypatch):
    """Resume works offline: the checkpoint's weights replace the ImageNet ones, so they are
    not fetched (any download here would fail: the proxy is a closed port)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")
    config = tiny_config(tmp_path, tmp_path, pretrained="imagenet")
    runtime = resolve_runtime("cpu")
    trained = create_state(config.replace(pretrained="none"), 20, runtime)
    restored = restore_state(trained.checkpoint(config), config, 20, runtime)
    for a, b in zip(trained.model.state_dict().values(), restored.model.state_dict().values()):
        assert torch.equal(a, b)


def test_resident_and_streamed_training_data_train_the_same_model(
    tiny_nih, cache_dir, mlflow_store
):
    """The images held on the device as one tensor, or read from the cache batch by batch:
    the same batches, so the same history, bit for bit."""
    tracking.use_experiment("prunecxr")
    resident = run_training(tiny_config(tiny_nih, cache_dir, max_epochs=2, resident_data=True))
    streamed = run_training(tiny_config(tiny_nih, cache_dir, max_epochs=2, resident_data=False))
    columns = ["train_loss", "val_loss", "val_mAUC"]
    pd.testing.assert_frame_equal(_history(resident)[columns], _history(streamed)[columns])
    params = MlflowClient().get_run(resident).data.params
    assert params["resident_data_resolved"] == "true"


def test_checkpoints_are_kept_here_every_epoch_and_uploaded_in_the_background(
    tiny_nih, cache_dir, mlflow_store, tmp_path
):
    """Epoch 1: the full checkpoint and the best weights uploaded; epoch 2, better: the best
    weights only; epoch 3, worse: nothing (kept here). What is saved is the state at the end of
    the epoch, whatever the training changes while the thread writes it."""
    tracking.use_experiment("prunecxr")
    config = tiny_config(tiny_nih, cache_dir)
    state = create_state(config, len(NIH.classes), resolve_runtime("cpu"))
    row = {"epoch": 1, "train_loss": 1.0, "val_loss": 1.0, "val_mAUC": 0.5, "val_mAP": 0.1}

    def epoch(number: int, val_loss: float, since_best: int) -> None:
        state.epoch, state.epochs_since_best = number, since_best
        state.history = [*state.history, {**row, "epoch": number, "val_loss": val_loss}]
        if since_best == 0:
            state.best_val_loss, state.best_weights = val_loss, portable_state_dict(state.model)
        keeper.after_epoch(state)

    def uploaded(artifact: str) -> dict:
        path = tracking.download_artifact(run_id, artifact, tmp_path / artifact.rsplit("/")[1])
        return torch.load(path, weights_only=True)

    with tracking.start_run("train") as run_id, Checkpoints(run_id, config) as keeper:
        epoch(1, 1.0, since_best=0)
        epoch(2, 0.5, since_best=0)
        weights = portable_state_dict(state.model)
        with torch.no_grad():
            for parameter in state.model.parameters():
                parameter.zero_()  # the next epoch's steps, while the thread may still write
        keeper.wait()
        saved = torch.load(keeper.path, weights_only=True)
        assert saved["epoch"] == 2
        assert all(torch.equal(saved["model"][k], v) for k, v in weights.items())
        epoch(3, 0.7, since_best=1)
        keeper.wait()
        assert uploaded(CHECKPOINT_ARTIFACT)["epoch"] == 1
        best = uploaded(BEST_ARTIFACT)
        assert (best["epoch"], best["best_val_loss"]) == (2, 0.5)
        assert all(torch.equal(best["best_weights"][k], v) for k, v in weights.items())
        assert fetch_checkpoint(run_id)["epoch"] == 3  # resume takes the newer local one
        # The process dies here; a resume with no epoch left to train still uploads epoch 3.
        Checkpoints(run_id, config).upload_last()
        assert uploaded(CHECKPOINT_ARTIFACT)["epoch"] == 3
        assert not list((cache_dir / "checkpoints").rglob("*.pt"))  # uploaded: local copy gone


def test_fused_adam_resumes_across_memory_layouts():
    """A checkpoint of a channels_last run (a GPU) resumed in the standard layout (a CPU): the
    fused Adam step equals the plain per-tensor one, moments in the other layout or not."""
    import copy

    from prunecxr.models import create_model

    def resumed_step(state: dict, **adam) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = create_model("resnet18", 4)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, **adam)
        optimizer.load_state_dict(copy.deepcopy(state))
        torch.manual_seed(1)
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        optimizer.step()
        return [p.detach() for p in model.parameters()]

    torch.manual_seed(0)
    gpu_like = create_model("resnet18", 4).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(gpu_like.parameters(), lr=1e-3, fused=True)
    gpu_like(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    checkpoint = copy.deepcopy(optimizer.state_dict())
    for fused, plain in zip(
        resumed_step(checkpoint, fused=True), resumed_step(checkpoint, foreach=False)
    ):
        torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_weight_decay_shrinks_weights_the_data_leaves_alone(tmp_path, weight_decay):
    """--weight-decay is Adam's L2 penalty: a step with no data gradient shrinks the weights
    toward zero with it, and changes none without it (the paper's setting)."""
    config = tiny_config(tmp_path, tmp_path, weight_decay=weight_decay)
    state = create_state(config, len(NIH.classes), resolve_runtime("cpu"))
    weights = [p for p in state.model.parameters() if p.dim() > 1]
    before = [w.detach().clone() for w in weights]
    for p in state.model.parameters():
        p.grad = torch.zeros_like(p)
    state.optimizer.step()
    for old, new in zip(before, weights):
        if weight_decay:
            assert new.abs().sum() < old.abs().sum()
        else:
            assert torch.equal(old, new)


def test_runs_keyed_before_weight_decay_existed_are_still_found():
    """At 0, weight_decay is left out of the keys: the same values prunecxr computed before the
    option existed (6915a9c), so running an older command again continues its study."""
    config = TrainConfig.from_flat(
        dataset="nih-cxr-lt", data_dir="/data/nih", label_dir="/data/nih"
    )
    assert train_key(config) == "78f9b5c4da9fb4ea"
    assert study_key(StudyConfig(config)) == "8f71ffefca0be4b4"
    decayed = config.replace(weight_decay=1e-5)
    assert train_key(decayed) != train_key(config)
    assert study_key(StudyConfig(decayed)) != study_key(StudyConfig(config))
    # A checkpoint written before: its missing weight_decay is the default, not a change.
    older = {k: v for k, v in config.flat().items() if k != "weight_decay"}
    checkpoint = {"config": older, "epoch": 3}
    assert "weight_decay" not in resume_note(checkpoint, config, resolve_runtime("cpu"))
