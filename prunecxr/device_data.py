"""A split's images where the model reads them: resident on the device as one uint8 tensor
(uploaded once), or streamed from the memory-mapped cache batch by batch through two pinned
host buffers with asynchronous copies, so the host reads the next batch while the device
still computes the last (nothing in a training step waits for the host). Both give the same
batches, so results do not depend on the choice."""

from __future__ import annotations

import logging

import numpy as np
import torch

from prunecxr.data import SplitData
from prunecxr.runtime import Runtime

log = logging.getLogger(__name__)
RESIDENT_SHARE = 0.5  # hold a split on the GPU only if it takes at most this share of free memory


class DeviceImages:
    """(N, S, S) uint8 images and (N, C) float labels of one split, served as device batches."""

    def __init__(self, images: np.ndarray, runtime: Runtime, labels: np.ndarray | None = None):
        self.device = runtime.device
        self.host = images
        self.labels = None if labels is None else torch.from_numpy(np.array(labels)).to(self.device)
        self.resident = runtime.resident_data and _fits(images, runtime)
        self.images = None
        if self.resident:
            self.images = torch.from_numpy(np.array(images)).to(self.device)
        self._pinned: list[tuple[torch.Tensor, torch.cuda.Event]] = []
        self._turn = 0

    @classmethod
    def of(cls, split: SplitData, runtime: Runtime) -> DeviceImages:
        return cls(split.images, runtime, split.labels)

    def __len__(self) -> int:
        return len(self.host)

    def batch(
        self, index: torch.Tensor, host_index: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, S, S) uint8 and labels (B, C) on the device for `index` (on the device)
        and the same positions on the host, sorted (sorted reads are fast on a memmap)."""
        if self.resident:
            return self.images[index], self.labels[index]
        return self._upload(self.host[host_index]), self.labels[index]

    def slice(self, start: int, stop: int) -> torch.Tensor:
        """Images start:stop (evaluation reads in order)."""
        if self.resident:
            return self.images[start:stop]
        return self._upload(self.host[start:stop])

    def _upload(self, array: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(np.array(array))  # a copy: the cache is read-only
        if self.device.type != "cuda":
            return tensor
        # Two pinned buffers in turn: a buffer is refilled only once its last copy is done.
        if not self._pinned or self._pinned[0][0].shape[1:] != tensor.shape[1:]:
            self._pinned = [
                (torch.empty((0, *tensor.shape[1:]), dtype=torch.uint8), torch.cuda.Event())
                for _ in range(2)
            ]
        buffer, copied = self._pinned[self._turn]
        if buffer.shape[0] < len(tensor):
            buffer = torch.empty(tensor.shape, dtype=torch.uint8).pin_memory()
        copied.synchronize()
        staged = buffer[: len(tensor)]
        staged.copy_(tensor)
        on_device = staged.to(self.device, non_blocking=True)
        copied.record()
        self._pinned[self._turn] = (buffer, copied)
        self._turn = 1 - self._turn
        return on_device


def _fits(images: np.ndarray, runtime: Runtime) -> bool:
    if runtime.device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(runtime.device)
    if images.nbytes <= RESIDENT_SHARE * free:
        return True
    log.info(
        "%.1f GB of images do not fit beside the model (%.1f GB free): streaming them",
        images.nbytes / 1e9,
        free / 1e9,
    )
    return False
