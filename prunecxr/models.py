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


def model_from_weights(arch: str, num_classes: int, state: dict) -> nn.Module:
    """`arch` built and given `state` (a logged model's state dict), in eval mode."""
    return load_weights_into(create_model(arch, num_classes), state)


def load_weights_into(model: nn.Module, state: dict) -> nn.Module:
    """Load `state` into `model` of the same architecture, first giving every layer the shape
    its weights have there (a structurally pruned model has fewer channels)."""
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for key, value in [
            *module.named_parameters(recurse=False),
            *module.named_buffers(recurse=False),
        ]:
            saved = state.get(prefix + key)
            if saved is None or saved.shape == value.shape:
                continue
            if key in module._parameters:
                module._parameters[key] = nn.Parameter(torch.empty_like(saved))
            else:
                module._buffers[key] = torch.empty_like(saved)
        _match_shape_attributes(module)
    model.load_state_dict(state)
    return model.eval()


def _match_shape_attributes(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        module.out_channels = module.weight.shape[0]
        module.in_channels = module.weight.shape[1] * module.groups
    elif isinstance(module, nn.BatchNorm2d):
        module.num_features = module.weight.shape[0]
    elif isinstance(module, nn.Linear):
        module.out_features, module.in_features = module.weight.shape


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
