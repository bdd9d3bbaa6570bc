"""The radiologist reader study of PIEs (Holste et al. 2023, Fig. 6), export side: which test
images each reader rates, under which anonymous names, and the VGG Image Annotator 2 (VIA 2)
project that asks the paper's three questions (docs/reader-study.md).

Each reader gets N PIEs and N non-PIEs, no image twice over all readers (as the original's
forms), shuffled, named img-0001... in that order (names unique over readers, so a file name
alone says whose it is). The key (anonymous name -> image) is written apart by the caller."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from prunecxr import PrunecxrError


@dataclass(frozen=True)
class Question:
    """One question, asked as a VIA radio file attribute named `name`."""

    name: str
    text: str
    options: tuple[str, ...]
    original: str  # the attribute's name in the original study's VIA exports
    scale: str  # what the figure's axis says the numbers mean


SCORES = ("1", "2", "3", "4", "5")
QUESTIONS = (
    Question(
        "agree",
        "Do you fully agree with the label?",
        ("yes", "no"),
        "Do you fully agree with the label?",
        "label agreement\n(0 = no, 1 = yes)",
    ),
    Question(
        "quality",
        "How would you rate the image quality? (1 = poor ... 5 = excellent)",
        SCORES,
        "How would you rate the image quality?",
        "image quality\n(1 = poor ... 5 = excellent)",
    ),
    Question(
        "difficulty",
        "How difficult would you consider it to properly diagnose this image? "
        "(1 = very easy ... 5 = very difficult)",
        SCORES,
        "How difficult would you consider it to properly diagnose this image?",
        "diagnosis difficulty\n(1 = very easy ... 5 = very difficult)",
    ),
)
LABEL_ATTRIBUTE = "label"  # a text attribute holding the findings the reader judges
KEY_COLUMNS = ["reader", "filename", "image", "row", "is_pie", "analyze_run_id"]
VIA_FORMAT_VERSION = "2.0.10"


def non_pie_pool(
    test_images: list[str], pies: pd.DataFrame, undefined: pd.DataFrame
) -> pd.DataFrame:
    """Columns row, image: the test images that are neither PIEs nor of undefined correlation
    (constant predictions: neither typical nor PIE)."""
    excluded = set(pies.image) | set(undefined.image)
    rows = [(row, image) for row, image in enumerate(test_images) if image not in excluded]
    return pd.DataFrame(rows, columns=["row", "image"])


def select_images(
    pies: pd.DataFrame, others: pd.DataFrame, per_reader: int, readers: int, seed: int
) -> pd.DataFrame:
    """The key (KEY_COLUMNS but analyze_run_id): per reader `per_reader` PIEs and as many
    non-PIEs (columns row, image of each pool), drawn with numpy's Generator of `seed`."""
    need = per_reader * readers
    for what, pool in (("PIEs", pies), ("non-PIEs", others)):
        if len(pool) < need:
            raise PrunecxrError(
                f"the analyze run has {len(pool)} {what}; {readers} reader(s) x {per_reader} "
                f"{what} need {need}: lower --per-reader or --readers"
            )
    rng = np.random.default_rng(seed)
    pies, others = (p.sort_values("row").reset_index(drop=True) for p in (pies, others))
    drawn_pies = pies.iloc[rng.permutation(len(pies))[:need]].assign(is_pie=True)
    drawn_others = others.iloc[rng.permutation(len(others))[:need]].assign(is_pie=False)
    parts = []
    for reader in range(readers):
        part = slice(reader * per_reader, (reader + 1) * per_reader)
        images = pd.concat([drawn_pies.iloc[part], drawn_others.iloc[part]])
        parts.append(images.iloc[rng.permutation(len(images))].assign(reader=reader + 1))
    key = pd.concat(parts, ignore_index=True)
    width = max(4, len(str(len(key))))
    suffixes = [Path(image).suffix.lower() for image in key.image]
    key["filename"] = [f"img-{n:0{width}d}{s}" for n, s in enumerate(suffixes, start=1)]
    return key[KEY_COLUMNS[:-1]]


def findings_text(labels: np.ndarray, classes) -> str:
    """An image's ground-truth findings as text ("none" when it has no label)."""
    return ", ".join(c for c, on in zip(classes, labels) if on) or "none"


def via_project(name: str, files: list[tuple[str, int, str]]) -> dict:
    """A VIA 2 project: `files` ((file name, size in bytes, label text), in showing order) with
    the label as a text file attribute and the three questions as radio file attributes."""
    metadata = {
        filename + str(size): {  # VIA 2 keys an image by its name and size
            "filename": filename,
            "size": size,
            "regions": [],
            "file_attributes": {LABEL_ATTRIBUTE: label},
        }
        for filename, size, label in files
    }
    attributes = {
        LABEL_ATTRIBUTE: {
            "type": "text",
            "description": "The image's label (its findings): the label the first question asks about",
            "default_value": "",
        }
    }
    for question in QUESTIONS:
        attributes[question.name] = {
            "type": "radio",
            "description": question.text,
            "options": {option: option for option in question.options},
            "default_options": {},  # no preset answer: an unanswered question stays missing
        }
    return {
        "_via_settings": _via_settings(name),
        "_via_img_metadata": metadata,
        "_via_attributes": {"region": {}, "file": attributes},
        "_via_data_format_version": VIA_FORMAT_VERSION,
        "_via_image_id_list": list(metadata),
    }


def _via_settings(name: str) -> dict:
    """VIA 2.0.10's defaults; default_filepath "": images beside the page that opens via.html."""
    grid = {
        "img_height": 80,
        "rshape_fill": "none",
        "rshape_fill_opacity": 0.3,
        "rshape_stroke": "yellow",
        "rshape_stroke_width": 2,
        "show_region_shape": True,
        "show_image_policy": "all",
    }
    image = {
        "region_label": "__via_region_id__",
        "region_color": "__via_default_region_color__",
        "region_label_font": "10px Sans",
        "on_image_annotation_editor_placement": "NEAR_REGION",
    }
    ui = {
        "annotation_editor_height": 25,
        "annotation_editor_fontsize": 0.8,
        "leftsidebar_width": 18,
        "image_grid": grid,
        "image": image,
    }
    core = {"buffer_size": 18, "filepath": {}, "default_filepath": ""}
    return {"ui": ui, "core": core, "project": {"name": name}}


def check_out(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise PrunecxrError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PrunecxrError(f"--out {out} is not empty; choose another folder or pass --overwrite")


def clear_out(out: Path) -> None:
    """Remove what an earlier export wrote in `out` (reader-* folders, key.csv; anything else
    stays) and make sure it exists."""
    for folder in out.glob("reader-*"):
        shutil.rmtree(folder)
    (out / "key.csv").unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def check_images(images, data_dir: Path) -> None:
    """Every image to copy is a file under `data_dir`."""
    missing = [image for image in images if not (data_dir / image).is_file()]
    if missing:
        raise PrunecxrError(
            f"{len(missing)} image(s) to export not found in {data_dir}, e.g. {missing[0]}; "
            f"pass --data-dir where the images are"
        )


def write_reader_folder(
    key: pd.DataFrame, findings: dict[str, str], data_dir: Path, folder: Path
) -> None:
    """One reader's folder: the images under their anonymous names, labels.csv (name ->
    findings) and via_project.json. `key` holds this reader's rows, in showing order."""
    folder.mkdir(parents=True)
    files = []
    for filename, image in zip(key.filename, key.image):
        shutil.copyfile(data_dir / image, folder / filename)
        files.append((filename, (folder / filename).stat().st_size, findings[image]))
    labels = pd.DataFrame([(f, label) for f, _, label in files], columns=["filename", "label"])
    labels.to_csv(folder / "labels.csv", index=False)
    project = via_project(folder.name, files)
    (folder / "via_project.json").write_text(json.dumps(project, indent=1))
