"""The replication table on hand-made cases whose answer is known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from prunecxr.analysis import cooccurrence, figures, forgetting, replication
from prunecxr.analysis.predictions import SweepPredictions
from prunecxr.analysis.study_analysis import analyze_predictions
from prunecxr.data import DatasetSchema, get_schema

NIH = get_schema("nih-cxr-lt")
SPARSITIES = (0.0, 0.5, 0.9, 0.95)


def _train_labels(counts: np.ndarray) -> np.ndarray:
    """(max count, C) labels whose column sums are `counts`."""
    rows = np.arange(counts.max())[:, None]
    return (rows < counts[None, :]).astype(float)


def _case(change_of_class, seeds=(0, 1, 2), counts=None) -> tuple[pd.DataFrame, SweepPredictions]:
    """A metrics table whose relative AP change is change_of_class(seed) -> (K, C), and the
    predictions it belongs to (train counts chosen by hand, random test labels)."""
    if counts is None:
        counts = np.geomspace(44625, 130, NIH.num_classes).round()
    rows = []
    for seed in seeds:
        changes = change_of_class(seed)
        for k_index, k in enumerate(SPARSITIES):
            for c, name in enumerate(NIH.classes):
                rows.append(
                    {
                        "method": "l1",
                        "seed": seed,
                        "sparsity": k,
                        "class": name,
                        "rel_ap_change": changes[k_index, c],
                    }
                )
    rng = np.random.default_rng(0)
    test = (rng.random((300, NIH.num_classes)) < np.linspace(0.4, 0.05, NIH.num_classes)) * 1.0
    preds = SweepPredictions(NIH, (), test, _train_labels(np.asarray(counts, int)), {})
    return pd.DataFrame(rows), preds


def _damage_rising_with_frequency(seed: int) -> np.ndarray:
    """Rare classes lose more, exactly linearly in log frequency, the same for every seed."""
    log_freq = np.log(np.geomspace(44625, 130, NIH.num_classes).round())
    scale = (log_freq - log_freq.max()) / np.ptp(log_freq)  # 0 (common) .. -1 (rare)
    return np.outer(np.array(SPARSITIES), 0.1 + 0.9 * -scale) * -1


def test_verdicts_by_hand():
    verdict = replication.verdict
    assert verdict("0.64", 0.62, 0.50, 0.70, 0.01, True) == "consistent"
    # 0.64 as printed stands for [0.635, 0.645): an interval ending at 0.6351 holds it
    assert verdict("0.64", 0.60, 0.50, 0.6351, 0.01, True) == "consistent"
    assert verdict("0.64", 0.60, 0.50, 0.6349, 0.01, True) == "same direction"
    assert verdict("0.64", 0.60, 0.50, 0.6349, 0.20, True) == "differs"  # not significant
    assert verdict("0.80", -0.5, -0.7, -0.3, 0.001, True) == "differs"  # opposite sign
    assert verdict("0.90", 0.70, 0.60, 0.80, 0.001, False) == "differs"  # a value, not a sign
    assert verdict("0.90", np.nan, np.nan, np.nan, np.nan, False) == "not computed"
    assert verdict("0.90", 0.90, np.nan, np.nan, np.nan, False) == "untested"


def test_a_perfect_relation_is_same_direction_with_an_interval_of_one():
    """AP change exactly linear in log frequency, identical across seeds: r = ρ = 1 in every
    bootstrap replicate, so the paper's 0.80 lies outside [1, 1] but agrees in sign."""
    table, preds = _case(_damage_rising_with_frequency)
    result = replication.replication_table(table, preds, "l1", synthetic=False)
    rows = result[result.x == "rel_ap_change_0.95"].set_index("statistic")
    for statistic in ("pearson_r", "spearman_rho"):
        row = rows.loc[statistic]
        assert row.ours == pytest.approx(1) and row.ci_low == pytest.approx(1)
        assert row.verdict == "same direction"
    assert (result.note == "").all()  # real data, 0.95 swept, 3 seeds


def test_frequencies_are_facts_and_match_when_the_counts_do():
    """ln(44625) = 10.7060495 and ln(130) = 4.8675345: the paper's No Finding and Hernia."""
    counts = np.full(NIH.num_classes, 1000)
    counts[NIH.classes.index("No Finding")], counts[NIH.classes.index("Hernia")] = 44625, 130
    table, preds = _case(_damage_rising_with_frequency, counts=counts)
    result = replication.replication_table(table, preds, "l1", synthetic=False)
    rows = result[result.statistic == "log_train_freq"].set_index("subject")
    assert (rows.verdict == "consistent").all()
    assert (rows.ci_low == rows.ours).all() and (rows.ci_high == rows.ours).all()


def test_a_class_value_has_a_seed_interval_only_with_three_seeds():
    def noisy(seed):
        return _damage_rising_with_frequency(0) + 0.05 * (seed - 1)  # seeds differ

    hernia = "Hernia"
    for seeds, tested in (((0, 1, 2, 3), True), ((0, 1), False)):
        table, preds = _case(noisy, seeds=seeds)
        result = replication.replication_table(table, preds, "l1", synthetic=True)
        row = result[(result.statistic == "rel_ap_change_0.95") & (result.subject == hernia)]
        row = row.iloc[0]
        per_seed = [noisy(s)[3, NIH.classes.index(hernia)] for s in seeds]
        assert row.ours == pytest.approx(np.median(per_seed))
        if tested:
            assert min(per_seed) <= row.ci_low <= row.ours <= row.ci_high <= max(per_seed)
        else:
            assert np.isnan(row.ci_low) and row.verdict == "untested"
            assert "seeds not resampled" in result.note[result.statistic == "pearson_r"].iloc[0]
        assert result.note.str.contains("synthetic data").all()


def test_ours_are_the_analysis_own_numbers_and_the_table_repeats():
    rng = np.random.default_rng(3)
    classes = NIH.num_classes
    test = (rng.random((200, classes)) < np.linspace(0.4, 0.05, classes)) * 1.0
    train = _train_labels(np.geomspace(3000, 20, classes).astype(int))
    probs = {
        ("l1", seed, k): np.clip(0.5 * test + rng.random(test.shape) * (0.3 + k), 0, 1)
        for seed in range(3)
        for k in SPARSITIES
    }
    preds = SweepPredictions(NIH, tuple(map(str, range(200))), test, train, probs)
    result = analyze_predictions(preds)
    table = result.tables["tables/replication.csv"]
    correlations = result.tables["tables/correlations.csv"].fillna({"definition": ""})
    legacy = correlations.set_index(["x", "y", "definition"])
    k20 = table[(table.statistic == "spearman_rho") & (table.x == "k20")].iloc[0]
    expected = legacy.loc[("log_train_freq", "k20", ""), "spearman_rho"]
    assert k20.ours == pytest.approx(expected, nan_ok=True)
    iou = table[(table.statistic == "pearson_r") & (table.x == "iou^0.25 (legacy)")].iloc[0]
    assert iou.ours == pytest.approx(legacy.loc[("iou^0.25", "fcd", "legacy"), "pearson_r"])
    fcd = result.tables["tables/fcd.csv"].query("definition == 'legacy'")
    pair = fcd[(fcd.class_a == "Infiltration") & (fcd.class_b == "Hernia")].fcd.iloc[0]
    assert table[table.subject == "Infiltration|Hernia"].ours.iloc[0] == pytest.approx(pair)
    again = replication.replication_table(
        forgetting.metrics_table(preds), preds, "l1", synthetic=False
    )
    pd.testing.assert_frame_equal(table, again)  # seeded: the same run, the same table
    figures.close(result.figures.values())


def test_only_the_papers_datasets_get_a_table_and_callouts_come_from_it():
    toy = DatasetSchema(name="toy", image_column="id", image_suffix=".png", classes=("A", "B"))
    preds = SweepPredictions(toy, (), np.eye(2), np.eye(2), {})
    table = pd.DataFrame(columns=["method", "seed", "sparsity", "class", "rel_ap_change"])
    assert replication.replication_table(table, preds, "l1", synthetic=False) is None
    assert replication.published_statistics("mimic-cxr-lt").figure.isin(["Fig. 2", "Fig. 4"]).all()
    nih = replication.callouts("nih-cxr-lt")
    assert nih.classes == ("No Finding", "Hernia") and "Infiltration|Hernia" in nih.pairs
    assert len(replication.published_statistics("nih-cxr-lt")) == 17


def test_paper_style_scatter_has_its_line_numbers_and_no_overlapping_labels():
    """20 class names on a crowded plot: none overlaps another after placement; the call-outs
    are ringed; r and ρ are printed."""
    rng = np.random.default_rng(0)
    x = np.sort(rng.random(NIH.num_classes)) * 0.5 + 5  # crowded on purpose
    y = x * 0.3 + rng.random(NIH.num_classes) * 0.05
    fig = figures.correlation_scatter(
        x, y, NIH.classes, axes_labels=("x", "y"), title="t", highlight=("Hernia",)
    )
    ax = fig.axes[0]
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text() in NIH.classes]
    assert len(labels) == NIH.num_classes
    boxes = [t.get_window_extent(renderer) for t in labels]
    overlaps = [
        (labels[i].get_text(), labels[j].get_text())
        for i in range(len(boxes))
        for j in range(i + 1, len(boxes))
        if boxes[i].overlaps(boxes[j])
    ]
    assert overlaps == []
    assert any(t.get_text().startswith("r = ") for t in ax.texts)
    assert len(ax.lines) >= 1  # the least-squares line
    bold = [t.get_text() for t in labels if t.get_fontweight() == "bold"]
    assert bold == ["Hernia"]
    figures.close([fig])


def test_legacy_pair_statistics_are_the_test_splits():
    """The FCD rows use the legacy definition: frequency and IoU from the test split."""
    table, preds = _case(_damage_rising_with_frequency)
    curves = replication.SweepCurves.of(table, preds, "l1")
    frequency, iou = cooccurrence.pair_statistics(preds.labels, "legacy")
    a, b = NIH.classes.index("Emphysema"), NIH.classes.index("Pneumomediastinum")
    index = curves.pair_index("Pneumomediastinum|Emphysema")  # either order
    assert curves.legacy_iou_scaled[index] == pytest.approx(iou[a, b] ** 0.25)
    expected = abs(np.log(frequency[a]) - np.log(frequency[b]))
    assert curves.legacy_log_freq_diff[index] == pytest.approx(expected)
