"""Did it replicate? Every number printed on the paper's Figs. 2-4 beside ours, with a 95 %
bootstrap interval and a verdict (tables/replication.csv, first in report.html).

The paper's numbers ship with the package (published_statistics.csv): each with its figure and
the line of the original code (VITA-Group/PruneCXR, `src/main_analysis.py`) that prints it.

1. Ours: the analysis's own computation for the paper's method: forgettability curves (median
   over seeds of the relative AP change), k20, the change at sparsity 0.95, and the legacy FCD
   (the published FCD values come from it: frequency and IoU from the test split's
   co-occurrence matrix, IoU^¼).
2. Interval: each bootstrap replicate resamples the classes (a class-level correlation) or the
   class pairs (an FCD correlation) and, with ≥ 3 model seeds, the seeds too, recomputing the
   median curves. A class's or pair's own value varies only with the seeds; log frequencies are
   facts of the data. Percentiles 2.5 and 97.5 of a seeded generator: the same run always gives
   the same table.
3. Verdict: "consistent" when the paper's value (± half a unit of its last printed digit) lies
   inside our interval; for a correlation, "same direction" when the signs agree and ours has
   p < 0.05; otherwise "differs". "untested" where there is no interval (a class's value with
   fewer than 3 seeds), "not computed" where ours is undefined.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib import resources

import numpy as np
import pandas as pd
from scipy.stats import rankdata

from prunecxr.analysis import cooccurrence
from prunecxr.analysis.forgetting import AP_CHANGE_SPARSITY, FORGET_THRESHOLD, correlate
from prunecxr.analysis.predictions import SweepPredictions

BOOTSTRAP_REPLICATES = 1000
BOOTSTRAP_SEED = 0
MIN_SEEDS_TO_RESAMPLE = 3
CORRELATIONS = {"pearson_r": "pearson", "spearman_rho": "spearman"}
SYNTHETIC_NOTE = "synthetic data (prunecxr synth): the comparison is illustrative only"


def published_statistics(dataset: str) -> pd.DataFrame:
    """The paper's printed numbers for `dataset` (empty for a dataset it did not publish);
    `value` stays text, as printed (its digits set the rounding tolerance)."""
    path = resources.files("prunecxr.analysis") / "published_statistics.csv"
    with resources.as_file(path) as csv:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False)
    return table[table.dataset == dataset].reset_index(drop=True)


@dataclass(frozen=True)
class Callouts:
    """What the paper's figures name: classes (Fig. 2) and 'A|B' class pairs (Fig. 3)."""

    classes: tuple[str, ...] = ()
    pairs: tuple[str, ...] = ()


def callouts(dataset: str) -> Callouts:
    named = published_statistics(dataset).query("class_or_pair != ''")
    is_pair = named.statistic == "fcd"
    return Callouts(
        classes=tuple(dict.fromkeys(named[~is_pair].class_or_pair)),
        pairs=tuple(named[is_pair].class_or_pair),
    )


@dataclass(frozen=True)
class SweepCurves:
    """changes: (S, K, C) relative AP change per seed, sparsity and class of one method;
    the data's facts: log training frequency (C,) and the legacy pair statistics (P,)."""

    classes: tuple[str, ...]
    sparsities: np.ndarray
    changes: np.ndarray
    log_train_freq: np.ndarray
    legacy_log_freq_diff: np.ndarray
    legacy_iou_scaled: np.ndarray

    @classmethod
    def of(cls, table: pd.DataFrame, preds: SweepPredictions, method: str) -> SweepCurves:
        classes = preds.schema.classes
        rows = table[table.method == method]
        seeds, sparsities = sorted(set(rows.seed)), sorted(set(rows.sparsity))
        wide = rows.pivot_table(index=["seed", "sparsity"], columns="class", values="rel_ap_change")
        full = pd.MultiIndex.from_product([seeds, sparsities])  # a missing cell stays NaN
        cube = wide.reindex(index=full, columns=list(classes)).to_numpy(float)
        changes = cube.reshape(len(seeds), len(sparsities), len(classes))
        frequency, iou = cooccurrence.pair_statistics(preds.labels, "legacy")
        a, b = np.triu_indices(len(classes), 1)  # the order of fcd_table's pairs
        log_freq = np.log(np.maximum(frequency, 1))
        return cls(
            classes=tuple(classes),
            sparsities=np.asarray(sparsities, float),
            changes=changes,
            log_train_freq=np.log(np.maximum(preds.train_counts, 1)),
            legacy_log_freq_diff=np.abs(log_freq[a] - log_freq[b]),
            legacy_iou_scaled=iou[a, b] ** cooccurrence.LEGACY_IOU_POWER,
        )

    @property
    def change_sparsity(self) -> float:
        """0.95 (the paper's) when swept, else the highest sparsity swept."""
        swept = self.sparsities.tolist()
        return AP_CHANGE_SPARSITY if AP_CHANGE_SPARSITY in swept else max(swept)

    def quantities(self, seeds: np.ndarray) -> dict[str, np.ndarray]:
        """Every per-class (C,) and per-pair (P,) quantity the paper correlates, from the
        median curves of the given seeds (indices into the seed axis, repeats allowed)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN: a class with no AP
            curves = np.nanmedian(self.changes[seeds], axis=0)  # (K, C)
        forgotten = curves <= FORGET_THRESHOLD
        first = np.argmax(forgotten, axis=0)
        k20 = np.where(forgotten.any(axis=0), self.sparsities[first], np.nan)
        at_k = curves[self.sparsities.tolist().index(self.change_sparsity)]
        a, b = np.triu_indices(len(self.classes), 1)
        fcd = np.sqrt(np.nansum((curves[:, a] - curves[:, b]) ** 2, axis=0))
        return {
            "k20": k20,
            "rel_ap_change_0.95": at_k,
            "log_train_freq": self.log_train_freq,
            "fcd": fcd,
            "log_test_freq_diff (legacy)": self.legacy_log_freq_diff,
            "iou^0.25 (legacy)": self.legacy_iou_scaled,
        }

    def pair_index(self, pair: str) -> int | None:
        first, _, second = pair.partition("|")
        if first not in self.classes or second not in self.classes:
            return None
        a, b = sorted((self.classes.index(first), self.classes.index(second)))
        count = len(self.classes)
        return a * count - a * (a + 1) // 2 + (b - a - 1)  # position in triu order


def replication_table(
    table: pd.DataFrame, preds: SweepPredictions, method: str, *, synthetic: bool
) -> pd.DataFrame | None:
    """The paper's statistics beside ours (None for a dataset the paper did not publish).
    `table`: forgetting.metrics_table(preds)."""
    published = published_statistics(preds.schema.name)
    if published.empty:
        return None
    curves = SweepCurves.of(table, preds, method)
    all_seeds = np.arange(curves.changes.shape[0])
    ours = curves.quantities(all_seeds)
    statistics = list(published.itertuples(index=False))
    draws = _bootstrap(curves, statistics, np.random.default_rng(BOOTSTRAP_SEED))
    rows = []
    for i, row in enumerate(statistics):
        value = _value(row, curves, ours, None)
        low, high = _interval(draws[:, i], row, curves, value)
        p = _p_value(row, ours)
        rows.append(
            {
                "figure": row.figure,
                "statistic": row.statistic,
                "x": row.x,
                "y": row.y,
                "subject": row.class_or_pair,
                "paper": float(row.value),
                "ours": value,
                "ci_low": low,
                "ci_high": high,
                "verdict": verdict(row.value, value, low, high, p, row.statistic in CORRELATIONS),
                "note": _note(row, curves, synthetic),
                "source": row.source,
            }
        )
    return pd.DataFrame(rows)


def _bootstrap(curves: SweepCurves, statistics: list, rng) -> np.ndarray:
    """(B, rows) replicate values of every published statistic."""
    n_seeds, n_classes = curves.changes.shape[0], len(curves.classes)
    n_pairs = n_classes * (n_classes - 1) // 2
    draws = np.full((BOOTSTRAP_REPLICATES, len(statistics)), np.nan)
    for b in range(BOOTSTRAP_REPLICATES):
        seeds = np.arange(n_seeds)
        if n_seeds >= MIN_SEEDS_TO_RESAMPLE:
            seeds = rng.integers(n_seeds, size=n_seeds)
        resample = {n_classes: rng.integers(n_classes, size=n_classes)}
        resample[n_pairs] = rng.integers(n_pairs, size=n_pairs)
        quantities = curves.quantities(seeds)
        for i, row in enumerate(statistics):
            draws[b, i] = _value(row, curves, quantities, resample)
    return draws


def _value(row, curves: SweepCurves, quantities: dict, resample: dict | None) -> float:
    """A published row's statistic from our quantities; `resample` maps a length (classes or
    pairs) to the indices a bootstrap replicate draws (None: the sample itself)."""
    if row.statistic in CORRELATIONS:
        x, y = quantities[row.x], quantities[row.y]
        if resample is not None:
            x, y = x[resample[len(x)]], y[resample[len(y)]]
        return _correlation(x, y, CORRELATIONS[row.statistic])
    if row.statistic == "fcd":
        index = curves.pair_index(row.class_or_pair)
    else:
        known = row.class_or_pair in curves.classes
        index = curves.classes.index(row.class_or_pair) if known else None
    return np.nan if index is None else float(quantities[row.statistic][index])


def _correlation(x: np.ndarray, y: np.ndarray, kind: str) -> float:
    """Pearson, or Spearman (Pearson of average ranks, as scipy), over the finite pairs."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan
    if kind == "spearman":
        x, y = rankdata(x), rankdata(y)
    return float(np.corrcoef(x, y)[0, 1])


def _interval(draws: np.ndarray, row, curves: SweepCurves, value: float) -> tuple[float, float]:
    if row.statistic in ("log_train_freq",):  # a fact of the data: no sampling error
        return value, value
    resamples_seeds = curves.changes.shape[0] >= MIN_SEEDS_TO_RESAMPLE
    if row.statistic not in CORRELATIONS and not resamples_seeds:
        return np.nan, np.nan  # a class's own value varies only with the seeds
    finite = draws[np.isfinite(draws)]
    if len(finite) < BOOTSTRAP_REPLICATES // 2:
        return np.nan, np.nan
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def _p_value(row, quantities: dict) -> float:
    if row.statistic not in CORRELATIONS:
        return np.nan
    result = correlate(quantities[row.x], quantities[row.y], row.x, row.y)
    return result[f"{CORRELATIONS[row.statistic]}_p"]


def verdict(paper: str, ours: float, low: float, high: float, p: float, correlation: bool) -> str:
    """`paper` as printed: its last digit sets the rounding tolerance."""
    if not np.isfinite(ours):
        return "not computed"
    if not (np.isfinite(low) and np.isfinite(high)):
        return "untested"
    decimals = len(paper.partition(".")[2])
    tolerance = 0.5 * 10.0**-decimals
    value = float(paper)
    if low - tolerance <= value <= high + tolerance:
        return "consistent"
    if correlation and np.sign(ours) == np.sign(value) and p < 0.05:
        return "same direction"
    return "differs"


def _note(row, curves: SweepCurves, synthetic: bool) -> str:
    notes = [SYNTHETIC_NOTE] if synthetic else []
    uses_change = "rel_ap_change_0.95" in (row.statistic, row.x, row.y)
    if uses_change and curves.change_sparsity != AP_CHANGE_SPARSITY:
        notes.append(f"ours at sparsity {curves.change_sparsity:g} (0.95 was not swept)")
    unresampled = curves.changes.shape[0] < MIN_SEEDS_TO_RESAMPLE
    if unresampled and row.statistic in CORRELATIONS:
        notes.append("seeds not resampled (fewer than 3)")
    return "; ".join(notes)
