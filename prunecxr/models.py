"""Architectures of the study (torchvision ResNets with a C-way multi-label head) and their weights."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from prunecxr import PrunecxrError

ARCHS = {
    "resnet18": (torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
}


def create_model(arch: str, num_classes: int, pretrained: str = "none") -> nn.Module:
    """A torchvision ResNet whose `fc` has `num_classes` outputs (logits).

    pretrained: "imagenet" (torchvision weights, downloaded once into TORCH_HOME), "none", or a
    path to a state dict: a plain one, or the original study's `{'weights': state_dict}`."""
    try:
        builder, imagenet_weights = ARCHS[arch]
    except KeyError:
        raise PrunecxrError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}") from None
    model = builder(weights=None)
    if pretrained == "imagenet":
        model.load_state_dict(_download_imagenet(arch, imagenet_weights))
    elif pretrained != "none":
        _load_backbone(model, Path(pretrained))
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _download_imagenet(arch: str, weights) -> dict:
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as error:  # urllib raises URLError, http.client errors, RuntimeError...
        raise PrunecxrError(
            f"could not get ImageNet weights for {arch} ({type(error).__name__}: {error}); "
            f"offline, use --pretrained none or --pretrained PATH to a local weights file "
            f"(e.g. {weights.url.rsplit('/', 1)[-1]} placed in $TORCH_HOME/hub/checkpoints)"
        ) from None


def load_state_file(path: Path) -> dict:
    """A state dict from a .pt/.pth file; unwraps the original study's {'weights': ...}."""
    if not path.is_file():
        raise PrunecxrError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise PrunecxrError(f"cannot read weights file {path}: {error}") from None
    for key in ("weights", "model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise PrunecxrError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_backbone(model: nn.Module, path: Path) -> None:
    """Load everything but a classifier of another size (fc is replaced afterwards anyway)."""
    state = {k: v for k, v in load_state_file(path).items() if not k.startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise PrunecxrError(f"{path} does not fit the architecture: {error}") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise PrunecxrError(
            f"{path} does not fit the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
