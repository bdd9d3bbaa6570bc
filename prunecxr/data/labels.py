"""Reading label CSVs as a dataset's card describes them: one row per image, an image column and
0/1 class columns (cell text mapped to 0/1 first where the card says so)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from prunecxr import PrunecxrError
from prunecxr.data.schemas import SPLITS, DatasetSchema, cell_text


@dataclass(frozen=True)
class LabelTable:
    """image_ids: file names/paths relative to the data dir; labels: (N, C) float32 0/1."""

    path: Path
    image_ids: tuple[str, ...]
    labels: np.ndarray


def read_labels(schema: DatasetSchema, label_dir: Path, split: str) -> LabelTable:
    """Read the split's label file (`miccai2023_<dataset>_labels_<split>.csv` for the study's
    datasets), selecting the class columns by name so extra columns (subj_id, subject_id,
    study_id, ...) and column order do not matter. A card naming a patient column is refused
    when a patient is in two splits."""
    schema = schema.with_classes_from(label_dir)
    path = Path(label_dir) / schema.label_file(split)
    if not path.is_file():
        raise PrunecxrError(f"label file not found: {path}")
    if schema.patient_column:
        check_patients(schema, Path(label_dir))
    # Cells the card names (e.g. "NA") stay text; only an empty cell is missing.
    text = dict(keep_default_na=False, na_values=[""]) if schema.label_values else {}
    frame = pd.read_csv(path, **text)
    wanted = [schema.image_column, *schema.classes]
    missing = [column for column in wanted if column not in frame.columns]
    if missing:
        raise PrunecxrError(f"{path}: missing column(s) {', '.join(map(repr, missing))}")
    if frame.empty:
        raise PrunecxrError(f"{path}: no rows")
    labels = frame[list(schema.classes)]
    if schema.label_values:
        mapping = dict(schema.label_values)
        labels = labels.apply(lambda column: column.map(lambda c: mapping.get(cell_text(c), c)))
    _check_binary(path, labels)
    labels = labels.apply(pd.to_numeric)
    image_ids = frame[schema.image_column]
    if image_ids.isna().any():
        row = int(np.flatnonzero(image_ids.isna().to_numpy())[0])
        raise PrunecxrError(f"{path}: line {row + 2}: empty {schema.image_column!r}")
    image_ids = image_ids.astype(str)
    _check_image_ids(path, schema.image_column, image_ids)
    return LabelTable(path, tuple(image_ids), np.array(labels.to_numpy(dtype=np.float32)))


def _check_image_ids(path: Path, column: str, image_ids: pd.Series) -> None:
    """Each image once, and inside the data dir: an absolute path or a `..` would read (and
    cache) files the user never pointed us at."""
    repeated = image_ids.duplicated().to_numpy()
    if repeated.any():
        image_id = image_ids.iat[int(repeated.argmax())]
        lines = np.flatnonzero((image_ids == image_id).to_numpy()) + 2  # header = line 1
        raise PrunecxrError(
            f"{path}: {column} {image_id!r} is listed more than once (lines "
            f"{', '.join(map(str, lines))}); each image once"
        )
    for row, image_id in enumerate(image_ids):
        relative = Path(image_id)
        if relative.is_absolute() or ".." in relative.parts:
            raise PrunecxrError(
                f"{path}: line {row + 2}: {column} {image_id!r} leaves the data dir; image "
                f"paths must be relative to it, without '..'"
            )


def _check_binary(path: Path, labels: pd.DataFrame) -> None:
    """Reject anything but 0/1 with the first offending line (header = line 1)."""
    numeric = labels.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    bad = ~np.isin(numeric, [0.0, 1.0])
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        value = labels.iat[row, col]  # a numpy scalar shown as a plain number
        raise PrunecxrError(
            f"{path}: line {row + 2}, column {labels.columns[col]!r}: "
            f"label {getattr(value, 'item', lambda: value)()!r} is not 0 or 1"
        )


def check_patients(schema: DatasetSchema, label_dir: Path) -> None:
    """No patient in two splits (their images would leak from training into testing)."""
    column, seen = schema.patient_column, {}
    for split in SPLITS:
        path = label_dir / schema.label_file(split)
        if not path.is_file():
            continue
        frame = pd.read_csv(path, usecols=lambda name: name == column, dtype=str)
        if column not in frame.columns:
            raise PrunecxrError(f"{path}: missing column {column!r} (card {schema.card})")
        for patient in frame[column].dropna().unique():
            if seen.setdefault(patient, split) != split:
                raise PrunecxrError(
                    f"{path}: patient {patient!r} ({column}) is also in the "
                    f"{seen[patient]} split; a patient's images belong to one split"
                )
