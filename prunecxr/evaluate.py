"""Batched inference over cached uint8 images and the paper's per-class metrics (AUC, AP, F1)."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch
from scipy.special import expit
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
from torch import nn
from tqdm import tqdm

from prunecxr.data.schemas import class_slug
from prunecxr.data.transforms import normalize
from prunecxr.device_data import DeviceImages
from prunecxr.runtime import Runtime

F1_THRESHOLD = 0.5


def predict_logits(model: nn.Module, images: np.ndarray | DeviceImages, **options) -> np.ndarray:
    """images: (N, S, S) uint8 -> (N, C) float32 logits: device_logits (same `options`) as a
    numpy array."""
    return device_logits(model, images, **options)[0].numpy()


@torch.inference_mode()
def device_logits(
    model: nn.Module,
    images: np.ndarray | DeviceImages,
    *,
    runtime: Runtime,
    batch_size: int = 256,
    progress: str | None = None,
    forward: nn.Module | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """-> (logits (N, C) float32 on the CPU, seconds of each full batch's forward pass). Logits
    stay on the device until the pass ends (one copy back, no sync per batch); the forward
    passes are timed with CUDA events on a GPU. `forward`: the module to call (e.g. compiled).
    A compiled runtime pads a short last batch to `batch_size` (images are independent in
    eval mode): one static shape, one graph for every batch."""
    if not isinstance(images, DeviceImages):
        images = DeviceImages(images, runtime)
    model.eval()
    forward = model if forward is None else forward
    outputs, timers = [], []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None, leave=False):
        chunk = images.slice(start, start + batch_size)
        short = batch_size - len(chunk)
        if short and runtime.compile:
            chunk = torch.cat([chunk, chunk.new_zeros((short, *chunk.shape[1:]))])
        batch = runtime.place_batch(normalize(chunk.unsqueeze(1)))
        timer = Stopwatch(runtime) if len(chunk) == batch_size else None
        with runtime.autocast():
            outputs.append(forward(batch)[: batch_size - short].float())
        if timer:
            timers.append(timer.stop())
    logits = torch.cat(outputs).cpu()
    return logits, [timer.seconds() for timer in timers]


class Stopwatch:
    """Times device work without waiting for it: CUDA events on a GPU, perf_counter on a CPU
    (where the work is done when the call returns)."""

    def __init__(self, runtime: Runtime):
        self.cuda = runtime.on_cuda
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(True), torch.cuda.Event(True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self) -> Stopwatch:
        if self.cuda:
            self.end.record()
        else:
            self.end = time.perf_counter()
        return self

    def seconds(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.begin.elapsed_time(self.end) / 1000
        return self.end - self.begin


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return expit(logits)


def per_class_metrics(
    probs: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]
) -> pd.DataFrame:
    """probs, labels: (N, C) -> one row per class: class, slug, n_pos, auc, ap, f1 (F1 at 0.5).
    AUC and AP are NaN for a class with no positives or no negatives in `labels`."""
    rows = []
    for c, name in enumerate(classes):
        y, p = labels[:, c], probs[:, c]
        defined = 0 < y.sum() < len(y)
        rows.append(
            {
                "class": name,
                "slug": class_slug(name),
                "n_pos": int(y.sum()),
                "auc": roc_auc_score(y, p) if defined else np.nan,
                "ap": average_precision_score(y, p) if defined else np.nan,
                "f1": f1_score(y, p >= F1_THRESHOLD, zero_division=0.0),
            }
        )
    return pd.DataFrame(rows)


def summarize(metrics: pd.DataFrame, prefix: str) -> dict[str, float]:
    """Means over classes (mAUC, mAP, mF1) plus per-class values, named as in the design:
    `<prefix>_mAUC`, `<prefix>_auc_<slug>`, ..."""
    summary = {
        f"{prefix}_mAUC": float(metrics.auc.mean()),
        f"{prefix}_mAP": float(metrics.ap.mean()),
        f"{prefix}_mF1": float(metrics.f1.mean()),
    }
    for row in metrics.itertuples():
        for metric in ("auc", "ap", "f1"):
            summary[f"{prefix}_{metric}_{row.slug}"] = float(getattr(row, metric))
    return summary


def predictions_frame(
    image_ids: tuple[str, ...], probs: np.ndarray, labels: np.ndarray, classes: tuple[str, ...]
) -> pd.DataFrame:
    """One row per image: `image`, one probability column per class (class name), and the true
    labels as `label_<slug>` columns."""
    frame = pd.DataFrame(probs, columns=list(classes))
    frame.insert(0, "image", list(image_ids))
    true = pd.DataFrame(labels.astype(np.int8), columns=[f"label_{class_slug(c)}" for c in classes])
    return pd.concat([frame, true], axis=1)


def example_input(images: np.ndarray) -> np.ndarray:
    """(1, 3, S, S) float32: the first image as the model sees it (for MLflow's signature)."""
    return normalize(torch.from_numpy(np.array(images[:1])).unsqueeze(1)).numpy()
