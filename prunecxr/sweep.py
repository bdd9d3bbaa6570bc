"""The prune and sweep stages: one (model, method, sparsity) cell, or all of them as nested prune
runs under one sweep run. The test set is decoded once and held in memory, each source model is
read once; every cell starts from an in-memory copy."""

from __future__ import annotations

import copy
import functools
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from prunecxr import PrunecxrError, ownership, tracking
from prunecxr.data import SplitData, get_schema, load_split
from prunecxr.evaluate import (
    example_input,
    per_class_metrics,
    predict_logits,
    predictions_frame,
    sigmoid,
    summarize,
)
from prunecxr.pruning import count_macs, count_prunable, nonzero_parameters, prune_model
from prunecxr.runtime import Runtime, resolve_runtime
from prunecxr.sources import DataSettings, ModelSource, check_distinct_seeds
from prunecxr.train import Finetune, TrainConfig

log = logging.getLogger(__name__)
CELL_TAG = "prunecxr.cell"
SWEEP_KEY_TAG = "prunecxr.sweep_key"
LATENCY_BATCH = 32


@dataclass(frozen=True)
class CellSettings:
    device: str = "auto"
    channels_last: bool | None = None  # None: on for CUDA
    precision: str = "auto"  # fp32 (analysis-grade) on every device; bf16 only when asked
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
    runtime = resolve_runtime(
        settings.device, settings.channels_last, settings.precision, for_analysis=True
    )
    classes = get_schema(source.data.dataset).classes
    name = f"prune-{method}-{sparsity:g}-seed{source.seed}"
    with tracking.start_run("prune", run_name=name) as run_id:
        tracking.set_tags({CELL_TAG: cell_key(source, method, sparsity)})
        tracking.log_params(_cell_params(source, method, sparsity, finetune, settings))
        tracking.log_resolved(runtime.describe())
        size = source.data.image_size
        example = torch.zeros(1, 3, size, size, device=runtime.device)
        model = copy.deepcopy(source.model).to(runtime.device).eval()
        total, _ = count_prunable(model)
        model = prune_model(model, method, sparsity, example_inputs=example, seed=source.seed)
        model = runtime.place_model(model)
        if finetune.epochs:
            _finetune(model, source, finetune, runtime)
        probs = sigmoid(
            predict_logits(model, test.images, runtime=runtime, batch_size=settings.batch_size)
        )
        metrics = per_class_metrics(probs, test.labels, classes)
        tracking.log_metrics(
            {**summarize(metrics, "test"), **_measure(model, total, test, runtime)}
        )
        tracking.log_table(metrics, "per_class_metrics.csv")
        tracking.log_table(
            predictions_frame(test.image_ids, probs, test.labels, classes), "predictions.parquet"
        )
        if settings.log_model:
            tracking.log_model(model, example_input(test.images))
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
    }


def _measure(model: nn.Module, total_prunable: int, test: SplitData, runtime) -> dict[str, float]:
    """Measured, not assumed: zeroed or removed prunable weights, MACs and latency."""
    _, nonzero = count_prunable(model)
    size = test.images.shape[-1]
    return {
        "achieved_sparsity": 1 - nonzero / total_prunable,
        "nonzero_params": nonzero_parameters(model),
        "macs": count_macs(model, torch.zeros(1, 3, size, size, device=runtime.device)),
        "latency_ms_per_image": latency_ms_per_image(model, test.images, runtime),
    }


def latency_ms_per_image(model: nn.Module, images: np.ndarray, runtime: Runtime) -> float:
    """Mean inference time per image over 3 passes of a LATENCY_BATCH batch, after a warm-up."""
    batch = images[:LATENCY_BATCH]
    predict_logits(model, batch, runtime=runtime)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(3):
        predict_logits(model, batch, runtime=runtime)
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000 / (3 * len(batch))


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
    with tracking.start_run("sweep", run_name=name, run_id=resume_id) as sweep_id:
        with ownership.owned(sweep_id, contested=resume_id is not None):
            if resume_id is None:
                tracking.set_tags({SWEEP_KEY_TAG: key})
                tracking.log_params(_sweep_params(sources, methods, sparsities, finetune))
            cells = [(s, m, k) for s in sources for m in methods for k in sparsities]
            done = tracking.finished_child_ids_by_tag(sweep_id, "prune", CELL_TAG)
            todo = [cell for cell in cells if cell_key(*cell) not in done]
            if resume_id:
                log.info("%d of %d cells were done", len(cells) - len(todo), len(cells))
            _run_cells(todo, settings, finetune)
    return sweep_id


def _sweep_params(sources, methods, sparsities, finetune: Finetune) -> dict:
    return {
        "methods": ",".join(methods),
        "sparsities": ",".join(f"{k:g}" for k in sparsities),
        "model_uris": ",".join(s.uri for s in sources),
        "cells": len(sources) * len(methods) * len(sparsities),
        "finetune_epochs": finetune.epochs,
    }


def _run_cells(cells: list, settings: CellSettings, finetune: Finetune) -> None:
    tests: dict[DataSettings, SplitData] = {}
    for source, method, sparsity in tqdm(cells, desc="sweep", unit="cell"):
        if source.data not in tests:
            tests[source.data] = load_test_split(source.data, settings.num_workers)
        run_cell(source, method, sparsity, tests[source.data], settings, finetune)


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
