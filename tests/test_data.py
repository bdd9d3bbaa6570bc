"""Label readers, the decode-once image cache and batch transforms."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from prunecxr import PrunecxrError
from prunecxr.data import class_slug, get_schema, load_split
from prunecxr.data.cache import decode_image, load_images
from prunecxr.data.labels import read_labels
from prunecxr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    augment,
    draw_augmentation,
    normalize,
)

NIH = get_schema("nih-cxr-lt")
MIMIC = get_schema("mimic-cxr-lt")


def _write_label_file(tmp_path, schema, rows: int, **extra_columns) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.integers(0, 2, (rows, schema.num_classes)), columns=schema.classes)
    frame = frame[list(reversed(schema.classes))]  # column order must not matter
    frame.insert(0, schema.image_column, [f"img{i}.png" for i in range(rows)])
    for name, value in extra_columns.items():
        frame[name] = value
    frame.to_csv(tmp_path / schema.label_file("train"), index=False)
    return frame


@pytest.mark.parametrize("schema", [NIH, MIMIC], ids=lambda s: s.name)
def test_read_labels_selects_class_columns_by_name(tmp_path, schema):
    frame = _write_label_file(tmp_path, schema, 5, subj_id=7, study_id=9, subject_id=3)
    table = read_labels(schema, tmp_path, "train")
    assert table.labels.shape == (5, schema.num_classes)
    assert table.labels.dtype == np.float32
    np.testing.assert_array_equal(table.labels, frame[list(schema.classes)].to_numpy())
    assert table.image_ids == tuple(f"img{i}.png" for i in range(5))


def test_schemas_have_the_designs_class_counts_and_order():
    assert NIH.num_classes == 20 and MIMIC.num_classes == 19
    assert NIH.classes[0] == "No Finding" and NIH.classes[-1] == "Pneumomediastinum"
    assert MIMIC.classes[0] == "Support Devices" and MIMIC.classes[7] == "No Finding"
    assert class_slug("Subcutaneous Emphysema") == "subcutaneous_emphysema"
    assert class_slug("Calcification of the Aorta") == "calcification_of_the_aorta"


def test_unknown_dataset_lists_valid_choices():
    with pytest.raises(PrunecxrError, match="nih-cxr-lt, mimic-cxr-lt"):
        get_schema("chexpert")


def test_missing_label_file_is_named(tmp_path):
    with pytest.raises(PrunecxrError, match="miccai2023_nih-cxr-lt_labels_val.csv"):
        read_labels(NIH, tmp_path, "val")


def test_missing_class_column_is_named(tmp_path):
    _write_label_file(tmp_path, NIH, 3)
    path = tmp_path / NIH.label_file("train")
    pd.read_csv(path).drop(columns=["Hernia"]).to_csv(path, index=False)
    with pytest.raises(PrunecxrError, match="missing column.*'Hernia'"):
        read_labels(NIH, tmp_path, "train")


def test_non_binary_label_names_line_column_and_value(tmp_path):
    _write_label_file(tmp_path, NIH, 4)
    path = tmp_path / NIH.label_file("train")
    frame = pd.read_csv(path)
    frame["Mass"] = frame["Mass"].astype(object)
    frame.loc[2, "Mass"] = "maybe"
    frame.to_csv(path, index=False)
    with pytest.raises(PrunecxrError, match=r"line 4, column 'Mass': label 'maybe'"):
        read_labels(NIH, tmp_path, "train")


def test_decode_handles_grey_rgb_png_jpeg_and_16_bit(tmp_path):
    grey = np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "rgb.jpg", quality=100)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    for name in ("grey.png", "rgb.jpg", "deep.png"):
        image = decode_image(tmp_path / name, 32)
        assert image.shape == (32, 32) and image.dtype == np.uint8
        # left-to-right ramp survives decoding and resizing
        assert image[:, 0].mean() < 20 and image[:, -1].mean() > 230, name


def test_undecodable_image_is_named(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(PrunecxrError, match="broken.png"):
        decode_image(tmp_path / "broken.png", 32)


def test_cache_is_built_once_and_keyed_by_content_and_size(tiny_nih, cache_dir):
    first = load_split(NIH, tiny_nih, tiny_nih, "val", 32, cache_dir=cache_dir)
    assert isinstance(first.images, np.memmap) and first.images.shape == (48, 32, 32)
    (cached,) = cache_dir.glob("*.npy")
    built_at = cached.stat().st_mtime_ns
    again = load_split(NIH, tiny_nih, tiny_nih, "val", 32, cache_dir=cache_dir, num_workers=2)
    assert cached.stat().st_mtime_ns == built_at and len(list(cache_dir.glob("*.npy"))) == 1
    np.testing.assert_array_equal(first.images, again.images)
    expected = decode_image(tiny_nih / first.image_ids[3], 32)
    np.testing.assert_array_equal(first.images[3], expected)
    load_split(NIH, tiny_nih, tiny_nih, "val", 16, cache_dir=cache_dir)
    assert len(list(cache_dir.glob("*.npy"))) == 2  # another image size, another cache


def test_changed_image_invalidates_cache(tmp_path, cache_dir):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(np.full((8, 8), 50 * i, np.uint8)).save(paths[-1])
    label_file = tmp_path / "labels.csv"
    label_file.write_text("id\n0.png\n1.png\n2.png\n")
    before = np.array(load_images(label_file, paths, 8, cache_dir=cache_dir))
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(paths[1])
    os.utime(paths[1], ns=(1, 1))  # a new mtime even on coarse-clock file systems
    after = np.array(load_images(label_file, paths, 8, cache_dir=cache_dir))
    assert before[1].max() == 50 and after[1].min() == 255
    np.testing.assert_array_equal(before[[0, 2]], after[[0, 2]])


def test_workers_and_single_process_build_the_same_cache(tiny_mimic, tmp_path):
    one = load_split(MIMIC, tiny_mimic, tiny_mimic, "test", 24, cache_dir=tmp_path / "a")
    two = load_split(
        MIMIC, tiny_mimic, tiny_mimic, "test", 24, cache_dir=tmp_path / "b", num_workers=2
    )
    np.testing.assert_array_equal(one.images, two.images)


def test_normalize_gives_imagenet_statistics_per_channel():
    batch = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    out = normalize(batch)
    assert out.shape == (2, 3, 4, 4)
    for c in range(3):
        assert out[:, c].allclose(torch.tensor((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))


def test_augment_flips_and_rotates_each_image_independently():
    batch = torch.zeros(64, 1, 32, 32, dtype=torch.uint8)
    batch[..., :, :8] = 255  # bright left edge
    out = augment(batch, draw_augmentation(64, torch.Generator().manual_seed(0)))
    assert out.shape == batch.shape and out.dtype == torch.float32
    left, right = out[..., 12:20, :8].mean(dim=(1, 2, 3)), out[..., 12:20, -8:].mean(dim=(1, 2, 3))
    flipped = right > left
    assert 16 < int(flipped.sum()) < 48  # about half are mirrored
    rows = (out[..., :, :16] > 128).float().mean(dim=(1, 3)).squeeze(1)
    assert rows.std(dim=1).max() > 0.05  # rotation tilts the edge: rows differ
    again = augment(batch, draw_augmentation(64, torch.Generator().manual_seed(0)))
    assert torch.equal(out, again)  # same generator state, same augmentation


def _radiograph_like(tmp_path, name: str, dtype=np.uint8, size: int = 300) -> Path:
    """A grey image with fine stripes: where antialiasing and plain bilinear differ."""
    rng = np.random.default_rng(len(name))
    y, x = np.mgrid[0:size, 0:size]
    base = 0.5 + 0.3 * np.sin(x * 1.7) * np.cos(y * 0.9) + 0.1 * rng.random((size, size))
    top = np.iinfo(dtype).max
    path = tmp_path / name
    Image.fromarray((np.clip(base, 0, 1) * top).astype(dtype)).save(path)
    return path


def test_original_preprocess_gives_opencvs_pixels_as_the_original_code(tmp_path, cache_dir):
    """The original's datasets.py: cv2.imread(path) then cv2.resize(x, (256, 256)), defaults
    (3 equal channels of a grey image, INTER_LINEAR without antialiasing)."""
    cv2 = pytest.importorskip("cv2")
    paths = [_radiograph_like(tmp_path, f"{i}.png") for i in range(3)]
    paths.append(_radiograph_like(tmp_path, "deep.png", dtype=np.uint16))  # 16-bit PNG
    Image.open(paths[0]).convert("L").save(tmp_path / "photo.jpg", quality=90)
    paths.append(tmp_path / "photo.jpg")
    label_file = tmp_path / "labels.csv"
    label_file.write_text("id\n" + "\n".join(p.name for p in paths))
    cached = load_images(label_file, paths, 64, cache_dir=cache_dir, preprocess="original")
    for path, pixels in zip(paths, cached):
        expected = cv2.resize(cv2.imread(str(path)), (64, 64))
        assert (expected[..., 0] == expected[..., 2]).all()  # grey: equal channels
        np.testing.assert_array_equal(pixels, expected[..., 0])
    default = load_images(label_file, paths, 64, cache_dir=cache_dir)
    assert np.abs(default[0].astype(int) - cached[0].astype(int)).max() > 10  # antialiased
    assert len(list(cache_dir.glob("*.npy"))) == 2  # one cache each, side by side


def test_unknown_preprocess_lists_the_choices(tmp_path):
    path = _radiograph_like(tmp_path, "a.png")
    with pytest.raises(PrunecxrError, match="default, original"):
        decode_image(path, 32, "bicubic")
