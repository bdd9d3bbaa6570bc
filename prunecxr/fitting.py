"""Training of one multi-label classifier, as in the study: BCE-with-logits, Adam, early
stopping on validation loss keeping the best weights; and the optional fine-tuning of a pruned
model. Plain torch: nothing here knows of MLflow (the train stage, stages/train.py, logs it)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from prunecxr import distributed
from prunecxr.data import SPLITS, SplitData, get_schema, load_split
from prunecxr.data.transforms import augment, draw_augmentation, normalize
from prunecxr.device_data import DeviceImages
from prunecxr.evaluate import device_logits, per_class_metrics, sigmoid
from prunecxr.models import create_model
from prunecxr.runtime import Runtime, portable_state_dict
from prunecxr.specs import DataSpec, Finetune, TrainConfig

LOSS_SHOWN_EVERY = 25  # training steps between progress-bar loss updates


def open_split(data: DataSpec, split: str, *, num_workers: int | None = None) -> SplitData:
    """One split of `data`: its labels and memory-mapped cached images (the cache is built on
    first use, by `num_workers` processes, default the spec's)."""
    return load_split(
        get_schema(data.dataset),
        Path(data.data_dir),
        Path(data.label_dir),
        split,
        data.image_size,
        cache_dir=Path(data.cache_dir),
        num_workers=data.num_workers if num_workers is None else num_workers,
        preprocess=data.preprocess,
        skip_bad_images=data.skip_bad_images,
    )


def open_splits(data: DataSpec) -> dict[str, SplitData]:
    """Every split of `data` (bad labels or images: an error before any training)."""
    return {split: open_split(data, split) for split in SPLITS}


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
            "config": config.flat(),
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
    model = create_model(config.model.arch, num_classes, pretrained or config.model.pretrained)
    model = runtime.place_model(model)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=config.optim.lr, weight_decay=config.optim.weight_decay, fused=True
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
    classes = get_schema(config.data.dataset).classes
    (train, val), (train_forward, forward) = data, forwards
    optim = config.optim
    while state.epoch < optim.max_epochs and state.epochs_since_best < optim.patience:
        started = time.perf_counter()
        train_loss = train_one_epoch(state, train, optim.batch_size, runtime, train_forward)
        train_seconds = time.perf_counter() - started
        # Every rank evaluates the whole validation split; rank 0's loss decides for all.
        val_loss, val_metrics, _ = evaluate_split(
            state.model, val, classes, runtime, optim.batch_size, forward
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
