"""Training of one multi-label classifier (one seed), as in the study: BCE-with-logits, Adam,
early stopping on validation loss keeping the best weights, a checkpoint every epoch."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from prunecxr import PrunecxrError, distributed, ownership, tracking
from prunecxr.data import SplitData, get_schema, load_split
from prunecxr.data.cache import DEFAULT_CACHE_DIR
from prunecxr.data.synthetic import read_marker
from prunecxr.data.transforms import augment, draw_augmentation, normalize
from prunecxr.device_data import DeviceImages
from prunecxr.evaluate import (
    device_logits,
    example_input,
    per_class_metrics,
    predictions_frame,
    sigmoid,
    summarize,
)
from prunecxr.executor import Executor, WorkerContext, check_readable
from prunecxr.models import create_model
from prunecxr.runtime import Runtime, portable_state_dict, runtime_of

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_DIR}/last.pt"
RESUMED_TAG = "prunecxr.resumed"  # what each resumed session changed
LOCAL_CHECKPOINT_TAG = "prunecxr.local_checkpoint"  # where this machine keeps the newest one
TRAIN_KEY_TAG = "prunecxr.train_key"  # what a training computes: `train --seeds` continues it
LOSS_SHOWN_EVERY = 25  # training steps between progress-bar loss updates


@dataclass(frozen=True)
class TrainConfig:
    """Resolved settings of one training run; logged as params and stored in every checkpoint."""

    dataset: str
    data_dir: str
    label_dir: str
    arch: str = "resnet50"
    pretrained: str = "imagenet"  # "imagenet", "none" or a weights file
    image_size: int = 256  # images are resized to image_size x image_size
    batch_size: int = 256
    lr: float = 1e-4  # Adam
    weight_decay: float = 0.0  # Adam's L2 penalty; the paper trains without one
    max_epochs: int = 60
    patience: int = 15  # epochs without a better val_loss before stopping
    seed: int = 0
    device: str = "auto"  # auto = cuda if available
    channels_last: bool | None = None  # None: on for CUDA, off for the CPU
    precision: str = "auto"  # autocast: auto = bf16 on CUDA, fp32 on the CPU
    compile: bool | None = None  # None: torch.compile on CUDA only
    resident_data: bool | None = None  # None: the training images on the device on CUDA only
    num_workers: int = 0  # processes decoding images while the cache is built
    cache_dir: str = str(DEFAULT_CACHE_DIR)
    preprocess: str = "default"  # how pixels are made; "original": OpenCV as the original code
    skip_bad_images: bool = False  # leave unreadable images out instead of stopping


def default_pretrained(data_dir: str | Path) -> str:
    """ImageNet init for real data (the paper's setting); none for our synthetic data."""
    return "none" if read_marker(Path(data_dir)) else "imagenet"


@dataclass
class TrainState:
    """Everything needed to continue training exactly where it stopped."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # shuffling and augmentation, on the CPU
    epoch: int = 0  # epochs completed
    best_val_loss: float = float("inf")
    best_weights: dict | None = None
    epochs_since_best: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)

    def checkpoint(self, config: TrainConfig) -> dict:
        return {
            "config": dataclasses.asdict(config),
            "model": portable_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "best_val_loss": self.best_val_loss,
            "best_weights": self.best_weights,
            "epochs_since_best": self.epochs_since_best,
            "history": self.history,
        }


def create_state(
    config: TrainConfig, num_classes: int, runtime: Runtime, pretrained: str | None = None
) -> TrainState:
    """A fresh model (initialized from `pretrained`, default the config's), optimizer, RNG."""
    torch.manual_seed(config.seed)
    model = create_model(config.arch, num_classes, pretrained or config.pretrained)
    model = runtime.place_model(model)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay, fused=True
    )
    return TrainState(model, optimizer, torch.Generator().manual_seed(config.seed))


def restore_state(checkpoint: dict, config: TrainConfig, num_classes: int, runtime) -> TrainState:
    # The checkpoint's weights replace the initial ones: no ImageNet download (works offline).
    state = create_state(config, num_classes, runtime, pretrained="none")
    state.model.load_state_dict(checkpoint["model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.generator.set_state(checkpoint["generator"])
    for key in ("epoch", "best_val_loss", "best_weights", "epochs_since_best", "history"):
        setattr(state, key, checkpoint[key])
    return state


def train_one_epoch(
    state: TrainState, data: DeviceImages, batch_size: int, runtime, forward=None
) -> float:
    """One pass over `data` in a random order; returns the mean training loss. The epoch's
    order and augmentation are drawn on the CPU (repeatable on any device) and copied to the
    device once; losses add up on the device, so a step never waits for the host. `forward`:
    the module to call (the model, or the model compiled)."""
    state.model.train()
    forward = state.model if forward is None else forward
    order = torch.randperm(len(data), generator=state.generator).numpy()
    batches = [np.sort(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    positions = torch.from_numpy(np.concatenate(batches)).to(runtime.device)
    augmentation = draw_augmentation(len(data), state.generator).to(runtime.device)
    # Under torchrun each rank takes every world-th image of each global batch; its loss is
    # scaled so that DDP's gradient average is the gradient of the global batch's mean loss.
    rank, world = distributed.rank(), distributed.world_size()
    total, seen = torch.zeros((), device=runtime.device), 0
    bar = tqdm(batches, desc=f"epoch {state.epoch + 1}", leave=False, disable=rank > 0)
    for step, index in enumerate(bar):
        span = slice(step * batch_size, step * batch_size + len(index))
        if len(index) < max(2, world):  # BatchNorm cannot train on a single image
            continue
        mine = slice(rank, None, world)
        images, targets = data.batch(positions[span][mine], index[mine])
        batch = normalize(augment(images.unsqueeze(1), augmentation[span][mine]))
        with runtime.autocast():
            logits = forward(runtime.place_batch(batch)).float()
        summed = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")
        loss = summed * (world / targets.shape[1] / len(index))
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        total += loss.detach() * len(index) / world
        seen += len(index)
        if step % LOSS_SHOWN_EVERY == 0:  # reading the loss waits for the device
            bar.set_postfix(loss=f"{loss.item():.4f}")
    return distributed.all_sum(total).item() / max(seen, 1)


def evaluate_split(model, data: DeviceImages, classes, runtime, batch_size: int, forward=None):
    """-> (mean BCE loss, per-class metrics frame, probs (N, C))."""
    logits, _ = device_logits(model, data, runtime=runtime, batch_size=batch_size, forward=forward)
    labels = np.asarray(data.labels.cpu())
    loss = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(labels)).item()
    probs = sigmoid(logits.numpy())
    return loss, per_class_metrics(probs, labels, classes), probs


def fit(state: TrainState, config: TrainConfig, splits: dict, runtime, on_epoch_end) -> None:
    """Epochs until max_epochs or `patience` epochs without a lower val_loss; the best weights
    are kept in `state.best_weights`. on_epoch_end(state) runs after every epoch (checkpoint)."""
    train, val = DeviceImages.of(splits["train"], runtime), DeviceImages.of(splits["val"], runtime)
    with distributed.data_parallel(state.model) as trained:
        forward = runtime.compiled(state.model)
        train_forward = forward if trained is state.model else runtime.compiled(trained)
        _fit_epochs(state, config, (train, val), runtime, (train_forward, forward), on_epoch_end)


def _fit_epochs(state, config, data, runtime, forwards, on_epoch_end) -> None:
    classes = get_schema(config.dataset).classes
    (train, val), (train_forward, forward) = data, forwards
    while state.epoch < config.max_epochs and state.epochs_since_best < config.patience:
        started = time.perf_counter()
        train_loss = train_one_epoch(state, train, config.batch_size, runtime, train_forward)
        train_seconds = time.perf_counter() - started
        # Every rank evaluates the whole validation split; rank 0's loss decides for all.
        val_loss, val_metrics, _ = evaluate_split(
            state.model, val, classes, runtime, config.batch_size, forward
        )
        val_loss = distributed.main_rank_value(val_loss)
        state.epoch += 1
        if val_loss < state.best_val_loss:
            state.best_val_loss, state.epochs_since_best = val_loss, 0
            state.best_weights = portable_state_dict(state.model)
        else:
            state.epochs_since_best += 1
        state.history.append(
            {
                "epoch": state.epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_mAUC": float(val_metrics.auc.mean()),
                "val_mAP": float(val_metrics.ap.mean()),
                "train_images_per_s": len(train) / train_seconds,
                "seconds": time.perf_counter() - started,
            }
        )
        on_epoch_end(state)


def load_splits(config: TrainConfig) -> dict[str, SplitData]:
    schema = get_schema(config.dataset)
    return {
        split: load_split(
            schema,
            Path(config.data_dir),
            Path(config.label_dir),
            split,
            config.image_size,
            cache_dir=Path(config.cache_dir),
            num_workers=config.num_workers,
            preprocess=config.preprocess,
            skip_bad_images=config.skip_bad_images,
        )
        for split in ("train", "val", "test")
    }


def run_distributed_training(config: TrainConfig) -> str | None:
    """This process's part of a torchrun training: every rank trains in lockstep; one process
    per machine builds the caches, rank 0 alone logs the one train run (its id; None on the
    other ranks)."""
    with distributed.process_group(config.device):
        if distributed.builds_caches():
            load_splits(config)  # the caches, written once before the other ranks read them
        distributed.barrier()
        if distributed.rank() == 0:
            return run_training(config)
        runtime = runtime_of(config)
        state = create_state(config, get_schema(config.dataset).num_classes, runtime)
        fit(state, config, load_splits(config), runtime, on_epoch_end=lambda state: None)
        return None


def run_training(config: TrainConfig, parent_run_id: str | None = None) -> str:
    """Train one model as an MLflow `train` run (nested under `parent_run_id` if given, else
    under the active run if any); returns its run id."""
    return _train(config, checkpoint=None, run_id=None, parent_run_id=parent_run_id)


def train_seeds(config: TrainConfig, seeds: list[int], executor: Executor) -> list[str]:
    """One train run per seed, each a job of `executor` (Ray: in parallel); -> run ids. A seed
    trained before with the same settings is reused, one left unfinished is resumed. Under
    `mlflow run`, the seeds' runs are nested under the run it made."""
    context, parent = WorkerContext.here(), os.environ.pop("MLFLOW_RUN_ID", None)
    jobs = [(context, dataclasses.replace(config, seed=seed), parent) for seed in seeds]
    return executor.run_all(_training_job, jobs, [f"seed {seed}" for seed in seeds])


def _training_job(context: WorkerContext, config: TrainConfig, parent_run_id: str | None) -> str:
    context.enter()
    check_readable(config.data_dir, config.label_dir)
    runs = tracking.runs_with_tag("train", TRAIN_KEY_TAG, train_key(config))
    return continue_or_train(runs, config, parent_run_id)


def train_key(config: TrainConfig) -> str:
    """Identifies a training by what it computes (not where or how fast)."""
    fixed = keyed_settings(config, exclude=RESUME_OVERRIDABLE)
    return hashlib.sha256(repr(sorted(fixed.items())).encode()).hexdigest()[:16]


# Settings added after trainings and studies were first keyed, with the value every older run had.
ADDED_SINCE_KEYED = {"weight_decay": 0.0}


def keyed_settings(config: TrainConfig, exclude: tuple[str, ...]) -> dict:
    """The settings a key identifies: all but `exclude`; a setting added later is left out at
    the value older runs had, so their keys stay the same and running a command again still
    finds (and continues) what it started before."""
    return {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k not in exclude and not (k in ADDED_SINCE_KEYED and v == ADDED_SINCE_KEYED[k])
    }


def continue_or_train(runs: list[tuple[str, str]], config: TrainConfig, parent_run_id) -> str:
    """Of `runs` ((run id, status), newest first): the first finished one, else the first with
    a checkpoint resumed (with this config's runtime), else a new training."""
    for run_id, status in runs:
        if status == "FINISHED":
            return run_id
        if tracking.has_artifact(run_id, CHECKPOINT_ARTIFACT):
            return resume_training(run_id, **{k: getattr(config, k) for k in RUNTIME_FIELDS})
    return run_training(config, parent_run_id=parent_run_id)


# Where and how fast a training runs: may change when it is resumed (or its study continued).
RUNTIME_FIELDS = (
    "device",
    "channels_last",
    "precision",
    "compile",
    "resident_data",
    "num_workers",
    "cache_dir",
)
# What a resumed run may change besides: how long it trains; the data may have moved.
# --skip-bad-images: an image that went bad since need not end a week-long training.
RESUME_OVERRIDABLE = (
    *RUNTIME_FIELDS,
    *("max_epochs", "patience", "data_dir", "label_dir", "skip_bad_images"),
)


def resume_training(run_id: str, **overrides) -> str:
    """Continue train run `run_id` from its last checkpoint with the run's own settings;
    `overrides` (only what the user typed) replace those in RESUME_OVERRIDABLE. A run whose
    epochs are done but whose final results were never logged (it died while logging them)
    logs them now."""
    ownership.refuse_if_alive(run_id, "train run")
    checkpoint = fetch_checkpoint(run_id)
    stored = _checkpoint_settings(checkpoint)
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
    config = dataclasses.replace(TrainConfig(**stored), **overrides)
    if _training_done(checkpoint, config) and tracking.run_finished(run_id):
        raise PrunecxrError(
            f"run {run_id} already finished training at epoch {checkpoint['epoch']}; "
            f"pass a larger --max-epochs to train on"
        )
    return _train(config, checkpoint=checkpoint, run_id=run_id)


def _training_done(checkpoint: dict, config: TrainConfig) -> bool:
    return (
        checkpoint["epochs_since_best"] >= config.patience
        or checkpoint["epoch"] >= config.max_epochs
    )


def _train(
    config: TrainConfig,
    checkpoint: dict | None,
    run_id: str | None,
    parent_run_id: str | None = None,
) -> str:
    classes = get_schema(config.dataset).classes
    runtime = runtime_of(config)
    splits = load_splits(config)  # bad labels or images: an error before anything else
    if checkpoint:
        state = restore_state(checkpoint, config, len(classes), runtime)
    else:
        state = create_state(config, len(classes), runtime)
    run_name = f"train-{config.arch}-seed{config.seed}"
    with (
        tracking.start_run(
            "train",
            run_name=run_name,
            run_id=run_id,
            parent_run_id=parent_run_id,
            system_metrics=True,
            outbox_root=Path(config.cache_dir) / "outbox",
        ) as active_id,
        ownership.owned(active_id),
    ):
        if checkpoint:
            tracking.set_tags({RESUMED_TAG: _resume_note(checkpoint, config, runtime)})
        else:
            tracking.set_tags({TRAIN_KEY_TAG: train_key(config)})
            tracking.log_params(dataclasses.asdict(config))
            tracking.log_resolved(runtime.describe())
            for split in ("train", "val", "test"):
                tracking.log_label_file(config.label_dir, config.dataset, split)
            if config.skip_bad_images:
                tracking.log_metrics({f"skipped_images_{n}": d.skipped for n, d in splits.items()})
        checkpoints = Checkpoints(active_id, config)
        fit(state, config, splits, runtime, checkpoints.after_epoch)
        checkpoints.upload_last()
        # Test predictions are analysis-grade: fp32 unless bf16 was asked for explicitly.
        test_runtime = runtime_of(config, for_analysis=True)
        _log_final(state, config, splits["test"], test_runtime)
    return active_id


def _checkpoint_settings(checkpoint: dict) -> dict:
    """The settings a checkpoint was trained with; a setting added since it was written has its
    default (what that training used)."""
    return dataclasses.asdict(TrainConfig(**checkpoint["config"]))


def _resume_note(checkpoint: dict, config: TrainConfig, runtime: Runtime) -> str:
    """What a resumed session changed, e.g. 'from epoch 6: max_epochs=12, device=cpu'."""
    before = _checkpoint_settings(checkpoint)
    changed = {k: v for k, v in dataclasses.asdict(config).items() if before.get(k) != v}
    described = {**{k: str(v) for k, v in changed.items()}, **runtime.describe()}
    return f"from epoch {checkpoint['epoch']}: " + ", ".join(
        f"{k}={v}" for k, v in described.items()
    )


def fetch_checkpoint(run_id: str) -> dict:
    """The run's latest checkpoint: the one kept on this machine if it is newer than the one
    uploaded to the run (uploads are rate-limited, see Checkpoints), or the only one readable."""
    if tracking.run_stage(tracking.get_run(run_id)) != "train":
        raise PrunecxrError(f"run {run_id} is not a train run; --resume takes a train run id")
    local = Path(tracking.get_run(run_id).data.tags.get(LOCAL_CHECKPOINT_TAG, "/nonexistent"))
    kept = torch.load(local, map_location="cpu", weights_only=True) if local.is_file() else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = tracking.download_artifact(run_id, CHECKPOINT_ARTIFACT, Path(tmp))
            uploaded = torch.load(path, map_location="cpu", weights_only=True)
    except (PrunecxrError, OSError, RuntimeError):
        if kept is None:
            raise
        return kept
    return kept if kept is not None and kept["epoch"] > uploaded["epoch"] else uploaded


class Checkpoints:
    """After every epoch: metrics logged, the checkpoint written on this machine (to a temporary
    name, then renamed: a kill never leaves half a file). It is uploaded to the run only when
    it holds new best weights or the last upload is UPLOAD_EVERY_SECONDS old, and at the end:
    a ResNet50 checkpoint is ~380 MB, too much to send every epoch."""

    UPLOAD_EVERY_SECONDS = 900

    def __init__(self, run_id: str, config: TrainConfig):
        self.path = Path(config.cache_dir) / "checkpoints" / run_id / "last.pt"
        self.config, self.uploaded_at = config, time.monotonic()
        # A resumed run's local checkpoint may be newer than its upload (it died before it).
        self.pending = self.path.is_file()
        tracking.set_run_tags(run_id, {LOCAL_CHECKPOINT_TAG: str(self.path.resolve())})

    def after_epoch(self, state: TrainState) -> None:
        row = state.history[-1]
        tracking.log_metrics(
            {k: v for k, v in row.items() if k not in ("epoch", "seconds")}, step=row["epoch"]
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save(state.checkpoint(self.config), partial)
        partial.replace(self.path)
        self.pending = True
        stale = time.monotonic() - self.uploaded_at >= self.UPLOAD_EVERY_SECONDS
        if state.epochs_since_best == 0 or stale:
            self._upload()

    def upload_last(self) -> None:
        """The final checkpoint to the run; the local copy is then no longer needed."""
        if self.pending:
            self._upload(keep_while_away=True)
        self.path.unlink(missing_ok=True)

    def _upload(self, *, keep_while_away: bool = False) -> None:
        """While the tracking server is away, only the last checkpoint is kept to be sent: the
        local file is newer and serves --resume."""
        if tracking.log_file(self.path, CHECKPOINT_DIR, keep_while_away=keep_while_away):
            self.uploaded_at, self.pending = time.monotonic(), False


def _log_final(state: TrainState, config: TrainConfig, test: SplitData, runtime) -> None:
    """Best weights -> test metrics, predictions, history and the model."""
    classes = get_schema(config.dataset).classes
    state.model.load_state_dict(state.best_weights)
    _, metrics, probs = evaluate_split(
        state.model, DeviceImages.of(test, runtime), classes, runtime, config.batch_size
    )
    tracking.log_metrics({**summarize(metrics, "test"), "best_epoch": _best_epoch(state)})
    tracking.log_table(metrics, "per_class_metrics.csv")
    tracking.log_table(
        predictions_frame(test.image_ids, probs, test.labels, classes), "predictions.parquet"
    )
    tracking.log_table(pd.DataFrame(state.history), "history.csv")
    tracking.log_model(state.model, example_input(test.images))


def _best_epoch(state: TrainState) -> int:
    return min(state.history, key=lambda row: row["val_loss"])["epoch"]


@dataclass(frozen=True)
class Finetune:
    """Optional fine-tuning after pruning (0 epochs = the paper's setting)."""

    epochs: int = 0
    lr: float = 1e-4
    batch_size: int = 256


def finetune_model(
    model: nn.Module, train: SplitData, finetune: Finetune, *, seed: int, runtime: Runtime
) -> None:
    """A few epochs of training (Adam, BCE, same augmentation) of an already pruned model that
    is on `runtime`'s device."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=finetune.lr, fused=True)
    state = TrainState(model, optimizer, torch.Generator().manual_seed(seed))
    data = DeviceImages.of(train, runtime)
    for _ in range(finetune.epochs):
        train_one_epoch(state, data, finetune.batch_size, runtime)
        state.epoch += 1
    model.eval()
