"""Batch transforms on the device: uint8 grey batches -> augmented, ImageNet-normalized 3-channel
float batches. Doing this per batch (not per image in workers) is what lets the cache feed a GPU."""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_ROTATION_DEGREES = 15.0


@functools.cache
def _imagenet_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (1, 3, 1, 1) tensors, made once per device (not copied per batch)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return mean, std


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """batch: (B, 1, S, S) uint8 or float in [0, 255] -> (B, 3, S, S) float, ImageNet-normalized."""
    mean, std = _imagenet_constants(batch.device)
    return (batch.float().div(255.0).expand(-1, 3, -1, -1) - mean) / std


def draw_augmentation(size: int, generator: torch.Generator) -> torch.Tensor:
    """(size, 2): per image a rotation angle in [-15, 15] degrees (radians) and a flip sign
    (-1 mirrors). Drawn on the CPU so runs are repeatable across devices; a training epoch
    draws all of its images' at once and copies them to the device once."""
    angles = (torch.rand(size, generator=generator) * 2 - 1) * math.radians(MAX_ROTATION_DEGREES)
    flips = torch.where(torch.rand(size, generator=generator) < 0.5, -1.0, 1.0)
    return torch.stack([angles, flips], dim=1)


def augment(
    batch: torch.Tensor, params: torch.Tensor, interpolation: str = "bilinear"
) -> torch.Tensor:
    """Per-image horizontal flip and rotation (`params` from draw_augmentation, on the batch's
    device): (B, 1, S, S) uint8 -> (B, 1, S, S) float in [0, 255]. One affine grid does both,
    so the cost is a single grid_sample whatever the batch size. `interpolation`: bilinear, or
    nearest (torchvision's RandomRotation default, which the original code used)."""
    angles, flips = params[:, 0], params[:, 1]
    cos, sin, zero = torch.cos(angles), torch.sin(angles), torch.zeros_like(angles)
    # Rotation matrix times a horizontal flip (x -> -x) applied first.
    theta = torch.stack(
        [
            torch.stack([cos * flips, -sin, zero], dim=1),
            torch.stack([sin * flips, cos, zero], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(
        batch.float(), grid, mode=interpolation, padding_mode="zeros", align_corners=False
    )
