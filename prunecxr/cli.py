"""`prunecxr` command line: parses options and calls the library; nothing else lives here."""

from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import click

from prunecxr import PrunecxrError

NOT_YET_AVAILABLE_EXIT = 2

DATASETS = ("nih-cxr-lt", "mimic-cxr-lt")


def _options(*decorators):
    """Stack several click options into one decorator, so each option is defined once."""

    def apply(function):
        return functools.reduce(lambda f, option: option(f), reversed(decorators), function)

    return apply


experiment_option = click.option(
    "--experiment", default="prunecxr", show_default=True, help="MLflow experiment name."
)
seed_option = click.option("--seed", default=0, show_default=True, help="Random seed.")
device_option = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True
)
dataset_option = click.option(
    "--dataset", type=click.Choice(DATASETS), default="nih-cxr-lt", show_default=True
)
data_options = _options(
    dataset_option,
    click.option(
        "--data-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Directory the label files' image column is relative to.",
    ),
    click.option(
        "--label-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Directory with miccai2023_<dataset>_labels_{train,val,test}.csv [default: --data-dir].",
    ),
    click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        help="Where decoded images are cached [default: $PRUNECXR_CACHE or ~/.cache/prunecxr].",
    ),
    click.option(
        "--num-workers",
        default=0,
        show_default=True,
        help="Processes decoding images for the cache.",
    ),
)
model_options = _options(
    click.option(
        "--arch",
        type=click.Choice(["resnet18", "resnet34", "resnet50"]),
        default="resnet50",
        show_default=True,
    ),
    click.option(
        "--pretrained",
        help="imagenet | none | PATH to a weights file [default: imagenet; none for synthetic data].",
    ),
    click.option(
        "--image-size", default=256, show_default=True, help="Images are resized to S x S."
    ),
)
optimization_options = _options(
    click.option("--batch-size", default=256, show_default=True),
    click.option("--lr", default=1e-4, show_default=True, help="Adam learning rate."),
    click.option("--max-epochs", default=60, show_default=True),
    click.option(
        "--patience", default=15, show_default=True, help="Early stopping on validation loss."
    ),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="prunecxr")
def cli() -> None:
    """Train, prune and analyze long-tailed multi-label chest X-ray classifiers, tracked in MLflow."""


@cli.command()
@dataset_option
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--n-train", default=4000, show_default=True)
@click.option("--n-val", default=500, show_default=True)
@click.option("--n-test", default=1000, show_default=True)
@click.option("--size", default=256, show_default=True, help="Image side in pixels.")
@seed_option
@click.option("--overwrite", is_flag=True, help="Replace label files already in --out.")
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
@device_option
@experiment_option
@click.option("--resume", "resume_run_id", metavar="RUN_ID", help="Continue this train run.")
def train(resume_run_id, experiment, **settings) -> None:
    """Train one model (one seed) and log it as an MLflow train run."""
    from prunecxr import tracking
    from prunecxr.train import resume_training, run_training

    tracking.use_experiment(experiment)
    if resume_run_id:
        overrides = {key: settings[key] for key in ("max_epochs", "device", "num_workers")}
        run_id = resume_training(
            resume_run_id, **overrides, **_cache_override(settings["cache_dir"])
        )
    else:
        run_id = run_training(_train_config(**settings))
    click.echo(f"train run {run_id}: model at runs:/{run_id}/model")


def _cache_override(cache_dir: Path | None) -> dict:
    return {"cache_dir": str(cache_dir)} if cache_dir else {}


def _train_config(*, data_dir, label_dir, pretrained, cache_dir, **settings):
    from prunecxr.train import TrainConfig, default_pretrained

    if data_dir is None:
        raise PrunecxrError("--data-dir is required (see `prunecxr synth` for synthetic data)")
    return TrainConfig(
        data_dir=str(data_dir),
        label_dir=str(label_dir or data_dir),
        pretrained=pretrained or default_pretrained(data_dir),
        **settings,
        **_cache_override(cache_dir),
    )


def _given_on_command_line(settings: dict) -> dict:
    """The settings the user typed (not click defaults), to override the demo's own."""
    context = click.get_current_context()
    typed = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    return {k: v for k, v in settings.items() if context.get_parameter_source(k) in typed}


@cli.command()
@data_options
@click.option(
    "--demo-dir",
    default="prunecxr-demo",
    show_default=True,
    type=click.Path(path_type=Path),
    help="Where the demo's synthetic data is written when no --data-dir is given.",
)
@model_options
@optimization_options
@click.option("--seeds", type=int, help="Number of seeds (0..N-1) [default: 2 demo, 30 real data].")
@device_option
@experiment_option
def study(demo_dir, seeds, experiment, **settings) -> None:
    """The whole pipeline as nested MLflow runs; with no --data-dir, the synthetic demo."""
    from prunecxr import tracking
    from prunecxr.study import StudyConfig, demo_config, ensure_demo_data, run_study

    tracking.use_experiment(experiment)
    if settings["data_dir"] is None:
        ensure_demo_data(demo_dir, settings["dataset"])
        overrides = _given_on_command_line(settings)
        overrides.update(_cache_override(overrides.pop("cache_dir", None)))
        for key in ("dataset", "data_dir", "label_dir"):
            overrides.pop(key, None)
        config = demo_config(demo_dir, settings["dataset"], **overrides)
    else:
        config = StudyConfig(_train_config(**settings, seed=0), tuple(range(30)))
    if seeds is not None:
        config = dataclasses.replace(config, seeds=tuple(range(seeds)))
    study_id = run_study(config)
    click.echo(f"study run {study_id}; see it with: mlflow ui  (then open http://127.0.0.1:5000)")


def _not_yet_available(name: str, issue: str):
    @cli.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def command() -> None:
        click.echo(f"prunecxr {name}: not yet available (lands with {issue})", err=True)
        sys.exit(NOT_YET_AVAILABLE_EXIT)

    command.__doc__ = f"Not yet available (lands with {issue})."
    return command


prune = _not_yet_available("prune", "the pruning issue #3")
sweep = _not_yet_available("sweep", "the pruning issue #3")
analyze = _not_yet_available("analyze", "the analysis issue #4")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and exit code 1."""
    from prunecxr import tracking

    tracking.quiet_logs()
    try:
        cli.main(args=argv, prog_name="prunecxr", standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except PrunecxrError as error:
        click.echo("error: " + " ".join(str(error).splitlines()), err=True)
        sys.exit(1)
