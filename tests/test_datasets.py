"""Datasets described by cards: the two built-in ones unchanged, any other card read, checked and
synthesized (docs/datasets.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from prunecxr import PrunecxrError
from prunecxr.data import get_schema, load_split
from prunecxr.data.labels import read_labels
from prunecxr.data.synthetic import write_synthetic, zipf_card
from prunecxr.models import create_model, head_of
from prunecxr.sources import rebuild_model
from prunecxr.specs import TrainConfig, train_key
from prunecxr.stages.study import demo_config, study_key

SIZES = {"train": 20, "val": 10, "test": 10}
# Computed by the code before datasets became cards (43172a6): the same synthetic bytes and keys,
# hence the same image caches (keyed by the label file's bytes and the image paths) and runs.
BEFORE = {
    "nih-cxr-lt": (
        "f454ae7bbc9c5470482dc1a43f4a6553b0822f3479f1f9952919493aa302eda7",
        "78f9b5c4da9fb4ea",
        "5974fdabcc562cd9",
    ),
    "mimic-cxr-lt": (
        "bc26d0b136d502b67f9c8c859f76dbd0db9f406f0c41a72cf9e9afda7078ea22",
        "c2bbfa6a5019de33",
        "4a55827878db9eed",
    ),
}


def _digest(directory: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(path.relative_to(directory).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_built_in_datasets_keep_their_data_and_keys(name, tmp_path):
    data, train, study = BEFORE[name]
    write_synthetic(get_schema(name), tmp_path / name, SIZES, image_size=16, seed=3)
    assert _digest(tmp_path / name) == data
    assert train_key(TrainConfig.from_flat(dataset=name, data_dir="/d", label_dir="/d")) == train
    assert study_key(demo_config(Path("/demo"), name)) == study


def test_a_card_is_keyed_by_its_content_not_its_place(tmp_path):
    card = zipf_card(tmp_path / "a", 3)
    moved = tmp_path / "b" / "card.yaml"
    moved.parent.mkdir()
    moved.write_text(card.read_text())
    keys = [
        train_key(TrainConfig.from_flat(dataset=str(path), data_dir="/d", label_dir="/d"))
        for path in (card, moved)
    ]
    assert keys[0] == keys[1]
    moved.write_text(card.read_text().replace("class_1", "class_one"))
    edited = train_key(TrainConfig.from_flat(dataset=str(moved), data_dir="/d", label_dir="/d"))
    assert edited != keys[0]


GOOD = {
    "name": "toy",
    "label_files": {"train": "train.csv", "val": "val.csv", "test": "test.csv"},
    "image_column": "image",
    "classes": ["A", "B"],
}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"name": None}, "name"),
        ({"name": "Toy Set"}, "name"),
        ({"label_files": {"train": "t.csv", "test": "s.csv"}}, "label_files"),
        ({"image_column": 3}, "image_column"),
        ({"classes": None}, "classes"),
        ({"all_columns_except": ["x"]}, "classes"),
        ({"classes": ["A", "a"]}, "classes"),
        ({"normal_class": "Normal"}, "normal_class"),
        ({"label_values": {"-1": 2}}, "label_values"),
        ({"image_root": "../elsewhere"}, "image_root"),
        ({"classes": ["image", "B"]}, "classes"),
    ],
)
def test_a_bad_card_is_one_line_naming_its_field(change, field, tmp_path):
    card = tmp_path / "card.json"
    card.write_text(json.dumps({k: v for k, v in {**GOOD, **change}.items() if v is not None}))
    with pytest.raises(PrunecxrError, match=rf"^{card}: field '{field}': ") as error:
        get_schema(str(card))
    assert "\n" not in str(error.value)


def test_a_card_that_is_not_a_card(tmp_path):
    card = tmp_path / "card.yaml"
    card.write_text("name: [unclosed\n")
    with pytest.raises(PrunecxrError, match="card.yaml: not valid YAML"):
        get_schema(str(card))
    card.write_text(yaml.safe_dump({**GOOD, "colour": "red"}))
    with pytest.raises(PrunecxrError, match="unknown field 'colour'"):
        get_schema(str(card))
    card.write_text(yaml.safe_dump(GOOD) + "label_values: {yes: 1, no: 0}\n")
    with pytest.raises(PrunecxrError, match="'label_values': quote the cell text True"):
        get_schema(str(card))
    with pytest.raises(PrunecxrError, match="dataset card .*missing.yaml: No such file"):
        get_schema(str(tmp_path / "missing.yaml"))


def _labels(directory: Path, split: str, rows: list[dict]) -> None:
    pd.DataFrame(rows).to_csv(directory / f"{split}.csv", index=False)


def test_columns_values_and_patients_as_the_card_says(tmp_path):
    """Classes from the train file's header, CheXpert-style cells (-1: uncertain, blank: not
    mentioned) mapped to 0/1, and a patient in two splits refused."""
    card = tmp_path / "card.yaml"
    card.write_text(
        yaml.safe_dump(
            {
                **{k: v for k, v in GOOD.items() if k != "classes"},
                "all_columns_except": ["Sex"],
                "patient_column": "patient",
                "label_values": {"-1": 1, "": 0},
            }
        )
    )
    row = {"image": "a.png", "patient": "p1", "Sex": "F", "A": 1, "B": -1}
    _labels(tmp_path, "train", [row, {**row, "image": "b.png", "A": None, "B": 0}])
    _labels(tmp_path, "val", [{**row, "image": "c.png", "patient": "p2"}])
    _labels(tmp_path, "test", [{**row, "image": "d.png", "patient": "p3"}])
    schema = get_schema(str(card), tmp_path)
    assert schema.classes == ("A", "B")
    assert read_labels(schema, tmp_path, "train").labels.tolist() == [[1, 1], [0, 0]]
    _labels(tmp_path, "test", [{**row, "image": "d.png", "patient": "p1"}])
    with pytest.raises(
        PrunecxrError, match=r"test.csv: patient 'p1' \(patient\) is also in the train"
    ):
        read_labels(schema, tmp_path, "val")


def test_every_column_but_the_image_and_na_as_text(tmp_path):
    """`all_columns_except: []`: every column but the image's is a class; a card mapping "NA"
    reads it as text, not as pandas' missing value."""
    card = tmp_path / "card.yaml"
    values = {k: v for k, v in GOOD.items() if k != "classes"}
    card.write_text(yaml.safe_dump({**values, "all_columns_except": []}))
    for split in ("train", "val", "test"):
        _labels(tmp_path, split, [{"image": f"{split}.png", "A": 1, "label_x": 0}])
    with pytest.raises(
        PrunecxrError, match="'all_columns_except': a class may not be named 'label_x'"
    ):
        get_schema(str(card), tmp_path)
    for split in ("train", "val", "test"):
        _labels(tmp_path, split, [{"image": f"{split}.png", "A": 1, "B": "NA"}])
    assert get_schema(str(card), tmp_path).classes == ("A", "B")
    card.write_text(yaml.safe_dump({**values, "all_columns_except": [], "label_values": {"NA": 0}}))
    assert read_labels(get_schema(str(card)), tmp_path, "test").labels.tolist() == [[1, 0]]


def test_a_logged_model_rebuilds_without_its_card(tmp_path):
    """The classes are counted from the weights: a card moved or gone does not matter."""
    state = create_model("resnet18", 7).state_dict()
    settings = {"arch": "resnet18", "dataset": str(tmp_path / "gone.yaml"), "image_size": "32"}
    assert head_of(rebuild_model(settings, state)).out_features == 7


def test_synth_writes_a_card_s_layout_that_reads_back(tmp_path):
    """The README's example card: its label files, -1 and blank cells, images where the card
    says; read back, the written labels."""
    schema = get_schema(str(Path(__file__).parents[1] / "examples" / "chexpert.yaml"))
    summary = write_synthetic(schema, tmp_path, SIZES, image_size=16, seed=0)
    raw = pd.read_csv(tmp_path / "CheXpert-v1.0-small" / "train.csv")
    assert list(raw.columns) == ["Path", *schema.classes]
    cells = raw[list(schema.classes)]
    assert (cells == -1).any().any() and cells.isna().any().any()
    split = load_split(schema, tmp_path, tmp_path, "train", 16, cache_dir=tmp_path / "cache")
    assert split.labels.sum(axis=0).tolist() == list(summary["splits"]["train"].values())
    normal = schema.classes.index("No Finding")
    assert (split.labels[split.labels[:, normal] == 1].sum(axis=1) == 1).all()


def test_a_zipf_set_has_its_long_tail(tmp_path):
    card = zipf_card(tmp_path, 60)
    schema = get_schema(str(card))
    sizes = {"train": 3000, "val": 300, "test": 300}
    counts = write_synthetic(schema, tmp_path, sizes, image_size=8, zipf=1.0)["splits"]["train"]
    counts = np.array(list(counts.values()))
    assert counts[0] == pytest.approx(0.3 * 3000, rel=0.15)
    assert counts[9] == pytest.approx(0.03 * 3000, rel=0.3)
    assert (counts >= 5).all() and np.corrcoef(np.log(counts), -np.log(np.arange(1, 61)))[
        0, 1
    ] > 0.9
