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


def _tiny_state(classes: int = 3):
    from prunecxr.fitting import TrainState

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(4, classes),
    )  # fmt: skip
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    return TrainState(model, optimizer, torch.Generator().manual_seed(0))


class _BatchSizes(torch.nn.Module):
    """Calls `model` and records the size of every batch it was given."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        self.sizes.append(len(batch))
        return self.model(batch)


@pytest.mark.parametrize(("compiled", "sizes"), [(False, [4, 4, 2]), (True, [4, 4])])
def test_a_compiled_runtime_trains_on_full_batches_only(compiled, sizes):
    """10 images in batches of 4: the short last batch would be a second compiled graph."""
    import numpy as np

    from prunecxr.device_data import DeviceImages
    from prunecxr.fitting import train_one_epoch

    runtime = resolve_runtime("cpu", compile=compiled)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 16, 16), dtype=np.uint8)
    labels = rng.integers(0, 2, (10, 3)).astype(np.float32)
    state = _tiny_state()
    recorder = _BatchSizes(state.model)
    loss = train_one_epoch(state, DeviceImages(images, runtime, labels), 4, runtime, recorder)
    assert recorder.sizes == sizes and np.isfinite(loss)


@pytest.mark.gpu
def test_strict_fp32_on_cuda_runs_ieee_math_in_the_standard_layout():
    """No TF32 in strict fp32: a matmul and a convolution land within fp32's error of fp64
    (TF32's 10-bit mantissa would be ~1e-3 off); the analysis's layout on CUDA is NCHW."""
    runtime = resolve_runtime("cuda", for_analysis=True)
    assert (runtime.precision, runtime.channels_last) == ("fp32", False)
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 512, 512, generator=generator, dtype=torch.float64)
    images = torch.randn(8, 64, 32, 32, generator=generator, dtype=torch.float64)
    weight = torch.randn(64, 64, 3, 3, generator=generator, dtype=torch.float64)
    with runtime.autocast():
        product = (a.float().cuda() @ b.float().cuda()).double().cpu()
        conv = torch.nn.functional.conv2d(images.float().cuda(), weight.float().cuda())
    exact_product, exact_conv = a @ b, torch.nn.functional.conv2d(images, weight)
    for got, exact in ((product, exact_product), (conv.double().cpu(), exact_conv)):
        assert ((got - exact).abs().max() / exact.abs().max()).item() < 1e-5


@pytest.mark.gpu
def test_streamed_batches_through_pinned_buffers_equal_the_resident_ones():
    """The streaming path (two pinned host buffers, asynchronous copies, no wait between
    batches) serves the same images as the split held on the device, batch after batch."""
    import numpy as np

    from prunecxr.device_data import DeviceImages

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 64, 64), dtype=np.uint8)
    labels = rng.integers(0, 2, (300, 3)).astype(np.float32)
    resident = DeviceImages(images, resolve_runtime("cuda", resident_data=True), labels)
    streamed = DeviceImages(images, resolve_runtime("cuda", resident_data=False), labels)
    assert resident.resident and not streamed.resident
    order = np.sort(rng.permutation(300).reshape(10, 30), axis=1)
    got = [streamed.batch(torch.from_numpy(i).cuda(), i)[0] for i in order]  # no sync between
    got += [streamed.slice(start, start + 64) for start in range(0, 300, 64)]
    want = [resident.batch(torch.from_numpy(i).cuda(), i)[0] for i in order]
    want += [resident.slice(start, start + 64) for start in range(0, 300, 64)]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_a_host_snapshot_holds_the_values_of_its_moment_without_a_sync():
    """Checkpoints copy the training state to pinned host memory asynchronously: the copy is
    in stream order, so steps queued after it do not reach it; it is in the standard layout."""
    from prunecxr.runtime import host_snapshot

    runtime = resolve_runtime("cuda")  # channels_last
    model = runtime.place_model(create_model("resnet18", 20))
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    snapshot, wait = host_snapshot(
        {"model": model.state_dict(), "step": torch.ones((), device="cuda")}
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(0)  # queued after the copies
    wait()
    for key, value in snapshot["model"].items():
        assert value.is_pinned() and value.is_contiguous() and torch.equal(value, before[key])
    assert snapshot["step"].item() == 1
