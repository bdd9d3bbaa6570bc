"""Forgettability curve distance (FCD) between class pairs, against the classes' difference in
frequency and their label overlap (Holste et al. 2023, §3.2).

FCD(A, B) = Euclidean distance between the forgettability curves of A and B.
IoU(A, B) = |A ∩ B| / |A ∪ B| over training images ("paper", the default).
"legacy": the original code's version, computed from the co-occurrence matrix M = Lᵀ L: a
class's frequency is its column sum of M (its count plus its co-occurrences), and
IoU(A, B) = M[A, B] / (colsum(A) + colsum(B) - M[A, B]). Both give the same ranking of
frequent classes but differ for classes that co-occur a lot.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from prunecxr import PrunecxrError

COOCCURRENCE_MODES = ("paper", "legacy")


def pair_statistics(train_labels: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """train_labels: (M, C) 0/1 -> (frequency (C,), IoU (C, C)) under `mode`."""
    if mode not in COOCCURRENCE_MODES:
        raise PrunecxrError(
            f"unknown co-occurrence mode {mode!r}; valid: {', '.join(COOCCURRENCE_MODES)}"
        )
    both = train_labels.T @ train_labels  # both[a, b] = images with a and b
    if mode == "paper":
        frequency = np.diag(both).astype(float)
    else:
        frequency = both.sum(axis=0).astype(float)
    union = frequency[:, None] + frequency[None, :] - both
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, both / union, 0.0)
    return frequency, iou


def fcd_table(
    curves: pd.DataFrame, classes, train_labels: np.ndarray, mode: str = "paper"
) -> pd.DataFrame:
    """Columns class_a, class_b, fcd, log_freq_diff, iou: one row per unordered class pair."""
    wide = curves.pivot(index="class", columns="sparsity", values="rel_ap_change").reindex(classes)
    frequency, iou = pair_statistics(train_labels, mode)
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
