"""One model trained by two processes (gloo on the CPU) equals one process training it."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mlflow.tracking import MlflowClient

from prunecxr import distributed, tracking
from prunecxr.device_data import DeviceImages
from prunecxr.fitting import TrainState, train_one_epoch
from prunecxr.models import create_model
from prunecxr.runtime import resolve_runtime
from prunecxr.stages.train import run_training
from tests.helpers import cli_env, free_port, tiny_cli_options, tiny_config

DDP_ENV = {"GLOO_SOCKET_IFNAME": "lo", "MASTER_ADDR": "127.0.0.1"}


def _one_epoch(rank: int, world: int, port: int, images, labels, out: str) -> None:
    """One epoch on this rank, in float64 (in float32, rounding alone moves some ResNet
    gradients by several per cent) with SGD (linear in the gradients, so a wrong loss scale
    shows, which Adam's step would hide); rank 0 saves the weights and BatchNorm statistics."""
    if world > 1:
        os.environ.update(DDP_ENV, MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = create_model("resnet18", labels.shape[1], "none").double()
    state = TrainState(model, torch.optim.SGD(model.parameters(), lr=0.5), torch.Generator())
    state.generator.manual_seed(0)
    runtime = resolve_runtime("cpu")
    data = DeviceImages(images, runtime, labels)
    with distributed.data_parallel(model) as trained:
        loss = train_one_epoch(state, data, 32, runtime, lambda batch: trained(batch.double()))
    if rank == 0:
        torch.save({"loss": loss, "state": model.state_dict()}, out)
    if world > 1:
        dist.destroy_process_group()


def test_two_processes_take_the_same_steps_as_one(tmp_path):
    generator = np.random.default_rng(0)
    images = generator.integers(0, 256, (96, 32, 32), dtype=np.uint8)
    labels = (generator.random((96, 20)) < 0.3).astype(np.float32)
    _one_epoch(0, 1, 0, images, labels, str(tmp_path / "one.pt"))
    args = (2, free_port(), images, labels, str(tmp_path / "two.pt"))
    mp.spawn(_one_epoch, args=args, nprocs=2)
    one, two = (torch.load(tmp_path / f"{n}.pt") for n in ("one", "two"))
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
    compared = 0
    for key, value in one["state"].items():
        if value.is_floating_point():
            assert torch.allclose(two["state"][key], value, rtol=1e-9, atol=1e-12), key
            compared += 1
    assert compared > 100  # weights, biases and every BatchNorm's running statistics


@pytest.mark.slow
def test_torchrun_trains_one_model_logged_once_by_rank_0(tiny_nih, cache_dir, mlflow_store):
    tracking.use_experiment("prunecxr")
    config = tiny_config(tiny_nih, cache_dir, max_epochs=2)
    single = run_training(config)
    args = [
        "--nproc-per-node",
        "2",
        "-m",
        "prunecxr",
        "train",
        *tiny_cli_options(tiny_nih, cache_dir),
        "--max-epochs",
        "2",
    ]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", *args]
    result = subprocess.run(
        torchrun, capture_output=True, text=True, env=cli_env(**DDP_ENV), timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["prunecxr"], output_format="list")
    assert len(runs) == 2  # the single-process run and one run for both ranks
    (ddp,) = [run for run in runs if run.info.run_id != single]
    assert result.stdout.count("train run ") == 1 and ddp.info.run_id in result.stdout
    client = MlflowClient()
    for metric in ("train_loss", "val_loss"):
        history = [
            [m.value for m in client.get_metric_history(run_id, metric)]
            for run_id in (single, ddp.info.run_id)
        ]
        # Close, not equal: float32 rounding moves some gradients by per cents (the float64
        # test above shows the steps are the same) and Adam's first steps amplify it.
        assert history[1] == pytest.approx(history[0], rel=0.03), metric
    assert ddp.data.params["batch_size"] == "32"
    assert "test_mAP" in ddp.data.metrics
