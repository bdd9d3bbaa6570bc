"""One model trained by several processes (`torchrun --nproc-per-node N -m prunecxr train`):
DistributedDataParallel with NCCL on GPUs and gloo on the CPU. Each rank takes its share of
every global batch (`--batch-size` is the global batch) and BatchNorm statistics are those of
the whole global batch, so N processes train the same model one process would."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def launched_as_main() -> bool:
    """Rank 0 of torchrun (known before the process group exists)."""
    return os.environ.get("RANK", "0") == "0"


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


@contextlib.contextmanager
def process_group(device: str) -> Iterator[None]:
    """The torchrun process group for the block: NCCL when the ranks train on GPUs (one GPU per
    rank, LOCAL_RANK), else gloo."""
    on_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if on_cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        dist.barrier()


def main_rank_value(value: float) -> float:
    """Rank 0's value on every rank: decisions (early stopping) must not split on rounding
    (each GPU may pick other cuDNN kernels)."""
    if not active():
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]


def builds_caches() -> bool:
    """The one process per machine that writes the image caches (LOCAL_RANK 0)."""
    return os.environ.get("LOCAL_RANK", "0") == "0"


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (the value itself in one process)."""
    if active():
        value = value.clone()
        dist.all_reduce(value)
    return value


class _AllSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the gradients: every rank's loss
    depends on every rank's inputs through the sum."""

    @staticmethod
    def forward(ctx, value: torch.Tensor) -> torch.Tensor:
        value = value.clone()
        dist.all_reduce(value)
        return value

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch: one all_reduce of
    (sum, sum of squares, count) per layer, differentiable, so the gradients are those of one
    process seeing the whole batch. torch's SyncBatchNorm does this
    on GPUs only; this one runs on the CPU too, so CI tests the code the GPUs run."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        values = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # autocast
        channels = values.shape[1]
        count = torch.full((1,), values.numel() / channels, device=x.device, dtype=values.dtype)
        stats = torch.cat([values.sum((0, 2, 3)), (values * values).sum((0, 2, 3)), count])
        stats = _AllSum.apply(stats)
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels : 2 * channels] / total - mean * mean).clamp(min=0)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * total / (total - 1), self.momentum)
        scale = self.weight / torch.sqrt(var + self.eps)
        shift = self.bias - mean * scale
        return (values * scale[None, :, None, None] + shift[None, :, None, None]).to(x.dtype)


@contextlib.contextmanager
def data_parallel(model: nn.Module) -> Iterator[nn.Module]:
    """The module to train with: `model` itself in one process; under torchrun, `model` with
    global BatchNorm wrapped in DistributedDataParallel. Afterwards `model` holds plain
    BatchNorm2d again (it is saved and logged as a standard model)."""
    if not active():
        yield model
        return
    norms = [m for m in model.modules() if type(m) is nn.BatchNorm2d]
    for norm in norms:
        norm.__class__ = GlobalBatchNorm2d  # same parameters and buffers, synced statistics
    try:
        device = next(model.parameters()).device
        yield DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    finally:
        for norm in norms:
            norm.__class__ = nn.BatchNorm2d
