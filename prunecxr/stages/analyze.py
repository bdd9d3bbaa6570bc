"""The analyze stage: gather a sweep's predictions (or the original study's published ones),
run every analysis, and log tables, figures and report.html as an analyze run."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from prunecxr import PrunecxrError, tracking
from prunecxr.analysis import figures
from prunecxr.analysis.cooccurrence import SPLIT_OF_MODE
from prunecxr.analysis.predictions import (
    SweepPredictions,
    from_prediction_frames,
    read_published_predictions,
)
from prunecxr.analysis.report import render_report
from prunecxr.analysis.study_analysis import Analysis, analyze_predictions
from prunecxr.cells import test_split
from prunecxr.data import get_schema
from prunecxr.data.cache import decode_image
from prunecxr.data.labels import read_labels
from prunecxr.data.synthetic import read_marker
from prunecxr.pruning import prunable_weights
from prunecxr.sources import source_of_cell
from prunecxr.stages.kernel import Stage, open_stage

HISTOGRAM_SPARSITIES = (0.5, 0.9)


def default_sweep_run_id() -> str:
    hint = "run `prunecxr sweep` first, or pass --sweep-run-id or --preds-dir"
    return tracking.newest_finished_run_id("sweep", how_to_make_one=hint)


def analyze_sweep(
    sweep_run_id: str, *, cooccurrence_mode: str = "paper", allow_pickle: bool = False
) -> str:
    """Analyze every prune run under `sweep_run_id`; returns the analyze run's id."""
    stage = tracking.stage_of(tracking.get_run(sweep_run_id))
    if stage != "sweep":
        raise PrunecxrError(
            f"run {sweep_run_id} is a {stage or 'non-prunecxr'} run, not a sweep; "
            f"--sweep-run-id takes the id `prunecxr sweep` printed"
        )
    cells = tracking.finished_children(sweep_run_id, "prune")
    if not cells:
        raise PrunecxrError(f"run {sweep_run_id} has no finished prune runs under it")
    frames = {
        (params["method"], int(params["seed"]), float(params["sparsity"])): tracking.read_table(
            run_id, "predictions.parquet"
        )
        for run_id, params in tqdm(cells, desc="reading predictions", unit="run")
    }
    if len(frames) < len(cells):
        raise PrunecxrError(
            f"sweep {sweep_run_id} has {len(cells)} finished prune runs but only {len(frames)} "
            f"distinct (method, seed, sparsity) cells: two models share a seed"
        )
    # The source gives the data, the labels and the unpruned weights (histogram).
    source = source_of_cell(cells[0][1], allow_pickle=allow_pickle)
    schema = source.data.schema()
    train_labels = read_labels(schema, Path(source.data.label_dir), "train").labels
    preds = from_prediction_frames(schema, frames, train_labels)
    _check_complete(preds)
    test_images = test_split(source.data).images
    analysis = analyze_predictions(
        preds,
        cooccurrence_mode=cooccurrence_mode,
        load_image=lambda row: test_images[row],
        synthetic=read_marker(Path(source.data.data_dir)) is not None,
    )
    analysis.figures["figures/weight_magnitudes.png"] = _weight_histogram(source.model, source.arch)
    context = {
        "sweep run": sweep_run_id,
        "dataset": schema.name,
        "arch": source.arch,
        "methods": ", ".join(preds.methods),
        "seeds": len(preds.seeds(preds.methods[0])),
        "test images": len(preds.labels),
        "co-occurrence": _cooccurrence_note(cooccurrence_mode),
    }
    params = {
        "sweep_run_id": sweep_run_id,
        "dataset": source.data.dataset,  # a built-in's name or the card's path, as runs record it
        "cooccurrence": cooccurrence_mode,
    }
    return _log(analysis, analyze_stage(params), context)


@dataclass(frozen=True)
class PublishedPredictions:
    """The original study's prediction files of one method, with the study's label files."""

    dataset: str
    preds_dir: Path
    label_dir: Path
    data_dir: Path | None = None  # images, for the PIE gallery
    method: str = "l1"  # what the directory holds: the original wrote l1 and random apart


def analyze_published(
    published: PublishedPredictions, *, allow_pickle: bool, cooccurrence_mode: str = "paper"
) -> str:
    """Analyze the original study's published prediction files."""
    schema = get_schema(published.dataset, published.label_dir)
    preds = read_published_predictions(
        schema, published.preds_dir, allow_pickle=allow_pickle, method=published.method
    )
    train_labels = read_labels(schema, published.label_dir, "train").labels
    _check_complete(preds)
    test = read_labels(schema, published.label_dir, "test")
    if len(test.labels) != len(preds.labels):
        raise PrunecxrError(
            f"{test.path} has {len(test.labels)} rows, the predictions {len(preds.labels)}"
        )
    preds = SweepPredictions(schema, test.image_ids, preds.labels, train_labels, preds.probs)
    load_image = None
    if published.data_dir is not None:
        images = Path(published.data_dir) / schema.image_root
        load_image = lambda row: decode_image(images / test.image_ids[row], 256)  # noqa: E731
    folders = [published.label_dir, published.data_dir]
    analysis = analyze_predictions(
        preds,
        cooccurrence_mode=cooccurrence_mode,
        load_image=load_image,
        synthetic=any(read_marker(Path(d)) for d in folders if d is not None),
    )
    context = {
        "predictions": f"{published.preds_dir} ({published.method})",
        "dataset": schema.name,
        "seeds": len(preds.seeds(published.method)),
        "test images": len(preds.labels),
        "co-occurrence": _cooccurrence_note(cooccurrence_mode),
    }
    params = {
        "preds_dir": str(published.preds_dir),
        "label_dir": str(published.label_dir),
        "data_dir": "" if published.data_dir is None else str(published.data_dir),
        "method": published.method,
        "dataset": published.dataset,
        "cooccurrence": cooccurrence_mode,
    }
    return _log(analysis, analyze_stage(params), context)


def _cooccurrence_note(mode: str) -> str:
    split = SPLIT_OF_MODE[mode]
    how = "|A ∩ B| / |A ∪ B|" if mode == "paper" else "co-occurrence column sums (original code)"
    return (
        f"findings lead with {mode}: frequency and IoU from the {split} split's labels, "
        f"IoU = {how} (both definitions are in tables/fcd.csv)"
    )


def _check_complete(preds: SweepPredictions) -> None:
    for method in preds.methods:
        if 0.0 not in preds.sparsities(method):
            raise PrunecxrError(
                f"method {method!r} has no sparsity-0 predictions: relative changes need them"
            )


def _weight_histogram(model, arch: str):
    weights = np.concatenate(
        [getattr(m, n).detach().abs().flatten().numpy() for m, n in prunable_weights(model)]
    )
    cuts = {k: float(np.quantile(weights, k)) for k in HISTOGRAM_SPARSITIES}
    return figures.weight_histograms(weights, cuts, arch)


def analyze_stage(params: dict) -> Stage:
    """A new analyze run (short: no heartbeat); a study finds its own by parent."""
    return Stage("analyze", "analyze", params=params, owned=False)


def _log(analysis: Analysis, stage: Stage, context: dict) -> str:
    with open_stage(stage) as run_id:
        tracking.log_metrics({k: float(v) for k, v in analysis.numbers.items() if np.isfinite(v)})
        for path, table in analysis.tables.items():
            tracking.log_table(table, path)
        for path, figure in analysis.figures.items():
            tracking.log_figure(figure, path)
        report = render_report(
            analysis, title=f"prunecxr analysis ({context['dataset']})", context=context
        )
        tracking.log_text(report, "report.html")
    figures.close(analysis.figures.values())
    return run_id
