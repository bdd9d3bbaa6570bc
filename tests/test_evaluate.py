"""Per-class metrics against sklearn and the design's metric names."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from prunecxr.evaluate import per_class_metrics, predictions_frame, summarize

CLASSES = ("No Finding", "Subcutaneous Emphysema", "Hernia")


def test_per_class_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, (200, 3)).astype(np.float32)
    probs = np.clip(labels * 0.3 + rng.random((200, 3)) * 0.7, 0, 1)
    metrics = per_class_metrics(probs, labels, CLASSES)
    for c in range(3):
        row = metrics.iloc[c]
        assert row.auc == pytest.approx(roc_auc_score(labels[:, c], probs[:, c]))
        assert row.ap == pytest.approx(average_precision_score(labels[:, c], probs[:, c]))
        assert row.f1 == pytest.approx(f1_score(labels[:, c], probs[:, c] >= 0.5))


def test_hand_computed_case():
    labels = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=np.float32)
    probs = np.array([[0.9, 0.2, 0.1], [0.2, 0.8, 0.3], [0.6, 0.4, 0.2], [0.7, 0.1, 0.9]])
    metrics = per_class_metrics(probs, labels, CLASSES)
    # No Finding: positives 0.9, 0.6; negatives 0.2, 0.7 -> 3 of 4 pairs ordered right
    assert metrics.auc[0] == pytest.approx(0.75)
    assert metrics.f1[1] == pytest.approx(2 / 3)  # one TP (0.8), one FN (0.4), no FP
    assert metrics.auc[2] == pytest.approx(1.0)


def test_undefined_auc_is_nan_and_excluded_from_means():
    labels = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
    probs = np.array([[0.9, 0.1, 0.1], [0.1, 0.8, 0.2]])
    summary = summarize(per_class_metrics(probs, labels, CLASSES), "test")
    assert np.isnan(summary["test_auc_hernia"])
    assert summary["test_mAUC"] == pytest.approx(1.0)
    assert "test_ap_subcutaneous_emphysema" in summary and "test_f1_no_finding" in summary


def test_predictions_frame_has_image_probs_and_labels():
    frame = predictions_frame(("a.png", "b.png"), np.eye(2, 3), np.eye(2, 3), CLASSES)
    assert list(frame.columns) == [
        "image",
        *CLASSES,
        "label_no_finding",
        "label_subcutaneous_emphysema",
        "label_hernia",
    ]
    assert frame.loc[1, "Subcutaneous Emphysema"] == 1.0 and frame.loc[1, "label_no_finding"] == 0
