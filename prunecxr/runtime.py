"""Where and how a model runs: the device, the memory layout and the autocast precision.

On CUDA the training defaults are channels_last, bf16 autocast and torch.compile (the fast path
on Ampere/Hopper); on the CPU, none of them. Strict fp32 runs in NCHW on CUDA too. Evaluation whose predictions feed the analysis (test
metrics, sweep cells) defaults to fp32: bf16 logits tie and reorder images within a class's
ranking enough to move APs by 0.05 and change PIEs (docs/PRECISION.md). fp32 is strict fp32:
TF32 tensor-core math is switched off while it runs; tf32 is fp32 with TF32 cuDNN
convolutions and IEEE matmuls, PyTorch 1.13's defaults (the original protocol). Every switch
can be chosen on either device with the same code, so CI runs the GPU's code path on a CPU.
Models are stored (logged, checkpointed, pruned) in the standard contiguous layout, whatever
layout they ran in, so they load and prune anywhere."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from prunecxr import PrunecxrError
from prunecxr.specs import DEVICES, PRECISIONS, RuntimeSpec


@dataclass(frozen=True)
class Runtime:
    """A resolved device, layout and precision (no "auto" left)."""

    device: torch.device
    channels_last: bool
    precision: str  # "bf16" (autocast), "tf32" (TF32 convolutions) or "fp32" (strict)
    compile: bool = False  # torch.compile the forward pass
    resident_data: bool = False  # a split's uint8 images held on the device as one tensor
    cudnn_benchmark: bool = False  # cuDNN times its kernels once per input shape

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
        """The forward pass's precision: bf16 autocast, else fp32_math()."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return self.fp32_math()

    def fp32_math(self) -> contextlib.AbstractContextManager:
        """While inside, fp32 convolutions use TF32 under "tf32" and no matmul or convolution
        does under "fp32" (training wraps forward and backward in it); bf16: unchanged."""
        if self.precision == "bf16":
            return contextlib.nullcontext()
        return _tf32_switches(convolutions=self.precision == "tf32")

    def describe(self) -> dict[str, str]:
        """What ran, for the run's params: every switch as resolved (device: its type)."""
        return {f.name: _text(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _text(value) -> str:
    if isinstance(value, torch.device):
        return value.type
    return str(value).lower() if isinstance(value, bool) else str(value)


def resolve_device(name: str = "auto") -> torch.device:
    if name not in DEVICES:
        raise PrunecxrError(f"unknown device {name!r}; valid: {', '.join(DEVICES)}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PrunecxrError("--device cuda was asked for, but torch sees no CUDA device")
    return torch.device(name)


# The default layout on CUDA per precision. Tensor-core kernels (bf16, TF32) are written for
# channels_last; strict fp32 runs on the CUDA cores, where cuDNN's NCHW kernels are expected to
# be at least as fast, and a layout change per cell is then not needed at all. bench/gpu.py
# times both layouts for each precision on the card it runs on (docs/PERFORMANCE.md, "Layout").
CHANNELS_LAST_ON_CUDA = {"bf16": True, "tf32": True, "fp32": False}


def runtime_of(
    spec: RuntimeSpec, *, for_analysis: bool = False, protocol: str = "default"
) -> Runtime:
    """Resolve "auto" (and None) per device: on CUDA bf16 + compile + the data on the device,
    in the layout of CHANNELS_LAST_ON_CUDA; on the CPU none of them. `for_analysis`: predictions the analysis
    uses, where "auto" precision is fp32 on every device. A training of the original
    `protocol` resolves "auto" precision to tf32 (what PyTorch 1.13 did; no effect on a CPU)."""
    if spec.precision not in PRECISIONS:
        raise PrunecxrError(f"unknown precision {spec.precision!r}; valid: {', '.join(PRECISIONS)}")
    device = resolve_device(spec.device)
    on_cuda = device.type == "cuda"
    precision = spec.precision
    if precision == "auto" and protocol == "original" and not for_analysis:
        precision = "tf32"
    elif precision == "auto":
        precision = "bf16" if on_cuda and not for_analysis else "fp32"
    # Fixed input shapes: cuDNN can pick the fastest kernels once (not bit-for-bit repeatable).
    benchmark = on_cuda if spec.cudnn_benchmark is None else spec.cudnn_benchmark
    torch.backends.cudnn.benchmark = benchmark
    channels_last = on_cuda and CHANNELS_LAST_ON_CUDA[precision]
    return Runtime(
        device,
        channels_last if spec.channels_last is None else spec.channels_last,
        precision,
        on_cuda if spec.compile is None else spec.compile,
        on_cuda if spec.resident_data is None else spec.resident_data,
        benchmark,
    )


def resolve_runtime(device: str = "auto", *, for_analysis: bool = False, **switches) -> Runtime:
    """runtime_of the RuntimeSpec of `device` and `switches` (its other fields)."""
    return runtime_of(RuntimeSpec(device, **switches), for_analysis=for_analysis)


# torch 2.9 replaced the allow_tf32 flags by fp32_precision; the two must not be mixed.
_PRECISION_API = hasattr(torch.backends.cudnn, "conv")


@contextlib.contextmanager
def _tf32_switches(*, convolutions: bool) -> Iterator[None]:
    """While inside: TF32 (10-bit mantissa) in cuDNN convolutions if `convolutions`, never in
    matmuls; the switches are restored on leaving."""
    if _PRECISION_API:
        switches = [
            (torch.backends.cudnn.conv, "fp32_precision"),
            (torch.backends.cuda.matmul, "fp32_precision"),
        ]
        wanted = ["tf32" if convolutions else "ieee", "ieee"]
    else:
        switches = [
            (torch.backends.cudnn, "allow_tf32"),
            (torch.backends.cuda.matmul, "allow_tf32"),
        ]
        wanted = [convolutions, False]
    saved = [getattr(owner, name) for owner, name in switches]
    for (owner, name), value in zip(switches, wanted):
        setattr(owner, name, value)
    try:
        yield
    finally:
        for (owner, name), value in zip(switches, saved):
            setattr(owner, name, value)


def standard_layout(model: nn.Module) -> nn.Module:
    """The model's 4-d weights back in the contiguous (NCHW) layout, in place; returns it.
    Needed before flattening weights (torch.nn.utils.prune views them as vectors) and before a
    model is saved, so that what is stored loads and prunes in any layout."""
    return model.to(memory_format=torch.contiguous_format)


def portable_model(model: nn.Module) -> nn.Module:
    """`model` as it is stored and logged: fp32, on the CPU, in the standard layout, in eval
    mode (in place, as `nn.Module.to` works; returns it)."""
    return standard_layout(model.float().cpu()).eval()


def portable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the model's state on the CPU in the standard layout (checkpoints, best
    weights), whatever device and layout the model trains in."""
    return {
        key: value.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        for key, value in model.state_dict().items()
    }


def host_snapshot(tree):
    """A copy of every tensor in `tree` (nested dicts, lists, tuples) in host memory, in the
    standard layout, taken without waiting for the device: -> (copy, wait). On CUDA the copies
    go asynchronously into pinned memory, in stream order (so they hold the values of this
    moment, whatever the next steps change); call wait() before reading them."""
    copied_from_cuda = False

    def copy(value):
        nonlocal copied_from_cuda
        if isinstance(value, torch.Tensor):
            value = value.detach()
            if not value.is_cuda:
                return value.clone(memory_format=torch.contiguous_format)
            copied_from_cuda = True
            host = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            return host.copy_(value, non_blocking=True)
        if isinstance(value, dict):
            return {key: copy(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(copy(item) for item in value)
        return value

    snapshot = copy(tree)
    return snapshot, _copies_done_waiter() if copied_from_cuda else _nothing_to_wait_for


def _copies_done_waiter() -> Callable[[], None]:
    done = torch.cuda.Event()
    done.record()
    return done.synchronize


def _nothing_to_wait_for() -> None:
    pass
