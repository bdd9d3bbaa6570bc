"""Analyses against hand-computable cases and independent scipy/sklearn computations."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr
from sklearn.metrics import average_precision_score

from prunecxr import PrunecxrError
from prunecxr.analysis import cooccurrence, figures, forgetting, pies
from prunecxr.analysis.predictions import SweepPredictions, read_published_predictions
from prunecxr.data import DatasetSchema, get_schema

TOY = DatasetSchema(
    name="toy", image_column="id", image_suffix=".png", classes=("No Finding", "A", "B")
)


def _toy_predictions(seeds=(0, 1, 2), sparsities=(0.0, 0.5, 0.9)) -> SweepPredictions:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (60, 3)).astype(float)
    labels[:, 0] = labels[:, 1:].sum(axis=1) == 0
    probs = {}
    for seed in seeds:
        for k in sparsities:
            noise = rng.random((60, 3)) * (0.5 + k)
            probs[("l1", seed, k)] = np.clip(0.5 * labels + noise, 0, 1)
    train = np.array([[1, 0, 0]] * 10 + [[0, 1, 0]] * 4 + [[0, 1, 1]] * 2, dtype=float)
    return SweepPredictions(TOY, tuple(f"{i}.png" for i in range(60)), labels, train, probs)


def test_relative_changes_match_sklearn():
    preds = _toy_predictions()
    table = forgetting.metrics_table(preds)
    row = table[(table.seed == 1) & (table.sparsity == 0.9) & (table["class"] == "B")].iloc[0]
    ap_0 = average_precision_score(preds.labels[:, 2], preds.probs[("l1", 1, 0.0)][:, 2])
    ap_k = average_precision_score(preds.labels[:, 2], preds.probs[("l1", 1, 0.9)][:, 2])
    assert row.ap == pytest.approx(ap_k)
    assert row.rel_ap_change == pytest.approx((ap_k - ap_0) / ap_0)
    assert (table[table.sparsity == 0].rel_ap_change == 0).all()


def _hand_table() -> pd.DataFrame:
    """rel_ap_change per seed: class A drops to -20 % (median) at 0.5, B never does."""
    rows = []
    changes = {
        "A": {0.0: [0, 0, 0], 0.5: [-0.1, -0.3, -0.25], 0.9: [-0.5, -0.6, -0.4]},
        "B": {0.0: [0, 0, 0], 0.5: [0.0, -0.1, 0.1], 0.9: [-0.19, -0.5, 0.0]},
    }
    for name, by_k in changes.items():
        for k, values in by_k.items():
            rows += [
                {"method": "l1", "seed": s, "sparsity": k, "class": name, "rel_ap_change": v}
                for s, v in enumerate(values)
            ]
    return pd.DataFrame(rows)


def test_forgettability_is_the_median_over_seeds_and_k20_the_first_drop_below_20_percent():
    curves = forgetting.forgettability(_hand_table(), "l1")
    a = curves[curves["class"] == "A"].set_index("sparsity").rel_ap_change
    assert a[0.5] == pytest.approx(-0.25) and a[0.9] == pytest.approx(-0.5)
    k20 = forgetting.thresholds(curves, ("A", "B"), np.array([100, 10]))
    assert k20.set_index("class").k20["A"] == 0.5
    assert np.isnan(k20.set_index("class").k20["B"])  # median -0.19 at 0.9: never forgotten
    assert list(k20.columns) == ["class", "train_freq", "k20"]


def test_correlations_equal_scipy():
    x = np.log([5, 50, 500, 5000, 50000.0])
    y = np.array([0.3, 0.5, 0.45, 0.8, 0.9])
    row = forgetting.correlate(x, y, "log_train_freq", "k20")
    assert row["spearman_rho"] == pytest.approx(spearmanr(x, y).statistic)
    assert row["pearson_r"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert row["n"] == 5
    with_nan = forgetting.correlate(np.append(x, 1.0), np.append(y, np.nan), "x", "y")
    assert with_nan["n"] == 5 and with_nan["spearman_rho"] == pytest.approx(row["spearman_rho"])


def test_fcd_iou_and_frequency_gap_by_hand():
    curves = pd.DataFrame(
        {
            "class": ["A", "A", "B", "B"],
            "sparsity": [0.0, 0.9, 0.0, 0.9],
            "rel_ap_change": [0.0, -0.3, 0.0, -0.7],
        }
    )
    train = np.array([[1, 0], [1, 0], [1, 1], [0, 1]], dtype=float)  # A: 3, B: 2, both: 1
    row = cooccurrence.fcd_table(curves, ("A", "B"), train, "paper").iloc[0]
    assert row.fcd == pytest.approx(0.4)
    assert row.iou == pytest.approx(1 / 4)  # |A ∩ B| = 1, |A ∪ B| = 4
    assert row.log_freq_diff == pytest.approx(abs(np.log(3) - np.log(2)))
    legacy = cooccurrence.fcd_table(curves, ("A", "B"), train, "legacy").iloc[0]
    # Co-occurrence column sums: A: 3 + 1 = 4, B: 1 + 2 = 3; IoU = 1 / (4 + 3 - 1)
    assert legacy.iou == pytest.approx(1 / 6)
    assert legacy.log_freq_diff == pytest.approx(abs(np.log(4) - np.log(3)))
    with pytest.raises(PrunecxrError, match="paper, legacy"):
        cooccurrence.pair_statistics(train, "other")


def test_pies_are_the_images_whose_class_ranking_changed_most():
    preds = _toy_predictions(seeds=(0, 1), sparsities=(0.0, 0.9))
    rng = np.random.default_rng(1)
    dense = rng.random((60, 3))
    pruned = dense.copy()
    pruned[[7, 42, 55]] = pruned[[7, 42, 55]][:, ::-1]  # reversed class ranking
    preds.probs.update({("l1", s, 0.0): dense for s in (0, 1)})
    preds.probs.update({("l1", s, 0.9): pruned for s in (0, 1)})
    found = pies.find_pies(preds, "l1", 0.9)
    assert set(found[found.is_pie].row) == {7, 42, 55}  # 5 % of 60 = 3 images
    assert found["corr"].iloc[0] == pytest.approx(spearmanr(dense[7], pruned[7]).statistic)


def test_pie_ratios_by_hand():
    labels = np.array([[0, 1, 1], [0, 1, 0], [1, 0, 0], [1, 0, 0]], dtype=float)
    is_pie = np.array([True, False, False, False])
    ratios = pies.class_ratios(labels, is_pie, ("No Finding", "A", "B")).set_index("class")
    assert ratios.ratio["A"] == pytest.approx(1 / (1 / 3))  # all PIEs have A, 1 in 3 others do
    assert np.isnan(ratios.ratio["B"])  # no other image has B
    classes = ("No Finding", "A", "B")
    counts = pies.disease_count_ratios(labels, is_pie, classes, "No Finding").set_index(
        "n_findings"
    )
    assert counts.pie_share["2"] == 1.0 and counts.other_share["0"] == pytest.approx(2 / 3)
    counted = pies.disease_count_ratios(labels, is_pie, classes).set_index("n_findings")
    assert counted.other_share["1"] == pytest.approx(1.0)  # no normal class: it counts
    assert list(counts.index) == ["0", "1", "2", "3", "4+"]


def _write_published(directory, schema, seeds=(0, 1), ks=("0", "0.5", "0.9"), label="Hernia|Mass"):
    for seed in seeds:
        for k in ks:
            frame = pd.DataFrame(np.full((4, schema.num_classes), 0.1), columns=schema.classes)
            frame["label"] = [label, "No Finding", "Mass", "Effusion"]
            with open(directory / f"{schema.name}_resnet50_seed-{seed}_prune-{k}.pkl", "wb") as f:
                pickle.dump(frame, f)


def test_published_predictions_need_allow_pickle(tmp_path):
    nih = get_schema("nih-cxr-lt")
    _write_published(tmp_path, nih)
    with pytest.raises(PrunecxrError, match="pass --allow-pickle"):
        read_published_predictions(nih, tmp_path, allow_pickle=False)
    preds = read_published_predictions(nih, tmp_path, allow_pickle=True)
    assert set(preds.probs) == {("l1", s, k) for s in (0, 1) for k in (0.0, 0.5, 0.9)}
    assert preds.labels[0, nih.classes.index("Hernia")] == 1
    assert preds.labels[0, nih.classes.index("Mass")] == 1 and preds.labels[0].sum() == 2


def test_published_predictions_with_an_unknown_class_name_the_row(tmp_path):
    nih = get_schema("nih-cxr-lt")
    _write_published(tmp_path, nih, seeds=(0,), ks=("0",), label="Hernia|Dragon")
    with pytest.raises(PrunecxrError, match="row 0: unknown class 'Dragon'"):
        read_published_predictions(nih, tmp_path, allow_pickle=True)


def test_ap_change_is_correlated_at_095_and_pies_stay_at_09():
    from prunecxr.analysis.study_analysis import analyze_predictions

    preds = _toy_predictions(sparsities=(0.0, 0.5, 0.9, 0.95))
    result = analyze_predictions(preds)
    rows = result.tables["tables/correlations.csv"].set_index("y")
    assert "rel_ap_change_0.95" in rows.index
    curves = result.tables["tables/forgettability.csv"]
    at_095 = curves[curves.sparsity == 0.95].set_index("class").rel_ap_change.reindex(TOY.classes)
    log_freq = np.log(preds.train_counts)
    expected = spearmanr(log_freq, at_095.to_numpy()).statistic
    assert rows.loc["rel_ap_change_0.95", "spearman_rho"] == pytest.approx(expected)
    found = pies.find_pies(preds, "l1", 0.9)
    assert set(result.tables["tables/pies.csv"]["row"]) == set(found[found.is_pie].row)
    figures.close(result.figures.values())


def test_both_fcd_definitions_every_time_on_their_own_split():
    """fcd.csv and correlations.csv carry both definitions, whatever the mode; the mode only
    picks which the findings lead with."""
    from prunecxr.analysis.study_analysis import analyze_predictions

    preds = _toy_predictions(sparsities=(0.0, 0.5, 0.9, 0.95))
    for lead in ("paper", "legacy"):
        result = analyze_predictions(preds, cooccurrence_mode=lead)
        all_fcd = result.tables["tables/fcd.csv"]
        correlations = result.tables["tables/correlations.csv"]
        assert list(all_fcd.definition.unique()) == sorted(
            ["paper", "legacy"], key=lambda d: d != lead
        )
        for definition, labels in (("paper", preds.train_labels), ("legacy", preds.labels)):
            fcd = all_fcd[all_fcd.definition == definition]
            frequency, iou = cooccurrence.pair_statistics(labels, definition)
            assert fcd.iou.tolist() == pytest.approx([iou[0, 1], iou[0, 2], iou[1, 2]])
            rows = correlations[correlations.definition == definition].set_index("x")
            for x in ("log_freq_diff", "iou"):
                expected = spearmanr(fcd[x], fcd.fcd).statistic if np.ptp(fcd[x]) else np.nan
                assert rows.loc[x, "y"] == "fcd"
                assert rows.loc[x, "spearman_rho"] == pytest.approx(expected, nan_ok=True)
            assert ("iou^0.25" in rows.index) == (definition == "legacy")
        fcd_claims = [claim for claim, _, _ in result.findings if "FCD" in claim]
        assert f"{lead} definition" in fcd_claims[0] and len(fcd_claims) == 4
        assert {"figures/fcd_paper.png", "figures/fcd_legacy.png"} <= set(result.figures)
        figures.close(result.figures.values())


def test_legacy_cooccurrence_uses_test_column_sums_by_hand():
    test = np.array([[1, 1], [1, 0], [0, 1], [0, 1]], dtype=float)  # M = [[2, 1], [1, 3]]
    frequency, iou = cooccurrence.pair_statistics(test, "legacy")
    assert frequency.tolist() == [3, 4]  # column sums of M
    assert iou[0, 1] == pytest.approx(1 / (3 + 4 - 1))
    assert cooccurrence.SPLIT_OF_MODE == {"paper": "train", "legacy": "test"}


def test_pie_count_is_int_of_5_percent_and_undefined_correlations_are_apart():
    """N = 79: the original takes int(0.05 * 79) = 3 images; a 5 % quantile would take 4."""
    rng = np.random.default_rng(3)
    n = 79
    dense = rng.random((n, 3))
    pruned = dense + rng.normal(0, 0.05, (n, 3))
    pruned[[5, 17, 60, 70]] = dense[[5, 17, 60, 70]][:, ::-1]  # 4 reversed rankings
    pruned[9] = 0.5  # constant prediction: undefined correlation
    labels = np.zeros((n, 3))
    preds = SweepPredictions(
        TOY,
        tuple(map(str, range(n))),
        labels,
        labels,
        {("l1", 0, 0.0): dense, ("l1", 0, 0.9): pruned},
    )
    found = pies.find_pies(preds, "l1", 0.9)
    corr = pies.image_correlations(dense, pruned)
    order = np.argsort(np.where(np.isnan(corr), np.inf, corr), kind="stable")
    assert found[found.is_pie].row.tolist() == order[:3].tolist()
    assert found.is_pie.sum() == int(0.05 * n) == 3
    assert np.isnan(found.set_index("row")["corr"][9]) and not found.set_index("row").is_pie[9]


def test_published_files_of_random_pruning_with_val_files_beside(tmp_path):
    nih = get_schema("nih-cxr-lt")
    _write_published(tmp_path, nih)
    val = pd.DataFrame(np.full((2, nih.num_classes), 0.3), columns=nih.classes)  # other rows
    val["label"] = ["Mass", "Hernia"]
    val.to_pickle(tmp_path / "nih-cxr-lt_resnet50_seed-0_prune-0_val.pkl")
    preds = read_published_predictions(nih, tmp_path, allow_pickle=True, method="random")
    assert set(preds.probs) == {("random", s, k) for s in (0, 1) for k in (0.0, 0.5, 0.9)}
    assert len(preds.labels) == 4  # the test files' rows; the _val file is not read


def test_a_missing_published_file_is_named(tmp_path):
    nih = get_schema("nih-cxr-lt")
    _write_published(tmp_path, nih, seeds=(0, 1, 2))
    (tmp_path / "nih-cxr-lt_resnet50_seed-1_prune-0.5.pkl").unlink()
    (tmp_path / "nih-cxr-lt_resnet50_seed-2_prune-0.9.pkl").unlink()
    with pytest.raises(
        PrunecxrError, match="2 prediction files missing \\(seed 1 at 0.5, seed 2 at 0.9\\)"
    ):
        read_published_predictions(nih, tmp_path, allow_pickle=True)


def test_report_shows_each_k20_as_the_grid_point_it_is():
    """0.925 (the demo's grid) is not rounded to 0.93, a sparsity never pruned at."""
    from prunecxr.analysis.report import render_report
    from prunecxr.analysis.study_analysis import Analysis

    thresholds = pd.DataFrame(
        {
            "class": ["Hernia", "Mass", "Effusion"],
            "train_freq": [60, 220, 461],
            "k20": [0.925, 0.97, np.nan],
        }
    )
    page = render_report(
        Analysis(tables={"tables/thresholds.csv": thresholds}), title="t", context={}
    )
    for cell in ("0.925", "0.97", "never", "60", "461"):
        assert f"<td>{cell}</td>" in page
    assert "0.93<" not in page and "60.0" not in page
