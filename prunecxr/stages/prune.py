"""The prune and sweep stages: one cell (model, method, sparsity) as a prune run, or every cell
of a grid as nested prune runs under one sweep run. The test set is decoded once and held in
memory, each source model is read once; cells are computed by cells.SourceCells."""

from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from prunecxr import PrunecxrError, tracking
from prunecxr.cells import Cell, CellResult, ModelSource, SourceCells, test_split
from prunecxr.data import SplitData
from prunecxr.device_data import DeviceImages
from prunecxr.evaluate import example_input, per_class_metrics, predictions_frame, summarize
from prunecxr.executor import Executor, Failure, WorkerContext, check_readable, retry_failed
from prunecxr.runtime import Runtime, runtime_of
from prunecxr.sources import check_distinct_seeds
from prunecxr.specs import CellSettings, Finetune, digest
from prunecxr.stages.kernel import KEY_TAGS, Stage, open_stage, run_stage
from prunecxr.tracking import ownership

log = logging.getLogger(__name__)
CELL_TAG = KEY_TAGS["prune"]
# Whose timing a prune run's speed metrics are: an unstructured cell's are its source's (dense
# kernels run at the same speed at every sparsity), a structured cell's its own.
SPEED_TAG = "prunecxr.speed_measured_on"


def sweep_key(sources: list[ModelSource], methods: list[str], sparsities: list[float]) -> str:
    """Identifies a sweep by what it covers, so that running it again continues it."""
    return digest((sorted(s.key for s in sources), sorted(methods), sorted(sparsities)))


@dataclass(frozen=True)
class CellRuns:
    """How the cells of one prune or sweep stage run and are logged."""

    settings: CellSettings
    finetune: Finetune = Finetune()

    def params(self, cell: Cell) -> dict:
        """A prune run's params: its source's, the cell's and how it ran."""
        return {
            **cell.source.params(),
            "method": cell.method,
            "sparsity": cell.sparsity,
            "finetune_epochs": self.finetune.epochs,
            **dataclasses.asdict(self.settings.runtime),
        }

    def stage(self, cell: Cell, parent_run_id: str | None = None) -> Stage:
        return Stage(
            "prune",
            cell.run_name,
            key=cell.key,
            params=self.params(cell),
            parent_run_id=parent_run_id,
            owned=False,  # a sweep's cells are its; a lone prune run is short
        )

    def log(self, cell: Cell, test: SplitData, runtime: Runtime, result: CellResult, parent):
        """One prune run with the cell's params, metrics, per-class table and predictions."""
        schema = cell.source.data.schema()
        ownership.ensure_mine(parent)  # a sweep taken over gets no more cells from here
        with open_stage(self.stage(cell, parent)) as run_id:
            tracking.log_resolved(runtime.describe())
            data = cell.source.data
            label_file = Path(data.label_dir) / schema.label_file("test")
            tracking.log_label_file(label_file, schema.name, "test")
            metrics = per_class_metrics(result.probs, test.labels, schema.classes)
            tracking.log_metrics({**summarize(metrics, "test"), **result.measures})
            tracking.set_tags({SPEED_TAG: result.speed_of})
            tracking.log_table(metrics, "per_class_metrics.csv")
            tracking.log_table(
                predictions_frame(test.image_ids, result.probs, test.labels, schema.classes),
                "predictions.parquet",
            )
            if result.model is not None:
                tracking.log_model(result.model, example_input(test.images))
        return run_id


def run_prune(
    source: ModelSource,
    method: str,
    sparsity: float,
    settings: CellSettings,
    finetune: Finetune = Finetune(),
) -> str:
    """The prune stage: prune a copy of the source model, evaluate it on the test split, log
    one prune run (nested under the active run if any). -> its run id."""
    runs, cell = CellRuns(settings, finetune), Cell(source, method, sparsity)
    test = test_split(source.data, settings.num_workers)
    runtime = runtime_of(settings.runtime, for_analysis=True)
    cells = SourceCells(source, DeviceImages.of(test, runtime), runtime, settings, finetune)
    return runs.log(cell, test, runtime, cells.compute(method, sparsity), None)


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
    with their error, and the sweep then fails after all others are done. -> the sweep run id."""
    check_distinct_seeds(sources)
    runs = CellRuns(settings, finetune)
    cells = [Cell(s, m, k) for s in sources for m in methods for k in sparsities]
    params = {
        "methods": ",".join(methods),
        "sparsities": ",".join(f"{k:g}" for k in sparsities),
        "model_uris": ",".join(s.uri for s in sources),
        "cells": len(cells),
        "finetune_epochs": finetune.epochs,
    }
    stage = Stage(
        "sweep",
        f"sweep-{'-'.join(methods)}",
        key=sweep_key(sources, methods, sparsities),
        params=params,
        system_metrics=True,
    )
    return run_stage(
        stage, lambda sweep_id, continued: _sweep(cells, runs, sweep_id, executor, continued)
    )


def _sweep(
    cells: list[Cell], runs: CellRuns, sweep_id: str, executor: Executor, continued: bool
) -> None:
    done = tracking.finished_child_ids_by_tag(sweep_id, "prune", CELL_TAG)
    todo = [cell for cell in cells if cell.key not in done]
    if continued:
        log.info("%d of %d cells were done", len(cells) - len(todo), len(cells))
    by_key = {cell.key: cell for cell in todo}
    context, errors = WorkerContext.here(), {}
    lost = Failure("lost: no finished run and no error came back", final=False)

    def attempt(keys: list[str]) -> dict[str, Failure]:
        """The cells of `keys` as executor jobs; -> those MLflow does not hold as finished
        (their job failed, or its worker or node was lost: then their last error, if any)."""
        ownership.ensure_mine(sweep_id)
        batches = _cell_batches([by_key[key] for key in keys], executor)
        # A job names its source apart from its cells: Ray stores each model once, not per job.
        jobs = [(context, batch[0].source, _grid(batch), runs, sweep_id) for batch in batches]
        for index, outcome in executor.map(run_cell_batch, jobs):
            if isinstance(outcome, BaseException):  # the whole job failed or was lost
                errors.update({cell.key: Failure.of(outcome) for cell in batches[index]})
            else:
                errors.update(outcome)
        ownership.ensure_mine(sweep_id)  # taken over: its cells' failures are not ours to log
        finished = tracking.finished_child_ids_by_tag(sweep_id, "prune", CELL_TAG)
        return {key: errors.get(key, lost) for key in keys if key not in finished}

    failed, retried = retry_failed(list(by_key), attempt, executor.max_retries, str)
    _log_failed_cells(failed, by_key, runs, sweep_id)
    line = (
        f"{len(todo) - len(failed)} cells done ({len(retried)} after a retry), {len(failed)} failed"
    )
    if not failed:
        log.info("sweep %s: %s", sweep_id, line)
        return
    key, failure = min(failed.items(), key=lambda item: not item[1].final)  # the user's first
    raise PrunecxrError(
        f"sweep {sweep_id}: {line}; first: {key}: {failure.error}. Each failed cell is a FAILED "
        f"prune run with its error; run the same command again to retry them"
    )


def _log_failed_cells(failed: dict[str, Failure], cells: dict[str, Cell], runs, sweep_id) -> None:
    """Runs the last attempt's lost workers left RUNNING are marked KILLED; every failed cell
    becomes a FAILED prune run with its params and error."""
    tracking.end_unfinished_children(
        sweep_id, still_alive=lambda run: run.data.tags.get(CELL_TAG) not in failed
    )
    for key, failure in failed.items():
        cell = cells[key]
        tags = {CELL_TAG: key}
        params = runs.params(cell)
        tracking.log_failed_run("prune", sweep_id, cell.run_name, tags, params, failure.error)


def _cell_batches(cells: list[Cell], executor: Executor) -> list[list[Cell]]:
    """One job per source model's cells (its model and test images are loaded once per job);
    on Ray, at most cells_per_task per job so that the cells of one model spread over the
    cluster."""
    by_source: dict[str, list[Cell]] = {}
    for cell in cells:
        by_source.setdefault(cell.source.key, []).append(cell)
    size = executor.spec.cells_per_task if executor.on_ray else len(cells)
    return [batch[i : i + size] for batch in by_source.values() for i in range(0, len(batch), size)]


def _grid(cells: list[Cell]) -> list[tuple[str, float]]:
    return [(cell.method, cell.sparsity) for cell in cells]


def run_cell_batch(
    context: WorkerContext,
    source: ModelSource,
    grid: list[tuple[str, float]],
    runs: CellRuns,
    sweep_id: str,
) -> dict[str, Failure]:
    """One job: the cells of `source` at `grid`'s (method, sparsity), in this process or a
    worker's. Cells already finished (by an earlier attempt) are skipped; runs an earlier
    attempt left RUNNING for these cells (its worker died) are marked KILLED. -> the cells that
    failed."""
    context.enter()
    batch = [Cell(source, method, sparsity) for method, sparsity in grid]
    check_readable(source.data.data_dir, source.data.label_dir)
    mine = {cell.key for cell in batch}
    tracking.end_unfinished_children(
        sweep_id, still_alive=lambda run: run.data.tags.get(CELL_TAG) not in mine
    )
    done = tracking.finished_child_ids_by_tag(sweep_id, "prune", CELL_TAG)
    return _run_cells([cell for cell in batch if cell.key not in done], runs, sweep_id)


def _run_cells(cells: list[Cell], runs: CellRuns, sweep_id: str) -> dict[str, Failure]:
    """Cells of one source model in order; each cell's run is logged by a background thread
    while the next cell computes (MLflow calls and file writes off the device's path). A cell
    that fails is returned with its failure; the others go on."""
    settings = runs.settings
    runtime = runtime_of(settings.runtime, for_analysis=True)
    failed: dict[str, Failure] = {}
    computer: SourceCells | None = None
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="log-cell") as logger:
        logging_jobs = {}
        for cell in tqdm(cells, desc="sweep", unit="cell"):
            ownership.ensure_mine(sweep_id)
            try:
                test = test_split(cell.source.data, settings.num_workers)
                if computer is None:
                    on_device = DeviceImages.of(test, runtime)
                    computer = SourceCells(cell.source, on_device, runtime, settings, runs.finetune)
                result = computer.compute(cell.method, cell.sparsity)
            except Exception as error:
                failed[cell.key] = Failure.of(error)
                continue
            args = (cell, test, runtime, result, sweep_id)
            logging_jobs[cell.key] = logger.submit(runs.log, *args)
        for key, job in logging_jobs.items():
            if job.exception() is not None:
                failed[key] = Failure.of(job.exception())
    return failed
