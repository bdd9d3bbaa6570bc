"""Synthetic NIH-CXR-LT / MIMIC-CXR-LT look-alikes, written in the real datasets' file formats,
and long-tailed sets in any dataset card's format (a card of K classes of their own included).

1. Labels: class prevalences follow the real training set's long tail (class_frequencies.csv,
   read from the authors' poster), or for any other card a Zipf law (prevalence of the i-th
   class ∝ i^-s); the card's normal class ("No Finding") excludes every other label; findings
   co-occur through shared latent factors (Gaussian copula), e.g. Emphysema with Subcutaneous
   Emphysema.
2. Images: a noisy chest-like background with finding-like distractor blobs; each finding adds
   its own visual sign (shape, place, polarity; every shape of a similar area), varying
   per image. Rarer findings are subtler, as in real radiographs: smaller and fainter, within
   +-10 % of the nominal contrast, and learned from fewer examples. (Rare signs at half the
   contrast, or look-alikes of common ones, stayed at chance AP in a small CNN: a class it never
   learned cannot be forgotten, and the paper's findings could not appear; docs/demo.md, "The
   demo's findings".)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image
from scipy.stats import norm
from tqdm import tqdm

from prunecxr import PrunecxrError
from prunecxr.data.schemas import BUILTIN, SPLITS, DatasetSchema, cell_text

MARKER_FILE = "prunecxr-synthetic.json"
CARD_FILE = "dataset.yaml"  # the card `synth --classes K` writes beside its data
ZIPF_TOP = 0.3  # the commonest class's prevalence in a Zipf-law set
# Approximate real training-set sizes: only the class ratios come from the frequency file, these
# turn counts into prevalences (NIH: No Finding ~57 %, MIMIC: Support Devices ~37 %).
REAL_TRAIN_SIZE = {"nih-cxr-lt": 78_000, "mimic-cxr-lt": 200_000}
# Pairs of findings that co-occur clinically; pairs naming a class a dataset lacks are skipped.
COOCCURRING = (
    ("Emphysema", "Subcutaneous Emphysema"),
    ("Pneumothorax", "Subcutaneous Emphysema"),
    ("Pneumomediastinum", "Subcutaneous Emphysema"),
    ("Effusion", "Atelectasis"),
    ("Pleural Effusion", "Atelectasis"),
    ("Infiltration", "Effusion"),
    ("Mass", "Nodule"),
    ("Edema", "Cardiomegaly"),
    ("Consolidation", "Pneumonia"),
    ("Lung Opacity", "Pneumonia"),
    ("Tortuous Aorta", "Calcification of the Aorta"),
    ("Pleural Effusion", "Edema"),
    ("Enlarged Cardiomediastinum", "Cardiomegaly"),
    ("Pneumothorax", "Pneumomediastinum"),
)
SHAPES = ("disc", "ring", "square", "cross", "hbar", "vbar")
MIN_POSITIVES = {"train": 5, "val": 3, "test": 5}  # so every class has a defined AUC/AP
NOISE_STD = 0.10
SIGN_CONTRAST = 0.22  # a finding's nominal contrast (images are in [0, 1])
MAX_DISTRACTORS = 3  # soft blobs of no class, so that "any local change" is not a shortcut


@dataclass(frozen=True)
class Sign:
    """The visual sign of one finding, in unit image coordinates."""

    shape: str
    x: float
    y: float
    radius: float
    contrast: float  # signed: bright or dark sign


def train_prevalence(schema: DatasetSchema, zipf: float = 1.0) -> np.ndarray:
    """(C,) prevalence of each class in the real training set, in the schema's class order (a
    built-in dataset), else ZIPF_TOP x i^-zipf for the i-th class of the card."""
    if schema.name not in BUILTIN or schema.card:
        return ZIPF_TOP * np.arange(1, schema.num_classes + 1, dtype=float) ** -zipf
    with resources.files("prunecxr.data").joinpath("class_frequencies.csv").open() as file:
        table = pd.read_csv(file)
    counts = table[table.dataset == schema.name].set_index("class")["train_count"]
    return counts.loc[list(schema.classes)].to_numpy(float) / REAL_TRAIN_SIZE[schema.name]


def create_signs(
    schema: DatasetSchema, prevalence: np.ndarray, rng: np.random.Generator
) -> dict[str, Sign]:
    """One sign per finding: a shape (cycling through SHAPES in order of frequency), a place and a
    polarity of its own; rarer findings are subtler, as in real radiographs: the size falls from
    0.12 to 0.08 and the contrast from 1.1 to 0.9 x SIGN_CONTRAST with the frequency rank."""
    findings = [name for name in schema.classes if name != schema.normal_class]
    by_frequency = np.argsort(
        -prevalence[[schema.classes.index(f) for f in findings]], kind="stable"
    )
    signs: dict[str, Sign] = {}
    for rank, index in enumerate(by_frequency):
        salience = 1 - rank / max(len(findings) - 1, 1)  # 1: the commonest, 0: the rarest
        signs[findings[index]] = Sign(
            SHAPES[rank % len(SHAPES)],
            float(rng.uniform(0.2, 0.8)),
            float(rng.uniform(0.2, 0.8)),
            0.08 + 0.04 * salience,
            float(rng.choice([-1, 1]) * SIGN_CONTRAST * (0.9 + 0.2 * salience)),
        )
    return signs


def sample_labels(
    schema: DatasetSchema,
    prevalence: np.ndarray,
    n: int,
    min_positives: int,
    rng: np.random.Generator,
):
    """(n, C) 0/1 labels with `prevalence`, co-occurrence and an exclusive normal class (where
    the card names one: every other image has a finding; else an image may have none)."""
    classes = list(schema.classes)
    if schema.normal_class is None:
        return _sample_findings(classes, prevalence, n, min_positives, rng)
    nf = classes.index(schema.normal_class)
    abnormal = rng.random(n) >= prevalence[nf]
    # 1. Latent scores: own noise + one factor per co-occurring pair + a shared "how sick" factor.
    pairs = [
        (classes.index(a), classes.index(b))
        for a, b in COOCCURRING
        if a in classes and b in classes
    ]
    latent = rng.standard_normal((n, len(classes))) + 0.6 * rng.standard_normal((n, 1))
    for a, b in pairs:
        shared = rng.standard_normal(n)
        latent[:, a] += shared
        latent[:, b] += shared
    latent /= latent.std(axis=0, keepdims=True)
    # 2. Thresholds give each finding its prevalence among abnormal images.
    conditional = np.clip(prevalence / (1 - prevalence[nf]), 1e-6, 0.9)
    labels = (latent > norm.ppf(1 - conditional)) & abnormal[:, None]
    labels[:, nf] = False
    # 3. An abnormal image with no finding gets its most likely one.
    empty = abnormal & ~labels.any(axis=1)
    margin = latent - norm.ppf(1 - conditional)
    margin[:, nf] = -np.inf
    labels[np.flatnonzero(empty), margin[empty].argmax(axis=1)] = True
    labels[:, nf] = ~abnormal
    _ensure_min_positives(labels, nf, min_positives, rng)
    return labels.astype(np.int64)


def _sample_findings(classes, prevalence, n: int, min_positives: int, rng) -> np.ndarray:
    """Labels of a dataset without a normal class: each class at its prevalence, through one
    shared factor (findings co-occur), an image with none allowed."""
    latent = rng.standard_normal((n, len(classes))) + 0.6 * rng.standard_normal((n, 1))
    latent /= latent.std(axis=0, keepdims=True)
    labels = latent > norm.ppf(1 - np.clip(prevalence, 1e-6, 0.9))
    for c in range(len(classes)):
        short = min_positives - int(labels[:, c].sum())
        if short > 0:
            negatives = np.flatnonzero(~labels[:, c])
            labels[rng.choice(negatives, size=min(short, len(negatives)), replace=False), c] = True
    return labels.astype(np.int64)


def _ensure_min_positives(labels: np.ndarray, nf: int, minimum: int, rng) -> None:
    """Tail classes can round to zero positives in small splits: add positives to abnormal rows."""
    for c in range(labels.shape[1]):
        short = minimum - int(labels[:, c].sum())
        if c == nf or short <= 0:
            continue
        candidates = np.flatnonzero(~labels[:, c] & ~labels[:, nf])
        labels[rng.choice(candidates, size=min(short, len(candidates)), replace=False), c] = True
    labels[:, nf] = ~np.delete(labels, nf, axis=1).any(axis=1)


def render_image(findings: list[Sign], size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) uint8: chest-like background, per-image jittered signs, noise."""
    v, u = np.mgrid[0:size, 0:size] / size
    lungs = ((u - 0.32) / 0.17) ** 2 + ((v - 0.5) / 0.32) ** 2 < 1
    lungs |= ((u - 0.68) / 0.17) ** 2 + ((v - 0.5) / 0.32) ** 2 < 1
    image = 0.55 - 0.25 * lungs + 0.1 * np.exp(-(((u - 0.5) / 0.05) ** 2))
    image = image + 0.06 * _low_frequency(size, rng)
    for sign in [*findings, *_distractors(rng)]:
        x, y = sign.x + rng.normal(0, 0.04), sign.y + rng.normal(0, 0.04)
        image = image + sign.contrast * rng.uniform(0.4, 1.2) * _mask(sign, u - x, v - y)
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0, NOISE_STD, image.shape)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


def _distractors(rng: np.random.Generator) -> list[Sign]:
    return [
        Sign(
            shape="blob",
            x=float(rng.uniform(0.15, 0.85)),
            y=float(rng.uniform(0.15, 0.85)),
            radius=float(rng.uniform(0.05, 0.12)),
            contrast=float(rng.choice([-1, 1]) * rng.uniform(0.06, 0.2)),
        )
        for _ in range(rng.integers(0, MAX_DISTRACTORS + 1))
    ]


def _low_frequency(size: int, rng: np.random.Generator) -> np.ndarray:
    coarse = Image.fromarray(rng.standard_normal((4, 4)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((size, size), Image.Resampling.BILINEAR))


def _mask(sign: Sign, du: np.ndarray, dv: np.ndarray) -> np.ndarray:
    r, distance = sign.radius, np.hypot(du, dv)
    masks = {
        "disc": distance < r,
        "ring": np.abs(distance - r) < 0.3 * r,
        "square": np.maximum(np.abs(du), np.abs(dv)) < 0.8 * r,
        "cross": ((np.abs(du) < 0.5 * r) & (np.abs(dv) < r))
        | ((np.abs(dv) < 0.5 * r) & (np.abs(du) < r)),
        "hbar": (np.abs(dv) < 0.5 * r) & (np.abs(du) < 1.5 * r),
        "vbar": (np.abs(du) < 0.5 * r) & (np.abs(dv) < 1.5 * r),
        "blob": np.exp(-((distance / r) ** 2)),
    }
    return masks[sign.shape].astype(np.float64)


def write_synthetic(
    schema: DatasetSchema,
    out_dir: Path,
    split_sizes: dict[str, int],
    *,
    image_size: int = 256,
    seed: int = 0,
    overwrite: bool = False,
    min_positives: dict[str, int] = MIN_POSITIVES,
    zipf: float = 1.0,
) -> dict:
    """Write label CSVs and images for each split into `out_dir` in the card's format; returns
    the marker's summary. `min_positives`: the fewest positives of every class per split;
    `zipf`: the long tail's exponent for a card that is not a built-in dataset."""
    out_dir = Path(out_dir)
    if not schema.classes:
        raise PrunecxrError(
            f"{schema.card}: synth needs the card's classes listed (field 'classes')"
        )
    existing = [path for path in planned_files(schema, out_dir, split_sizes) if path.exists()]
    if existing and not overwrite:
        raise PrunecxrError(
            f"{out_dir} already holds {len(existing)} of the files synth would write (e.g. "
            f"{existing[0].relative_to(out_dir)}); pick an empty folder, or pass --overwrite "
            f"to replace them"
        )
    rng = np.random.default_rng(seed)
    prevalence = train_prevalence(schema, zipf)
    signs = create_signs(schema, prevalence, rng)
    summary = {
        "dataset": schema.name,
        "seed": seed,
        "image_size": image_size,
        "split_sizes": dict(split_sizes),
        "min_positives": dict(min_positives),
        "splits": {},
    }
    first_subject = 0
    for split in SPLITS:
        labels = sample_labels(schema, prevalence, split_sizes[split], min_positives[split], rng)
        frame = _label_frame(schema, labels, first_subject, rng)
        first_subject += len(frame)
        _write_images(schema, out_dir, frame, labels, signs, image_size, rng)
        label_file = out_dir / schema.label_file(split)
        label_file.parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(label_file, index=False)
        summary["splits"][split] = dict(zip(schema.classes, map(int, labels.sum(axis=0))))
    (out_dir / MARKER_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def zipf_card(out_dir: Path, classes: int, overwrite: bool = False) -> Path:
    """Write the card of a generic set of `classes` classes (class_01, ...) into `out_dir`:
    label files train.csv, val.csv, test.csv; images/<patient>.png; a patient column."""
    path = Path(out_dir) / CARD_FILE
    if path.exists() and not overwrite:
        raise PrunecxrError(f"{path} exists; pick an empty folder, or pass --overwrite")
    width = len(str(classes))
    card = {
        "name": f"synth-{classes}",
        "label_files": {split: f"{split}.csv" for split in SPLITS},
        "image_column": "image",
        "image_root": "images",
        "patient_column": "patient",
        "classes": [f"class_{i:0{width}d}" for i in range(1, classes + 1)],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path


def planned_files(schema: DatasetSchema, out_dir: Path, split_sizes: dict[str, int]) -> list[Path]:
    """Every file write_synthetic writes: label files, the marker and each image."""
    files = [out_dir / schema.label_file(split) for split in SPLITS] + [out_dir / MARKER_FILE]
    first_subject = 0
    for split in SPLITS:
        ids = _id_columns(schema, np.arange(first_subject, first_subject + split_sizes[split]))
        files += [out_dir / schema.image_root / image_id for image_id in ids[schema.image_column]]
        first_subject += split_sizes[split]
    return files


def _label_frame(
    schema: DatasetSchema, labels: np.ndarray, first_subject: int, rng
) -> pd.DataFrame:
    ids = _id_columns(schema, np.arange(first_subject, first_subject + len(labels)))
    cells = pd.DataFrame(labels, columns=list(schema.classes))
    if schema.label_values:  # the card's own spellings of 0 and 1 (e.g. CheXpert's -1 and blank)
        cells = _spelled(cells, dict(schema.label_values), rng)
    return pd.concat([pd.DataFrame(ids), cells], axis=1)


def _spelled(cells: pd.DataFrame, values: dict[str, float], rng) -> pd.DataFrame:
    """About a quarter of the 0s and 1s written as the card's other texts for them."""
    numbers = cells.to_numpy()
    spelled = numbers.astype(object)
    for value in (0, 1):
        texts = [text for text, meaning in values.items() if meaning == value]
        texts = [text for text in texts if text != cell_text(value)]
        if texts:
            where = (numbers == value) & (rng.random(numbers.shape) < 0.25)
            spelled[where] = rng.choice(texts, size=int(where.sum()))
    return pd.DataFrame(spelled, columns=cells.columns)


def _id_columns(schema: DatasetSchema, subjects: np.ndarray) -> dict[str, list]:
    if schema.name == "nih-cxr-lt" and not schema.card:  # <patient>_<follow-up>.png
        return {"id": [f"{s:08d}_000.png" for s in subjects], "subj_id": subjects}
    if schema.name == "mimic-cxr-lt" and not schema.card:  # files/p1X/p1XXXXXXX/sYYYYYYYY/<id>.jpg
        subject_ids = 10_000_000 + subjects
        study_ids = 50_000_000 + subjects
        dicom_ids = [f"{s:08x}-synthetic" for s in subjects]
        paths = [
            f"files/p{s // 1_000_000}/p{s}/s{t}/{d}.jpg"
            for s, t, d in zip(subject_ids, study_ids, dicom_ids)
        ]
        return {
            "dicom_id": dicom_ids,
            "subject_id": subject_ids,
            "study_id": study_ids,
            "path": paths,
        }
    # any other card: patient<N>/study1/view1_frontal<suffix>, as CheXpert names its images
    patients = [f"patient{s:05d}" for s in subjects]
    columns = {
        schema.image_column: [f"{p}/study1/view1_frontal{schema.image_suffix}" for p in patients]
    }
    if schema.patient_column:
        columns[schema.patient_column] = patients
    return columns


def _write_images(schema, out_dir, frame, labels, signs, image_size, rng) -> None:
    names = list(schema.classes)
    for image_id, row in tqdm(
        zip(frame[schema.image_column], labels),
        total=len(frame),
        desc=f"writing {schema.name} images",
        unit="img",
    ):
        findings = [signs[names[c]] for c in np.flatnonzero(row) if names[c] != schema.normal_class]
        path = out_dir / schema.image_root / image_id
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(render_image(findings, image_size, rng)).save(path)


def read_marker(data_dir: Path) -> dict | None:
    """The synthetic generator's summary if `data_dir` holds synthetic data, else None."""
    marker = Path(data_dir) / MARKER_FILE
    return json.loads(marker.read_text()) if marker.exists() else None
