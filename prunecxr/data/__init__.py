"""Data layer: label schemas, the decode-once image cache, batch transforms, synthetic data."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prunecxr import PrunecxrError
from prunecxr.data.cache import DEFAULT_CACHE_DIR, BadImages, load_images
from prunecxr.data.labels import read_labels
from prunecxr.data.schemas import SPLITS, DatasetSchema, class_slug, get_schema

__all__ = ["SPLITS", "DatasetSchema", "SplitData", "class_slug", "get_schema", "load_split"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SplitData:
    """One split: images (N, S, S) uint8 (memory-mapped), labels (N, C) float32 0/1."""

    image_ids: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray
    skipped: int = 0  # unreadable images left out (--skip-bad-images)

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
    skip_bad_images: bool = False,
) -> SplitData:
    """One split's labels and cached images; `preprocess` is how pixels are made (cache.py).
    Unreadable images are an error listing them all, or with `skip_bad_images` left out."""
    table = read_labels(schema, label_dir, split)
    image_ids, labels = table.image_ids, table.labels
    load = dict(cache_dir=cache_dir, num_workers=num_workers, preprocess=preprocess)
    paths = [Path(data_dir) / schema.image_root / image_id for image_id in image_ids]
    try:
        images = load_images(table.path, paths, image_size, **load)
        return SplitData(image_ids, images, labels)
    except BadImages as error:
        if not skip_bad_images:
            raise
        keep = [index for index, path in enumerate(paths) if path not in error.bad]
    if not keep:
        raise PrunecxrError(f"{table.path}: no readable image (all {len(paths)} are bad)")
    skipped = len(paths) - len(keep)
    log.warning("%s: skipping %d unreadable image(s) (--skip-bad-images)", table.path, skipped)
    kept_paths = [paths[index] for index in keep]
    images = load_images(table.path, kept_paths, image_size, **load)
    kept_ids = tuple(image_ids[index] for index in keep)
    return SplitData(kept_ids, images, labels[keep], skipped=skipped)
