"""Which classes a pruned model forgets, and when (Holste et al. 2023, §2-3).

1. Per class, seed and sparsity k: AUC, AP, F1 on the test set.
2. Relative change of a metric m for class c: (m_k - m_0) / m_0, per seed.
3. Forgettability curve of c: median over seeds of the relative AP change, per k.
4. k20(c): the smallest k where that median falls to -20 % or below (NaN if it never does).
5. Correlations of log training frequency with k20 and with the relative AP change at k = 0.95
   (paper Fig. 2, right column; the original code filters `ratio == 0.95`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import pearsonr, spearmanr

from prunecxr.analysis.predictions import SweepPredictions
from prunecxr.evaluate import per_class_metrics

FORGET_THRESHOLD = -0.2
AP_CHANGE_SPARSITY = 0.95  # damage vs frequency (paper Fig. 2); PIEs use pies.PIE_SPARSITY


def metrics_table(preds: SweepPredictions) -> pd.DataFrame:
    """One row per (method, seed, sparsity, class): auc, ap, f1 and their relative changes."""
    frames = []
    for (method, seed, sparsity), probs in preds.probs.items():
        frame = per_class_metrics(probs, preds.labels, preds.schema.classes)
        frames.append(frame.assign(method=method, seed=seed, sparsity=sparsity))
    table = pd.concat(frames, ignore_index=True)
    dense = table[table.sparsity == 0].set_index(["method", "seed", "class"])[["auc", "ap", "f1"]]
    base = dense.reindex(pd.MultiIndex.from_frame(table[["method", "seed", "class"]])).to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):  # a metric of 0 at k = 0: undefined
        for i, metric in enumerate(("auc", "ap", "f1")):
            change = (table[metric].to_numpy() - base[:, i]) / base[:, i]
            table[f"rel_{metric}_change"] = np.where(base[:, i] > 0, change, np.nan)
    return table


def mean_ap_curves(table: pd.DataFrame) -> pd.DataFrame:
    """Per method and sparsity: median over seeds of the mean AP, with its quartiles."""
    per_seed = table.groupby(["method", "sparsity", "seed"]).ap.mean().reset_index()
    grouped = per_seed.groupby(["method", "sparsity"]).ap
    return pd.DataFrame(
        {"median": grouped.median(), "q25": grouped.quantile(0.25), "q75": grouped.quantile(0.75)}
    ).reset_index()


def forgettability(table: pd.DataFrame, method: str) -> pd.DataFrame:
    """Columns class, sparsity, rel_ap_change (median over seeds) for one method."""
    rows = table[table.method == method]
    curves = rows.groupby(["class", "sparsity"], sort=False).rel_ap_change.median()
    return curves.reset_index()


def thresholds(curves: pd.DataFrame, classes, train_counts: np.ndarray) -> pd.DataFrame:
    """Columns class, train_freq, k20."""
    k20 = []
    for name in classes:
        curve = curves[curves["class"] == name].sort_values("sparsity")
        forgotten = curve[curve.rel_ap_change <= FORGET_THRESHOLD]
        k20.append(forgotten.sparsity.iloc[0] if len(forgotten) else np.nan)
    return pd.DataFrame(
        {"class": list(classes), "train_freq": train_counts.astype(int), "k20": k20}
    )


def correlate(x: np.ndarray, y: np.ndarray, x_name: str, y_name: str) -> dict:
    """Pearson and Spearman correlation with p-values over the finite pairs."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    row = {"x": x_name, "y": y_name, "n": int(keep.sum())}
    if row["n"] < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {
            **row,
            "pearson_r": np.nan,
            "pearson_p": np.nan,
            "spearman_rho": np.nan,
            "spearman_p": np.nan,
        }
    pearson, spearman = pearsonr(x, y), spearmanr(x, y)
    return {
        **row,
        "pearson_r": float(pearson.statistic),
        "pearson_p": float(pearson.pvalue),
        "spearman_rho": float(spearman.statistic),
        "spearman_p": float(spearman.pvalue),
    }


def swept_or_highest(sparsities: list[float], wanted: float) -> float:
    """`wanted` (the paper's k) when the sweep has it, else the sweep's highest sparsity."""
    return wanted if wanted in sparsities else max(sparsities)


def frequency_correlations(
    curves: pd.DataFrame, k20: pd.DataFrame, k_change: float
) -> pd.DataFrame:
    """Rows (log_train_freq, k20) and (log_train_freq, rel_ap_change_<k_change>)."""
    log_freq = np.log(k20.train_freq.to_numpy(float))
    at_k = curves[curves.sparsity == k_change].set_index("class").rel_ap_change
    change = at_k.reindex(k20["class"]).to_numpy(float)
    rows = [
        correlate(log_freq, k20.k20.to_numpy(float), "log_train_freq", "k20"),
        correlate(log_freq, change, "log_train_freq", f"rel_ap_change_{k_change:g}"),
    ]
    return pd.DataFrame(rows)
