"""Where and how a model runs: the device, the memory layout and the autocast precision.

On CUDA the training defaults are channels_last, bf16 autocast and torch.compile (the fast path
on Ampere/Hopper); on the CPU, none of them. Evaluation whose predictions feed the analysis (test
metrics, sweep cells) defaults to fp32: bf16 logits tie and reorder images within a class's
ranking enough to move APs by 0.05 and change PIEs (docs/PRECISION.md). fp32 is strict fp32:
TF32 tensor-core math is switched off while it runs. Every switch can be chosen on either
device with the same code, so CI runs the GPU's code path on a CPU. Models are stored (logged,
checkpointed, pruned) in the standard contiguous layout, whatever layout they ran in, so they
load and prune anywhere."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from prunecxr import PrunecxrError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class Runtime:
    """A resolved device, layout and precision (no "auto" left)."""

    device: torch.device
    channels_last: bool
    precision: str  # "bf16" (autocast) or "fp32"
    compile: bool = False  # torch.compile the forward pass
    resident_data: bool = False  # a split's uint8 images held on the device as one tensor

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def place_model(self, model: nn.Module) -> nn.Module:
        """Move `model` to the device in the runtime's layout (in place; returns it)."""
        return model.to(self.device, memory_format=self.memory_format)

    def place_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) float batch -> the runtime's layout (a no-op when it already is)."""
        return batch.contiguous(memory_format=self.memory_format)

    def compiled(self, model: nn.Module) -> nn.Module:
        """The module to call: `model` compiled (sharing its parameters) or `model` itself."""
        if not self.compile:
            return model
        # One process compiles train and eval modes, several batch shapes and precisions of
        # the same forward: more than Dynamo's default of 8 graphs, past which it silently
        # runs uncompiled.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        return torch.compile(model)

    def synchronize(self) -> None:
        if self.on_cuda:
            torch.cuda.synchronize(self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return _strict_fp32()

    def describe(self) -> dict[str, str]:
        """What ran, for the run's params: device, channels_last, precision, compile."""
        return {
            "device": self.device.type,
            "channels_last": str(self.channels_last).lower(),
            "precision": self.precision,
            "compile": str(self.compile).lower(),
            "resident_data": str(self.resident_data).lower(),
        }


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICES:
        raise PrunecxrError(f"unknown device {name!r}; valid: {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PrunecxrError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


def resolve_runtime(
    device: str = "auto",
    channels_last: bool | None = None,
    precision: str = "auto",
    compile: bool | None = None,
    resident_data: bool | None = None,
    *,
    for_analysis: bool = False,
) -> Runtime:
    """Resolve "auto" (and None) per device: on CUDA channels_last + bf16 + compile + the data
    on the device; on the CPU none of them. `for_analysis`: predictions the analysis
    uses, where "auto" precision is fp32 on every device."""
    if precision not in PRECISIONS:
        raise PrunecxrError(f"unknown precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    resolved = resolve_device(device)
    on_cuda = resolved.type == "cuda"
    if precision == "auto":
        precision = "bf16" if on_cuda and not for_analysis else "fp32"
    if on_cuda:  # fixed input shapes: let cuDNN pick the fastest kernels once
        torch.backends.cudnn.benchmark = True
    return Runtime(
        resolved,
        on_cuda if channels_last is None else channels_last,
        precision,
        on_cuda if compile is None else compile,
        on_cuda if resident_data is None else resident_data,
    )


def runtime_of(settings, *, for_analysis: bool = False) -> Runtime:
    """resolve_runtime of settings that carry device, channels_last, precision, compile and
    resident_data (a TrainConfig, a sweep's CellSettings)."""
    return resolve_runtime(
        settings.device,
        settings.channels_last,
        settings.precision,
        settings.compile,
        settings.resident_data,
        for_analysis=for_analysis,
    )


@contextlib.contextmanager
def _strict_fp32() -> Iterator[None]:
    """No TF32 (10-bit mantissa) in CUDA convolutions and matmuls while inside."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def standard_layout(model: nn.Module) -> nn.Module:
    """The model's 4-d weights back in the contiguous (NCHW) layout, in place; returns it.
    Needed before flattening weights (torch.nn.utils.prune views them as vectors) and before a
    model is saved, so that what is stored loads and prunes in any layout."""
    return model.to(memory_format=torch.contiguous_format)


def portable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state on the CPU in the standard layout (checkpoints, best
    weights), whatever device and layout the model trains in."""
    return {
        key: value.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        for key, value in model.state_dict().items()
    }
