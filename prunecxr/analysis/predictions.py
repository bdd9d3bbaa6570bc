"""Predictions of a sweep, gathered into one structure the analyses share.

Sources: the prune runs under a sweep run, or the original study's published prediction files
(`{dataset}_resnet50_seed-{s}_prune-{k}.pkl`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from prunecxr import PrunecxrError
from prunecxr.data import DatasetSchema, class_slug

PRED_FILE = re.compile(
    r"(?P<dataset>[a-z0-9][a-z0-9._-]*)_resnet50_seed-(?P<seed>\d+)_prune-(?P<k>[0-9.]+)\.pkl"
)


@dataclass(frozen=True)
class SweepPredictions:
    """probs[(method, seed, sparsity)]: (N, C) probabilities on the test set; labels: (N, C);
    train_labels: (M, C) labels of the training set (class frequencies, IoU)."""

    schema: DatasetSchema
    image_ids: tuple[str, ...]
    labels: np.ndarray
    train_labels: np.ndarray
    probs: dict[tuple[str, int, float], np.ndarray]

    @property
    def methods(self) -> list[str]:
        return sorted({method for method, _, _ in self.probs})

    def seeds(self, method: str) -> list[int]:
        return sorted({seed for m, seed, _ in self.probs if m == method})

    def sparsities(self, method: str) -> list[float]:
        return sorted({k for m, _, k in self.probs if m == method})

    @property
    def train_counts(self) -> np.ndarray:
        return self.train_labels.sum(axis=0)


def from_prediction_frames(
    schema, frames: dict[tuple[str, int, float], pd.DataFrame], train_labels: np.ndarray
) -> SweepPredictions:
    """Frames from prune runs' predictions.parquet (image, class columns, label_<slug>)."""
    first = next(iter(frames.values()))
    label_columns = [f"label_{class_slug(c)}" for c in schema.classes]
    probs = {key: frame[list(schema.classes)].to_numpy(float) for key, frame in frames.items()}
    return SweepPredictions(
        schema, tuple(first["image"]), first[label_columns].to_numpy(float), train_labels, probs
    )


def read_published_predictions(
    schema: DatasetSchema, preds_dir: Path, *, allow_pickle: bool, method: str = "l1"
) -> SweepPredictions:
    """The original study's test-set files of one pruning `method` (its L1 and random runs
    were written to separate directories): a DataFrame with one probability column per class
    and a `label` column of '|'-joined class names. Its `_val` files are not used (no analysis
    here needs validation predictions). Pickle can run code: only with allow_pickle. Image ids
    are row numbers and train_labels empty: the caller adds both from label files."""
    files = sorted(p for p in Path(preds_dir).glob("*.pkl") if _matches(p, schema))
    if not files:
        raise PrunecxrError(
            f"no {schema.name}_resnet50_seed-<s>_prune-<k>.pkl files in {preds_dir}"
        )
    if not allow_pickle:
        raise PrunecxrError(
            f"{files[0]} is a pickle file, and unpickling can run arbitrary code: pass "
            f"--allow-pickle if you trust {preds_dir}"
        )
    keyed = {_seed_and_sparsity(path): path for path in files}
    _check_grid(set(keyed), preds_dir)
    probs, labels = {}, None
    for (seed, sparsity), path in keyed.items():
        frame = _unpickle(path)
        probs[(method, seed, sparsity)] = frame[list(schema.classes)].to_numpy(float)
        labels = labels if labels is not None else _labels_from_names(frame["label"], schema, path)
    image_ids = tuple(str(i) for i in range(len(labels)))
    return SweepPredictions(schema, image_ids, labels, np.zeros((0, schema.num_classes)), probs)


def _seed_and_sparsity(path: Path) -> tuple[int, float]:
    match = PRED_FILE.fullmatch(path.name)
    return int(match["seed"]), float(match["k"])


def _check_grid(found: set[tuple[int, float]], preds_dir: Path) -> None:
    """Seeds 0..max (the original numbers them so) x every sparsity seen: all must be there."""
    seeds = range(max(seed for seed, _ in found) + 1)
    sparsities = sorted({k for _, k in found})
    missing = [(s, k) for s in seeds for k in sparsities if (s, k) not in found]
    if missing:
        listed = ", ".join(f"seed {s} at {k:g}" for s, k in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise PrunecxrError(
            f"{preds_dir}: {len(missing)} prediction files missing ({listed}{more}); every "
            f"seed 0..{seeds[-1]} needs every sparsity {','.join(f'{k:g}' for k in sparsities)}"
        )


def _matches(path: Path, schema: DatasetSchema) -> bool:
    match = PRED_FILE.fullmatch(path.name)
    return bool(match) and match["dataset"] == schema.name


def _unpickle(path: Path) -> pd.DataFrame:
    # pandas' reader, not pickle.load: the files were written by pandas 1.5, and read_pickle
    # maps that version's internals onto today's.
    frame = pd.read_pickle(path)  # noqa: S301 - guarded by allow_pickle
    if not isinstance(frame, pd.DataFrame) or "label" not in frame.columns:
        raise PrunecxrError(f"{path}: expected a DataFrame with a 'label' column")
    return frame


def _labels_from_names(names: pd.Series, schema: DatasetSchema, path: Path) -> np.ndarray:
    index = {name: c for c, name in enumerate(schema.classes)}
    labels = np.zeros((len(names), schema.num_classes))
    for row, text in enumerate(names):
        for name in filter(None, str(text).split("|")):
            if name not in index:
                raise PrunecxrError(f"{path}: row {row}: unknown class {name!r} in 'label'")
            labels[row, index[name]] = 1
    return labels
