"""All analyses of one sweep's predictions: the design's tables, the figures and the findings."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from prunecxr.analysis import cooccurrence, figures, forgetting, pies, replication
from prunecxr.analysis.forgetting import AP_CHANGE_SPARSITY
from prunecxr.analysis.predictions import SweepPredictions

GALLERY_SIZE = 12


@dataclass
class Analysis:
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # artifact path -> table
    figures: dict[str, Figure] = field(default_factory=dict)  # artifact path -> figure
    # claim, seen?, numbers: the paper's findings, and our own tests of its PIE claims
    findings: list[tuple[str, bool | None, str]] = field(default_factory=list)
    pie_tests: list[tuple[str, bool | None, str]] = field(default_factory=list)
    numbers: dict[str, float] = field(default_factory=dict)  # logged as metrics


def analyze_predictions(
    preds: SweepPredictions,
    *,
    cooccurrence_mode: str = "paper",
    load_image: Callable[[int], np.ndarray] | None = None,
    synthetic: bool = False,
) -> Analysis:
    """`load_image(row)` -> (S, S) test image, for the PIE gallery (skipped when None);
    `cooccurrence_mode`: the FCD definition the findings lead with (both are computed);
    `synthetic`: the data was written by `prunecxr synth` (the replication table says so)."""
    result = Analysis()
    table = forgetting.metrics_table(preds)
    result.tables["tables/per_class_metrics.csv"] = table
    curves_by_method = forgetting.mean_ap_curves(table)
    result.tables["tables/mean_ap.csv"] = curves_by_method
    result.figures["figures/mean_ap_vs_sparsity.png"] = figures.mean_ap_vs_sparsity(
        curves_by_method
    )
    method = "l1" if "l1" in preds.methods else preds.methods[0]  # the paper's method
    replicated = replication.replication_table(table, preds, method, synthetic=synthetic)
    if replicated is not None:
        result.tables["tables/replication.csv"] = replicated
    _forgetting(result, preds, table, method, cooccurrence_mode)
    _pies(result, preds, method, load_image)
    return result


# The paper's correlational findings: (x, y) of tables/correlations.csv -> (claim, sign of ρ).
CLAIMS = {
    ("log_train_freq", "k20"): (
        "rare classes are forgotten at lower sparsity (k20 rises with log frequency)",
        1,
    ),
    ("log_train_freq", "rel_ap_change"): (
        "rare classes lose more AP at sparsity {k:g} (the change rises with log frequency)",
        1,
    ),
    ("log_freq_diff", "fcd"): (
        "classes of unlike frequency are forgotten unlike (FCD rises with |Δ log frequency|)",
        1,
    ),
    ("iou", "fcd"): ("classes that co-occur are forgotten alike (FCD falls with IoU)", -1),
}


def _forgetting(result: Analysis, preds, table, method: str, lead: str) -> None:
    classes = preds.schema.classes
    curves = forgetting.forgettability(table, method)
    k20 = forgetting.thresholds(curves, classes, preds.train_counts)
    k_change = forgetting.swept_or_highest(preds.sparsities(method), AP_CHANGE_SPARSITY)
    definitions = sorted(cooccurrence.COOCCURRENCE_MODES, key=lambda d: d != lead)
    fcd = {d: _fcd_of(curves, preds, d) for d in definitions}
    correlations = pd.concat(
        [
            forgetting.frequency_correlations(curves, k20, k_change).assign(definition=""),
            *(cooccurrence.fcd_correlations(fcd[d], d).assign(definition=d) for d in definitions),
        ],
        ignore_index=True,
    )
    result.tables.update(
        {
            "tables/forgettability.csv": curves,
            "tables/thresholds.csv": k20,
            "tables/correlations.csv": _definition_after_y(correlations),
            "tables/fcd.csv": pd.concat([fcd[d].assign(definition=d) for d in definitions])[
                ["definition", *fcd[lead].columns]
            ],
        }
    )
    callouts = replication.callouts(preds.schema.name)
    log_freq = np.log(k20.train_freq.clip(lower=1).to_numpy(float))
    at_k = curves[curves.sparsity == k_change].set_index("class").rel_ap_change.reindex(classes)
    scatter = functools.partial(
        figures.correlation_scatter, labels=classes, highlight=callouts.classes
    )
    result.figures["figures/forgettability_curves.png"] = figures.forgettability_curves(
        curves, k20, method
    )
    result.figures["figures/k20_vs_frequency.png"] = scatter(
        log_freq,
        k20.k20.to_numpy(float),
        axes_labels=("log training frequency", "k20 (sparsity where AP has dropped 20 %)"),
        title=f"Forgetting threshold ({method})",
    )
    result.figures["figures/ap_change_vs_frequency.png"] = scatter(
        log_freq,
        100 * at_k.to_numpy(),
        axes_labels=("log training frequency", f"relative AP change at sparsity {k_change:g} (%)"),
        title=f"Damage by class ({method})",
    )
    for d in definitions:
        result.figures[f"figures/fcd_{d}.png"] = figures.fcd_figure(fcd[d], d, callouts.pairs)
    _correlation_findings(result, correlations, k_change)
    result.numbers["classes_forgotten_by_k_change"] = float((k20.k20 <= k_change).sum())


def _fcd_of(curves: pd.DataFrame, preds, definition: str) -> pd.DataFrame:
    labels = _labels_of(preds, cooccurrence.SPLIT_OF_MODE[definition])
    return cooccurrence.fcd_table(curves, preds.schema.classes, labels, definition)


def _definition_after_y(correlations: pd.DataFrame) -> pd.DataFrame:
    columns = [c for c in correlations.columns if c != "definition"]
    return correlations[[*columns[:2], "definition", *columns[2:]]]


def _labels_of(preds, split: str) -> np.ndarray:
    return preds.train_labels if split == "train" else preds.labels


def _correlation_findings(result: Analysis, correlations: pd.DataFrame, k: float) -> None:
    for row in correlations.itertuples():
        key = (row.x, "rel_ap_change" if row.y.startswith("rel_ap_change") else row.y)
        if key not in CLAIMS:
            continue  # e.g. legacy's iou^0.25 row: the same Spearman ρ as the iou row
        claim, sign = CLAIMS[key]
        seen = None
        if row.n >= 3 and np.isfinite(row.spearman_rho):
            seen = bool(sign * row.spearman_rho > 0 and row.spearman_p < 0.05)
        definition = f" [FCD, {row.definition} definition]" if row.definition else ""
        result.findings.append(
            (
                claim.format(k=k) + definition,
                seen,
                f"Spearman ρ = {row.spearman_rho:.2f} (p = {row.spearman_p:.3g}), "
                f"Pearson r = {row.pearson_r:.2f} (p = {row.pearson_p:.3g}), n = {row.n}",
            )
        )
        suffix = f"_{row.definition}" if row.definition else ""
        result.numbers[f"spearman_{row.y}_vs_{row.x}{suffix}"] = row.spearman_rho


def _pies(result: Analysis, preds, method: str, load_image) -> None:
    k_ref = forgetting.swept_or_highest(preds.sparsities(method), pies.PIE_SPARSITY)
    found = pies.find_pies(preds, method, k_ref)
    is_pie = np.zeros(len(preds.labels), bool)
    is_pie[found.row[found.is_pie]] = True
    classes = preds.schema.classes
    ratios = pies.class_ratios(preds.labels, is_pie, classes)
    counts = pies.disease_count_ratios(preds.labels, is_pie, classes, preds.schema.normal_class)
    result.tables.update(
        {
            "tables/pies.csv": found[found.is_pie][["row", "image", "corr"]],
            "tables/pies_undefined.csv": found[found["corr"].isna()][["row", "image"]],
            "tables/pie_class_ratios.csv": ratios,
            "tables/pie_disease_counts.csv": counts,
        }
    )
    result.figures["figures/pie_class_ratios.png"] = figures.ratio_bars(
        ratios, "class", f"Labels among PIEs (k = {k_ref:g})"
    )
    result.figures["figures/pie_disease_counts.png"] = figures.ratio_bars(
        counts, "n_findings", "Number of findings among PIEs"
    )
    rho = forgetting.correlate(
        np.log(preds.train_counts.clip(min=1)), ratios.ratio.to_numpy(float), "", ""
    )
    result.pie_tests.append(
        (
            "PIEs are enriched for rare classes (PIE ratio falls with log frequency)",
            bool(rho["spearman_rho"] < 0 and rho["spearman_p"] < 0.05) if rho["n"] >= 3 else None,
            f"Spearman ρ = {rho['spearman_rho']:.2f} (p = {rho['spearman_p']:.3g})",
        )
    )
    multi = counts[counts.n_findings.isin(["2", "3", "4+"])]
    pie_multi, other_multi = multi.pie_share.sum(), multi.other_share.sum()
    result.pie_tests.append(
        (
            "PIEs more often show several findings (2 or more)",
            bool(pie_multi > other_multi),
            f"{100 * pie_multi:.1f} % of PIEs vs {100 * other_multi:.1f} % of other images",
        )
    )
    result.numbers.update(
        {
            "n_pies": float(is_pie.sum()),
            "n_undefined_correlation": float(found["corr"].isna().sum()),
            "pie_multi_finding_share": pie_multi,
        }
    )
    if load_image is not None:
        rows = found[found.is_pie].row.to_numpy()[:GALLERY_SIZE]
        captions = [
            _caption(preds.labels[r], classes, found.set_index("row")["corr"][r]) for r in rows
        ]
        result.figures["figures/pie_gallery.png"] = figures.image_gallery(
            [load_image(int(r)) for r in rows],
            captions,
            f"PIEs (lowest correlation first, k = {k_ref:g})",
        )


def _caption(labels: np.ndarray, classes, corr: float) -> str:
    names = [classes[c] for c in np.flatnonzero(labels)]
    return f"ρ={corr:.2f}\n" + "\n".join(names[:3]) + ("\n…" if len(names) > 3 else "")
