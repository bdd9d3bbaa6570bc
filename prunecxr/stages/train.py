"""The train stage: one model (one seed) as a `train` run: its settings as params, metrics per
epoch, checkpoints (stages/checkpoints.py), then test metrics, predictions and the model. A
training of the same settings is found again by its key: reused when finished, resumed from its
last checkpoint when not."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from prunecxr import PrunecxrError, distributed, tracking
from prunecxr.data import SplitData
from prunecxr.device_data import DeviceImages
from prunecxr.evaluate import example_input, predictions_frame, summarize
from prunecxr.executor import Executor, WorkerContext, check_readable
from prunecxr.fitting import (
    TrainState,
    create_state,
    evaluate_split,
    fit,
    keeps_training,
    open_splits,
    restore_state,
)
from prunecxr.runtime import Runtime, portable_model, runtime_of
from prunecxr.sources import rebuild_model
from prunecxr.specs import RESUMABLE, WHERE, TrainConfig, names_with_role, train_key
from prunecxr.stages.checkpoints import (
    Checkpoints,
    checkpoint_config,
    fetch_checkpoint,
    has_checkpoint,
)
from prunecxr.stages.kernel import Stage, find_previous, open_stage
from prunecxr.tracking import ownership

RESUMED_TAG = "prunecxr.resumed"  # what each resumed session changed
# What a resumed run may change: where and how fast it runs, how long it trains, where its
# data is now (and --skip-bad-images: an image that went bad need not end a week-long training).
RESUME_OVERRIDABLE = names_with_role(TrainConfig, RESUMABLE, WHERE)


def train_stage(config: TrainConfig, parent_run_id: str | None = None) -> Stage:
    return Stage(
        "train",
        f"train-{config.model.arch}-seed{config.seed}",
        key=train_key(config),
        params=config.flat(),
        parent_run_id=parent_run_id,
        system_metrics=True,
        keep_while_away=tracking.KeepWhileAway(
            Path(config.data.cache_dir) / "outbox", rebuild_model
        ),
    )


def run_training(config: TrainConfig, parent_run_id: str | None = None) -> str:
    """Train one model as a new MLflow `train` run (nested under `parent_run_id` if given, else
    under the active run if any); returns its run id."""
    return _train(config, checkpoint=None, run_id=None, parent_run_id=parent_run_id)


def train_or_continue(
    config: TrainConfig,
    parent_run_id: str | None = None,
    candidates: list[tuple[str, str]] | None = None,
) -> str:
    """The training of `config`: of its earlier runs (by default those of its key in the
    experiment; `candidates` where the caller finds them otherwise), a finished one is reused,
    an unfinished one with a checkpoint resumed (with this config's runtime), else a new run is
    trained (nested under `parent_run_id`). -> its run id."""
    stage = train_stage(config, parent_run_id)
    previous = find_previous(
        stage, reuse_finished=True, can_continue=has_checkpoint, candidates=candidates
    )
    if previous is None:
        return run_training(config, parent_run_id)
    if previous.finished:
        return previous.run_id
    where = {k: v for k, v in config.flat().items() if k in names_with_role(TrainConfig, WHERE)}
    return resume_training(previous.run_id, **where)


def train_seeds(config: TrainConfig, seeds: list[int], executor: Executor) -> list[str]:
    """One train run per seed, each a job of `executor` (Ray: in parallel); -> run ids. A seed
    trained before with the same settings is reused, one left unfinished is resumed. Under
    `mlflow run`, the seeds' runs are nested under the run it made."""
    context, parent = WorkerContext.here(), os.environ.pop("MLFLOW_RUN_ID", None)
    jobs = [(context, config.replace(seed=seed), parent) for seed in seeds]
    return executor.run_all(training_job, jobs, [f"seed {seed}" for seed in seeds])


def training_job(context: WorkerContext, config: TrainConfig, parent_run_id: str | None) -> str:
    """A job (this process or a Ray worker's): train_or_continue."""
    context.enter()
    check_readable(config.data.data_dir, config.data.label_dir)
    return train_or_continue(config, parent_run_id)


def resume_training(run_id: str, **overrides) -> str:
    """Continue train run `run_id` from its last checkpoint with the run's own settings;
    `overrides` (only what the user typed) replace those in RESUME_OVERRIDABLE. A run whose
    epochs are done but whose final results were never logged (it died while logging them)
    logs them now. The run is claimed first: a second process is refused before it downloads
    the checkpoint or opens the data (minutes where caches are built)."""
    with ownership.claimed(run_id, "train run"):
        return _resume(run_id, overrides)


def _resume(run_id: str, overrides: dict) -> str:
    checkpoint = fetch_checkpoint(run_id)
    stored = checkpoint_config(checkpoint).flat()
    if "data_dir" in overrides and "label_dir" not in overrides:
        if stored["label_dir"] == stored["data_dir"]:  # labels beside the images: move along
            overrides = {**overrides, "label_dir": overrides["data_dir"]}
    fixed = sorted(
        k for k, v in overrides.items() if k not in RESUME_OVERRIDABLE and stored.get(k) != v
    )
    if fixed:
        raise PrunecxrError(
            f"--resume keeps the run's own {', '.join(fixed)} "
            f"({', '.join(f'{k}={stored.get(k)}' for k in fixed)}); only "
            f"{', '.join(RESUME_OVERRIDABLE)} can change when resuming"
        )
    config = TrainConfig.from_flat(**{**stored, **overrides})
    done = not keeps_training(checkpoint["epoch"], checkpoint["epochs_since_best"], config.optim)
    if done and tracking.run_finished(run_id):
        raise PrunecxrError(
            f"run {run_id} already finished training at epoch {checkpoint['epoch']}; "
            f"pass a larger --max-epochs to train on"
        )
    return _train(config, checkpoint=checkpoint, run_id=run_id)


def run_distributed_training(config: TrainConfig) -> str | None:
    """This process's part of a torchrun training: every rank trains in lockstep; one process
    per machine builds the caches, rank 0 alone logs the one train run (its id; None on the
    other ranks)."""
    with distributed.process_group(config.runtime.device):
        if distributed.builds_caches():
            open_splits(config.data)  # the caches, written once before the other ranks read them
        distributed.barrier()
        if distributed.rank() == 0:
            return run_training(config)
        runtime = runtime_of(config.runtime, protocol=config.optim.protocol)
        state = create_state(config, config.data.schema().num_classes, runtime)
        fit(state, config, open_splits(config.data), runtime, on_epoch_end=lambda state: None)
        return None


def _train(
    config: TrainConfig,
    checkpoint: dict | None,
    run_id: str | None,
    parent_run_id: str | None = None,
) -> str:
    num_classes = config.data.schema().num_classes
    runtime = runtime_of(config.runtime, protocol=config.optim.protocol)
    # Bad labels or images: an error before a new run is created (a resumed one is claimed).
    splits = open_splits(config.data)
    if checkpoint:
        state = restore_state(checkpoint, config, num_classes, runtime)
    else:
        state = create_state(config, num_classes, runtime)
    with open_stage(train_stage(config, parent_run_id), continued_run_id=run_id) as active_id:
        if checkpoint:
            tracking.set_tags({RESUMED_TAG: resume_note(checkpoint, config, runtime)})
        else:
            _log_inputs(config, runtime, splits)
        with Checkpoints(active_id, config) as checkpoints:

            def after_epoch(state: TrainState) -> None:
                ownership.ensure_mine(active_id)  # taken over: not one more epoch logged
                checkpoints.after_epoch(state)

            fit(state, config, splits, runtime, after_epoch)
            ownership.ensure_mine(active_id)
            checkpoints.upload_last()
        # Test predictions are analysis-grade: fp32 unless bf16 was asked for explicitly.
        _log_final(state, config, splits["test"], runtime_of(config.runtime, for_analysis=True))
    return active_id


def _log_inputs(config: TrainConfig, runtime: Runtime, splits: dict[str, SplitData]) -> None:
    """What a new train run resolved and read: the runtime, the label files, skipped images."""
    tracking.log_resolved(runtime.describe())
    schema = config.data.schema()
    for split in splits:
        path = Path(config.data.label_dir) / schema.label_file(split)
        tracking.log_label_file(path, schema.name, split)
    if config.data.skip_bad_images:
        tracking.log_metrics({f"skipped_images_{n}": d.skipped for n, d in splits.items()})


def resume_note(checkpoint: dict, config: TrainConfig, runtime: Runtime) -> str:
    """What a resumed session changed, e.g. 'from epoch 6: max_epochs=12, device=cpu'."""
    before = checkpoint_config(checkpoint).flat()
    changed = {k: v for k, v in config.flat().items() if before.get(k) != v}
    described = {**{k: str(v) for k, v in changed.items()}, **runtime.describe()}
    return f"from epoch {checkpoint['epoch']}: " + ", ".join(
        f"{k}={v}" for k, v in described.items()
    )


def _log_final(state: TrainState, config: TrainConfig, test: SplitData, runtime) -> None:
    """Best weights -> test metrics, predictions, history and the model."""
    classes = config.data.schema().classes
    state.model.load_state_dict(state.best_weights)
    _, metrics, probs = evaluate_split(
        state.model, DeviceImages.of(test, runtime), classes, runtime, config.optim.batch_size
    )
    best_epoch = min(state.history, key=lambda row: row["val_loss"])["epoch"]
    tracking.log_metrics({**summarize(metrics, "test"), "best_epoch": best_epoch})
    tracking.log_table(metrics, "per_class_metrics.csv")
    tracking.log_table(
        predictions_frame(test.image_ids, probs, test.labels, classes), "predictions.parquet"
    )
    tracking.log_table(pd.DataFrame(state.history), "history.csv")
    tracking.log_model(portable_model(state.model), example_input(test.images))
