"""Training of one multi-label classifier, as in the study: BCE-with-logits, Adam, early
stopping on validation loss keeping the best weights; and the optional fine-tuning of a pruned
model. Plain torch: nothing here knows of MLflow (the train stage, stages/train.py, logs it)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from prunecxr import distributed
from prunecxr.data import SPLITS, SplitData, load_split
from prunecxr.data.transforms import augment, draw_augmentation, normalize
from prunecxr.device_data import DeviceImages
from prunecxr.evaluate import device_logits, per_class_metrics, sigmoid
from prunecxr.models import create_model
from prunecxr.runtime import Runtime, host_snapshot, portable_state_dict
from prunecxr.specs import DataSpec, Finetune, OptimSpec, TrainConfig

LOSS_SHOWN_EVERY = 25  # training steps between progress-bar loss updates


def open_split(data: DataSpec, split: str, *, num_workers: int | None = None) -> SplitData:
    """One split of `data`: its labels and memory-mapped cached images (the cache is built on
    first use, by `num_workers` processes, default the spec's)."""
    return load_split(
        data.schema(),
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
        checkpoint, wait = self.snapshot(config)
        wait()
        return checkpoint

    def snapshot(self, config: TrainConfig) -> tuple[dict, Callable[[], None]]:
        """The checkpoint, copied to host memory without waiting for the device:
        -> (checkpoint, wait); read it only after wait() (runtime.host_snapshot)."""
        return host_snapshot(
            {
                "config": config.flat(),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state(),
                "epoch": self.epoch,
                "best_val_loss": self.best_val_loss,
                "best_weights": self.best_weights,
                "epochs_since_best": self.epochs_since_best,
                "history": [dict(row) for row in self.history],
            }
        )


def create_state(
    config: TrainConfig, num_classes: int, runtime: Runtime, pretrained: str | None = None
) -> TrainState:
    """A fresh model (initialized from `pretrained`, default the config's), optimizer, RNG."""
    torch.manual_seed(config.seed)
    pretrained = pretrained or config.model.pretrained
    model = create_model(config.model.arch, num_classes, pretrained, config.data.image_size)
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
    state: TrainState,
    data: DeviceImages,
    batch_size: int,
    runtime,
    forward=None,
    protocol: str = "default",
) -> float:
    """One pass over `data` in a random order; returns the mean training loss. The epoch's
    order and augmentation are drawn on the CPU (repeatable on any device) and copied to the
    device once; losses add up on the device, so a step never waits for the host. `forward`:
    the module to call (the model, or the model compiled). The original `protocol` rotates
    nearest-neighbour and trains epochs after the first in eval mode (BatchNorm statistics
    frozen: the original code never called train() after its first validation). A compiled
    runtime leaves out a last batch smaller than `batch_size` when there is a full one (its
    images are drawn again in other epochs), so that one compiled graph serves every step."""
    original = protocol == "original"
    state.model.train(not (original and state.epoch > 0))
    forward = state.model if forward is None else forward
    batches, positions, augmentation = _epoch_plan(state.generator, len(data), batch_size, runtime)
    interpolation = "nearest" if original else "bilinear"
    # Under torchrun each rank takes every world-th image of each global batch; its loss is
    # scaled so that DDP's gradient average is the gradient of the global batch's mean loss.
    rank, world = distributed.rank(), distributed.world_size()
    total, seen = torch.zeros((), device=runtime.device), 0
    bar = tqdm(batches, desc=f"epoch {state.epoch + 1}", leave=False, disable=rank > 0)
    with runtime.fp32_math():  # forward and backward alike
        for step, index in enumerate(bar):
            span = slice(step * batch_size, step * batch_size + len(index))
            if len(index) < max(2, world):  # BatchNorm cannot train on a single image
                continue
            if runtime.compile and len(index) < batch_size <= len(data):  # one static shape
                continue
            mine = slice(rank, None, world)
            images, targets = data.batch(positions[span][mine], index[mine])
            batch = normalize(augment(images.unsqueeze(1), augmentation[span][mine], interpolation))
            scale = world / targets.shape[1] / len(index)
            loss = _train_step(state, forward, runtime, batch, targets, scale)
            total += loss.detach() * len(index) / world
            seen += len(index)
            if step % LOSS_SHOWN_EVERY == 0:  # reading the loss waits for the device
                bar.set_postfix(loss=f"{loss.item():.4f}")
    return distributed.all_sum(total).item() / max(seen, 1)


def _epoch_plan(generator: torch.Generator, size: int, batch_size: int, runtime):
    """An epoch's batches (sorted index arrays), their positions and the images' augmentation
    on the device, drawn on the CPU."""
    order = torch.randperm(size, generator=generator).numpy()
    batches = [np.sort(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    positions = torch.from_numpy(np.concatenate(batches)).to(runtime.device)
    augmentation = draw_augmentation(size, generator).to(runtime.device)
    return batches, positions, augmentation


def _train_step(state: TrainState, forward, runtime, batch, targets, scale: float) -> torch.Tensor:
    """One optimizer step on the summed BCE times `scale`; -> that loss."""
    with runtime.autocast():
        logits = forward(runtime.place_batch(batch)).float()
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") * scale
    state.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.optimizer.step()
    return loss


def evaluate_split(
    model,
    data: DeviceImages,
    classes,
    runtime,
    batch_size: int,
    forward=None,
    *,
    loss_per_batch: bool = False,
):
    """-> (mean BCE loss, per-class metrics frame, probs (N, C)). `loss_per_batch`: the loss
    is the mean of the batches' mean losses, as the original code's validation loss."""
    logits, _ = device_logits(model, data, runtime=runtime, batch_size=batch_size, forward=forward)
    labels = np.asarray(data.labels.cpu())
    loss = mean_loss(logits, torch.from_numpy(labels), batch_size if loss_per_batch else None)
    probs = sigmoid(logits.numpy())
    return loss, per_class_metrics(probs, labels, classes), probs


def mean_loss(logits: torch.Tensor, labels: torch.Tensor, batch_size: int | None = None) -> float:
    """Mean BCE over every image and class; with `batch_size`, the mean over consecutive
    batches of their mean BCE (a smaller last batch then weighs as much as a full one)."""
    if batch_size is None:
        return F.binary_cross_entropy_with_logits(logits, labels).item()
    batches = zip(logits.split(batch_size), labels.split(batch_size))
    return float(np.mean([F.binary_cross_entropy_with_logits(x, y).item() for x, y in batches]))


def keeps_training(epoch: int, epochs_since_best: int, optim: OptimSpec) -> bool:
    """Whether another epoch runs: fewer than max_epochs done, and fewer stale epochs (no lower
    val_loss) than `patience`; under the original protocol, not more than `patience`, as the
    original code (it trains a 16th stale epoch at patience 15)."""
    stale_limit = optim.patience + (optim.protocol == "original")
    return epoch < optim.max_epochs and epochs_since_best < stale_limit


def fit(state: TrainState, config: TrainConfig, splits: dict, runtime, on_epoch_end) -> None:
    """Epochs while keeps_training (max_epochs, `patience` epochs without a lower val_loss);
    the best weights are kept in `state.best_weights`. on_epoch_end(state) runs after every
    epoch (checkpoint)."""
    train, val = DeviceImages.of(splits["train"], runtime), DeviceImages.of(splits["val"], runtime)
    with distributed.data_parallel(state.model) as trained:
        forward = runtime.compiled(state.model)
        train_forward = forward if trained is state.model else runtime.compiled(trained)
        _fit_epochs(state, config, (train, val), runtime, (train_forward, forward), on_epoch_end)


def _fit_epochs(state, config, data, runtime, forwards, on_epoch_end) -> None:
    classes = config.data.schema().classes
    (train, val), (train_forward, forward) = data, forwards
    optim, original = config.optim, config.optim.protocol == "original"
    while keeps_training(state.epoch, state.epochs_since_best, optim):
        started = time.perf_counter()
        train_loss = train_one_epoch(
            state, train, optim.batch_size, runtime, train_forward, optim.protocol
        )
        train_seconds = time.perf_counter() - started
        # Every rank evaluates the whole validation split; rank 0's loss decides for all.
        val_loss, val_metrics, _ = evaluate_split(
            state.model, val, classes, runtime, optim.batch_size, forward, loss_per_batch=original
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
