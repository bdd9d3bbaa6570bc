"""Datasets described by cards: small YAML/JSON files naming the label files and their columns
(docs/datasets.md). The two datasets of the study (NIH-CXR-LT and MIMIC-CXR-LT, MICCAI 2023)
are cards shipped with the package (prunecxr/data/cards/); `--dataset` takes their names or the
path of any other card."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd
import yaml

from prunecxr import PrunecxrError

SPLITS = ("train", "val", "test")
BUILTIN = ("nih-cxr-lt", "mimic-cxr-lt")
CARD_SUFFIXES = (".yaml", ".yml", ".json")
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")
_FIELDS = {
    "name": "a short name: lower-case letters, digits, '.', '_' and '-'",
    "label_files": "the label CSV of each split (train, val, test), relative to --label-dir",
    "image_column": "the column holding each image's path, relative to --data-dir/image_root",
    "image_root": "a folder under --data-dir the image paths are relative to (default: none)",
    "classes": "the class columns, in order",
    "all_columns_except": "instead of classes: every column of the train file but these",
    "normal_class": "a class that excludes all others (as 'No Finding'); optional",
    "patient_column": "a column naming each image's patient: no patient may be in two splits",
    "label_values": "cell text read as 0 or 1 before the check (e.g. {'-1': 1, '': 0})",
    "image_suffix": "the image file suffix `synth` writes (default .png)",
}


@dataclass(frozen=True)
class DatasetSchema:
    """How one dataset's label files look: file names, the image column and the class columns."""

    name: str
    image_column: str
    classes: tuple[str, ...]
    image_suffix: str = ".png"  # what the synthetic generator writes; readers take PNG and JPEG
    label_files: tuple[tuple[str, str], ...] = ()  # (split, file name); empty: the study's names
    image_root: str = ""
    normal_class: str | None = None
    patient_column: str | None = None
    label_values: tuple[tuple[str, float], ...] = ()  # (cell text, 0 or 1)
    all_columns_except: tuple[str, ...] = ()  # classes = the train file's other columns
    card: str = ""  # the card's path, for messages ("" for a built-in dataset)

    def label_file(self, split: str) -> str:
        if split not in SPLITS:
            raise PrunecxrError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return dict(self.label_files).get(split, f"miccai2023_{self.name}_labels_{split}.csv")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def with_classes_from(self, label_dir: Path) -> DatasetSchema:
        """A card giving `all_columns_except`: its classes read from the train file's header."""
        if self.classes:
            return self
        path = Path(label_dir) / self.label_file("train")
        if not path.is_file():
            raise PrunecxrError(f"label file not found: {path} (card {self.card}, label_files)")
        header = pd.read_csv(path, nrows=0).columns
        left_out = {self.image_column, self.patient_column, *self.all_columns_except}
        classes = [column for column in header if column not in left_out]
        fail = functools.partial(_field_error, f"{self.card} (with {path})")
        if not classes:
            raise fail("all_columns_except", "leaves no class column")
        _check_classes(classes, self.normal_class, "all_columns_except", fail)
        return dataclasses.replace(self, classes=tuple(classes))


def is_card_path(dataset: str) -> bool:
    return str(dataset).lower().endswith(CARD_SUFFIXES)


def get_schema(dataset: str, label_dir: Path | str | None = None) -> DatasetSchema:
    """A built-in dataset by name, or the card at path `dataset`; with `label_dir`, a card's
    `all_columns_except` is resolved from the train file there."""
    if is_card_path(dataset):
        schema = load_card(Path(dataset))
    elif dataset in BUILTIN:
        schema = _builtin(dataset)
    else:
        raise PrunecxrError(
            f"unknown dataset {dataset!r}; valid: {', '.join(BUILTIN)}, or the path of a card "
            f"({'/'.join(CARD_SUFFIXES)}; docs/datasets.md)"
        )
    return schema if label_dir is None else schema.with_classes_from(Path(label_dir))


def card_key(dataset: str) -> str:
    """What a key records of `dataset`: a built-in's name; for a card, its name and a digest of
    its text (the same card anywhere is the same dataset; an edited card is another)."""
    if not is_card_path(dataset):
        return dataset
    path = Path(dataset)
    digest = hashlib.sha256(_card_bytes(path)).hexdigest()[:16]
    return f"{load_card(path).name}@{digest}"


def _builtin(name: str) -> DatasetSchema:
    text = resources.files("prunecxr.data").joinpath("cards", f"{name}.yaml").read_text()
    return _schema_from(yaml.safe_load(text), f"built-in card {name}")


def load_card(path: Path) -> DatasetSchema:
    """Read and check a card; every error names the card and the field."""
    text = _card_bytes(path).decode()
    try:
        values = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise PrunecxrError(f"{path}: not valid {path.suffix[1:].upper()}: {error}") from None
    return dataclasses.replace(_schema_from(values, str(path)), card=str(path))


def _card_bytes(path: Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise PrunecxrError(f"dataset card {path}: {error.strerror}") from None


def _field_error(card: str, field: str, problem: str) -> PrunecxrError:
    return PrunecxrError(f"{card}: field {field!r}: {problem} ({_FIELDS[field]})")


def _check_classes(classes: list[str], normal: str | None, field: str, fail) -> None:
    """Class names that make distinct metric names and do not clash with the prediction
    tables' own columns; the normal class among them."""
    slugs = [class_slug(c) for c in classes]
    if len(set(slugs)) != len(slugs):
        repeated = next(c for c, slug in zip(classes, slugs) if slugs.count(slug) > 1)
        raise fail(field, f"{repeated!r} is listed twice (or as another spelling)")
    reserved = [c for c in classes if c == "image" or c.startswith("label_")]
    if reserved:
        raise fail(field, f"a class may not be named {reserved[0]!r} (a prediction table's column)")
    if normal is not None and normal not in classes:
        raise fail("normal_class", f"{normal!r} is not one of the classes")


def _schema_from(values, card: str) -> DatasetSchema:
    fail = functools.partial(_field_error, card)
    if not isinstance(values, dict):
        raise PrunecxrError(f"{card}: a card is a mapping of fields: {', '.join(_FIELDS)}")
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise PrunecxrError(f"{card}: unknown field {unknown[0]!r}; fields: {', '.join(_FIELDS)}")
    for field in ("name", "label_files", "image_column"):
        if values.get(field) in (None, ""):
            raise fail(field, "missing")
    name = values["name"]
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise fail("name", f"{name!r} is not a valid name")
    files = values["label_files"]
    if not isinstance(files, dict) or sorted(files) != sorted(SPLITS):
        raise fail("label_files", f"needs exactly {', '.join(SPLITS)}; got {files!r}")
    for key in ("image_column", "image_root", "normal_class", "patient_column", "image_suffix"):
        if values.get(key) is not None and not isinstance(values[key], str):
            raise fail(key, f"{values[key]!r} is not text")
    classes = _text_list(values, "classes", fail)
    excluded = _text_list(values, "all_columns_except", fail)
    if bool(classes) == ("all_columns_except" in values):
        raise fail("classes", "give either classes or all_columns_except")
    normal = values.get("normal_class")
    if classes:
        _check_classes(classes, normal, "classes", fail)
    root = Path(values.get("image_root") or "")
    if root.is_absolute() or ".." in root.parts:
        raise fail("image_root", f"{str(root)!r} leaves --data-dir")
    return DatasetSchema(
        name=name,
        image_column=values["image_column"],
        classes=tuple(classes),
        image_suffix=values.get("image_suffix", ".png"),
        label_files=tuple((split, str(files[split])) for split in SPLITS),
        image_root=values.get("image_root") or "",
        normal_class=normal,
        patient_column=values.get("patient_column"),
        label_values=_label_values(values.get("label_values") or {}, fail),
        all_columns_except=tuple(excluded),
    )


def _text_list(values: dict, field: str, fail) -> list[str]:
    items = values.get(field) or []
    if not isinstance(items, list) or not all(isinstance(item, str) and item for item in items):
        raise fail(field, f"{items!r} is not a list of names")
    return items


def _label_values(mapping, fail) -> tuple[tuple[str, float], ...]:
    if not isinstance(mapping, dict) or any(
        isinstance(v, bool) or v not in (0, 1) for v in mapping.values()
    ):
        raise fail("label_values", f"{mapping!r} does not map cell text to 0 or 1")
    unquoted = [key for key in mapping if isinstance(key, bool) or key is None]
    if unquoted:  # YAML reads yes/no/on/off/null as booleans and None
        raise fail("label_values", f"quote the cell text {unquoted[0]!r} (YAML read it as such)")
    return tuple((cell_text(key), float(value)) for key, value in mapping.items())


def cell_text(value) -> str:
    """How a label cell reads as text: -1.0 and -1 alike, an empty cell as ''."""
    if value is None:
        return ""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value).strip()
    return "" if number != number else f"{number:g}"


def class_slug(name: str) -> str:
    """Metric-name form of a class: lower case, non-alphanumerics -> '_' ('Subcutaneous Emphysema'
    -> 'subcutaneous_emphysema')."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
