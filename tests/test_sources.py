"""Model sources: the original study's checkpoint files, one seed each, through sweep and analyze."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

from prunecxr import PrunecxrError
from prunecxr.models import create_model
from prunecxr.sources import file_sha256, seed_from_layout
from tests.helpers import prunecxr


@pytest.mark.parametrize(
    ("path", "seed"),
    [
        ("results/nih-cxr-lt_resnet50_ce_lr-0.0001_bs-256/chkpt.pt", 0),
        ("results/nih-cxr-lt_resnet50_ce_lr-0.0001_bs-256_seed-7/chkpt.pt", 7),
        ("results/nih-cxr-lt_resnet50_ce_lr-0.0001_bs-256_seed-29/chkpt.pt", 29),
        ("elsewhere/model.pt", 0),
    ],
)
def test_seed_from_the_original_layout(path, seed):
    assert seed_from_layout(Path(path)) == seed


def _original_layout(root: Path, seeds: tuple[int, ...]) -> list[Path]:
    """Checkpoint files as the original study wrote them ({'weights': state_dict}), here all
    with the same weights, so that only the seed tells the models apart."""
    torch.manual_seed(0)
    weights = create_model("resnet18", 20).state_dict()
    paths = []
    for seed in seeds:
        folder = root / ("nih_resnet18" + (f"_seed-{seed}" if seed else ""))
        folder.mkdir(parents=True)
        torch.save({"weights": weights}, folder / "chkpt.pt")
        paths.append(folder / "chkpt.pt")
    return paths


def _sweep(paths: list[Path], data: Path, tmp_path: Path, *extra: str):
    return prunecxr(
        "sweep",
        "--model-uri",
        ",".join(map(str, paths)),
        *("--arch", "resnet18", "--dataset", "nih-cxr-lt", "--data-dir", str(data)),
        *("--image-size", "32", "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"),
        *("--methods", "l1,random", "--sparsities", "0,0.5,0.9", *extra),
    )


def _cells(sweep_id: str) -> pd.DataFrame:
    return mlflow.search_runs(
        experiment_names=["prunecxr"], filter_string=f"tags.`mlflow.parentRunId` = '{sweep_id}'"
    )


def _predictions(run_id: str) -> np.ndarray:
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions.parquet")
    return pd.read_parquet(path).iloc[:, 1:21].to_numpy()


@pytest.mark.slow
def test_three_original_checkpoints_sweep_as_three_seeds_and_analyze(
    tiny_nih, tmp_path, mlflow_store
):
    paths = _original_layout(tmp_path / "results", (0, 1, 2))
    result = _sweep(paths, tiny_nih, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep_id = result.stdout.split("sweep run ")[1].split()[0]
    cells = _cells(sweep_id)
    assert len(cells) == 3 * 2 * 3 and set(cells.status) == {"FINISHED"}
    assert sorted(set(cells["params.seed"])) == ["0", "1", "2"]
    assert set(cells["params.preprocess"]) == {"original"}  # the original's pixels for its files
    for path, seed in zip(paths, ("0", "1", "2")):
        mine = cells[cells["params.seed"] == seed]
        assert set(mine["params.checkpoint_path"]) == {str(path)}
        assert set(mine["params.checkpoint_sha256"]) == {file_sha256(path)}
        assert set(mine["params.source_run_id"]) == {""}
    # Same weights: L1 masks agree across seeds, random masks do not (seeded per model).
    at_half = cells[cells["params.sparsity"] == "0.5"].set_index(["params.method", "params.seed"])
    l1 = [_predictions(at_half.loc[("l1", s), "run_id"]) for s in ("0", "1")]
    random = [_predictions(at_half.loc[("random", s), "run_id"]) for s in ("0", "1")]
    np.testing.assert_array_equal(l1[0], l1[1])
    assert not np.allclose(random[0], random[1])

    analyzed = prunecxr("analyze")
    assert analyzed.returncode == 0, analyzed.stderr[-3000:]
    run_id = analyzed.stdout.split("analyze run ")[1].split(":")[0]
    run = mlflow.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params["sweep_run_id"] == sweep_id
    report = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="report.html")
    assert "<tr><th>seeds</th><td>3</td></tr>" in Path(report).read_text()


@pytest.mark.slow
def test_seeds_from_the_command_line_and_clashing_seeds(tiny_nih, tmp_path, mlflow_store):
    paths = _original_layout(tmp_path / "results", (0, 1))
    given = _sweep(paths, tiny_nih, tmp_path, "--seeds", "11,12", "--methods", "random")
    assert given.returncode == 0, given.stderr[-3000:]
    sweep_id = given.stdout.split("sweep run ")[1].split()[0]
    assert sorted(set(_cells(sweep_id)["params.seed"])) == ["11", "12"]

    other = tmp_path / "other" / "chkpt.pt"  # seed 0 by the layout, like paths[0]
    other.parent.mkdir()
    other.write_bytes(paths[1].read_bytes())
    clash = _sweep([paths[0], other], tiny_nih, tmp_path)
    assert clash.returncode == 1
    assert f"{paths[0]} and {other} both have seed 0" in clash.stderr
    wrong_count = _sweep(paths, tiny_nih, tmp_path, "--seeds", "1")
    assert wrong_count.returncode == 1 and "1 seeds (1) for 2 models" in wrong_count.stderr


def test_a_checkpoint_changed_since_its_sweep_is_refused(tmp_path):
    from prunecxr.sources import source_of_cell

    path = _original_layout(tmp_path, (0,))[0]
    params = {
        "dataset": "nih-cxr-lt",
        "data_dir": str(tmp_path),
        "label_dir": str(tmp_path),
        "image_size": "32",
        "arch": "resnet18",
        "seed": "0",
        "source_run_id": "",
        "checkpoint_path": str(path),
        "checkpoint_sha256": "0" * 64,
    }
    with pytest.raises(PrunecxrError, match="changed since it was pruned"):
        source_of_cell(params)
