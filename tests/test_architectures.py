"""The study end to end on the architectures beside the ResNets (DenseNet121, ViT-B/16), at
tiny sizes on the CPU: train, sweep (unstructured and structured), analyze."""

from __future__ import annotations

import mlflow
import pytest

from tests.helpers import prunecxr, tiny_cli_options

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch", ["densenet121", "vit_b_16"])
def test_a_study_runs_end_to_end_on_every_architecture(arch, tiny_nih, tmp_path, mlflow_store):
    options = tiny_cli_options(tiny_nih, tmp_path / "cache")
    options[options.index("resnet18")] = arch
    result = prunecxr(
        "study",
        *options,
        *("--seeds", "2", "--max-epochs", "1"),
        *("--methods", "l1,structured", "--sparsities", "0,0.5,0.9"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs = mlflow.search_runs(experiment_names=["prunecxr"])
    assert set(runs["status"]) == {"FINISHED"}
    stages = runs["tags.prunecxr.stage"].value_counts().to_dict()
    assert stages == {"study": 1, "train": 2, "sweep": 1, "prune": 2 * 2 * 3, "analyze": 1}
    trained = runs[runs["tags.prunecxr.stage"] == "train"]
    assert set(trained["params.arch"]) == {arch}
    pruned = runs[runs["tags.prunecxr.stage"] == "prune"]
    assert pruned["metrics.achieved_sparsity"].to_numpy() == pytest.approx(
        pruned["params.sparsity"].astype(float).to_numpy(), abs=0.01
    )
    structured = pruned[pruned["params.method"] == "structured"]
    assert (structured["metrics.macs"] < structured["metrics.macs"].max()).any()
