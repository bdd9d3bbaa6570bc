"""The `prunecxr` command line and the demo study, end to end."""

from __future__ import annotations

import socket
import time

import mlflow
from mlflow.tracking import MlflowClient

from tests.helpers import prunecxr


def test_help_lists_every_command():
    result = prunecxr("--help")
    assert result.returncode == 0
    for command in ("synth", "train", "prune", "sweep", "analyze", "study"):
        assert command in result.stdout


def test_analyze_refuses_pickles_without_allow_pickle(tmp_path, mlflow_store):
    (tmp_path / "nih-cxr-lt_resnet50_seed-0_prune-0.pkl").write_bytes(b"not trusted")
    result = prunecxr("analyze", "--preds-dir", str(tmp_path), "--label-dir", str(tmp_path))
    assert result.returncode == 1
    assert "unpickling can run arbitrary code: pass --allow-pickle" in result.stderr


def test_bad_input_is_one_line_naming_the_file(tmp_path, mlflow_store):
    result = prunecxr("train", "--data-dir", str(tmp_path), "--pretrained", "none")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: label file not found: {tmp_path / 'miccai2023_nih-cxr-lt_labels_train.csv'}"
    ]


def test_synth_then_train_from_the_command_line(tmp_path, mlflow_store):
    data = tmp_path / "data"
    result = prunecxr(
        "synth",
        "--dataset",
        "mimic-cxr-lt",
        "--out",
        str(data),
        "--n-train",
        "40",
        "--n-val",
        "20",
        "--n-test",
        "20",
        "--size",
        "32",
    )
    assert result.returncode == 0, result.stderr
    assert "prunecxr train --dataset mimic-cxr-lt" in result.stdout
    again = prunecxr("synth", "--dataset", "mimic-cxr-lt", "--out", str(data))
    assert again.returncode == 1 and "--overwrite" in again.stderr
    result = prunecxr(
        "train",
        "--dataset",
        "mimic-cxr-lt",
        "--data-dir",
        "data",  # relative to the working directory (mlflow_store's tmp_path)
        "--arch",
        "resnet18",
        "--image-size",
        "32",
        "--batch-size",
        "16",
        "--max-epochs",
        "1",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--experiment",
        "cli",
    )
    assert result.returncode == 0, result.stderr
    run_id = result.stdout.split("train run ")[1].split(":")[0]
    run = MlflowClient().get_run(run_id)
    assert run.data.params["pretrained"] == "none"  # synthetic data: no ImageNet download
    assert run.data.params["data_dir"] == str(data)  # recorded absolute, usable from anywhere
    assert mlflow.get_experiment(run.info.experiment_id).name == "cli"


def test_an_unreachable_tracking_server_fails_fast_before_any_work(tiny_nih, tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        uri = f"http://127.0.0.1:{sock.getsockname()[1]}"
    started = time.monotonic()
    result = prunecxr(
        "train",
        "--data-dir",
        str(tiny_nih),
        "--cache-dir",
        str(tmp_path / "cache"),
        MLFLOW_TRACKING_URI=uri,
    )
    assert result.returncode == 1
    assert f"error: the tracking server {uri} does not answer" in result.stderr
    assert "Traceback" not in result.stderr
    assert time.monotonic() - started < 60  # MLflow's own retries would take minutes
    assert not (tmp_path / "cache").exists()  # nothing done before the check
