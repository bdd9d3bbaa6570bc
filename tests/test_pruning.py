"""Pruning methods: global magnitude order, achieved sparsity, structured shapes."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch.nn.utils import prune

from prunecxr import PrunecxrError
from prunecxr.models import create_model
from prunecxr.pruning import (
    count_macs,
    count_prunable,
    prunable_weights,
    prune_model,
    zeros_stay_zero,
)

EXAMPLE = torch.zeros(1, 3, 64, 64)


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return create_model("resnet18", 20).eval()


def _flat_weights(model) -> torch.Tensor:
    return torch.cat([getattr(m, n).detach().flatten() for m, n in prunable_weights(model)])


@pytest.mark.parametrize("sparsity", [0.3, 0.9])
def test_l1_zeroes_the_globally_smallest_weights(resnet18, sparsity):
    before = _flat_weights(resnet18).abs()
    pruned = prune_model(copy.deepcopy(resnet18), "l1", sparsity, example_inputs=EXAMPLE)
    after = _flat_weights(pruned)
    zeroed = after == 0
    assert zeroed.float().mean().item() == pytest.approx(sparsity, abs=1e-6)
    assert before[zeroed].max() <= before[~zeroed].min()  # global, not per-layer, order
    per_layer = [(getattr(m, n) == 0).float().mean().item() for m, n in prunable_weights(pruned)]
    assert max(per_layer) - min(per_layer) > 0.1  # layers lose different fractions
    assert (pruned.fc.weight == 0).any()  # the classifier's weights are prunable too


def test_masks_are_permanent(resnet18):
    pruned = prune_model(copy.deepcopy(resnet18), "l1", 0.5, example_inputs=EXAMPLE)
    names = {name for name, _ in pruned.named_parameters()}
    assert not any(name.endswith("weight_orig") for name in names)
    assert not any(prune.is_pruned(module) for module in pruned.modules())
    total, nonzero = count_prunable(pruned)
    assert nonzero / total == pytest.approx(0.5, abs=1e-6)


def test_random_is_seeded_and_ignores_magnitude(resnet18):
    def zero_mask(seed):
        model = prune_model(
            copy.deepcopy(resnet18), "random", 0.5, example_inputs=EXAMPLE, seed=seed
        )
        return _flat_weights(model) == 0

    first, again, other = zero_mask(1), zero_mask(1), zero_mask(2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert first.float().mean().item() == pytest.approx(0.5, abs=1e-6)
    magnitudes = _flat_weights(resnet18).abs()
    assert magnitudes[first].max() > magnitudes[~first].min()  # not magnitude-ordered


def _random_kept(model, sparsity, seed=1) -> torch.Tensor:
    pruned = prune_model(
        copy.deepcopy(model), "random", sparsity, example_inputs=EXAMPLE, seed=seed
    )
    return _flat_weights(pruned) != 0


def test_random_masks_of_two_sparsities_are_drawn_independently(resnet18):
    """As the original's one random stream: the mask at 0.9 is no subset of the mask at 0.5
    (nested masks would keep every weight of 0.9 at 0.5); each is repeatable and exact."""
    half, tenth = _random_kept(resnet18, 0.5), _random_kept(resnet18, 0.9)
    assert torch.equal(half, _random_kept(resnet18, 0.5))
    assert (tenth & ~half).any()  # kept at 0.9 but not at 0.5
    assert (tenth & ~half).float().mean().item() == pytest.approx(0.1 * 0.5, abs=0.01)
    assert 1 - half.float().mean().item() == pytest.approx(0.5, abs=1e-6)
    assert 1 - tenth.float().mean().item() == pytest.approx(0.9, abs=1e-6)


def test_random_masks_leave_the_weights_and_the_global_rng_alone(resnet18):
    """The mask is drawn from a generator of its own on the CPU: the kept weights are the
    model's own, bit for bit, and torch's global random state is not advanced."""
    rng = torch.get_rng_state()
    before = _flat_weights(resnet18)
    pruned = prune_model(copy.deepcopy(resnet18), "random", 0.7, example_inputs=EXAMPLE, seed=2)
    after = _flat_weights(pruned)
    assert torch.equal(after[after != 0], before[after != 0])
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(_flat_weights(resnet18), before)


@pytest.mark.gpu
def test_random_masks_are_the_same_on_a_gpu(resnet18):
    on_cpu = _random_kept(resnet18, 0.6, seed=5)
    gpu_model = copy.deepcopy(resnet18).cuda()
    pruned = prune_model(gpu_model, "random", 0.6, example_inputs=EXAMPLE.cuda(), seed=5)
    assert pruned.fc.weight.is_cuda
    assert torch.equal((_flat_weights(pruned) != 0).cpu(), on_cpu)


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_structured_hits_the_target_and_shrinks_the_model(resnet18, sparsity):
    total, _ = count_prunable(resnet18)
    pruned = prune_model(copy.deepcopy(resnet18), "structured", sparsity, example_inputs=EXAMPLE)
    remaining, nonzero = count_prunable(pruned)
    assert 1 - remaining / total == pytest.approx(sparsity, abs=0.01)
    assert pruned.fc.out_features == 20  # classifier outputs are never removed
    assert pruned.layer1[0].conv1.out_channels < resnet18.layer1[0].conv1.out_channels
    assert pruned(torch.randn(2, 3, 64, 64)).shape == (2, 20)
    assert count_macs(pruned, EXAMPLE) < (1 - sparsity / 2) * count_macs(resnet18, EXAMPLE)


def test_sparsity_zero_changes_nothing(resnet18):
    for method in ("l1", "random", "structured"):
        same = prune_model(copy.deepcopy(resnet18), method, 0.0, example_inputs=EXAMPLE)
        assert torch.equal(_flat_weights(same), _flat_weights(resnet18))


def test_bad_method_and_sparsity_are_refused(resnet18):
    with pytest.raises(PrunecxrError, match="l1, random, structured"):
        prune_model(resnet18, "magnitude", 0.5, example_inputs=EXAMPLE)
    with pytest.raises(PrunecxrError, match="outside"):
        prune_model(resnet18, "l1", 1.0, example_inputs=EXAMPLE)


def test_zeros_stay_zero_while_fine_tuning(resnet18):
    model = prune_model(copy.deepcopy(resnet18), "l1", 0.8, example_inputs=EXAMPLE).train()
    zero_before = _flat_weights(model) == 0
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with zeros_stay_zero(model):
        model(torch.randn(4, 3, 64, 64)).sum().backward()
        optimizer.step()
    after = _flat_weights(model)
    assert (after[zero_before] == 0).all()
    assert not torch.equal(after[~zero_before], _flat_weights(resnet18)[~zero_before])


@pytest.mark.parametrize("method", ["l1", "random", "structured"])
def test_a_channels_last_model_from_a_gpu_prunes_like_the_standard_layout(resnet18, method):
    """Training on CUDA leaves weights channels_last; torch.nn.utils.prune views every weight
    as a vector, which that layout refused before prune_model put it back in NCHW order."""
    standard = prune_model(copy.deepcopy(resnet18), method, 0.5, example_inputs=EXAMPLE, seed=3)
    channels_last = copy.deepcopy(resnet18).to(memory_format=torch.channels_last)
    assert not channels_last.conv1.weight.is_contiguous()
    pruned = prune_model(channels_last, method, 0.5, example_inputs=EXAMPLE, seed=3)
    for a, b in zip(standard.state_dict().values(), pruned.state_dict().values()):
        assert torch.equal(a, b)
    assert all(p.is_contiguous() for p in pruned.parameters())


def test_random_cells_carry_their_mask_scheme_in_the_key():
    """A sweep continued across the change of random masks redoes its random cells (their
    masks were nested and drawn on the device); L1 and structured cells keep their keys."""
    from prunecxr.cells import Cell, ModelSource
    from prunecxr.specs import DataSpec

    source = ModelSource(
        "runs:/r/model", "r", "resnet18", 0, "none", DataSpec(), torch.nn.Identity()
    )
    assert Cell(source, "l1", 0.5).key == "r|l1|0.5"
    assert Cell(source, "structured", 0.5).key == "r|structured|0.5"
    assert Cell(source, "random", 0.5).key == "r|random|0.5|masks-per-cell-cpu"


@pytest.mark.gpu
def test_random_masks_are_the_same_on_the_cpu_and_the_gpu(resnet18):
    on_cpu = prune_model(copy.deepcopy(resnet18), "random", 0.7, example_inputs=None, seed=4)
    on_gpu = prune_model(copy.deepcopy(resnet18).cuda(), "random", 0.7, example_inputs=None, seed=4)
    for a, b in zip(on_cpu.parameters(), on_gpu.parameters()):
        assert torch.equal(a == 0, b.cpu() == 0)


def test_macs_are_counted_once_per_architecture_layer_shapes_and_input(resnet18, monkeypatch):
    """The count depends on shapes only: an unstructured cell's is its source's, so it is not
    traced again (nor for another seed's model of the same shapes)."""
    import torch_pruning as tp

    traced = []
    real = tp.utils.count_ops_and_params
    monkeypatch.setattr(
        tp.utils, "count_ops_and_params", lambda *a, **k: traced.append(1) or real(*a, **k)
    )
    example = torch.zeros(1, 3, 40, 40)  # a shape no other test counts
    dense = count_macs(resnet18, example)
    pruned = prune_model(copy.deepcopy(resnet18), "l1", 0.5, example_inputs=None)
    assert count_macs(pruned, example) == dense and len(traced) == 1
    count_macs(resnet18, torch.zeros(1, 3, 48, 48))
    assert len(traced) == 2


def _small(arch: str) -> torch.nn.Module:
    """The classes of densenet121 and vit_b_16, a few layers deep (the same pruning code)."""
    torch.manual_seed(0)
    if arch == "densenet":
        return torchvision.models.DenseNet(12, (3, 3), 24, 4, num_classes=5).eval()
    return torchvision.models.VisionTransformer(32, 16, 2, 4, 64, 128, num_classes=5).eval()


@pytest.mark.parametrize("arch", ["densenet", "vit"])
@pytest.mark.parametrize("method", ["l1", "random"])
def test_unstructured_pruning_covers_every_architecture(arch, method):
    """Conv2d and Linear weights, and a ViT's attention q/k/v projection (not a Linear)."""
    model = _small(arch)
    layers = {type(module).__name__ for module, _ in prunable_weights(model)}
    expected = {"Conv2d", "Linear"} | ({"MultiheadAttention"} if arch == "vit" else set())
    assert expected <= layers
    pruned = prune_model(model, method, 0.7, example_inputs=None, seed=1)
    total, nonzero = count_prunable(pruned)
    assert 1 - nonzero / total == pytest.approx(0.7, abs=1e-3)
    attention = [m for m in pruned.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert all((m.in_proj_weight == 0).any() for m in attention)


@pytest.mark.parametrize(
    ("arch", "sparsities"), [("densenet", (0.5, 0.7, 0.9)), ("vit", (0.5, 0.7, 0.9))]
)
def test_structured_pruning_of_densenet_and_vit_reaches_the_sparsity(arch, sparsities):
    """DenseNet: channels; ViT: the embedding width and MLP width, in multiples of the head
    count (every head keeps whole dimensions); the classifier's outputs stay."""
    model, images = _small(arch), torch.randn(2, 3, 32, 32)
    total, _ = count_prunable(model)
    for sparsity in sparsities:
        pruned = prune_model(
            copy.deepcopy(model), "structured", sparsity, example_inputs=images[:1]
        )
        left, _ = count_prunable(pruned)
        assert 1 - left / total == pytest.approx(sparsity, abs=0.01)
        with torch.no_grad():
            assert pruned(images).shape == (2, 5)
        if arch == "vit":
            attention = pruned.encoder.layers[0].self_attention
            assert attention.num_heads == 4 and attention.embed_dim % 4 == 0
            assert pruned.hidden_dim == attention.embed_dim < 64
