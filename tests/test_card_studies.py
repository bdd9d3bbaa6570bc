"""Studies end to end on datasets described by cards, at tiny sizes on the CPU: K = 3 and K = 60
classes of their own (`synth --classes K`), and the README's CheXpert example."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import prunecxr

pytestmark = pytest.mark.slow
TINY = ["--arch", "resnet18", "--image-size", "32", "--batch-size", "32", "--lr", "1e-3"]
EXAMPLE = Path(__file__).parents[1] / "examples" / "chexpert.yaml"


def _study(card: Path, data: Path, tmp_path: Path, *options: str) -> pd.DataFrame:
    result = prunecxr(
        "study",
        *("--dataset", str(card), "--data-dir", str(data), *TINY, "--device", "cpu"),
        *("--cache-dir", str(tmp_path / "cache"), "--max-epochs", "1", *options),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["prunecxr"])
    assert set(runs["status"]) == {"FINISHED"}
    return runs


def _table(runs: pd.DataFrame, name: str) -> pd.DataFrame:
    analyze = runs[runs["tags.prunecxr.stage"] == "analyze"].run_id.item()
    return pd.read_csv(MlflowClient().download_artifacts(analyze, name))


@pytest.mark.parametrize("classes", [3, 60])
def test_a_study_on_k_classes_of_their_own(classes, tmp_path, mlflow_store):
    data = tmp_path / "data"
    sizes = ("--n-train", "160", "--n-val", "48", "--n-test", "96", "--size", "32")
    assert prunecxr("synth", "--classes", str(classes), "--out", str(data), *sizes).returncode == 0
    runs = _study(
        data / "dataset.yaml",
        data,
        tmp_path,
        *("--seeds", "2", "--methods", "l1", "--sparsities", "0,0.5,0.9"),
    )
    study = runs[runs["tags.prunecxr.stage"] == "study"]
    assert study["tags.mlflow.runName"].item() == f"study-synth-{classes}"
    assert len(_table(runs, "tables/per_class_metrics.csv")["class"].unique()) == classes
    assert len(_table(runs, "tables/thresholds.csv")) == classes
    fcd = _table(runs, "tables/fcd.csv")
    assert len(fcd) == 2 * classes * (classes - 1) // 2  # every pair, in both definitions
    counts = _table(runs, "tables/pie_disease_counts.csv")  # no normal class: every class counts
    assert list(counts.n_findings.astype(str)) == ["0", "1", "2", "3", "4+"]
    analyze = runs[runs["tags.prunecxr.stage"] == "analyze"].run_id.item()
    artifacts = {a.path for a in MlflowClient().list_artifacts(analyze, "tables")}
    assert "tables/replication.csv" not in artifacts  # the paper published no such dataset
    # The reader study finds the card and its images (under the card's image_root) again.
    readers = tmp_path / "readers"
    export = prunecxr(
        "reader-study",
        "export",
        analyze,
        "--out",
        str(readers),
        "--per-reader",
        "2",
        "--readers",
        "1",
    )
    assert export.returncode == 0, export.stderr[-2000:]
    assert len(list(readers.glob("reader-*/*.png"))) == 4


def test_the_readme_s_chexpert_example(tmp_path, mlflow_store):
    data = tmp_path / "chexpert"
    sizes = ("--n-train", "160", "--n-val", "48", "--n-test", "96", "--size", "32")
    written = prunecxr("synth", "--dataset", str(EXAMPLE), "--out", str(data), *sizes)
    assert written.returncode == 0, written.stderr[-2000:]
    runs = _study(
        EXAMPLE,
        data,
        tmp_path,
        "--seeds",
        "2",
        "--methods",
        "l1,structured",
        "--sparsities",
        "0,0.9",
    )
    trained = runs[runs["tags.prunecxr.stage"] == "train"]
    assert set(trained["params.dataset"]) == {str(EXAMPLE)}
    assert len(_table(runs, "tables/thresholds.csv")) == 14
