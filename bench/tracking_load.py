"""Tracking-server load: several processes logging the cells of one sweep at the same time.

Every process logs its cells with prunecxr's own `CellRuns.log` (the params, metrics, label-file
input, per-class table and predictions.parquet a real sweep cell logs) as prune runs nested
under one sweep run. Pruning and evaluation are left out (random probabilities), so the
tracking server is the only thing measured. For each number of concurrent processes it reports
the cells per second the server took and checks that every run, param, metric and artifact
arrived.

    docker compose up -d tracking     # the compose stack: PostgreSQL backend, basic auth
    MLFLOW_TRACKING_URI=http://localhost:5000 MLFLOW_TRACKING_USERNAME=trainer \\
    MLFLOW_TRACKING_PASSWORD=... python bench/tracking_load.py --processes 1,2,4,8 --cells 12
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient
from torch import nn

from prunecxr import tracking
from prunecxr.cells import Cell, CellResult, ModelSource
from prunecxr.data import SplitData, get_schema
from prunecxr.evaluate import per_class_metrics, summarize
from prunecxr.runtime import resolve_runtime
from prunecxr.specs import CellSettings, DataSpec, RuntimeSpec
from prunecxr.stages.prune import CellRuns

DATASET = "nih-cxr-lt"
NIH_TEST_IMAGES = 20_796  # the real NIH-CXR-LT test split: predictions.parquet's size per cell


@dataclass(frozen=True)
class Load:
    experiment: str
    sweep_run_id: str
    label_dir: str
    test_images: int
    cells: int  # per process


def write_test_labels(folder: Path, images: int, seed: int = 0) -> None:
    schema = get_schema(DATASET)
    rng = np.random.default_rng(seed)
    labels = (rng.random((images, schema.num_classes)) < 0.05).astype(int)
    frame = pd.DataFrame(labels, columns=list(schema.classes))
    frame.insert(0, schema.image_column, [f"{i:08d}_000.png" for i in range(images)])
    frame.to_csv(folder / schema.label_file("test"), index=False)


def _test_split(load: Load) -> SplitData:
    schema = get_schema(DATASET)
    frame = pd.read_csv(Path(load.label_dir) / schema.label_file("test"))
    labels = frame[list(schema.classes)].to_numpy(np.float32)
    return SplitData(tuple(frame[schema.image_column]), np.zeros((len(frame), 1, 1)), labels)


def log_cells(load: Load, process: int) -> tuple[float, float]:
    """One process's share: `load.cells` prune runs under the sweep. -> when it started and
    ended logging (Unix time; the process's start-up is not counted)."""
    tracking.quiet_logs()
    tracking.use_experiment(load.experiment)
    data = DataSpec(DATASET, load.label_dir, load.label_dir, 32)
    source = ModelSource("bench", None, "resnet18", 0, "none", data, nn.Identity(), "0" * 64)
    test, runtime = _test_split(load), resolve_runtime("cpu")
    rng = np.random.default_rng(process)
    started = time.time()
    for cell in range(load.cells):
        sparsity = round((process * load.cells + cell + 1) / 10_000, 4)  # a distinct cell each
        probs = rng.random(test.labels.shape, dtype=np.float32)
        measures = {"achieved_sparsity": sparsity, "nonzero_params": 1e6, "macs": 1e9}
        result = CellResult(probs, measures)
        runs = CellRuns(CellSettings(RuntimeSpec(device="cpu")))
        runs.log(Cell(source, "l1", sparsity), test, runtime, result, load.sweep_run_id)
    return started, time.time()


def run_load(processes: int, cells: int, test_images: int, experiment: str) -> dict:
    """`processes` processes at once, `cells` each, into a new sweep run; -> the measurement
    and what arrived."""
    with tempfile.TemporaryDirectory() as folder:
        write_test_labels(Path(folder), test_images)
        tracking.use_experiment(experiment)
        with tracking.start_run("sweep", run_name=f"load-{processes}x{cells}") as sweep_id:
            load = Load(experiment, sweep_id, folder, test_images, cells)
            context = multiprocessing.get_context("spawn")
            with context.Pool(processes) as pool:
                spans = pool.starmap(log_cells, [(load, p) for p in range(processes)])
            seconds = max(end for _, end in spans) - min(start for start, _ in spans)
        arrived = check_arrived(sweep_id, processes * cells, _expected_metrics(load))
    return {
        "processes": processes,
        "cells": processes * cells,
        "test_images": test_images,
        "seconds": round(seconds, 2),
        "cells_per_s": round(processes * cells / seconds, 3),
        **arrived,
    }


def _expected_metrics(load: Load) -> set[str]:
    test = _test_split(load)
    classes = get_schema(DATASET).classes
    metrics = per_class_metrics(np.full(test.labels.shape, 0.5), test.labels, classes)
    return set(summarize(metrics, "test")) | {"achieved_sparsity", "nonzero_params", "macs"}


def check_arrived(sweep_id: str, cells: int, metric_names: set[str]) -> dict:
    """What the server holds under the sweep: runs, and whether each is complete."""
    client = MlflowClient()
    experiment_id = client.get_run(sweep_id).info.experiment_id
    query = f"tags.`mlflow.parentRunId` = '{sweep_id}'"
    runs = client.search_runs([experiment_id], query, max_results=10_000)
    params = {frozenset(run.data.params) for run in runs}
    complete = [
        run
        for run in runs
        if run.info.status == "FINISHED"
        and metric_names <= set(run.data.metrics)
        and {"method", "sparsity", "arch", "dataset"} <= set(run.data.params)
        and {a.path for a in client.list_artifacts(run.info.run_id)}
        >= {"per_class_metrics.csv", "predictions.parquet"}
    ]
    return {
        "runs": len(runs),
        "complete_runs": len(complete),
        "same_params_everywhere": len(params) == 1,
        "all_arrived": len(runs) == len(complete) == cells and len(params) == 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", default="1,2,4,8", help="Concurrency levels to measure.")
    parser.add_argument("--cells", type=int, default=12, help="Cells per process.")
    parser.add_argument("--test-images", type=int, default=NIH_TEST_IMAGES)
    parser.add_argument("--experiment", default="prunecxr-load")
    parser.add_argument("--out", type=Path, help="Also write the results as JSON here.")
    args = parser.parse_args()
    results = []
    for processes in (int(p) for p in args.processes.split(",")):
        results.append(run_load(processes, args.cells, args.test_images, args.experiment))
        print(json.dumps(results[-1]), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"uri": mlflow.get_tracking_uri(), "runs": results}))


if __name__ == "__main__":
    main()
