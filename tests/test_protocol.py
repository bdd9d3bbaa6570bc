"""--protocol original: the training behind the paper's published checkpoints (docs/training.md,
"The original protocol"), each difference observed on a tiny model; the default stays ours."""

from __future__ import annotations

import math

import mlflow
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from prunecxr import PrunecxrError, tracking
from prunecxr.data import get_schema
from prunecxr.data.transforms import augment, draw_augmentation
from prunecxr.device_data import DeviceImages
from prunecxr.evaluate import device_logits
from prunecxr.fitting import (
    create_state,
    fit,
    keeps_training,
    mean_loss,
    open_split,
    open_splits,
    train_one_epoch,
)
from prunecxr.runtime import runtime_of
from prunecxr.specs import OptimSpec, RuntimeSpec, TrainConfig, train_key
from prunecxr.stages.checkpoints import fetch_checkpoint
from prunecxr.stages.study import StudyConfig, study_key
from prunecxr.stages.train import RESUMED_TAG, resume_training, run_training
from tests.helpers import tiny_config

NIH = get_schema("nih-cxr-lt")
CPU = runtime_of(RuntimeSpec("cpu"))


def _batchnorm_statistics(model: torch.nn.Module) -> list[torch.Tensor]:
    return [
        buffer.clone()
        for name, buffer in model.named_buffers()
        if name.endswith(("running_mean", "running_var"))
    ]


def _fit(config: TrainConfig, state=None) -> tuple[list[list[torch.Tensor]], object]:
    """Train `config` on the CPU; -> (BatchNorm statistics before and after each epoch, state)."""
    if state is None:
        state = create_state(config, NIH.num_classes, CPU)
    statistics = [_batchnorm_statistics(state.model)]
    splits = open_splits(config.data)
    fit(state, config, splits, CPU, lambda s: statistics.append(_batchnorm_statistics(s.model)))
    return statistics, state


def _same(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("protocol", ["default", "original"])
def test_batchnorm_statistics_freeze_after_the_first_epoch_only_under_original(
    tiny_nih, cache_dir, protocol
):
    """The original never called train() after its first validation: epochs from the second
    on train with BatchNorm in eval mode, its running statistics frozen (the weights still
    learn)."""
    config = tiny_config(tiny_nih, cache_dir, max_epochs=2, patience=10, protocol=protocol)
    weights = create_state(config, NIH.num_classes, CPU).model.fc.weight.detach().clone()
    (initial, after_first, after_second), state = _fit(config)
    assert not _same(initial, after_first)  # epoch 1 trains in train mode either way
    assert _same(after_first, after_second) == (protocol == "original")
    assert not torch.equal(state.model.fc.weight, weights)


def test_the_original_trains_one_stale_epoch_more(tiny_nih, cache_dir):
    """A model that cannot beat its best validation loss (0: BCE is positive) is stale from its
    first epoch: at patience 1 ours stops after one such epoch, the original after two."""
    for protocol, epochs in (("default", 1), ("original", 2)):
        config = tiny_config(tiny_nih, cache_dir, max_epochs=5, patience=1, protocol=protocol)
        state = create_state(config, NIH.num_classes, CPU)
        state.best_val_loss = 0.0
        _fit(config, state)
        assert len(state.history) == epochs == state.epochs_since_best, protocol


def test_the_stopping_rule_at_the_papers_patience():
    default, original = OptimSpec(patience=15), OptimSpec(patience=15, protocol="original")
    assert keeps_training(10, 14, default) and not keeps_training(10, 15, default)
    assert keeps_training(10, 15, original) and not keeps_training(10, 16, original)
    assert not keeps_training(60, 0, original)  # max_epochs bounds both


def test_nearest_rotation_only_moves_pixels_bilinear_blends_them():
    """The original's RandomRotation(15) interpolates nearest: every output pixel is an input
    pixel (or the zero fill); bilinear makes values no input pixel had."""
    images = torch.randint(1, 256, (8, 1, 32, 32), dtype=torch.uint8)
    params = draw_augmentation(8, torch.Generator().manual_seed(0))
    for image, nearest, bilinear in zip(
        images, augment(images, params, "nearest"), augment(images, params)
    ):
        allowed = set(image.unique().tolist()) | {0}
        assert set(nearest.unique().tolist()) <= allowed
        assert not set(bilinear.unique().tolist()) <= allowed
    assert torch.equal(augment(images, params), augment(images, params, "bilinear"))


def test_the_first_epoch_differs_by_the_rotation_only(tiny_nih, cache_dir):
    """Epoch 1 trains in train mode under both protocols, fp32 on the CPU: only the rotation's
    interpolation differs, and it changes what the model learns."""
    config = tiny_config(tiny_nih, cache_dir)
    split = open_split(config.data, "train")
    data = DeviceImages(split.images[:64], CPU, split.labels[:64])

    def weights_after_one_epoch(protocol: str) -> torch.Tensor:
        state = create_state(config, NIH.num_classes, CPU)
        train_one_epoch(state, data, 32, CPU, protocol=protocol)
        return state.model.fc.weight.detach().clone()

    default = weights_after_one_epoch("default")
    assert torch.equal(default, weights_after_one_epoch("default"))
    assert not torch.equal(default, weights_after_one_epoch("original"))


def test_validation_loss_is_the_mean_of_batch_means_under_original():
    """Three images, batches of two: the last batch (one image) weighs as much as the first."""
    logits = torch.tensor([[0.0], [0.0], [2.0]])
    labels = torch.tensor([[1.0], [0.0], [1.0]])
    losses = [math.log(2), math.log(2), math.log(1 + math.exp(-2))]
    assert mean_loss(logits, labels) == pytest.approx(sum(losses) / 3)
    assert mean_loss(logits, labels, 2) == pytest.approx((losses[0] + losses[2]) / 2)


def test_fit_logs_the_original_validation_loss(tiny_nih, cache_dir):
    """48 validation images in batches of 32: the logged val_loss is the mean of the two
    batches' mean losses, not the mean over the 48 images."""
    config = tiny_config(tiny_nih, cache_dir, max_epochs=1, protocol="original")
    _, state = _fit(config)
    val = open_split(config.data, "val")
    logits, _ = device_logits(state.model, val.images, runtime=CPU, batch_size=32)
    labels = torch.from_numpy(val.labels)
    batches = (slice(0, 32), slice(32, 48))
    halves = [F.binary_cross_entropy_with_logits(logits[b], labels[b]).item() for b in batches]
    logged = state.history[-1]["val_loss"]
    assert logged == pytest.approx(sum(halves) / 2, rel=1e-6)
    assert logged != pytest.approx(F.binary_cross_entropy_with_logits(logits, labels).item())


def test_original_precision_is_fp32_with_tf32_convolutions():
    """PyTorch 1.13's defaults: TF32 in cuDNN convolutions, IEEE matmuls; what the run logs
    as precision_resolved (a CPU has no TF32: no effect there). Analysis-grade evaluation
    stays strict fp32, and a precision typed explicitly is kept."""
    original = runtime_of(RuntimeSpec("cpu"), protocol="original")
    assert original.precision == "tf32" and original.describe()["precision"] == "tf32"
    assert runtime_of(RuntimeSpec("cpu"), protocol="original", for_analysis=True).precision == (
        "fp32"
    )
    bf16 = RuntimeSpec("cpu", precision="bf16")
    assert runtime_of(bf16, protocol="original").precision == "bf16"
    if not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("torch < 2.9 has no fp32_precision switches")
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with original.fp32_math():
        assert (conv.fp32_precision, matmul.fp32_precision) == ("tf32", "ieee")
        with CPU.autocast():  # strict fp32 inside, as analysis-grade evaluation
            assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
        assert conv.fp32_precision == "tf32"
    assert (conv.fp32_precision, matmul.fp32_precision) == before


def test_protocol_is_keyed_only_when_original():
    """Keys of runs from before the option stay the same; an original training is another
    training (and study)."""
    config = TrainConfig.from_flat(
        dataset="nih-cxr-lt", data_dir="/data/nih", label_dir="/data/nih"
    )
    assert config.optim.protocol == "default"
    assert train_key(config) == "78f9b5c4da9fb4ea"
    assert study_key(StudyConfig(config)) == "8f71ffefca0be4b4"
    original = config.replace(protocol="original")
    assert train_key(original) != train_key(config)
    assert study_key(StudyConfig(original)) != study_key(StudyConfig(config))


@pytest.mark.slow
def test_an_original_run_logs_its_protocol_and_keeps_it_on_resume(
    tiny_nih, cache_dir, mlflow_store
):
    tracking.use_experiment("prunecxr")
    config = tiny_config(tiny_nih, cache_dir, max_epochs=1, protocol="original")
    run_id = run_training(config)
    run = MlflowClient().get_run(run_id)
    assert run.data.params["protocol"] == "original"
    assert run.data.params["precision_resolved"] == "tf32"
    assert run.data.tags["prunecxr.train_key"] == train_key(config)
    with pytest.raises(PrunecxrError, match="keeps the run's own protocol .protocol=original"):
        resume_training(run_id, max_epochs=2, protocol="default")
    assert resume_training(run_id, max_epochs=2) == run_id
    assert fetch_checkpoint(run_id)["config"]["protocol"] == "original"
    assert "precision=tf32" in MlflowClient().get_run(run_id).data.tags[RESUMED_TAG]
    assert mlflow.get_run(run_id).data.metrics["best_epoch"] in (1, 2)
