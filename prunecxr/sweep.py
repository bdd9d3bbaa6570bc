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
from dataclasses import dataclass, field
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
from prunecxr.executor import (
    Executor,
    WorkerContext,
    check_readable,
    describe_error,
    is_final,
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
        skip_bad_images=data.skip_bad_images,
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


def cell_run_name(source: ModelSource, method: str, sparsity: float) -> str:
    return f"prune-{method}-{sparsity:g}-seed{source.seed}"


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
    name = cell_run_name(source, method, sparsity)
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
    executor: Executor = Executor(),
) -> str:
    """Every (model, method, sparsity) cell as a nested prune run under one sweep run. A sweep
    with the same models, methods and sparsities that did not finish is continued: its finished
    cells are skipped (while its process is alive, a second one is refused). Cells that fail
    are retried (executor.max_retries); those that fail every time end as FAILED prune runs
    with their error, and the sweep then fails after all others are done. Returns the sweep
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
            _run_with_retries(todo, settings, finetune, sweep_id, executor).check(sweep_id)
    return sweep_id


def _sweep_params(sources, methods, sparsities, finetune: Finetune) -> dict:
    return {
        "methods": ",".join(methods),
        "sparsities": ",".join(f"{k:g}" for k in sparsities),
        "model_uris": ",".join(s.uri for s in sources),
        "cells": len(sources) * len(methods) * len(sparsities),
        "finetune_epochs": finetune.epochs,
    }


@dataclass
class CellsOutcome:
    """What a batch of cells left undone: {cell key: error} (the others are logged), and which
    of those errors are the user's to fix (retrying cannot help)."""

    errors: dict[str, str] = field(default_factory=dict)
    final: set[str] = field(default_factory=set)

    def add(self, key: str, error: BaseException) -> None:
        self.errors[key] = describe_error(error)
        if is_final(error):
            self.final.add(key)


@dataclass
class SweepSummary:
    done: int
    retried: int  # done, but not at the first attempt
    failed: dict[str, str]  # cell key -> its last error

    def check(self, sweep_id: str) -> None:
        """Says how the sweep went; a sweep with failed cells fails (non-zero exit)."""
        line = f"{self.done} cells done ({self.retried} after a retry), {len(self.failed)} failed"
        if not self.failed:
            log.info("sweep %s: %s", sweep_id, line)
            return
        key, error = next(iter(self.failed.items()))
        raise PrunecxrError(
            f"sweep {sweep_id}: {line}; first: {key}: {error}. Each failed cell is a FAILED "
            f"prune run with its error; run the same command again to retry them"
        )


def _run_with_retries(
    cells: list, settings: CellSettings, finetune: Finetune, sweep_id: str, executor: Executor
) -> SweepSummary:
    """Batches of cells as executor jobs, in rounds: after each round, the cells MLflow does not
    hold as finished (their job failed, or its worker or node was lost) are run again, up to
    executor.max_retries times; finished cells are never run twice."""
    context, outcome, retried, todo = WorkerContext.here(), CellsOutcome(), 0, cells
    given_up: list = []  # cells whose error retrying cannot fix
    for attempt in range(executor.max_retries + 1):
        if attempt:
            log.info("retrying %d cells (retry %d of %d)", len(todo), attempt, executor.max_retries)
        jobs = [
            (context, source, batch, settings, finetune, sweep_id)
            for source, batch in _cell_batches(todo, executor)
        ]
        for index, result in executor.map(run_cell_batch, jobs):
            if isinstance(result, BaseException):  # the whole job failed or was lost
                source, batch = jobs[index][1], jobs[index][2]
                for method, sparsity in batch:
                    outcome.add(cell_key(source, method, sparsity), result)
            else:
                outcome.errors.update(result.errors)
                outcome.final |= result.final
        done = tracking.finished_child_ids_by_tag(sweep_id, "prune", CELL_TAG)
        if attempt:
            retried += sum(cell_key(*cell) in done for cell in todo)
        todo = [cell for cell in todo if cell_key(*cell) not in done]
        given_up += [cell for cell in todo if cell_key(*cell) in outcome.final]
        todo = [cell for cell in todo if cell_key(*cell) not in outcome.final]
        if not todo:
            break
    todo = given_up + todo
    done_count = len(cells) - len(todo)
    failed = {cell_key(*cell): outcome.errors.get(cell_key(*cell), "?") for cell in todo}
    tracking.end_unfinished_children(  # runs the last attempt's lost workers left RUNNING
        sweep_id, still_alive=lambda run: run.data.tags.get(CELL_TAG) not in failed
    )
    for source, method, sparsity in todo:
        key = cell_key(source, method, sparsity)
        tracking.log_failed_run(
            "prune",
            sweep_id,
            cell_run_name(source, method, sparsity),
            {CELL_TAG: key},
            _cell_params(source, method, sparsity, finetune, settings),
            failed[key],
        )
    return SweepSummary(done_count, retried, failed)


def _cell_batches(cells: list, executor: Executor) -> list[tuple[ModelSource, list]]:
    """(source, [(method, sparsity), ...]) per job: a source's cells together (its model and
    test images are loaded once per job); on Ray, at most executor.cells_per_task per job so
    that the cells of one model spread over the cluster."""
    by_source: dict[str, tuple[ModelSource, list]] = {}
    for source, method, sparsity in cells:
        by_source.setdefault(source.key, (source, []))[1].append((method, sparsity))
    size = executor.cells_per_task if executor.kind == "ray" else len(cells)
    return [
        (source, batch[i : i + size])
        for source, batch in by_source.values()
        for i in range(0, len(batch), max(size, 1))
    ]


def run_cell_batch(
    context: WorkerContext,
    source: ModelSource,
    batch: list[tuple[str, float]],
    settings: CellSettings,
    finetune: Finetune,
    sweep_id: str,
) -> CellsOutcome:
    """One job: cells of one source model, in this process or a worker's. Cells already
    finished (by an earlier attempt) are skipped; runs an earlier attempt left RUNNING for
    these cells (its worker died) are marked KILLED."""
    context.enter()
    check_readable(source.data.data_dir, source.data.label_dir)
    mine = {cell_key(source, method, sparsity) for method, sparsity in batch}
    tracking.end_unfinished_children(
        sweep_id, still_alive=lambda run: run.data.tags.get(CELL_TAG) not in mine
    )
    done = tracking.finished_child_ids_by_tag(sweep_id, "prune", CELL_TAG)
    todo = [(source, m, k) for m, k in batch if cell_key(source, m, k) not in done]
    return _run_cells(todo, settings, finetune, sweep_id)


def _run_cells(
    cells: list, settings: CellSettings, finetune: Finetune, sweep_id: str
) -> CellsOutcome:
    """Cells in order, one source model at a time; each cell's run is logged by a background
    thread while the next cell computes (MLflow calls and file writes off the device's path).
    A cell that fails is reported in the outcome; the others go on."""
    runtime = runtime_of(settings, for_analysis=True)
    tests: dict[DataSettings, tuple[SplitData, DeviceImages]] = {}
    prepared: SourceCells | None = None
    outcome = CellsOutcome()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="log-cell") as logger:
        logging_jobs = {}
        for source, method, sparsity in tqdm(cells, desc="sweep", unit="cell"):
            try:
                if source.data not in tests:
                    split = load_test_split(source.data, settings.num_workers)
                    tests[source.data] = split, DeviceImages.of(split, runtime)
                split, on_device = tests[source.data]
                if prepared is None or prepared.source is not source:
                    prepared = SourceCells(source, on_device, runtime, settings, finetune)
                result = prepared.compute(method, sparsity)
            except Exception as error:
                outcome.add(cell_key(source, method, sparsity), error)
                continue
            args = (source, method, sparsity, split, settings, finetune, runtime, result, sweep_id)
            logging_jobs[cell_key(source, method, sparsity)] = logger.submit(log_cell, *args)
        for key, job in logging_jobs.items():
            if job.exception() is not None:
                outcome.add(key, job.exception())
    return outcome


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
