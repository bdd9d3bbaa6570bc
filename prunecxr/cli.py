"""`prunecxr` command line: parses options and calls the library; nothing else lives here."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import click

from prunecxr import PrunecxrError, distributed, tracking
from prunecxr.data.cache import DEFAULT_CACHE_DIR
from prunecxr.executor import Executor
from prunecxr.options import (
    allow_pickle_option,
    cell_settings,
    checkpoint_seeds,
    data_options,
    execution_options,
    experiment_option,
    finetune,
    given_on_command_line,
    model_options,
    optimization_options,
    option,
    parse_methods,
    parse_sparsities,
    published_options,
    runtime_options,
    seed_option,
    source_data,
    source_options,
    spec_of,
    train_config,
)
from prunecxr.sources import default_model_uri, load_source, rebuild_model
from prunecxr.specs import DataSpec, ExecutionSpec, TrainConfig, flat_fields
from prunecxr.stages.analyze import (
    PublishedPredictions,
    analyze_published,
    analyze_sweep,
    default_sweep_run_id,
)
from prunecxr.stages.prune import run_prune, run_sweep
from prunecxr.stages.study import StudyConfig, demo_config, ensure_demo_data, run_study
from prunecxr.stages.train import (
    resume_training,
    run_distributed_training,
    run_training,
    train_seeds,
)

POSITIVE = click.IntRange(min=1)
TRAIN_SETTINGS = set(flat_fields(TrainConfig))


def _executor(values: dict) -> Executor:
    return Executor(spec_of(ExecutionSpec, values))


def _typed_train_settings(values: dict) -> dict:
    """The training settings the user typed (they override a run's or the demo's own)."""
    return {k: v for k, v in given_on_command_line(values).items() if k in TRAIN_SETTINGS}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="prunecxr")
def cli() -> None:
    """Train, prune and analyze long-tailed multi-label chest X-ray classifiers, tracked in MLflow."""


@cli.command()
@option(DataSpec, "dataset")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, resolve_path=True, path_type=Path)
)
@click.option("--n-train", type=POSITIVE, default=4000, show_default=True)
@click.option("--n-val", type=POSITIVE, default=500, show_default=True)
@click.option("--n-test", type=POSITIVE, default=1000, show_default=True)
@click.option(
    "--size",
    type=click.IntRange(min=8),
    default=256,
    show_default=True,
    help="Image side in pixels.",
)
@seed_option
@click.option(
    "--overwrite", is_flag=True, help="Replace files synth would write that --out already holds."
)
def synth(dataset, out, n_train, n_val, n_test, size, seed, overwrite) -> None:
    """Write a synthetic dataset in the real dataset's file format (label CSVs + images)."""
    from prunecxr.data import get_schema
    from prunecxr.data.synthetic import write_synthetic

    sizes = {"train": n_train, "val": n_val, "test": n_test}
    summary = write_synthetic(
        get_schema(dataset), out, sizes, image_size=size, seed=seed, overwrite=overwrite
    )
    counts = summary["splits"]["train"]
    click.echo(
        f"wrote {sum(sizes.values())} images to {out}; train positives per class: "
        + ", ".join(f"{name} {count}" for name, count in counts.items())
    )
    click.echo(f"next: prunecxr train --dataset {dataset} --data-dir {out}")


@cli.command()
@data_options
@model_options
@optimization_options
@seed_option
@runtime_options
@experiment_option
@click.option(
    "--resume",
    "resume_run_id",
    metavar="RUN_ID",
    help="Continue this train run with its own settings; options you type override them.",
)
@click.option(
    "--seeds",
    type=POSITIVE,
    help="Train N seeds from --seed on, one train run each (with --executor ray, in "
    "parallel); seeds trained before with the same settings are reused.",
)
@execution_options
def train(resume_run_id, experiment, seeds, **settings) -> None:
    """Train one model (one seed) and log it as an MLflow train run."""
    executor = _executor(settings)
    if distributed.launched():  # torchrun: this process is one rank of one training
        if seeds is not None or resume_run_id or executor.on_ray:
            raise PrunecxrError(
                "under torchrun, train trains one model: drop --seeds, --resume and --executor"
            )
        if distributed.launched_as_main():  # the other ranks never talk to MLflow
            tracking.use_experiment(experiment)
        run_id = run_distributed_training(train_config(settings))
        if run_id:
            click.echo(f"train run {run_id}: model at runs:/{run_id}/model")
        return
    if seeds is not None:
        if resume_run_id:
            raise PrunecxrError("--seeds trains new seeds; --resume continues one run: not both")
        tracking.use_experiment(experiment)
        config = train_config(settings)
        chosen = list(range(config.seed, config.seed + seeds))
        for seed, run_id in zip(chosen, train_seeds(config, chosen, executor)):
            click.echo(f"train run {run_id} (seed {seed}): model at runs:/{run_id}/model")
        return
    if resume_run_id:
        typed_experiment = given_on_command_line({"experiment": experiment})
        tracking.use_run_experiment(resume_run_id, typed_experiment.get("experiment"))
        run_id = resume_training(resume_run_id, **_typed_train_settings(settings))
    else:
        tracking.use_experiment(experiment)
        run_id = run_training(train_config(settings))
    click.echo(f"train run {run_id}: model at runs:/{run_id}/model")


@cli.command()
@data_options
@click.option(
    "--demo-dir",
    default="prunecxr-demo",
    show_default=True,
    type=click.Path(resolve_path=True, path_type=Path),
    help="Where the demo's synthetic data is written when no --data-dir is given.",
)
@click.option(
    "--demo-seed", default=0, show_default=True, help="Seed of the demo's synthetic data."
)
@model_options
@optimization_options
@click.option(
    "--seeds", type=POSITIVE, help="Number of seeds (0..N-1) [default: 2 demo, 30 real data]."
)
@click.option(
    "--methods", help="Pruning methods [default: l1,random,structured demo; l1,random real data]."
)
@click.option(
    "--sparsities", help="Sparsity grid [default: 0,0.5,...,0.97 demo; 0:0.95:0.05 real data]."
)
@runtime_options
@allow_pickle_option
@experiment_option
@execution_options
def study(
    demo_dir, demo_seed, seeds, methods, sparsities, allow_pickle, experiment, **settings
) -> None:
    """The whole pipeline as nested MLflow runs; with no --data-dir, the synthetic demo."""
    executor = _executor(settings)
    tracking.use_experiment(experiment)
    if settings["data_dir"] is None:
        ensure_demo_data(demo_dir, settings["dataset"], demo_seed)
        overrides = _typed_train_settings(settings)
        for key in ("dataset", "data_dir", "label_dir"):
            overrides.pop(key, None)
        config = demo_config(demo_dir, settings["dataset"], **overrides)
    else:
        config = StudyConfig(train_config({**settings, "seed": 0}))
    if seeds is not None:
        config = dataclasses.replace(config, seeds=tuple(range(seeds)))
    if methods is not None:
        config = dataclasses.replace(config, methods=tuple(parse_methods(methods)))
    if sparsities is not None:
        config = dataclasses.replace(config, sparsities=tuple(parse_sparsities(sparsities)))
    study_id = run_study(config, executor, allow_pickle=allow_pickle)
    click.echo(f"study run {study_id}; see it with: {tracking.where_to_browse(study_id)}")


@cli.command()
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


@cli.command()
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
    executor = _executor(settings)
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


@cli.command()
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


@cli.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--tracking-uri",
    help="Where to send it [default: the server the run was logging to]; for a server that moved.",
)
def upload(folder, tracking_uri) -> None:
    """Send what a train run kept in FOLDER while its tracking server was away (the error
    line of that run names the folder and this command)."""
    run_id, count = tracking.upload_kept(folder, rebuild_model, tracking_uri)
    click.echo(f"run {run_id}: {count} kept calls sent; {tracking.where_to_browse(run_id)}")


@cli.group()
def cache() -> None:
    """List or remove decoded-image caches (one .npy file per split and image size)."""


cache_dir_option = click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=str(DEFAULT_CACHE_DIR),
    show_default="$PRUNECXR_CACHE or ~/.cache/prunecxr",
)


@cache.command("list")
@cache_dir_option
def cache_list(cache_dir) -> None:
    """Every cache, least recently used first: size, last use, name."""
    from prunecxr.data.cache import list_caches

    files = list_caches(cache_dir)
    for file in files:
        click.echo(_describe_cache(file))
    total = sum(file.size for file in files)
    click.echo(f"{len(files)} files, {total / 1e9:.2f} GB in {cache_dir}")


@cache.command("prune")
@cache_dir_option
@click.option("--older-than", type=float, metavar="DAYS", help="Remove caches unused this long.")
@click.option("--all", "remove_all", is_flag=True, help="Remove every cache.")
@click.option("--dry-run", is_flag=True, help="Only say what would be removed.")
def cache_prune(cache_dir, older_than, remove_all, dry_run) -> None:
    """Remove caches (rebuilt on next use), naming each; a build still in progress (its
    process alive on this machine) is kept."""
    import time

    from prunecxr.data.cache import list_caches

    if older_than is None and not remove_all:
        raise PrunecxrError("say what to remove: --older-than DAYS or --all (--dry-run to see)")
    cutoff = time.time() - 86400 * (older_than or 0) if not remove_all else float("inf")
    chosen = [
        file
        for file in list_caches(cache_dir)
        if file.last_used <= cutoff and (file.building_pid is None or file.abandoned)
    ]
    for file in chosen:
        click.echo(("would remove " if dry_run else "removed ") + _describe_cache(file))
        if not dry_run:
            file.path.unlink(missing_ok=True)
    freed = sum(file.size for file in chosen) / 1e9
    click.echo(f"{'would free' if dry_run else 'freed'} {freed:.2f} GB ({len(chosen)} files)")


def _describe_cache(file) -> str:
    import datetime

    used = datetime.datetime.fromtimestamp(file.last_used).strftime("%Y-%m-%d %H:%M")
    note = " (partial: abandoned build)" if file.abandoned else ""
    note = " (partial: being built)" if file.building_pid and not file.abandoned else note
    return f"{file.size / 1e6:10.1f} MB  {used}  {file.path.name}{note}"


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 1."""
    tracking.quiet_logs()
    _show_progress_notes()
    try:
        cli.main(args=argv, prog_name="prunecxr", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.exceptions.NoArgsIsHelpError as error:  # `prunecxr cache`: its help
        error.show()
        sys.exit(error.exit_code)
    except click.UsageError as error:  # a bad option or value: one line, like every input error
        click.echo(f"error: {error.format_message()}", err=True)
        sys.exit(1)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except PrunecxrError as error:
        click.echo("error: " + " ".join(str(error).splitlines()), err=True)
        sys.exit(1)
    except PermissionError as error:  # e.g. an output folder mounted read-only or root-owned
        click.echo(f"error: no permission to write {error.filename}: {error.strerror}", err=True)
        sys.exit(1)
    except Exception as error:
        uri = tracking.absolute_tracking_uri()
        if tracking.server_answers(uri):
            raise
        click.echo(  # whatever failed, the cause is the server: one line, no traceback
            f"error: the tracking server {uri} stopped answering ({type(error).__name__}); run "
            f"the same command again when it is back: finished work continues",
            err=True,
        )
        sys.exit(1)


def _show_progress_notes() -> None:
    """The library's notes (which run it took, what it continues) as plain lines on stderr."""
    logger = logging.getLogger("prunecxr")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # Ray and MLflow may give the root logger a handler too
