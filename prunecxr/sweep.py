"""The prune and sweep stages: one (model, method, sparsity) cell, or all of them as nested prune
runs under one sweep run. The test set is decoded once and held in memory, each source model is
read once; every cell starts from an in-memory copy."""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from prunecxr import PrunecxrError, ownership, tracking
from prunecxr.data import SplitData, get_schema, load_split
from prunecxr.data.transforms import normalize
from prunecxr.device_data import DeviceImages
from prunecxr.evaluate import (
    Stopwatch,
    device_logits,
    example_input,
    per_class_metrics,
    predictions_frame,
    sigmoid,
    summarize,
)
from prunecxr.pruning import count_macs, count_prunable, nonzero_parameters, prune_model
from prunecxr.runtime import Runtime, runtime_of, standard_layout
from prunecxr.sources import DataSettings, ModelSource, check_distinct_seeds
from prunecxr.train import Finetune, TrainConfig

log = logging.getLogger(__name__)
CELL_TAG = "prunecxr.cell"
SWEEP_KEY_TAG = "prunecxr.sweep_key"
TIMED_REPEATS = 20  # timed forward passes behind each latency (their median)
WARMUP_PASSES = 3


@dataclass(frozen=True)
class CellSettings:
    device: str = "auto"
    channels_last: bool | None = None  # None: on for CUDA
    precision: str = "auto"  # fp32 (analysis-grade) on every device; bf16 only when asked
    compile: bool | None = None  # None: on for CUDA
    resident_data: bool | None = None  # None: the test images on the device on CUDA
    batch_size: int = 256
    log_model: bool = False  # sweeps keep only metrics and predictions per cell
    num_workers: int = 0  # processes decoding images if the test-set cache must be built

    @classmethod
    def like_training(cls, train: TrainConfig) -> CellSettings:
        """Cells that run where and how a training ran (device, layout, precision, batch)."""
        return cls(
            device=train.device,
            channels_last=train.channels_last,
            precision=train.precision,
            compile=train.compile,
            resident_data=train.resident_data,
            batch_size=train.batch_size,
            num_workers=train.num_workers,
        )


@functools.lru_cache(maxsize=8)
def load_data_split(data: DataSettings, split: str, num_workers: int = 0) -> SplitData:
    """A split of the source model's data (memory-mapped cache), opened once per process."""
    return load_split(
        get_schema(data.dataset),
        Path(data.data_dir),
        Path(data.label_dir),
        split,
        data.image_size,
        cache_dir=Path(data.cache_dir),
        num_workers=num_workers,
        preprocess=data.preprocess,
    )


def load_test_split(data: DataSettings, num_workers: int = 0) -> SplitData:
    """The cached test split, read fully into memory."""
    split = load_data_split(data, "test", num_workers)
    return SplitData(split.image_ids, np.array(split.images), split.labels)


def sweep_key(sources: list[ModelSource], methods: list[str], sparsities: list[float]) -> str:
    """Identifies a sweep by what it covers, so that running it again continues it."""
    text = repr((sorted(s.key for s in sources), sorted(methods), sorted(sparsities)))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cell_key(source: ModelSource, method: str, sparsity: float) -> str:
    return f"{source.key}|{method}|{sparsity:g}"


@dataclass
class CellResult:
    probs: np.ndarray  # (N, C) test probabilities
    measures: dict[str, float]  # sparsity reached, parameters, MACs, speed
    model: nn.Module | None = None  # on the CPU, only when the cell logs its model


class SourceCells:
    """The cells of one source model on one device. The dense weights are copied to the device
    once; unstructured cells load them in place into one working model and prune it (so a
    compiled forward pass serves them all without recompiling); the dense model (sparsity 0,
    the same for every method) is evaluated once. Structured cells change shapes: each prunes
    its own copy, with the channel ratio found once per architecture and sparsity."""

    def __init__(
        self, source: ModelSource, test: DeviceImages, runtime: Runtime, settings, finetune
    ):
        self.source, self.test, self.runtime = source, test, runtime
        self.settings, self.finetune = settings, finetune
        size = source.data.image_size
        self.example = torch.zeros(1, 3, size, size, device=runtime.device)
        self.working = runtime.place_model(copy.deepcopy(source.model)).eval()
        self.dense = {
            k: v.detach().clone() for k, v in standard_layout(self.working).state_dict().items()
        }
        self.total, _ = count_prunable(self.working)
        self.forward = runtime.compiled(self.working)
        self.dense_result: CellResult | None = None

    def compute(self, method: str, sparsity: float) -> CellResult:
        """The cell's result; `cell_images_per_s` counts everything from the dense weights to
        the measured pruned model (for sparsity 0, its one computation)."""
        started = time.perf_counter()
        if sparsity == 0 and not self.finetune.epochs:
            if self.dense_result is None:
                self.dense_result = self._evaluate(self._load_dense(), self.forward)
                self._count_rate(self.dense_result, started)
            return self.dense_result
        result = self._compute_pruned(method, sparsity)
        self._count_rate(result, started)
        return result

    def _count_rate(self, result: CellResult, started: float) -> None:
        self.runtime.synchronize()
        result.measures["cell_images_per_s"] = len(self.test) / (time.perf_counter() - started)

    def _compute_pruned(self, method: str, sparsity: float) -> CellResult:
        if method == "structured":
            model = copy.deepcopy(self.source.model).to(self.runtime.device).eval()
            model = prune_model(model, method, sparsity, example_inputs=self.example)
            model, forward = self.runtime.place_model(model), None
        else:
            model, forward = self._load_dense(), self.forward
            prune_model(model, method, sparsity, example_inputs=self.example, seed=self.source.seed)
            self.runtime.place_model(model)
        if self.finetune.epochs:
            _finetune(model, self.source, self.finetune, self.runtime)
        return self._evaluate(model, forward)

    def _load_dense(self) -> nn.Module:
        standard_layout(self.working).load_state_dict(self.dense)  # copies in place
        return self.runtime.place_model(self.working)

    def _evaluate(self, model: nn.Module, forward: nn.Module | None) -> CellResult:
        logits, batch_seconds = device_logits(
            model,
            self.test,
            runtime=self.runtime,
            batch_size=self.settings.batch_size,
            forward=forward,
        )
        _, nonzero = count_prunable(model)
        measures = {
            "achieved_sparsity": 1 - nonzero / self.total,
            "nonzero_params": nonzero_parameters(model),
            "macs": count_macs(model, self.example),
            # Every cell's speed is the plain model's (structured ones are not compiled), so
            # the evaluation's timings count only where they were of the plain model.
            **measure_speed(
                model,
                self.test,
                self.runtime,
                self.settings.batch_size,
                batch_seconds if forward is None or forward is model else [],
            ),
        }
        kept = copy.deepcopy(model).cpu() if self.settings.log_model else None
        return CellResult(sigmoid(logits.numpy()), measures, kept)


def measure_speed(
    forward: nn.Module,
    test: DeviceImages,
    runtime: Runtime,
    batch_size: int,
    batch_seconds: list[float],
) -> dict[str, float]:
    """Model-only speed (inputs already on the device and normalized; no host copies): the
    median of TIMED_REPEATS timed passes after a warm-up, at batch 1 and at the sweep's batch
    size (the evaluation's own full batches count as repetitions). CUDA events on a GPU."""
    size = min(batch_size, len(test))
    single = _time_passes(forward, test, 1, runtime, [])
    at_batch = _time_passes(forward, test, size, runtime, batch_seconds)
    return {
        "latency_ms_batch1": 1000 * single,
        "latency_ms_per_image": 1000 * at_batch / size,
        "throughput_images_per_s": size / at_batch,
    }


def _time_passes(forward, test: DeviceImages, size: int, runtime, timed: list[float]) -> float:
    batch = runtime.place_batch(normalize(test.slice(0, size).unsqueeze(1)))
    timed = list(timed)
    with torch.inference_mode(), runtime.autocast():
        if not timed:  # warm-up (the evaluation pass warmed up the sweep's batch size)
            for _ in range(WARMUP_PASSES):
                forward(batch)
        while len(timed) < TIMED_REPEATS:
            watch = Stopwatch(runtime)
            forward(batch)
            timed.append(watch.stop().seconds())
    return float(np.median(timed))


def run_cell(
    source: ModelSource,
    method: str,
    sparsity: float,
    test: SplitData,
    settings: CellSettings,
    finetune: Finetune = Finetune(),
) -> str:
    """Prune a copy of the source model, evaluate it on `test`, log one prune run (nested under
    the active run if any). Returns the prune run's id."""
    runtime = runtime_of(settings, for_analysis=True)
    cells = SourceCells(source, DeviceImages.of(test, runtime), runtime, settings, finetune)
    result = cells.compute(method, sparsity)
    return log_cell(source, method, sparsity, test, settings, finetune, runtime, result)


def log_cell(
    source,
    method,
    sparsity,
    test: SplitData,
    settings,
    finetune,
    runtime,
    result: CellResult,
    parent_run_id: str | None = None,
) -> str:
    """One prune run with the cell's params, metrics, per-class table and predictions."""
    classes = get_schema(source.data.dataset).classes
    name = f"prune-{method}-{sparsity:g}-seed{source.seed}"
    with tracking.start_run("prune", run_name=name, parent_run_id=parent_run_id) as run_id:
        tracking.set_tags({CELL_TAG: cell_key(source, method, sparsity)})
        tracking.log_params(_cell_params(source, method, sparsity, finetune, settings))
        tracking.log_resolved(runtime.describe())
        tracking.log_label_file(source.data.label_dir, source.data.dataset, "test")
        metrics = per_class_metrics(result.probs, test.labels, classes)
        tracking.log_metrics({**summarize(metrics, "test"), **result.measures})
        tracking.log_table(metrics, "per_class_metrics.csv")
        tracking.log_table(
            predictions_frame(test.image_ids, result.probs, test.labels, classes),
            "predictions.parquet",
        )
        if result.model is not None:
            tracking.log_model(result.model, example_input(test.images))
    return run_id


def _cell_params(
    source: ModelSource, method: str, sparsity: float, finetune: Finetune, settings: CellSettings
) -> dict:
    return {
        **source.params(),
        "method": method,
        "sparsity": sparsity,
        "finetune_epochs": finetune.epochs,
        "device": settings.device,
        "channels_last": settings.channels_last,
        "precision": settings.precision,
        "compile": settings.compile,
        "resident_data": settings.resident_data,
    }


def _finetune(model: nn.Module, source: ModelSource, finetune: Finetune, runtime) -> None:
    from prunecxr.pruning import zeros_stay_zero
    from prunecxr.train import finetune_model

    train = load_data_split(source.data, "train")
    with zeros_stay_zero(model):
        finetune_model(model, train, finetune, seed=source.seed, runtime=runtime)


def run_prune(
    source: ModelSource,
    method: str,
    sparsity: float,
    settings: CellSettings,
    finetune: Finetune = Finetune(),
) -> str:
    """The prune stage: one cell as its own prune run."""
    return run_cell(
        source,
        method,
        sparsity,
        load_test_split(source.data, settings.num_workers),
        settings,
        finetune,
    )


def run_sweep(
    sources: list[ModelSource],
    methods: list[str],
    sparsities: list[float],
    settings: CellSettings,
    finetune: Finetune = Finetune(),
) -> str:
    """Every (model, method, sparsity) cell as a nested prune run under one sweep run. A sweep
    with the same models, methods and sparsities that did not finish is continued: its finished
    cells are skipped (while its process is alive, a second one is refused). Returns the sweep
    run's id."""
    check_distinct_seeds(sources)
    key = sweep_key(sources, methods, sparsities)
    resume_id = tracking.find_unfinished_run_id("sweep", SWEEP_KEY_TAG, key)
    if resume_id:
        ownership.take_over(resume_id, "sweep")
    name = f"sweep-{'-'.join(methods)}"
    with tracking.start_run(
        "sweep", run_name=name, run_id=resume_id, system_metrics=True
    ) as sweep_id:
        with ownership.owned(sweep_id, contested=resume_id is not None):
            if resume_id is None:
                tracking.set_tags({SWEEP_KEY_TAG: key})
                tracking.log_params(_sweep_params(sources, methods, sparsities, finetune))
            cells = [(s, m, k) for s in sources for m in methods for k in sparsities]
            done = tracking.finished_child_ids_by_tag(sweep_id, "prune", CELL_TAG)
            todo = [cell for cell in cells if cell_key(*cell) not in done]
            if resume_id:
                log.info("%d of %d cells were done", len(cells) - len(todo), len(cells))
            _run_cells(todo, settings, finetune, sweep_id)
    return sweep_id


def _sweep_params(sources, methods, sparsities, finetune: Finetune) -> dict:
    return {
        "methods": ",".join(methods),
        "sparsities": ",".join(f"{k:g}" for k in sparsities),
        "model_uris": ",".join(s.uri for s in sources),
        "cells": len(sources) * len(methods) * len(sparsities),
        "finetune_epochs": finetune.epochs,
    }


def _run_cells(cells: list, settings: CellSettings, finetune: Finetune, sweep_id: str) -> None:
    """Cells in order, one source model at a time; each cell's run is logged by a background
    thread while the next cell computes (MLflow calls and file writes off the device's path)."""
    runtime = runtime_of(settings, for_analysis=True)
    tests: dict[DataSettings, tuple[SplitData, DeviceImages]] = {}
    prepared: SourceCells | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="log-cell") as logger:
        pending = []
        for source, method, sparsity in tqdm(cells, desc="sweep", unit="cell"):
            if source.data not in tests:
                split = load_test_split(source.data, settings.num_workers)
                tests[source.data] = split, DeviceImages.of(split, runtime)
            split, on_device = tests[source.data]
            if prepared is None or prepared.source is not source:
                prepared = SourceCells(source, on_device, runtime, settings, finetune)
            result = prepared.compute(method, sparsity)
            args = (source, method, sparsity, split, settings, finetune, runtime, result, sweep_id)
            pending.append(logger.submit(log_cell, *args))
            _raise_failed(pending)
        for job in pending:
            job.result()


def _raise_failed(jobs: list) -> None:
    """A cell whose logging failed stops the sweep now, not after every other cell."""
    for job in [j for j in jobs if j.done()]:
        job.result()
        jobs.remove(job)


def parse_sparsities(text: str) -> list[float]:
    """'0:0.95:0.05' (start:stop:step, stop included) or '0,0.5,0.9' -> sorted unique floats."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            if step <= 0:
                raise ValueError
            values = np.arange(start, stop + step / 2, step)
        else:
            values = np.array([float(part) for part in text.split(",") if part.strip()])
    except ValueError:
        raise PrunecxrError(
            f"bad sparsities {text!r}: use start:stop:step or a comma list"
        ) from None
    values = sorted(set(np.round(values, 6).tolist()))
    bad = [v for v in values if not 0 <= v < 1]
    if bad or not values:
        raise PrunecxrError(f"bad sparsities {text!r}: every sparsity must be in [0, 1)")
    return values
