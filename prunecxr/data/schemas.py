"""Label-file formats of the two datasets of the study (NIH-CXR-LT and MIMIC-CXR-LT, MICCAI 2023)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from prunecxr import PrunecxrError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetSchema:
    """How one dataset's label files look: file names, the image column and the class columns."""

    name: str
    image_column: str
    classes: tuple[str, ...]
    image_suffix: str  # what the synthetic generator writes; readers accept PNG and JPEG alike

    def label_file(self, split: str) -> str:
        if split not in SPLITS:
            raise PrunecxrError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return f"miccai2023_{self.name}_labels_{split}.csv"

    @property
    def num_classes(self) -> int:
        return len(self.classes)


NIH_CXR_LT = DatasetSchema(
    name="nih-cxr-lt",
    image_column="id",
    image_suffix=".png",
    classes=(
        "No Finding",
        "Infiltration",
        "Effusion",
        "Atelectasis",
        "Nodule",
        "Mass",
        "Consolidation",
        "Pneumothorax",
        "Pleural Thickening",
        "Cardiomegaly",
        "Emphysema",
        "Edema",
        "Fibrosis",
        "Subcutaneous Emphysema",
        "Pneumonia",
        "Tortuous Aorta",
        "Calcification of the Aorta",
        "Pneumoperitoneum",
        "Hernia",
        "Pneumomediastinum",
    ),
)

MIMIC_CXR_LT = DatasetSchema(
    name="mimic-cxr-lt",
    image_column="path",
    image_suffix=".jpg",
    classes=(
        "Support Devices",
        "Lung Opacity",
        "Cardiomegaly",
        "Pleural Effusion",
        "Atelectasis",
        "Pneumonia",
        "Edema",
        "No Finding",
        "Enlarged Cardiomediastinum",
        "Consolidation",
        "Pneumothorax",
        "Fracture",
        "Calcification of the Aorta",
        "Tortuous Aorta",
        "Subcutaneous Emphysema",
        "Lung Lesion",
        "Pneumomediastinum",
        "Pneumoperitoneum",
        "Pleural Other",
    ),
)

SCHEMAS = {schema.name: schema for schema in (NIH_CXR_LT, MIMIC_CXR_LT)}


def get_schema(name: str) -> DatasetSchema:
    try:
        return SCHEMAS[name]
    except KeyError:
        raise PrunecxrError(f"unknown dataset {name!r}; valid: {', '.join(SCHEMAS)}") from None


def class_slug(name: str) -> str:
    """Metric-name form of a class: lower case, non-alphanumerics -> '_' ('Subcutaneous Emphysema'
    -> 'subcutaneous_emphysema')."""
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
