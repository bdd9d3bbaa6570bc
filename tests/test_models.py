"""Architectures and weight loading, including the original study's checkpoint format."""

from __future__ import annotations

import pytest
import torch
import torchvision

from prunecxr import PrunecxrError, models
from prunecxr.models import ARCHS, create_model, head_of


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_models_output_one_logit_per_class(arch):
    model = create_model(arch, 20, image_size=64).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 20)
    assert head_of(model).out_features == 20


def test_a_vit_needs_whole_patches():
    with pytest.raises(PrunecxrError, match="vit_b_16 needs an image size divisible by 16, not 40"):
        create_model("vit_b_16", 20, image_size=40)


def test_imagenet_weights_of_a_vit_are_interpolated_to_the_image_size(monkeypatch):
    """ImageNet's ViT-B/16 position embeddings are made for 224 px (197 tokens); at 32 px the
    model has 5 (torchvision's interpolate_embeddings). The download is stood in for."""
    imagenet = torchvision.models.vit_b_16(weights=None).state_dict()
    monkeypatch.setattr(models, "_download_imagenet", lambda arch, weights: imagenet)
    model = create_model("vit_b_16", 20, pretrained="imagenet", image_size=32)
    assert model.encoder.pos_embedding.shape == (1, 5, 768)
    assert torch.equal(model.conv_proj.weight, imagenet["conv_proj.weight"])
    assert model.heads.head.out_features == 20


def test_unknown_arch_lists_valid_choices():
    with pytest.raises(PrunecxrError, match="resnet18, resnet34, resnet50"):
        create_model("vgg16", 20)


@pytest.mark.parametrize(
    "wrap", [lambda sd: sd, lambda sd: {"weights": sd}], ids=["plain", "original"]
)
def test_pretrained_path_loads_the_backbone(tmp_path, wrap):
    source = create_model("resnet18", 19)
    torch.save(wrap(source.state_dict()), tmp_path / "chkpt.pt")
    model = create_model("resnet18", 20, pretrained=str(tmp_path / "chkpt.pt"))
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_mean, source.layer4[1].bn2.running_mean)
    assert model.fc.out_features == 20  # the head is new, whatever the file's head size


@pytest.mark.parametrize("arch", ["densenet121", "vit_b_16"])
def test_pretrained_path_loads_the_backbone_of_every_architecture(tmp_path, arch):
    source = create_model(arch, 18, image_size=32)  # e.g. torchxrayvision's 18 classes
    torch.save(source.state_dict(), tmp_path / "backbone.pt")
    model = create_model(arch, 20, pretrained=str(tmp_path / "backbone.pt"), image_size=32)
    kept = [name for name in source.state_dict() if not name.startswith(ARCHS[arch].head)]
    assert all(torch.equal(model.state_dict()[k], source.state_dict()[k]) for k in kept)
    assert head_of(model).out_features == 20


def test_a_grey_model_s_features_load_as_the_docs_convert_them(tmp_path):
    """torchxrayvision's DenseNet121 layout (one input channel, `features.*` kept by the
    documented command): its first convolution spread over the three grey copies gives the same
    output on a grey image."""
    grey = torchvision.models.densenet121(weights=None)
    grey.features.conv0 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    features = {k: v for k, v in grey.state_dict().items() if k.startswith("features.")}
    torch.save(features, tmp_path / "xrv-densenet121.pt")
    model = create_model("densenet121", 20, pretrained=str(tmp_path / "xrv-densenet121.pt"))
    image = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        expected = grey.features.conv0(image)
        assert torch.allclose(model.features.conv0(image.expand(1, 3, 64, 64)), expected, atol=1e-5)
    kept = [k for k in features if k != "features.conv0.weight"]
    assert all(torch.equal(model.state_dict()[k], features[k]) for k in kept)


def test_weights_of_another_arch_are_refused(tmp_path):
    torch.save(create_model("resnet18", 20).state_dict(), tmp_path / "r18.pt")
    with pytest.raises(PrunecxrError, match="does not fit the architecture"):
        create_model("resnet50", 20, pretrained=str(tmp_path / "r18.pt"))


def test_imagenet_download_offline_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached weights
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # nothing listens: offline for sure
    with pytest.raises(PrunecxrError, match="--pretrained none or --pretrained PATH"):
        create_model("resnet18", 20, pretrained="imagenet")
