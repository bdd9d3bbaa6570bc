"""Pruning-identified exemplars (PIEs; Hooker et al. 2019, adapted to multi-label by Holste et
al. 2023, §3.3).

1. Ensemble: average the predicted probabilities over seeds, at k = 0 and at k = 0.9.
2. Per image: Spearman correlation across classes between the two ensembled vectors.
3. PIEs: the int(0.05 N) images with the lowest correlation, in a stable sort (as the original
   code: `np.argsort(corrs)[:int(0.05 * N)]`). An image whose correlation is undefined
   (constant predictions) is listed apart, never counted as a PIE.
4. Who they are: per class, the fraction of PIEs with that label over the fraction of other
   images with it; and the same ratio per number of findings (0, 1, 2, 3, 4+; the dataset's
   normal class, as No Finding, is not a finding).
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
from scipy.stats import ConstantInputWarning, spearmanr

from prunecxr.analysis.predictions import SweepPredictions

PIE_FRACTION = 0.05
PIE_SPARSITY = 0.9  # paper §3.3; the AP-change analysis uses forgetting.AP_CHANGE_SPARSITY
DISEASE_BINS = ("0", "1", "2", "3", "4+")


def ensemble(preds: SweepPredictions, method: str, sparsity: float) -> np.ndarray:
    """(N, C) mean over seeds of the probabilities at one sparsity."""
    return np.mean([preds.probs[(method, s, sparsity)] for s in preds.seeds(method)], axis=0)


def image_correlations(dense: np.ndarray, pruned: np.ndarray) -> np.ndarray:
    """(N,) Spearman correlation across classes of each image's two probability vectors
    (NaN where either vector is constant)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConstantInputWarning)
        return np.array([spearmanr(a, b).statistic for a, b in zip(dense, pruned)])


def find_pies(preds: SweepPredictions, method: str, sparsity: float) -> pd.DataFrame:
    """Columns row (0-based row of the test label file), image, corr (NaN: undefined), is_pie;
    sorted by corr (stable, undefined last); int(PIE_FRACTION * N) PIEs of N images."""
    corr = image_correlations(ensemble(preds, method, 0.0), ensemble(preds, method, sparsity))
    frame = pd.DataFrame({"row": np.arange(len(corr)), "image": preds.image_ids, "corr": corr})
    frame = frame.sort_values("corr", kind="stable", na_position="last").reset_index(drop=True)
    count = min(int(PIE_FRACTION * len(corr)), int(np.isfinite(corr).sum()))
    frame["is_pie"] = frame.index < count
    return frame


def class_ratios(labels: np.ndarray, is_pie: np.ndarray, classes) -> pd.DataFrame:
    """Per class: share of PIEs with the label / share of non-PIEs with it."""
    pie, rest = labels[is_pie].mean(axis=0), labels[~is_pie].mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(rest > 0, pie / rest, np.nan)
    return pd.DataFrame(
        {"class": list(classes), "pie_share": pie, "other_share": rest, "ratio": ratio}
    )


def disease_count_ratios(
    labels: np.ndarray, is_pie: np.ndarray, classes, normal_class: str | None = None
) -> pd.DataFrame:
    """Per number of findings (0..3, 4+): share among PIEs / share among non-PIEs; every class
    but `normal_class` is a finding."""
    findings = [c for c, name in enumerate(classes) if name != normal_class]
    counts = np.minimum(labels[:, findings].sum(axis=1), 4).astype(int)
    rows = []
    for n, name in enumerate(DISEASE_BINS):
        pie, rest = (counts[is_pie] == n).mean(), (counts[~is_pie] == n).mean()
        rows.append(
            {
                "n_findings": name,
                "pie_share": pie,
                "other_share": rest,
                "ratio": pie / rest if rest > 0 else np.nan,
            }
        )
    return pd.DataFrame(rows)
