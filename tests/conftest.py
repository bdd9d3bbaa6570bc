"""Shared fixtures: tiny synthetic datasets, an isolated MLflow store, a real MLflow server."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import mlflow
import pytest

from prunecxr.data import get_schema
from prunecxr.data.synthetic import write_synthetic
from tests.helpers import MlflowServer

TINY_SPLITS = {"train": 96, "val": 48, "test": 64}


# The longest test files start first, so that the parallel workers (ci/test.sh) end together.
LONGEST_FIRST = ("test_quickstart.py", "test_docker.py", "test_mlproject.py", "test_study.py")


def pytest_collection_modifyitems(config, items) -> None:
    """Longest files first; `gpu` tests run where torch sees a CUDA device and are skipped
    elsewhere, unless PRUNECXR_REQUIRE_GPU=1 (on a GPU machine, a broken CUDA setup then
    fails them)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: else as collected
    import torch

    if torch.cuda.is_available() or os.environ.get("PRUNECXR_REQUIRE_GPU") == "1":
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_nih(tmp_path_factory) -> Path:
    """A 32 px synthetic NIH-CXR-LT with ~200 images (seconds to train a ResNet18 on)."""
    out = tmp_path_factory.mktemp("tiny-nih")
    write_synthetic(get_schema("nih-cxr-lt"), out, TINY_SPLITS, image_size=32, seed=1)
    return out


@pytest.fixture(scope="session")
def tiny_mimic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-mimic")
    write_synthetic(get_schema("mimic-cxr-lt"), out, TINY_SPLITS, image_size=32, seed=2)
    return out


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch) -> str:
    """An embedded sqlite store of this test's own (what users get with no server)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # file-based artifacts land under the test's directory
    mlflow.set_tracking_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` on 127.0.0.1 with server-served artifacts; stopped afterwards."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def server_store(mlflow_server, tmp_path, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(mlflow_server)
    yield mlflow_server
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def prunecxr_warnings(caplog):
    """prunecxr's warnings (the CLI may have stopped them from reaching the root logger)."""
    notes = logging.getLogger("prunecxr")
    notes.addHandler(caplog.handler)
    yield caplog
    notes.removeHandler(caplog.handler)
