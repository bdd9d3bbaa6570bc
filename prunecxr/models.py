"""Architectures (torchvision ResNets as in the study, DenseNet121 as in CheXNet and
torchxrayvision, ViT-B/16) with a C-way multi-label head, and their weights."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models import vision_transformer

from prunecxr import PrunecxrError


@dataclass(frozen=True)
class Architecture:
    build: Callable[..., nn.Module]  # torchvision's builder
    imagenet: torchvision.models.WeightsEnum
    head: str  # the classifier's attribute path, replaced by a C-way Linear
    sized: bool = False  # built for its input size (a ViT's position embeddings)


ARCHS = {
    "resnet18": Architecture(
        torchvision.models.resnet18, torchvision.models.ResNet18_Weights.IMAGENET1K_V1, "fc"
    ),
    "resnet34": Architecture(
        torchvision.models.resnet34, torchvision.models.ResNet34_Weights.IMAGENET1K_V1, "fc"
    ),
    "resnet50": Architecture(
        torchvision.models.resnet50, torchvision.models.ResNet50_Weights.IMAGENET1K_V1, "fc"
    ),
    "densenet121": Architecture(
        torchvision.models.densenet121,
        torchvision.models.DenseNet121_Weights.IMAGENET1K_V1,
        "classifier",
    ),
    "vit_b_16": Architecture(
        torchvision.models.vit_b_16,
        torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1,
        "heads.head",
        sized=True,
    ),
}


def architecture(arch: str) -> Architecture:
    try:
        return ARCHS[arch]
    except KeyError:
        raise PrunecxrError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}") from None


def head_of(model: nn.Module) -> nn.Module:
    """The classifier layer of any of ARCHS (pruning leaves its outputs alone)."""
    for arch in ARCHS.values():
        try:
            return operator.attrgetter(arch.head)(model)
        except AttributeError:
            continue
    raise PrunecxrError(f"no classifier head found in {type(model).__name__}")


def create_model(
    arch: str, num_classes: int, pretrained: str = "none", image_size: int = 224
) -> nn.Module:
    """A torchvision model whose classifier has `num_classes` outputs (logits).

    pretrained: "imagenet" (torchvision weights, downloaded once into TORCH_HOME), "none", or a
    path to a state dict: a plain one, or the original study's `{'weights': state_dict}`.
    `image_size` matters to a ViT only (its position embeddings; ImageNet's, made at 224 px,
    are interpolated to it); it must be a multiple of its 16 px patches."""
    spec = architecture(arch)
    if spec.sized and image_size % 16:
        raise PrunecxrError(f"{arch} needs an image size divisible by 16, not {image_size}")
    model = spec.build(weights=None, **({"image_size": image_size} if spec.sized else {}))
    if pretrained == "imagenet":
        state = _download_imagenet(arch, spec.imagenet)
        if spec.sized:
            state = vision_transformer.interpolate_embeddings(image_size, 16, state)
        model.load_state_dict(state)
    elif pretrained != "none":
        _load_backbone(model, Path(pretrained), spec.head)
    parent, _, name = spec.head.rpartition(".")
    owner = operator.attrgetter(parent)(model) if parent else model
    setattr(owner, name, nn.Linear(getattr(owner, name).in_features, num_classes))
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


def _load_backbone(model: nn.Module, path: Path, head: str) -> None:
    """Load everything but a classifier of another size (it is replaced afterwards anyway). A
    first convolution of one input channel (a grey-image model, as torchxrayvision's) is spread
    over the three grey copies this model sees: the same output on a grey image."""
    state = {k: v for k, v in load_state_file(path).items() if not k.startswith(f"{head}.")}
    own = model.state_dict()
    for key, value in state.items():
        if key in own and value.dim() == 4 and value.shape[1] == 1 and own[key].shape[1] == 3:
            state[key] = value.repeat(1, 3, 1, 1) / 3
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise PrunecxrError(f"{path} does not fit the architecture: {error}") from None
    missing = [k for k in missing if not k.startswith(f"{head}.")]
    if missing or unexpected:
        raise PrunecxrError(
            f"{path} does not fit the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}"
        )


def model_from_weights(
    arch: str, num_classes: int, state: dict, image_size: int = 224
) -> nn.Module:
    """`arch` built and given `state` (a logged model's state dict), in eval mode."""
    return load_weights_into(create_model(arch, num_classes, image_size=image_size), state)


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
