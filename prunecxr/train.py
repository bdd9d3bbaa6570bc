"""Training of one multi-label classifier (one seed), as in the study: BCE-with-logits, Adam,
early stopping on validation loss keeping the best weights, a checkpoint every epoch."""

from __future__ import annotations

import dataclasses
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

from prunecxr import PrunecxrError, tracking
from prunecxr.data import SplitData, get_schema, load_split
from prunecxr.data.cache import DEFAULT_CACHE_DIR
from prunecxr.data.synthetic import read_marker
from prunecxr.data.transforms import augment, normalize
from prunecxr.evaluate import (
    autocast,
    example_input,
    per_class_metrics,
    predict_logits,
    predictions_frame,
    sigmoid,
    summarize,
)
from prunecxr.models import create_model

CHECKPOINT_DIR = "checkpoints"
CHECKPOINT_ARTIFACT = f"{CHECKPOINT_DIR}/last.pt"


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
    max_epochs: int = 60
    patience: int = 15  # epochs without a better val_loss before stopping
    seed: int = 0
    device: str = "auto"  # auto = cuda if available
    num_workers: int = 0  # processes decoding images while the cache is built
    cache_dir: str = str(DEFAULT_CACHE_DIR)


def default_pretrained(data_dir: str | Path) -> str:
    """ImageNet init for real data (the paper's setting); none for our synthetic data."""
    return "none" if read_marker(Path(data_dir)) else "imagenet"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise PrunecxrError(f"unknown device {name!r}; valid: auto, cpu, cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise PrunecxrError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


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
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
            "epoch": self.epoch,
            "best_val_loss": self.best_val_loss,
            "best_weights": self.best_weights,
            "epochs_since_best": self.epochs_since_best,
            "history": self.history,
        }


def create_state(config: TrainConfig, num_classes: int, device: torch.device) -> TrainState:
    torch.manual_seed(config.seed)
    model = create_model(config.arch, num_classes, config.pretrained).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    return TrainState(model, optimizer, torch.Generator().manual_seed(config.seed))


def restore_state(checkpoint: dict, config: TrainConfig, num_classes: int, device) -> TrainState:
    state = create_state(config, num_classes, device)
    state.model.load_state_dict(checkpoint["model"])
    state.optimizer.load_state_dict(checkpoint["optimizer"])
    state.generator.set_state(checkpoint["generator"])
    for key in ("epoch", "best_val_loss", "best_weights", "epochs_since_best", "history"):
        setattr(state, key, checkpoint[key])
    return state


def train_one_epoch(state: TrainState, split: SplitData, batch_size: int, device) -> float:
    """One pass over `split` in a random order; returns the mean training loss."""
    state.model.train()
    order = torch.randperm(len(split), generator=state.generator).numpy()
    total, seen = 0.0, 0
    bar = tqdm(range(0, len(order), batch_size), desc=f"epoch {state.epoch + 1}", leave=False)
    for start in bar:
        index = np.sort(order[start : start + batch_size])  # sorted reads are faster on a memmap
        if len(index) < 2:  # BatchNorm cannot train on a single image
            continue
        images = torch.from_numpy(split.images[index]).unsqueeze(1).to(device)
        targets = torch.from_numpy(split.labels[index]).to(device)
        batch = normalize(augment(images, state.generator))
        if device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device):
            loss = F.binary_cross_entropy_with_logits(state.model(batch).float(), targets)
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        total, seen = total + loss.item() * len(index), seen + len(index)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    return total / max(seen, 1)


def evaluate_split(model: nn.Module, split: SplitData, classes, device, batch_size: int):
    """-> (mean BCE loss, per-class metrics frame, probs (N, C))."""
    logits = predict_logits(model, split.images, device=device, batch_size=batch_size)
    loss = F.binary_cross_entropy_with_logits(
        torch.from_numpy(logits), torch.from_numpy(split.labels)
    ).item()
    probs = sigmoid(logits)
    return loss, per_class_metrics(probs, split.labels, classes), probs


def fit(state: TrainState, config: TrainConfig, splits: dict, classes, on_epoch_end) -> None:
    """Epochs until max_epochs or `patience` epochs without a lower val_loss; the best weights
    are kept in `state.best_weights`. on_epoch_end(state) runs after every epoch (checkpoint)."""
    device = next(state.model.parameters()).device
    while state.epoch < config.max_epochs and state.epochs_since_best < config.patience:
        started = time.perf_counter()
        train_loss = train_one_epoch(state, splits["train"], config.batch_size, device)
        val_loss, val_metrics, _ = evaluate_split(
            state.model, splits["val"], classes, device, config.batch_size
        )
        state.epoch += 1
        if val_loss < state.best_val_loss:
            state.best_val_loss, state.epochs_since_best = val_loss, 0
            state.best_weights = {
                k: v.detach().to("cpu", copy=True) for k, v in state.model.state_dict().items()
            }
        else:
            state.epochs_since_best += 1
        state.history.append(
            {
                "epoch": state.epoch,
                "train_loss": train_loss,
                "val_loss": val_loss,
                "val_mAUC": float(val_metrics.auc.mean()),
                "val_mAP": float(val_metrics.ap.mean()),
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
        )
        for split in ("train", "val", "test")
    }


def run_training(config: TrainConfig) -> str:
    """Train one model as an MLflow `train` run; returns its run id."""
    return _train(config, checkpoint=None, run_id=None)


def resume_training(run_id: str, **overrides) -> str:
    """Continue train run `run_id` from its last checkpoint. `overrides` replace stored settings
    that may change between sessions (max_epochs, device, num_workers, cache_dir)."""
    checkpoint = fetch_checkpoint(run_id)
    config = dataclasses.replace(TrainConfig(**checkpoint["config"]), **overrides)
    return _train(config, checkpoint=checkpoint, run_id=run_id)


def _train(config: TrainConfig, checkpoint: dict | None, run_id: str | None) -> str:
    classes = get_schema(config.dataset).classes
    device = resolve_device(config.device)
    if checkpoint:
        state = restore_state(checkpoint, config, len(classes), device)
        if state.epochs_since_best >= config.patience or state.epoch >= config.max_epochs:
            raise PrunecxrError(
                f"run {run_id} already finished training at epoch {state.epoch}; "
                f"pass a larger --max-epochs to train on"
            )
    else:
        state = create_state(config, len(classes), device)
    splits = load_splits(config)
    run_name = f"train-{config.arch}-seed{config.seed}"
    with tracking.start_run("train", run_name=run_name, run_id=run_id) as active_id:
        if not checkpoint:
            tracking.log_params(dataclasses.asdict(config))
        with tempfile.TemporaryDirectory() as tmp:
            fit(state, config, splits, classes, lambda s: _log_epoch(s, config, Path(tmp)))
        _log_final(state, config, splits["test"], classes, device)
    return active_id


def fetch_checkpoint(run_id: str) -> dict:
    if tracking.run_stage(tracking.get_run(run_id)) != "train":
        raise PrunecxrError(f"run {run_id} is not a train run; --resume takes a train run id")
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.download_artifact(run_id, CHECKPOINT_ARTIFACT, Path(tmp))
        return torch.load(path, map_location="cpu", weights_only=False)


def _log_epoch(state: TrainState, config: TrainConfig, tmp: Path) -> None:
    row = state.history[-1]
    tracking.log_metrics(
        {k: v for k, v in row.items() if k not in ("epoch", "seconds")}, step=row["epoch"]
    )
    path = tmp / "last.pt"
    torch.save(state.checkpoint(config), path)
    tracking.log_file(path, CHECKPOINT_DIR)


def _log_final(state: TrainState, config: TrainConfig, test: SplitData, classes, device) -> None:
    """Best weights -> test metrics, predictions, history and the model."""
    state.model.load_state_dict(state.best_weights)
    _, metrics, probs = evaluate_split(state.model, test, classes, device, config.batch_size)
    tracking.log_metrics({**summarize(metrics, "test"), "best_epoch": _best_epoch(state)})
    tracking.log_table(metrics, "per_class_metrics.csv")
    tracking.log_table(
        predictions_frame(test.image_ids, probs, test.labels, classes), "predictions.parquet"
    )
    tracking.log_table(pd.DataFrame(state.history), "history.csv")
    tracking.log_model(state.model.float().cpu(), example_input(test.images))


def _best_epoch(state: TrainState) -> int:
    return min(state.history, key=lambda row: row["val_loss"])["epoch"]


def finetune_model(
    model: nn.Module, train: SplitData, *, epochs: int, lr: float, batch_size: int, seed: int
) -> None:
    """A few epochs of training (Adam, BCE, same augmentation) of an already pruned model."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    state = TrainState(model, optimizer, torch.Generator().manual_seed(seed))
    device = next(model.parameters()).device
    for _ in range(epochs):
        train_one_epoch(state, train, batch_size, device)
        state.epoch += 1
    model.eval()
