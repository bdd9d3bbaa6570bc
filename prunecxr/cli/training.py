"""The commands that make data and train: synth, train (one seed, several, resumed, or one rank
under torchrun) and study (the whole pipeline; with no data, the demo)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from prunecxr import PrunecxrError, distributed, tracking
from prunecxr.cli.options import (
    POSITIVE,
    allow_pickle_option,
    data_options,
    execution_options,
    executor_of,
    experiment_option,
    given_on_command_line,
    model_options,
    optimization_options,
    option,
    parse_methods,
    parse_sparsities,
    runtime_options,
    seed_option,
    train_config,
)
from prunecxr.specs import DataSpec, TrainConfig, flat_fields
from prunecxr.stages.study import StudyConfig, demo_config, ensure_demo_data, run_study
from prunecxr.stages.train import (
    resume_training,
    run_distributed_training,
    run_training,
    train_seeds,
)

TRAIN_SETTINGS = set(flat_fields(TrainConfig))


def _typed_train_settings(values: dict) -> dict:
    """The training settings the user typed (they override a run's or the demo's own)."""
    return {k: v for k, v in given_on_command_line(values).items() if k in TRAIN_SETTINGS}


@click.command()
@option(DataSpec, "dataset")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, resolve_path=True, path_type=Path)
)
@click.option(
    "--classes",
    type=click.IntRange(min=2),
    help="Instead of --dataset: a long-tailed set of K classes of its own, its card written to "
    "OUT/dataset.yaml.",
)
@click.option(
    "--zipf",
    type=click.FloatRange(min=0),
    default=1.0,
    show_default=True,
    help="The long tail of --classes or of a card: the i-th class's prevalence ∝ i^-S.",
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
def synth(dataset, out, classes, zipf, n_train, n_val, n_test, size, seed, overwrite) -> None:
    """Write a synthetic dataset in a dataset's file format (label CSVs + images): a built-in
    dataset's, a card's, or with --classes a generic one described by the card it writes."""
    from prunecxr.data import get_schema
    from prunecxr.data.synthetic import write_synthetic, zipf_card

    if classes is not None:
        if given_on_command_line({"dataset": dataset}):
            raise PrunecxrError("give --classes or --dataset, not both")
        dataset = str(zipf_card(out, classes, overwrite))
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    summary = write_synthetic(
        get_schema(dataset), out, sizes, image_size=size, seed=seed, overwrite=overwrite, zipf=zipf
    )
    counts = summary["splits"]["train"]
    click.echo(
        f"wrote {sum(sizes.values())} images to {out}; train positives per class: "
        + ", ".join(f"{name} {count}" for name, count in counts.items())
    )
    click.echo(f"next: prunecxr train --dataset {dataset} --data-dir {out}")


@click.command()
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
    executor = executor_of(settings)
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


@click.command()
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
    executor = executor_of(settings)
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
