"""Data layer: label schemas, the decode-once image cache, batch transforms, synthetic data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prunecxr.data.cache import DEFAULT_CACHE_DIR, load_images
from prunecxr.data.labels import read_labels
from prunecxr.data.schemas import SPLITS, DatasetSchema, class_slug, get_schema

__all__ = ["SPLITS", "DatasetSchema", "SplitData", "class_slug", "get_schema", "load_split"]


@dataclass(frozen=True)
class SplitData:
    """One split: images (N, S, S) uint8 (memory-mapped), labels (N, C) float32 0/1."""

    image_ids: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.image_ids)


def load_split(
    schema: DatasetSchema,
    data_dir: Path,
    label_dir: Path,
    split: str,
    image_size: int,
    *,
    cache_dir: Path = DEFAULT_CACHE_DIR,
    num_workers: int = 0,
    preprocess: str = "default",
) -> SplitData:
    """One split's labels and cached images; `preprocess` is how pixels are made (cache.py)."""
    table = read_labels(schema, label_dir, split)
    image_paths = [Path(data_dir) / image_id for image_id in table.image_ids]
    images = load_images(
        table.path,
        image_paths,
        image_size,
        cache_dir=cache_dir,
        num_workers=num_workers,
        preprocess=preprocess,
    )
    return SplitData(table.image_ids, images, table.labels)
