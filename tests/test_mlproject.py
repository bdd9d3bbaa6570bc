"""Every MLproject entry point through `mlflow run --env-manager local`, as users without conda
run it: with its own defaults, with every parameter set, with relative paths. `mlflow run` logs
each -P value and declared default as a param before our code starts; ours must not clash."""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.projects import _project_spec  # private, but MLflow has no public MLproject parser
from mlflow.tracking import MlflowClient

from prunecxr import tracking
from prunecxr.cli import cli
from prunecxr.stages.train import run_training
from tests.helpers import PROJECT_ROOT, cli_env, prunecxr, tiny_config

ENTRY_POINTS = {"main", "train", "prune", "sweep", "analyze"}


def mlflow_run(
    entry_point: str, experiment: str | None = None, project: Path = PROJECT_ROOT, **params
) -> subprocess.CompletedProcess:
    """`mlflow run` of the MLproject, as users run it without conda (no --experiment-name when
    `experiment` is None), from the current working directory."""
    command = [sys.executable, "-m", "mlflow", "run", str(project), "-e", entry_point]
    command += ["--env-manager", "local"]
    if experiment is not None:
        command += ["--experiment-name", experiment]
    for name, value in params.items():
        command += ["-P", f"{name}={value}"]
    return subprocess.run(command, capture_output=True, text=True, env=cli_env(), timeout=1200)


def _launcher():
    spec = importlib.util.spec_from_file_location("run", PROJECT_ROOT / "entrypoints" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _runs(experiment: str, stage: str):
    return mlflow.search_runs(
        experiment_names=[experiment], filter_string=f"tags.`prunecxr.stage` = '{stage}'"
    )


def test_mlproject_builds_its_conda_environment_from_conda_yaml():
    """`mlflow run .` with conda: MLflow reads conda.yaml, which installs this package (its
    dependencies come from pyproject.toml). Conda itself is not reachable from CI."""
    project = _project_spec.load_project(str(PROJECT_ROOT))
    assert project.env_type == "conda_env"
    conda = yaml.safe_load(Path(project.env_config_path).read_text())
    assert "python=3.11" in conda["dependencies"]
    assert {"pip": ["-e ."]} in conda["dependencies"]
    assert set(project._entry_points) == ENTRY_POINTS


def test_launcher_turns_mlflow_parameters_into_cli_options():
    to_cli = _launcher().to_cli_arguments
    assert to_cli(["sweep", "--log_models", "true", "--channels-last", "auto"]) == [
        "sweep",
        "--log-models",
    ]
    assert to_cli(["prune", "--log-model", "false", "--channels_last", "True"]) == [
        "prune",
        "--no-log-model",
        "--channels-last",
    ]
    assert to_cli(["train", "--label_dir", "", "--data_dir", "d"]) == ["train", "--data-dir", "d"]
    with pytest.raises(SystemExit, match="--log-models takes true, false or auto, not 'maybe'"):
        to_cli(["sweep", "--log_models", "maybe"])


@pytest.mark.parametrize("entry_point", sorted(ENTRY_POINTS))
def test_every_entry_point_command_parses_with_its_defaults_and_every_parameter(
    entry_point, tmp_path
):
    """The command each entry point builds is a valid CLI call, with the declared defaults and
    with every declared parameter set (click parses it exactly as the CLI would)."""
    project = _project_spec.load_project(str(PROJECT_ROOT))
    entry = project.get_entry_point(entry_point)
    required = {name: str(tmp_path) for name, p in entry.parameters.items() if p.default is None}
    for params in (required, {**required, **_non_defaults(entry.parameters)}):
        command = shlex.split(entry.compute_command(params, storage_dir=str(tmp_path)))
        assert command[:2] == ["python", "entrypoints/run.py"]
        arguments = _launcher().to_cli_arguments(command[2:])
        name, options = arguments[0], arguments[1:]
        context = cli.commands[name].make_context(name, options)
        for key, value in params.items():
            if key in context.params and key not in required:
                assert str(context.params[key]).lower() == str(value).lower(), key


def _non_defaults(parameters) -> dict[str, str]:
    """A value other than its default for each declared parameter (a new one must be added)."""
    return {name: NON_DEFAULTS[name] for name, p in parameters.items() if p.default is not None}


NON_DEFAULTS = {
    "dataset": "mimic-cxr-lt",
    "device": "cpu",
    "channels_last": "true",
    "precision": "bf16",
    "compile": "false",
    "resident_data": "true",
    "cudnn_benchmark": "true",
    "protocol": "original",
    "arch": "resnet18",
    "image_size": "64",
    "batch_size": "32",
    "lr": "0.001",
    "weight_decay": "0.0001",
    "max_epochs": "2",
    "patience": "3",
    "seed": "1",
    "method": "random",
    "sparsity": "0.5",
    "finetune_epochs": "1",
    "log_model": "false",
    "methods": "l1",
    "sparsities": "0,0.5",
    "log_models": "true",
    "cooccurrence": "legacy",
    "executor": "ray",
}


@pytest.mark.slow
def test_train_with_its_defaults_and_a_relative_data_dir(tiny_nih, tmp_path, mlflow_store):
    """Only what keeps a CPU test short is set (one epoch); ResNet50 at 256 px, the rest as
    declared. data_dir is relative to where `mlflow run` is typed, as in the README."""
    shutil.copytree(tiny_nih, tmp_path / "data")
    result = mlflow_run("train", "mlproject", data_dir="data/", max_epochs=1)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _runs("mlproject", "train")
    assert len(runs) == 1  # our code continued the run `mlflow run` created, no second run
    run = MlflowClient().get_run(runs.run_id.iloc[0])
    assert run.info.status == "FINISHED"
    params = tracking.run_settings(run)
    assert params["data_dir"] == str(tmp_path / "data")
    assert (params["arch"], params["image_size"], params["lr"]) == ("resnet50", "256", "0.0001")
    assert params["pretrained"] == "none"  # synthetic data: resolved, no ImageNet download
    assert (params["device_resolved"], params["precision_resolved"]) == ("cpu", "fp32")


@pytest.mark.slow
def test_train_with_every_parameter_set(tiny_mimic, tmp_path, mlflow_store):
    result = mlflow_run(
        "train",
        "mlproject",
        data_dir=tiny_mimic,
        dataset="mimic-cxr-lt",
        arch="resnet18",
        image_size=32,
        batch_size=32,
        lr="1e-3",
        weight_decay="1e-5",
        max_epochs=1,
        patience=2,
        seed=3,
        device="cpu",
        channels_last="true",
        precision="bf16",
        compile="false",
        resident_data="true",
        cache_dir=tmp_path / "cache",  # undeclared: passed through as --cache-dir
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = MlflowClient().get_run(_runs("mlproject", "train").run_id.iloc[0])
    params = run.data.params
    assert params["lr"] == "1e-3"  # as typed; our 0.001 is the same value, not logged again
    assert params["weight_decay"] == "1e-5"
    assert "weight_decay_resolved" not in params  # prunecxr trained with the value typed
    assert (params["seed"], params["dataset"], params["channels_last"]) == (
        "3",
        "mimic-cxr-lt",
        "true",
    )
    assert (params["channels_last_resolved"], params["precision_resolved"]) == ("true", "bf16")
    assert (params["compile_resolved"], params["resident_data_resolved"]) == ("false", "true")
    assert run.data.metrics["test_mAUC"] > 0


@pytest.fixture
def trained(tiny_nih, cache_dir, mlflow_store) -> str:
    tracking.use_experiment("mlproject")
    return run_training(tiny_config(tiny_nih, cache_dir, max_epochs=1))


@pytest.mark.slow
def test_prune_with_its_defaults(trained):
    result = mlflow_run("prune", "mlproject")
    assert result.returncode == 0, result.stderr[-3000:]
    runs = _runs("mlproject", "prune")
    assert len(runs) == 1
    assert runs["params.source_run_id"].iloc[0] == trained  # the newest finished train run
    assert (runs["params.method"].iloc[0], runs["params.sparsity"].iloc[0]) == ("l1", "0.9")
    assert runs["metrics.achieved_sparsity"].iloc[0] == pytest.approx(0.9, abs=1e-6)
    assert mlflow.models.get_model_info(f"runs:/{runs.run_id.iloc[0]}/model") is not None


@pytest.mark.slow
def test_prune_with_every_parameter_set(trained):
    result = mlflow_run(
        "prune",
        "mlproject",
        model_uri=f"runs:/{trained}/model",
        method="random",
        sparsity=0.5,
        finetune_epochs=1,
        log_model="false",
        device="cpu",
        channels_last="true",
        precision="bf16",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = MlflowClient().get_run(_runs("mlproject", "prune").run_id.iloc[0])
    assert run.data.params["finetune_epochs"] == "1"
    assert run.data.params["precision_resolved"] == "bf16"
    assert run.data.metrics["achieved_sparsity"] == pytest.approx(0.5, abs=1e-6)
    with pytest.raises(Exception, match="model"):  # log_model=false: no model logged
        mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")


@pytest.mark.slow
def test_sweep_with_its_defaults_then_analyze_with_its_defaults(trained):
    """The default grid 0:0.95:0.05 stays the param `mlflow run` logged; the expanded grid is
    `sparsities_resolved`. 3 methods x 20 sparsities of the newest train run."""
    result = mlflow_run("sweep", "mlproject")
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = MlflowClient().get_run(_runs("mlproject", "sweep").run_id.iloc[0])
    assert sweep.data.params["sparsities"] == "0:0.95:0.05"
    assert sweep.data.params["sparsities_resolved"].split(",")[:3] == ["0", "0.05", "0.1"]
    cells = _runs("mlproject", "prune")
    assert len(cells) == 60 and set(cells["status"]) == {"FINISHED"}
    analyzed = mlflow_run("analyze", "mlproject")
    assert analyzed.returncode == 0, analyzed.stderr[-3000:]
    analyze = _runs("mlproject", "analyze")
    assert analyze["params.sweep_run_id"].iloc[0] == sweep.info.run_id
    assert analyze["params.cooccurrence"].iloc[0] == "paper"


@pytest.mark.slow
def test_sweep_and_analyze_with_every_parameter_set(trained):
    result = mlflow_run(
        "sweep",
        "mlproject",
        model_uri=f"runs:/{trained}/model",
        methods="l1,structured",
        sparsities="0,0.5",
        finetune_epochs=0,
        log_models="true",
        device="cpu",
        channels_last="true",
        precision="bf16",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cells = _runs("mlproject", "prune")
    assert len(cells) == 4
    for run_id in cells.run_id:  # --log-models: every cell's pruned model is logged
        assert mlflow.models.get_model_info(f"runs:/{run_id}/model").run_id == run_id
    sweep_id = _runs("mlproject", "sweep").run_id.iloc[0]
    analyzed = mlflow_run("analyze", "mlproject", sweep_run_id=sweep_id, cooccurrence="legacy")
    assert analyzed.returncode == 0, analyzed.stderr[-3000:]
    assert _runs("mlproject", "analyze")["params.cooccurrence"].iloc[0] == "legacy"


@pytest.mark.slow
def test_main_with_every_parameter_set(tiny_nih, tmp_path, mlflow_store):
    """The study entry point on given data (the paper's path; the demo's path is the
    Quickstart test's). `seeds` stays as typed (3), the seed list is `seeds_resolved`."""
    result = mlflow_run(
        "main",
        "mlproject",
        dataset="nih-cxr-lt",
        device="cpu",
        channels_last="false",
        precision="fp32",
        seeds=3,
        data_dir=tiny_nih,
        arch="resnet18",
        image_size=32,
        max_epochs=1,
        methods="l1",
        sparsities="0,0.9",
        cache_dir=tmp_path / "cache",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    study = MlflowClient().get_run(_runs("mlproject", "study").run_id.iloc[0])
    assert (study.data.params["seeds"], study.data.params["seeds_resolved"]) == ("3", "0,1,2")
    assert len(_runs("mlproject", "train")) == 3 and len(_runs("mlproject", "prune")) == 6
    assert len(_runs("mlproject", "analyze")) == 1


@pytest.mark.slow
def test_the_headline_prune_command_finds_a_model_the_cli_trained(tiny_nih, tmp_path, mlflow_store):
    """`prunecxr train` logs into experiment `prunecxr`; `mlflow run` with no
    --experiment-name puts its run in MLflow's Default experiment and must still find it."""
    trained = prunecxr(
        *("train", "--data-dir", str(tiny_nih), "--arch", "resnet18", "--image-size", "32"),
        *("--max-epochs", "1", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"),
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    train_id = trained.stdout.split("train run ")[1].split(":")[0]
    result = mlflow_run("prune", sparsity=0.9)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"using the newest finished train run {train_id}" in result.stderr
    (pruned,) = MlflowClient().search_runs([tracking.DEFAULT_EXPERIMENT_ID])
    assert pruned.data.params["source_run_id"] == train_id
    assert pruned.data.metrics["achieved_sparsity"] == pytest.approx(0.9, abs=1e-6)
