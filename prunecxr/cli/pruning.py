"""The commands that prune and analyze: prune (one cell), sweep (every cell of a grid) and
analyze (a sweep, or the original study's published predictions)."""

from __future__ import annotations

import click

from prunecxr import PrunecxrError, tracking
from prunecxr.cli.options import (
    cell_settings,
    checkpoint_seeds,
    execution_options,
    executor_of,
    experiment_option,
    finetune,
    parse_methods,
    parse_sparsities,
    published_options,
    source_data,
    source_options,
)
from prunecxr.sources import default_model_uri, load_source
from prunecxr.stages.analyze import (
    PublishedPredictions,
    analyze_published,
    analyze_sweep,
    default_sweep_run_id,
)
from prunecxr.stages.prune import run_prune, run_sweep


@click.command()
@click.option(
    "--model-uri",
    help="runs:/<id>/model, models:/<name>/<version> or a chkpt.pt file "
    "[default: the newest finished train run of the experiment].",
)
@click.option(
    "--method", type=click.Choice(["l1", "random", "structured"]), default="l1", show_default=True
)
@click.option(
    "--sparsity",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.9,
    show_default=True,
    help="Fraction of Conv2d/Linear weights zeroed or removed.",
)
@click.option("--log-model/--no-log-model", default=True, show_default=True)
@click.option(
    "--seed",
    type=int,
    help="Seed of a checkpoint file's model [default: from the original layout "
    "<dir>_seed-<s>/chkpt.pt, else 0]; a train run's model keeps its run's seed.",
)
@source_options
def prune(model_uri, method, sparsity, log_model, seed, experiment, **settings) -> None:
    """Prune one model once, evaluate it on the test set, log a prune run."""
    tracking.use_experiment(experiment)
    uri = model_uri or default_model_uri()
    typed_seed = None if seed is None else str(seed)
    source = _source(uri, settings, checkpoint_seeds([uri], typed_seed)[0])
    run_id = run_prune(
        source, method, sparsity, cell_settings(settings, log_model), finetune(settings)
    )
    click.echo(
        f"prune run {run_id}: model at runs:/{run_id}/model" if log_model else f"prune run {run_id}"
    )


@click.command()
@click.option(
    "--model-uri",
    "model_uris",
    multiple=True,
    help="Repeat or comma-separate for several models [default: the newest train run].",
)
@click.option("--methods", default="l1,random,structured", show_default=True)
@click.option(
    "--sparsities",
    default="0:0.95:0.05",
    show_default=True,
    help="start:stop:step (stop included) or a comma list.",
)
@click.option(
    "--log-models/--no-log-models",
    default=False,
    show_default=True,
    help="Also log every pruned model (large).",
)
@click.option(
    "--seeds",
    help="Seeds of the checkpoint files, one per --model-uri in order (e.g. 0,1,2) "
    "[default: from the original layout <dir>_seed-<s>/chkpt.pt].",
)
@source_options
@execution_options
def sweep(model_uris, methods, sparsities, log_models, seeds, experiment, **settings) -> None:
    """Every model x method x sparsity as nested prune runs under one sweep run."""
    executor = executor_of(settings)
    method_list, sparsity_list = parse_methods(methods), parse_sparsities(sparsities)
    tracking.use_experiment(experiment)
    uris = [u for given in model_uris for u in given.split(",") if u] or [default_model_uri()]
    sources = [
        _source(uri, settings, seed) for uri, seed in zip(uris, checkpoint_seeds(uris, seeds))
    ]
    sweep_id = run_sweep(
        sources,
        method_list,
        sparsity_list,
        cell_settings(settings, log_models),
        finetune(settings),
        executor,
    )
    click.echo(f"sweep run {sweep_id}")


def _source(uri: str, values: dict, seed: int | None):
    """The model to prune: a run's (its own data; a typed --cache-dir wins) or a checkpoint
    file's (the data the options give)."""
    cache_dir = str(values["cache_dir"]) if values["cache_dir"] else None
    return load_source(
        uri,
        fallback=source_data(values),
        arch=values["arch"],
        cache_dir=cache_dir,
        seed=seed,
        allow_pickle=values["allow_pickle"],
    )


@click.command()
@click.option("--sweep-run-id", help="Analyze this sweep [default: the newest finished sweep].")
@click.option(
    "--cooccurrence",
    type=click.Choice(["paper", "legacy"]),
    default="paper",
    show_default=True,
    help="FCD's frequency and IoU: the paper's (train split, |A∩B|/|A∪B|) or the original "
    "code's (test split, co-occurrence column sums).",
)
@published_options
@experiment_option
def analyze(sweep_run_id, cooccurrence, allow_pickle, experiment, **published) -> None:
    """Forgettability curves, k20 thresholds, FCD, PIEs, figures and report.html of a sweep."""
    tracking.use_experiment(experiment)
    if published["preds_dir"] is not None:
        if published["label_dir"] is None:
            raise PrunecxrError("--preds-dir needs --label-dir (the study's label files)")
        run_id = analyze_published(
            PublishedPredictions(**published),
            allow_pickle=allow_pickle,
            cooccurrence_mode=cooccurrence,
        )
    else:
        run_id = analyze_sweep(
            sweep_run_id or default_sweep_run_id(),
            cooccurrence_mode=cooccurrence,
            allow_pickle=allow_pickle,
        )
    click.echo(f"analyze run {run_id}: report at runs:/{run_id}/report.html")
