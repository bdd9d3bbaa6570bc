"""Batch transforms on the device: uint8 grey batches -> augmented, ImageNet-normalized 3-channel
float batches. Doing this per batch (not per image in workers) is what lets the cache feed a GPU."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_ROTATION_DEGREES = 15.0


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """batch: (B, 1, S, S) uint8 or float in [0, 255] -> (B, 3, S, S) float, ImageNet-normalized."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return (batch.float().div(255.0).expand(-1, 3, -1, -1) - mean) / std


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-image random horizontal flip and rotation in [-15, 15] degrees.

    batch: (B, 1, S, S) uint8 -> (B, 1, S, S) float in [0, 255]. One affine grid does both, so
    the cost is a single grid_sample whatever the batch size. `generator` lives on the CPU so
    runs are repeatable across devices."""
    size = batch.shape[0]
    angles = (torch.rand(size, generator=generator) * 2 - 1) * math.radians(MAX_ROTATION_DEGREES)
    flips = torch.where(torch.rand(size, generator=generator) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angles), torch.sin(angles)
    # Rotation matrix times a horizontal flip (x -> -x) applied first.
    theta = torch.stack(
        [
            torch.stack([cos * flips, -sin, torch.zeros(size)], dim=1),
            torch.stack([sin * flips, cos, torch.zeros(size)], dim=1),
        ],
        dim=1,
    ).to(batch.device)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    return F.grid_sample(
        batch.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
    )
