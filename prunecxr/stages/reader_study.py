"""The reader study stage (docs/reader-study.md): export an analyze run's PIEs and non-PIEs for
radiologists to rate, then analyze their answers; each as a `reader_study` run nested under
the analyze run (param `part`: export or analysis). The key is logged to the export run and
written beside the reader folders, never inside one."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from prunecxr import PrunecxrError, tracking
from prunecxr.analysis import figures
from prunecxr.analysis import reader_responses as responses
from prunecxr.analysis import reader_study as study
from prunecxr.data import get_schema
from prunecxr.data.labels import LabelTable, read_labels
from prunecxr.stages.kernel import Stage, open_stage

log = logging.getLogger(__name__)
STAGE = "reader_study"
KEY_FILE = "key.csv"


@dataclass(frozen=True)
class Export:
    """What `prunecxr reader-study export` asks for."""

    analyze_run_id: str
    out: Path
    per_reader: int = 20
    readers: int = 6
    seed: int = 0
    overwrite: bool = False
    data_dir: Path | None = None  # None: where the analyzed sweep's data was
    label_dir: Path | None = None


@contextlib.contextmanager
def _open_run(run_name: str, params: dict, parent_run_id: str | None) -> Iterator[str]:
    """A new reader_study run (in the parent's experiment, nested under it)."""
    if parent_run_id is not None:
        experiment_id = tracking.get_run(parent_run_id).info.experiment_id
        tracking.use_tracking(tracking.absolute_tracking_uri(), experiment_id)
    stage = Stage(STAGE, run_name, params=params, parent_run_id=parent_run_id, owned=False)
    with open_stage(stage) as run_id:
        yield run_id


def export_study(request: Export) -> str:
    """Write the reader folders and key.csv under request.out; -> the export run's id."""
    study.check_out(request.out, request.overwrite)
    dataset, data_dir, label_dir = _data_of(request)
    schema = get_schema(dataset, label_dir)
    images = Path(data_dir) / schema.image_root
    test = read_labels(schema, label_dir, "test")
    pies, others = _pools(request.analyze_run_id, test)
    key = study.select_images(pies, others, request.per_reader, request.readers, request.seed)
    key["analyze_run_id"] = request.analyze_run_id
    study.check_images(key.image, images)
    findings = {
        image: study.findings_text(test.labels[row], schema.classes)
        for image, row in zip(key.image, key.row)
    }
    study.clear_out(request.out)
    for reader, part in tqdm(key.groupby("reader"), desc="writing reader folders", unit="reader"):
        study.write_reader_folder(part, findings, images, request.out / f"reader-{reader}")
    key.to_csv(request.out / KEY_FILE, index=False)
    return _log_export(request, key, (dataset, data_dir, label_dir), len(pies), len(others))


def _pools(run_id: str, test: LabelTable) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The analyze run's PIEs and the other test images (columns row, image; row: of the
    test label file)."""
    pies = tracking.read_table(run_id, "tables/pies.csv")
    undefined = pd.DataFrame(columns=["row", "image"])
    if tracking.has_artifact(run_id, "tables/pies_undefined.csv"):
        undefined = tracking.read_table(run_id, "tables/pies_undefined.csv")
    rows = {image: row for row, image in enumerate(test.image_ids)}
    pies = pies.assign(row=[rows.get(image, -1) for image in pies.image])
    if (pies.row < 0).any():
        raise PrunecxrError(f"PIE {pies.image[pies.row < 0].iloc[0]} is not in {test.path}")
    return pies[["row", "image"]], study.non_pie_pool(list(test.image_ids), pies, undefined)


def _data_of(request: Export) -> tuple[str, Path, Path]:
    """The analyzed data (dataset, images, label files): the sweep's prune runs logged them;
    --data-dir/--label-dir give them for published predictions, or where they moved to."""
    run = tracking.get_run(request.analyze_run_id)
    if tracking.stage_of(run) != "analyze":
        raise PrunecxrError(
            f"run {request.analyze_run_id} is a {tracking.stage_of(run) or 'non-prunecxr'} run, "
            f"not an analyze run; pass the id `prunecxr analyze` printed"
        )
    params = dict(run.data.params)
    if params.get("sweep_run_id"):
        cells = tracking.finished_children(params["sweep_run_id"], "prune")
        params = {**(cells[0][1] if cells else {}), **params}
    data_dir = request.data_dir or params.get("data_dir")
    label_dir = request.label_dir or params.get("label_dir") or data_dir
    if not data_dir:
        raise PrunecxrError(
            f"analyze run {request.analyze_run_id} does not say where its images are "
            f"(published predictions); pass --data-dir (and --label-dir)"
        )
    return params["dataset"], Path(data_dir), Path(label_dir)


def _log_export(request: Export, key: pd.DataFrame, data: tuple, n_pies: int, n_others: int) -> str:
    params = {
        "part": "export",
        "analyze_run_id": request.analyze_run_id,
        "per_reader": request.per_reader,
        "readers": request.readers,
        "seed": request.seed,
        "out": str(request.out.resolve()),
        **dict(zip(("dataset", "data_dir", "label_dir"), map(str, data))),
    }
    with _open_run("reader-study-export", params, request.analyze_run_id) as run_id:
        tracking.log_file(request.out / KEY_FILE, None)
        for reader in sorted(set(key.reader)):
            folder = request.out / f"reader-{reader}"
            for name in ("labels.csv", "via_project.json"):
                tracking.log_file(folder / name, folder.name)
        tracking.log_metrics(
            {"n_images": len(key), "pies_available": n_pies, "non_pies_available": n_others}
        )
    return run_id


@dataclass(frozen=True)
class Analysis:
    """What `prunecxr reader-study analyze` found: its run, the statistics and the checked
    responses."""

    run_id: str
    statistics: pd.DataFrame
    checked: responses.Responses


def analyze_study(key_or_run: str, response_files: list[Path]) -> Analysis:
    """Check the answers against the key, compare PIEs with non-PIEs, log an analysis run."""
    key = load_key(key_or_run)
    raw = pd.concat([responses.read_responses(Path(f)) for f in response_files], ignore_index=True)
    checked = responses.check_responses(raw, key)
    for message in checked.rejected.message:
        log.warning("rejected: %s", message)
    if checked.valid.empty:
        raise PrunecxrError(
            f"no valid response: all {len(raw)} in {len(response_files)} file(s) were rejected"
        )
    table = responses.statistics(checked.valid)
    run_id = _log_analysis(key, key_or_run, response_files, checked, table)
    return Analysis(run_id, table, checked)


def load_key(key_or_run: str) -> pd.DataFrame:
    """A key.csv file; or the key of an export run, or of an analyze run's newest export."""
    if Path(key_or_run).is_file():
        key = pd.read_csv(key_or_run)
        missing = [c for c in study.KEY_COLUMNS if c not in key.columns]
        if missing:
            raise PrunecxrError(f"{key_or_run}: not a reader study key (no {', '.join(missing)})")
        return key
    try:
        run = tracking.get_run(key_or_run)
    except PrunecxrError:
        raise PrunecxrError(
            f"{key_or_run!r} is neither a key file nor a run of this tracking store"
        ) from None
    run_id = key_or_run
    if tracking.stage_of(run) == "analyze":
        exports = [
            r for r, p in tracking.finished_children(run_id, STAGE) if p.get("part") == "export"
        ]
        if not exports:
            raise PrunecxrError(f"analyze run {run_id} has no finished reader study export")
        run_id = exports[0]
    elif tracking.stage_of(run) != STAGE or run.data.params.get("part") != "export":
        raise PrunecxrError(f"{key_or_run} is neither a key file nor an export or analyze run")
    return tracking.read_table(run_id, KEY_FILE)


def _log_analysis(key, key_or_run, files, checked: responses.Responses, table) -> str:
    parent = str(key.analyze_run_id.iloc[0])
    try:
        tracking.get_run(parent)
    except PrunecxrError:
        log.info("the key's analyze run %s is not in this store: a top-level run", parent)
        parent = None
    params = {"part": "analysis", "key": key_or_run, "responses": ", ".join(f.name for f in files)}
    fig = responses.figure(table)
    with _open_run("reader-study-analysis", params, parent) as run_id:
        tracking.log_table(table, "tables/statistics.csv")
        tracking.log_table(checked.valid, "tables/responses.csv")
        tracking.log_table(checked.rejected, "tables/rejected_responses.csv")
        tracking.log_figure(fig, "figures/reader_study.png")
        tracking.log_metrics(_metrics(checked, table))
    figures.close([fig])
    return run_id


def _metrics(checked: responses.Responses, table: pd.DataFrame) -> dict[str, float]:
    numbers = {
        "n_responses": len(checked.valid),
        "n_rejected": len(checked.rejected),
        "n_readers": checked.valid.reader.nunique(),
    }
    for row in table.itertuples():
        prefix = row.question if row.scale == "raw" else f"{row.question}_z"
        for name in ("pie_mean", "other_mean", "kruskal_p", "mannwhitney_p", "welch_p"):
            numbers[f"{prefix}_{name}"] = getattr(row, name)
    return {k: float(v) for k, v in numbers.items() if np.isfinite(v)}
