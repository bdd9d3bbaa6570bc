"""The prune and sweep stages end to end: runs, params, metrics, models, resumable sweeps."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from prunecxr import PrunecxrError, tracking
from prunecxr.cli.options import parse_sparsities
from prunecxr.data import get_schema, load_split
from prunecxr.evaluate import predict_logits, sigmoid
from prunecxr.executor import Executor
from prunecxr.runtime import resolve_runtime
from prunecxr.sources import load_source
from prunecxr.specs import CellSettings, DataSpec, ExecutionSpec, Finetune, RuntimeSpec
from prunecxr.stages.prune import CELL_TAG, run_prune, run_sweep
from prunecxr.stages.train import run_training
from tests.helpers import prunecxr, tiny_config

NIH = get_schema("nih-cxr-lt")
pytestmark = pytest.mark.slow


@pytest.fixture
def trained(tiny_nih, cache_dir, mlflow_store) -> str:
    tracking.use_experiment("prunecxr")
    return run_training(tiny_config(tiny_nih, cache_dir, max_epochs=1))


def _children(parent_id: str) -> pd.DataFrame:
    return mlflow.search_runs(
        experiment_names=["prunecxr"], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )


def test_prune_defaults_to_the_newest_train_run_and_logs_a_complete_run(
    trained, tiny_nih, cache_dir
):
    result = prunecxr("prune", "--method", "structured", "--sparsity", "0.7", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.split("prune run ")[1].split(":")[0]
    run = MlflowClient().get_run(run_id)
    assert run.data.tags["prunecxr.stage"] == "prune"
    params = run.data.params
    assert (params["method"], params["sparsity"], params["source_run_id"]) == (
        "structured",
        "0.7",
        trained,
    )
    assert (params["dataset"], params["arch"], params["image_size"]) == (
        "nih-cxr-lt",
        "resnet18",
        "32",
    )
    metrics = run.data.metrics
    assert metrics["achieved_sparsity"] == pytest.approx(0.7, abs=0.01)
    assert {"nonzero_params", "macs", "latency_ms_per_image", "test_mAUC", "test_ap_hernia"} <= set(
        metrics
    )
    source_macs = MlflowClient().get_run(trained)  # the structured model is smaller and faster
    assert metrics["macs"] < 0.7 * _dense_macs(source_macs.info.run_id)
    # The structurally pruned model loads back with its smaller shapes and gives the logged predictions.
    model = mlflow.pytorch.load_model(f"runs:/{run_id}/model")
    assert model.layer1[0].conv1.out_channels < 64
    test = load_split(NIH, tiny_nih, tiny_nih, "test", 32, cache_dir=cache_dir)
    probs = sigmoid(predict_logits(model, test.images, runtime=resolve_runtime("cpu")))
    logged = pd.read_parquet(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions.parquet")
    )
    np.testing.assert_allclose(logged[list(NIH.classes)].to_numpy(), probs, atol=1e-5)
    per_class = pd.read_csv(
        mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="per_class_metrics.csv")
    )
    assert list(per_class["class"]) == list(NIH.classes)
    # prunecxr itself reads the pruned model from its weights file, never the pickle: with every
    # pickled model gone from the store, it loads with its smaller shapes and the same outputs.
    pickled = list(Path.cwd().glob("**/data/model.pth"))  # the store is under the test's cwd
    assert len(pickled) == 2  # the train run's model and the prune run's
    for path in pickled:
        path.unlink()
    reread = load_source(f"runs:/{run_id}/model").model.eval()
    assert reread.layer1[0].conv1.out_channels == model.layer1[0].conv1.out_channels
    reread_probs = sigmoid(predict_logits(reread, test.images, runtime=resolve_runtime("cpu")))
    np.testing.assert_allclose(reread_probs, probs, atol=1e-6)


def test_a_model_without_a_weights_file_is_unpickled_only_when_allowed(trained):
    """Runs logged by an older prunecxr have only the pickled MLflow model."""
    (weights,) = Path.cwd().glob(f"**/{trained}/artifacts/{tracking.WEIGHTS_ARTIFACT}")
    expected = load_source(f"runs:/{trained}/model").model.state_dict()
    weights.unlink()
    with pytest.raises(PrunecxrError, match="unpickling can run code: pass --allow-pickle"):
        load_source(f"runs:/{trained}/model")
    unpickled = load_source(f"runs:/{trained}/model", allow_pickle=True).model.state_dict()
    assert all(torch.equal(unpickled[key], value) for key, value in expected.items())


def _dense_macs(train_run_id: str) -> float:
    from prunecxr.pruning import count_macs

    model = mlflow.pytorch.load_model(f"runs:/{train_run_id}/model")
    return count_macs(model, torch.zeros(1, 3, 32, 32))


def test_prune_an_original_study_checkpoint_file(tiny_nih, tmp_path, mlflow_store):
    from prunecxr.models import create_model

    torch.save({"weights": create_model("resnet18", 20).state_dict()}, tmp_path / "chkpt.pt")
    result = prunecxr(
        "prune",
        "--model-uri",
        str(tmp_path / "chkpt.pt"),
        "--arch",
        "resnet18",
        "--dataset",
        "nih-cxr-lt",
        "--data-dir",
        str(tiny_nih),
        "--image-size",
        "32",
        "--method",
        "l1",
        "--sparsity",
        "0.5",
        "--no-log-model",
        "--device",
        "cpu",
    )
    assert result.returncode == 0, result.stderr
    runs = mlflow.search_runs(experiment_names=["prunecxr"])
    assert runs["params.model_uri"].iloc[0] == str(tmp_path / "chkpt.pt")
    assert runs["metrics.achieved_sparsity"].iloc[0] == pytest.approx(0.5, abs=1e-6)


def test_prune_without_any_train_run_says_how_to_make_one(mlflow_store):
    result = prunecxr("prune", "--experiment", "empty")
    assert result.returncode == 1
    assert "no finished train run in experiment 'empty'" in result.stderr


def test_sweep_runs_every_cell_and_resumes_after_an_interruption(trained, cache_dir):
    source = load_source(f"runs:/{trained}/model", cache_dir=str(cache_dir))
    settings = CellSettings(RuntimeSpec(device="cpu"), batch_size=64, log_model=False)
    sparsities = [0.0, 0.5, 0.9]
    sweep_id = run_sweep([source], ["l1", "random"], sparsities, settings)
    children = _children(sweep_id)
    assert len(children) == 6 and set(children.status) == {"FINISHED"}
    assert set(children["tags.prunecxr.stage"]) == {"prune"}
    assert sorted(children["params.sparsity"].astype(float)) == sorted(sparsities * 2)
    dense = children[children["params.sparsity"] == "0.0"]
    assert dense["metrics.test_mAUC"].nunique() == 1  # sparsity 0 is the same model for both

    # What an interruption leaves: the sweep and the cell in progress killed, one cell missing.
    client = MlflowClient()
    killed = children.run_id.iloc[0]
    client.set_terminated(killed, "KILLED")
    client.delete_run(children.run_id.iloc[1])
    client.set_terminated(sweep_id, "KILLED")
    again = run_sweep([source], ["l1", "random"], sparsities, settings)
    assert again == sweep_id  # the same sweep run continues
    children = _children(sweep_id)
    finished = children[children.status == "FINISHED"]
    assert len(finished) == 6 and finished[f"tags.{CELL_TAG}"].nunique() == 6
    assert len(children) == 7  # 5 kept + 2 redone (the killed one stays, as MLflow keeps it)
    assert client.get_run(sweep_id).info.status == "FINISHED"


def test_checkpoint_file_needs_data_settings(tmp_path):
    torch.save({"weights": {}}, tmp_path / "chkpt.pt")
    with pytest.raises(PrunecxrError, match="give --dataset, --data-dir"):
        load_source(str(tmp_path / "chkpt.pt"))
    assert DataSpec("nih-cxr-lt", "d", "d", 32).cache_dir


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0:0.95:0.05", [round(0.05 * i, 6) for i in range(20)]), ("0.9,0,0.5,0.5", [0, 0.5, 0.9])],
)
def test_parse_sparsities(text, expected):
    assert parse_sparsities(text) == expected


@pytest.mark.parametrize("text", ["0:1:0.5", "a,b", "0:0.9:0"])
def test_bad_sparsities_are_refused(text):
    with pytest.raises(PrunecxrError, match="bad sparsities"):
        parse_sparsities(text)


def test_finetuning_after_unstructured_pruning_keeps_the_sparsity(trained, cache_dir):

    source = load_source(f"runs:/{trained}/model", cache_dir=str(cache_dir))
    settings = CellSettings(RuntimeSpec(device="cpu"), batch_size=64)
    run_id = run_prune(source, "l1", 0.5, settings, Finetune(epochs=1, lr=1e-3, batch_size=32))
    run = MlflowClient().get_run(run_id)
    assert run.data.params["finetune_epochs"] == "1"
    assert run.data.metrics["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6)
    untuned = run_prune(source, "l1", 0.5, settings)
    untuned_auc = MlflowClient().get_run(untuned).data.metrics["test_mAUC"]
    assert run.data.metrics["test_mAUC"] != untuned_auc  # fine-tuning changed the weights


def test_unstructured_cells_share_one_compiled_graph_and_match_a_fresh_copy():
    """Sweep cells load the dense weights in place into one working model: with --compile, the
    one graph compiled for the first cell (a short last batch is padded) serves every later one,
    and each cell's predictions equal pruning a fresh copy of the model. Sparsity 0 is
    evaluated once, the source's speed measured once."""
    import copy

    import torch._dynamo.utils

    from prunecxr.cells import ModelSource, SourceCells
    from prunecxr.device_data import DeviceImages
    from prunecxr.pruning import prune_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, NIH.num_classes),
    ).eval()
    images = np.random.default_rng(0).integers(0, 256, (10, 16, 16), dtype=np.uint8)
    data = DataSpec(NIH.name, "/nowhere", "/nowhere", 16)
    source = ModelSource("test", None, "tiny", 3, "none", data, model)
    runtime = resolve_runtime("cpu", compile=True)
    settings = CellSettings(RuntimeSpec(device="cpu", compile=True), batch_size=4)
    cells = SourceCells(source, DeviceImages(images, runtime), runtime, settings, Finetune())
    counters = torch._dynamo.utils.counters["stats"]
    before = counters["unique_graphs"]
    first = cells.compute("l1", 0.5)
    graphs = counters["unique_graphs"]
    assert graphs == before + 1  # 10 images in batches of 4: the last padded, one shape
    later = {(m, k): cells.compute(m, k) for m in ("l1", "random") for k in (0.7, 0.9)}
    assert counters["unique_graphs"] == graphs  # no recompile after the first cell
    assert cells.compute("random", 0.0) is cells.compute("l1", 0.0)  # dense: evaluated once
    speed = ("latency_ms_batch1", "latency_ms_per_image", "throughput_images_per_s")
    timings = {tuple(r.measures[k] for k in speed) for r in [first, *later.values()]}
    assert len(timings) == 1  # dense kernels at every sparsity: the source timed once
    assert {r.speed_of for r in [first, *later.values()]} == {"source (dense kernels)"}
    eager = resolve_runtime("cpu")
    for (method, sparsity), result in [(("l1", 0.5), first), *later.items()]:
        fresh = prune_model(copy.deepcopy(model), method, sparsity, example_inputs=None, seed=3)
        expected = sigmoid(predict_logits(fresh, images, runtime=eager, batch_size=4))
        np.testing.assert_allclose(result.probs, expected, rtol=1e-4, atol=1e-5)
        assert result.measures["achieved_sparsity"] == pytest.approx(sparsity, abs=0.01)
        assert result.measures["throughput_images_per_s"] > 0


def test_cells_that_fail_are_failed_runs_with_their_error_and_the_others_finish(
    tiny_nih, cache_dir, mlflow_store, tmp_path
):
    tracking.use_experiment("prunecxr")
    moved = tmp_path / "moved"
    shutil.copytree(tiny_nih, moved)
    runs = [
        run_training(tiny_config(tiny_nih, cache_dir, max_epochs=1)),
        run_training(tiny_config(moved, tmp_path / "cache-moved", max_epochs=1, seed=1)),
    ]
    sources = [load_source(f"runs:/{run_id}/model") for run_id in runs]
    shutil.rmtree(moved)  # the second model's test data is gone (e.g. a disk not mounted)
    shutil.rmtree(tmp_path / "cache-moved")
    settings = CellSettings(RuntimeSpec(device="cpu"), batch_size=64)
    sweep = functools.partial(
        run_sweep,
        sources,
        ["l1"],
        [0.0, 0.5, 0.9],
        settings,
        executor=Executor(ExecutionSpec(max_retries=1)),
    )
    with pytest.raises(PrunecxrError, match=r"3 cells done \(0 after a retry\), 3 failed"):
        sweep()
    (sweep_id,) = mlflow.search_runs(
        experiment_names=["prunecxr"], filter_string="tags.`prunecxr.stage` = 'sweep'"
    ).run_id
    children = _children(sweep_id)
    failed = children[children.status == "FAILED"]
    assert sorted(failed["params.seed"]) == ["1", "1", "1"]
    assert failed["tags.prunecxr.error"].str.contains(f"cannot read {moved}").all()
    assert set(children[children.status == "FINISHED"]["params.seed"]) == {"0"}
    assert MlflowClient().get_run(sweep_id).info.status == "FAILED"

    shutil.copytree(tiny_nih, moved)  # the data is back: the same command continues
    assert sweep() == sweep_id
    finished = _children(sweep_id).query("status == 'FINISHED'")
    assert len(finished) == 6 and finished[f"tags.{CELL_TAG}"].nunique() == 6
