"""Device, memory layout and precision: the GPU's fast path, selectable on the CPU."""

from __future__ import annotations

import pytest
import torch

from prunecxr import PrunecxrError
from prunecxr.models import create_model
from prunecxr.runtime import resolve_runtime, standard_layout


def test_defaults_per_device():
    cpu = resolve_runtime("cpu")
    assert (cpu.channels_last, cpu.precision, cpu.compile, cpu.resident_data) == (
        False,
        "fp32",
        False,
        False,
    )
    if torch.cuda.is_available():
        cuda = resolve_runtime("cuda")
        assert (cuda.channels_last, cuda.precision, cuda.compile, cuda.resident_data) == (
            True,
            "bf16",
            True,
            True,
        )


def test_every_switch_is_selectable_on_the_cpu():
    runtime = resolve_runtime(
        "cpu", channels_last=True, precision="bf16", compile=True, resident_data=True
    )
    model = runtime.place_model(create_model("resnet18", 20)).eval()
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    batch = runtime.place_batch(torch.randn(2, 3, 32, 32))
    assert batch.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), runtime.autocast():
        assert model(batch).dtype == torch.bfloat16
    assert runtime.describe() == {
        "device": "cpu",
        "channels_last": "true",
        "precision": "bf16",
        "compile": "true",
        "resident_data": "true",
        "cudnn_benchmark": "false",
    }
    standard_layout(model)
    assert all(p.is_contiguous() for p in model.parameters())


def test_unknown_choices_list_the_valid_ones():
    with pytest.raises(PrunecxrError, match="auto, bf16, fp32"):
        resolve_runtime("cpu", precision="fp16")
    with pytest.raises(PrunecxrError, match="auto, cpu, cuda"):
        resolve_runtime("tpu")


def test_analysis_grade_evaluation_is_strict_fp32_by_default():
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        assert resolve_runtime(device, for_analysis=True).precision == "fp32"
        assert resolve_runtime(device, precision="bf16", for_analysis=True).precision == "bf16"
    if not hasattr(torch.backends.cudnn, "conv"):  # torch < 2.9: no fp32_precision API
        return
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    before = conv.fp32_precision, matmul.fp32_precision
    with resolve_runtime("cpu").autocast():
        assert (conv.fp32_precision, matmul.fp32_precision) == ("ieee", "ieee")
    assert (conv.fp32_precision, matmul.fp32_precision) == before


@pytest.mark.gpu
def test_cuda_trains_in_bf16_and_evaluates_for_the_analysis_in_fp32():
    assert resolve_runtime("cuda").precision == "bf16"
    assert resolve_runtime("cuda", for_analysis=True).precision == "fp32"


def test_compiled_forward_shares_the_model_and_matches_eager():
    """torch.compile on the CPU (inductor): same parameters, same outputs as eager mode."""
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(), torch.nn.Flatten()
    ).eval()
    forward = resolve_runtime("cpu", compile=True).compiled(model)
    assert forward is not model
    batch = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(forward(batch), model(batch), rtol=1e-5, atol=1e-5)
        model[0].weight.mul_(2)  # in place, as a sweep loads each cell's weights
        torch.testing.assert_close(forward(batch), model(batch), rtol=1e-5, atol=1e-5)
    assert resolve_runtime("cpu").compiled(model) is model


def test_cudnn_benchmark_follows_the_switch():
    """On for CUDA unless switched off; selectable on the CPU; reported as it ran."""
    assert resolve_runtime("cpu").describe()["cudnn_benchmark"] == "false"
    chosen = resolve_runtime("cpu", cudnn_benchmark=True)
    assert chosen.cudnn_benchmark and torch.backends.cudnn.benchmark
    assert chosen.describe()["cudnn_benchmark"] == "true"
    resolve_runtime("cpu", cudnn_benchmark=False)
    assert not torch.backends.cudnn.benchmark
    if torch.cuda.is_available():
        assert resolve_runtime("cuda").cudnn_benchmark
