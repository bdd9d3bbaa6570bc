"""Forgettability curve distance (FCD) between class pairs, against the classes' difference in
frequency and their label overlap (Holste et al. 2023, §3.2).

FCD(A, B) = Euclidean distance between the forgettability curves of A and B, correlated with
|Δ log frequency| and with IoU(A, B) (paper, NIH: r = 0.71, ρ = 0.64 and r = -0.43, ρ = -0.47).

"paper" (the default): on the training split, frequency = a class's image count and
IoU(A, B) = |A ∩ B| / |A ∪ B| over images.
"legacy": the original code exactly: on the **test** split, from the co-occurrence matrix
M = Lᵀ L, a class's "frequency" is its column sum of M (its count plus its co-occurrences) and
IoU(A, B) = M[A, B] / (colsum(A) + colsum(B) - M[A, B]); its figure plots IoU^¼.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from prunecxr import PrunecxrError
from prunecxr.analysis.forgetting import correlate

COOCCURRENCE_MODES = ("paper", "legacy")
SPLIT_OF_MODE = {"paper": "train", "legacy": "test"}  # whose labels give frequency and IoU
LEGACY_IOU_POWER = 0.25  # the original figure's axis: IoU^(1/4)


def pair_statistics(labels: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """labels: (M, C) 0/1 of the mode's split -> (frequency (C,), IoU (C, C)) under `mode`."""
    if mode not in COOCCURRENCE_MODES:
        raise PrunecxrError(
            f"unknown co-occurrence mode {mode!r}; valid: {', '.join(COOCCURRENCE_MODES)}"
        )
    both = labels.T @ labels  # both[a, b] = images with a and b
    if mode == "paper":
        frequency = np.diag(both).astype(float)
    else:
        frequency = both.sum(axis=0).astype(float)
    union = frequency[:, None] + frequency[None, :] - both
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, both / union, 0.0)
    return frequency, iou


def fcd_table(
    curves: pd.DataFrame, classes, labels: np.ndarray, mode: str = "paper"
) -> pd.DataFrame:
    """Columns class_a, class_b, fcd, log_freq_diff, iou: one row per unordered class pair.
    `labels`: (M, C) of the split SPLIT_OF_MODE[mode] names."""
    wide = curves.pivot(index="class", columns="sparsity", values="rel_ap_change").reindex(classes)
    frequency, iou = pair_statistics(labels, mode)
    log_freq = np.log(np.maximum(frequency, 1))
    rows = []
    for a, b in itertools.combinations(range(len(classes)), 2):
        distance = np.sqrt(np.nansum((wide.iloc[a].to_numpy() - wide.iloc[b].to_numpy()) ** 2))
        rows.append(
            {
                "class_a": classes[a],
                "class_b": classes[b],
                "fcd": float(distance),
                "log_freq_diff": float(abs(log_freq[a] - log_freq[b])),
                "iou": float(iou[a, b]),
            }
        )
    return pd.DataFrame(rows)


def fcd_correlations(fcd: pd.DataFrame, mode: str) -> pd.DataFrame:
    """Rows (log_freq_diff, fcd) and (iou, fcd); legacy adds (iou^0.25, fcd), its figure's axis
    (Spearman is the same, Pearson is not)."""
    fcd_values = fcd.fcd.to_numpy(float)
    rows = [
        correlate(fcd.log_freq_diff.to_numpy(float), fcd_values, "log_freq_diff", "fcd"),
        correlate(fcd.iou.to_numpy(float), fcd_values, "iou", "fcd"),
    ]
    if mode == "legacy":
        scaled = fcd.iou.to_numpy(float) ** LEGACY_IOU_POWER
        rows.append(correlate(scaled, fcd_values, f"iou^{LEGACY_IOU_POWER:g}", "fcd"))
    return pd.DataFrame(rows)
