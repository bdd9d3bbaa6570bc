"""The synthetic generator: real file formats, long-tailed co-occurring labels, determinism."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from prunecxr import PrunecxrError
from prunecxr.data import get_schema
from prunecxr.data.labels import read_labels
from prunecxr.data.synthetic import (
    MARKER_FILE,
    sample_labels,
    train_prevalence,
    write_synthetic,
)

NIH = get_schema("nih-cxr-lt")
MIMIC = get_schema("mimic-cxr-lt")


def _digest(directory) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def test_nih_files_match_the_real_format(tiny_nih):
    frame = pd.read_csv(tiny_nih / "miccai2023_nih-cxr-lt_labels_train.csv")
    assert list(frame.columns) == ["id", "subj_id", *NIH.classes]
    assert frame["id"].str.fullmatch(r"\d{8}_\d{3}\.png").all()
    assert all((tiny_nih / image_id).is_file() for image_id in frame["id"])


def test_mimic_files_match_the_real_format(tiny_mimic):
    frame = pd.read_csv(tiny_mimic / "miccai2023_mimic-cxr-lt_labels_test.csv")
    assert {"dicom_id", "subject_id", "study_id", "path"} <= set(frame.columns)
    assert frame["path"].str.fullmatch(r"files/p1\d/p1\d{7}/s5\d{7}/[\w-]+\.jpg").all()
    assert all((tiny_mimic / path).is_file() for path in frame["path"])
    assert read_labels(MIMIC, tiny_mimic, "test").labels.shape == (64, 19)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    sizes = {"train": 20, "val": 10, "test": 10}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        write_synthetic(NIH, tmp_path / name, sizes, image_size=16, seed=seed)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


@pytest.mark.parametrize("schema", [NIH, MIMIC], ids=lambda s: s.name)
def test_labels_follow_the_real_long_tail(schema):
    labels = sample_labels(schema, train_prevalence(schema), 40_000, 5, np.random.default_rng(0))
    counts = labels.sum(axis=0)
    rho, _ = spearmanr(counts, train_prevalence(schema))
    assert rho > 0.95
    nf = schema.classes.index("No Finding")
    assert (labels[labels[:, nf] == 1].sum(axis=1) == 1).all()  # No Finding excludes the rest
    assert (labels.sum(axis=1) >= 1).all()
    assert labels[:, nf].mean() == pytest.approx(train_prevalence(schema)[nf], abs=0.02)


def test_findings_co_occur():
    labels = sample_labels(NIH, train_prevalence(NIH), 40_000, 5, np.random.default_rng(0))
    emphysema = labels[:, NIH.classes.index("Emphysema")] == 1
    subcutaneous = labels[:, NIH.classes.index("Subcutaneous Emphysema")] == 1
    assert subcutaneous[emphysema].mean() > 3 * subcutaneous.mean()


def test_every_class_has_positives_in_small_splits():
    labels = sample_labels(NIH, train_prevalence(NIH), 200, 5, np.random.default_rng(0))
    assert (labels.sum(axis=0) >= 5).all()


def test_refuses_to_overwrite_without_flag(tmp_path):
    sizes = {"train": 10, "val": 10, "test": 10}
    write_synthetic(NIH, tmp_path, sizes, image_size=16)
    with pytest.raises(PrunecxrError, match="already holds 34 of the files .* --overwrite"):
        write_synthetic(NIH, tmp_path, sizes, image_size=16)
    write_synthetic(NIH, tmp_path, sizes, image_size=16, seed=5, overwrite=True)


def test_an_image_folder_is_never_overwritten(tmp_path):
    """Real NIH file names: pointed at a folder of radiographs without label files, synth
    must refuse rather than replace one."""
    radiograph = tmp_path / "00000003_000.png"
    radiograph.write_bytes(b"a real radiograph")
    with pytest.raises(PrunecxrError, match="already holds 1 of the files .*00000003_000.png"):
        write_synthetic(NIH, tmp_path, {"train": 5, "val": 5, "test": 5}, image_size=16)
    assert radiograph.read_bytes() == b"a real radiograph"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000003_000.png"]


def test_every_finding_has_a_sign_of_its_own_subtler_when_rarer():
    """No look-alikes (a common sign's shape and polarity a little apart): rare classes are rare,
    not hidden. Rarer findings have smaller and fainter signs, within +-10 % of SIGN_CONTRAST."""
    from prunecxr.data.synthetic import SIGN_CONTRAST, create_signs

    by_name = create_signs(NIH, train_prevalence(NIH), np.random.default_rng(0))
    signs = list(by_name.values())
    assert len(signs) == len(NIH.classes) - 1
    for i, a in enumerate(signs):
        for b in signs[i + 1 :]:
            alike = a.shape == b.shape and np.sign(a.contrast) == np.sign(b.contrast)
            assert not (alike and np.hypot(a.x - b.x, a.y - b.y) < 0.15)
    assert all(0.9 * SIGN_CONTRAST <= abs(s.contrast) <= 1.1 * SIGN_CONTRAST for s in signs)
    prevalence = dict(zip(NIH.classes, train_prevalence(NIH)))
    commonest_first = sorted(by_name, key=lambda name: -prevalence[name])
    radii = [by_name[name].radius for name in commonest_first]
    contrasts = [abs(by_name[name].contrast) for name in commonest_first]
    assert radii == sorted(radii, reverse=True) and radii[0] > radii[-1]
    assert contrasts == sorted(contrasts, reverse=True) and contrasts[0] > contrasts[-1]
    assert "No Finding" not in by_name


def test_the_demo_reuses_its_data_and_refuses_another_seeds_or_an_older_recipe(tmp_path):
    from prunecxr.stages.study import DEMO_SPLIT_SIZES, ensure_demo_data

    demo = tmp_path / "demo"
    ensure_demo_data(demo, "nih-cxr-lt", seed=0)
    assert len(list(demo.glob("*.png"))) == sum(DEMO_SPLIT_SIZES.values())
    before = _digest(demo)
    ensure_demo_data(demo, "nih-cxr-lt", seed=0)
    assert _digest(demo) == before
    with pytest.raises(PrunecxrError, match="seed 0, not 1"):
        ensure_demo_data(demo, "nih-cxr-lt", seed=1)
    # A marker of a prunecxr before split sizes and minimum positives were recorded.
    marker = demo / MARKER_FILE
    summary = json.loads(marker.read_text())
    marker.write_text(json.dumps({k: v for k, v in summary.items() if k != "min_positives"}))
    with pytest.raises(PrunecxrError, match="older prunecxr \\(another minimum positives\\)"):
        ensure_demo_data(demo, "nih-cxr-lt", seed=0)
    # Data an older demo drew (here: small, 16 px, the generator's default minimum positives).
    older = tmp_path / "older"
    write_synthetic(NIH, older, {"train": 30, "val": 10, "test": 10}, image_size=16, seed=0)
    before = _digest(older)
    message = "older prunecxr \\(another image size, split sizes, minimum positives\\)"
    with pytest.raises(PrunecxrError, match=message):
        ensure_demo_data(older, "nih-cxr-lt", seed=0)
    assert _digest(older) == before
