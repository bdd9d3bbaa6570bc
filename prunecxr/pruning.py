"""Pruning at a given sparsity, as in the study (docs/ARCHITECTURE.md, "Pruning").

`sparsity` is the fraction of prunable weights (every Conv2d and Linear weight) that is zeroed
(unstructured: global L1 or random, torch.nn.utils.prune, made permanent) or removed
(structured: torch-pruning channel pruning; the channel ratio is searched to hit the target).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from collections.abc import Callable, Iterator

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune
from torchvision.models import VisionTransformer

from prunecxr import PrunecxrError
from prunecxr.models import head_of
from prunecxr.runtime import standard_layout

STRUCTURED_TOLERANCE = 0.01  # |achieved - target| sparsity allowed for structured pruning
STRUCTURED_MAX_STEPS = 24  # bisection steps on the channel ratio
# The channel ratio that reaches a sparsity depends on the layer shapes only (each layer loses
# the same share of channels), not on the weights: searched once per architecture, reused for
# every seed.
_channel_ratios: dict[tuple, float] = {}


def prunable_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every Conv2d and Linear weight (the classifier's included, as in the paper), and an
    attention layer's query/key/value projection (a ViT's; its output projection is a Linear)."""
    weights = []
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weights.append((module, "weight"))
        elif isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            weights.append((module, "in_proj_weight"))
    return weights


def count_prunable(model: nn.Module) -> tuple[int, int]:
    """-> (number of prunable weights, how many of them are non-zero)."""
    weights = [getattr(module, name) for module, name in prunable_weights(model)]
    return sum(w.numel() for w in weights), _count_nonzero(weights)


def nonzero_parameters(model: nn.Module) -> int:
    return _count_nonzero(list(model.parameters()))


def _count_nonzero(tensors: list[torch.Tensor]) -> int:
    """Non-zero elements of `tensors`, read from the device once (not once per tensor)."""
    if not tensors:
        return 0
    return int(torch.stack([t.detach().count_nonzero() for t in tensors]).sum())


@contextlib.contextmanager
def zeros_stay_zero(model: nn.Module) -> Iterator[None]:
    """Inside the block, prunable weights that are zero now stay zero (fine-tuning after
    unstructured pruning); the masks are made permanent again on leaving."""
    for module, name in prunable_weights(model):
        prune.custom_from_mask(module, name, getattr(module, name) != 0)
    try:
        yield
    finally:
        for module, name in prunable_weights(model):
            prune.remove(module, name)


def prune_l1(model: nn.Module, sparsity: float, **_) -> nn.Module:
    """Global L1 unstructured: zero the `sparsity` fraction of smallest-magnitude weights."""
    return _prune_global(model, prune.L1Unstructured, sparsity)


def prune_random(model: nn.Module, sparsity: float, *, seed: int = 0, **_) -> nn.Module:
    """Global random unstructured: zero a random `sparsity` fraction of prunable weights. Each
    (seed, sparsity) draws its own mask, as the original's single random stream did (masks of
    two sparsities are not nested), from a CPU generator: the same mask on any device."""
    generator = torch.Generator().manual_seed(random_mask_seed(seed, sparsity))
    scores = {}
    for module, name in prunable_weights(model):
        weight = getattr(module, name)
        scores[(module, name)] = torch.rand(weight.shape, generator=generator).to(weight.device)
    # Pruning the lowest scores (L1 order of the scores, not of the weights) is random pruning.
    return _prune_global(model, prune.L1Unstructured, sparsity, scores)


def random_mask_seed(seed: int, sparsity: float) -> int:
    """The random mask generator's seed: a 63-bit hash of the model seed and the sparsity."""
    text = f"{int(seed)}:{float(sparsity)!r}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") >> 1


def _prune_global(model: nn.Module, method, sparsity: float, scores=None) -> nn.Module:
    parameters = prunable_weights(model)
    if sparsity > 0:
        prune.global_unstructured(
            parameters, pruning_method=method, importance_scores=scores, amount=float(sparsity)
        )
        for module, name in parameters:
            prune.remove(module, name)  # masks become permanent zeros
    return model


def prune_structured(
    model: nn.Module, sparsity: float, *, example_inputs: torch.Tensor, **_
) -> nn.Module:
    """Channel pruning (group L1 magnitude) whose channel ratio is searched by bisection so the
    removed fraction of prunable weights is within STRUCTURED_TOLERANCE of `sparsity`.
    The classifier's outputs are never removed. Returns a new, smaller model."""
    if sparsity == 0:
        return model
    key = (_layer_shapes(model), sparsity)
    if key not in _channel_ratios:
        _channel_ratios[key] = _search_channel_ratio(model, sparsity, example_inputs)
    return _prune_channels(copy.deepcopy(model), _channel_ratios[key], example_inputs)


def _layer_shapes(model: nn.Module) -> tuple:
    return tuple(tuple(getattr(m, name).shape) for m, name in prunable_weights(model))


def _search_channel_ratio(model: nn.Module, sparsity: float, example_inputs) -> float:
    total, _ = count_prunable(model)
    low, high = 0.0, 1.0
    best: tuple[float, float] | None = None  # (achieved sparsity, ratio)
    for _step in range(STRUCTURED_MAX_STEPS):
        ratio = (low + high) / 2
        candidate = _prune_channels(copy.deepcopy(model), ratio, example_inputs)
        achieved = 1 - count_prunable(candidate)[0] / total
        if best is None or abs(achieved - sparsity) < abs(best[0] - sparsity):
            best = (achieved, ratio)
        if abs(achieved - sparsity) <= STRUCTURED_TOLERANCE / 2:
            break
        low, high = (ratio, high) if achieved < sparsity else (low, ratio)
    if abs(best[0] - sparsity) > STRUCTURED_TOLERANCE:
        raise PrunecxrError(
            f"structured pruning cannot reach sparsity {sparsity} (closest: {best[0]:.4f})"
        )
    return best[1]


def _prune_channels(model: nn.Module, ratio: float, example_inputs: torch.Tensor) -> nn.Module:
    # The dependency graph is traced with autograd on (torch-pruning needs grad_fn links).
    with torch.enable_grad():
        pruner = tp.pruner.BasePruner(
            model,
            example_inputs,
            importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=ratio,
            ignored_layers=[head_of(model)],
            unwrapped_parameters=_embedding_parameters(model),
            round_to=_width_multiple(model),
        )
        pruner.step()
    if isinstance(model, VisionTransformer):  # its forward pass reads the width from here
        model.hidden_dim = model.conv_proj.out_channels
    return model


def _width_multiple(model: nn.Module) -> int | None:
    """A ViT's widths stay multiples of its head count (each head keeps whole dimensions)."""
    if not isinstance(model, VisionTransformer):
        return None
    return model.encoder.layers[0].self_attention.num_heads


def _embedding_parameters(model: nn.Module) -> list[tuple[nn.Parameter, int]] | None:
    """A ViT's class token and position embeddings, pruned along the embedding width with
    the layers that read them (torch-pruning cannot see them through a layer)."""
    if not isinstance(model, VisionTransformer):
        return None
    return [(model.class_token, 2), (model.encoder.pos_embedding, 2)]


METHODS: dict[str, Callable[..., nn.Module]] = {
    "l1": prune_l1,
    "random": prune_random,
    "structured": prune_structured,
}


def prune_model(
    model: nn.Module, method: str, sparsity: float, *, example_inputs: torch.Tensor, seed: int = 0
) -> nn.Module:
    """Prune `model` (in place for unstructured; a new model for structured) and return it, in
    the standard layout: a model in any memory format is accepted (a channels_last model from a
    GPU would otherwise fail, as torch.nn.utils.prune views every weight as a vector)."""
    if not 0 <= sparsity < 1:
        raise PrunecxrError(f"sparsity {sparsity} is outside [0, 1)")
    try:
        prune_fn = METHODS[method]
    except KeyError:
        raise PrunecxrError(f"unknown method {method!r}; valid: {', '.join(METHODS)}") from None
    model = standard_layout(model)
    return prune_fn(model, sparsity, seed=seed, example_inputs=example_inputs)


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass over `example_inputs` (dense count: zeros
    count). A dense count depends only on the architecture, the layer shapes and the input
    shape, so it is counted once per (those) in a process: an unstructured cell's count is its
    source's, a structured one's that of every seed at that sparsity."""
    key = (type(model).__name__, _layer_shapes(model), tuple(example_inputs.shape))
    if key not in _macs:
        macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
        _macs[key] = int(macs)
    return _macs[key]


_macs: dict[tuple, int] = {}
