"""Architectures and weight loading, including the original study's checkpoint format."""

from __future__ import annotations

import pytest
import torch

from prunecxr import PrunecxrError
from prunecxr.models import ARCHS, create_model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_models_output_one_logit_per_class(arch):
    model = create_model(arch, 20).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 64)).shape == (2, 20)


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
