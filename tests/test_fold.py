"""BatchNorm folded into the convolutions for inference: the same outputs within float rounding."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import detrkit
from conftest import padded_batch, randomize_buffers, tiny_config
from detrkit.models.fold import fold_batchnorm


@pytest.mark.parametrize("backbone,frozen_bn", [("resnet18", True), ("resnet50", True), ("resnet18", False)])
def test_folded_model_gives_the_same_outputs(backbone, frozen_bn):
    torch.manual_seed(0)
    model = detrkit.build_model(tiny_config(backbone=backbone, frozen_bn=frozen_bn)).eval()
    randomize_buffers(model)  # running statistics and affine parameters far from identity
    if not frozen_bn:  # a trained BatchNorm in eval mode: give it statistics too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.5, 0.5)
    folded = copy.deepcopy(model)
    count = fold_batchnorm(folded)
    norms = sum("BatchNorm" in type(m).__name__ for m in model.backbone.modules())
    assert count == norms > 0  # every BatchNorm of the backbone, none left behind
    assert not any("BatchNorm" in type(m).__name__ for m in folded.backbone.modules())
    images, padding_mask = padded_batch()
    with torch.no_grad():
        expected, actual = model(images, padding_mask), folded(images, padding_mask)
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-5)


def test_a_training_mode_model_is_refused():
    model = detrkit.build_model(tiny_config(frozen_bn=False)).train()
    with pytest.raises(ValueError, match="training mode"):
        fold_batchnorm(model)


def test_the_detector_folds_what_it_loads(tmp_path):
    torch.manual_seed(0)
    model = detrkit.build_model(tiny_config(class_names=("a", "b", "c", "d"))).eval()
    randomize_buffers(model)
    detrkit.save_model(model, tmp_path / "m.safetensors")
    detector = detrkit.Detector.from_pretrained(tmp_path / "m.safetensors")
    assert not any("BatchNorm" in type(m).__name__ for m in detector.model.backbone.modules())
    image = torch.rand(3, 90, 120)
    [folded] = detector.predict(image, threshold=0.0)
    [plain] = detrkit.Detector(model).predict(image, threshold=0.0)
    torch.testing.assert_close(folded.scores, plain.scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(folded.boxes, plain.boxes, rtol=1e-5, atol=1e-3)


def test_a_convolution_with_a_bias_folds_exactly():
    from detrkit.models.fold import fold_conv_norm

    torch.manual_seed(0)
    conv, norm = nn.Conv2d(3, 5, 3, padding=1, bias=True), nn.BatchNorm2d(5).eval()
    norm.running_mean.uniform_(-1, 1)
    norm.running_var.uniform_(0.5, 2)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.uniform_(norm.bias, -1, 1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = norm(conv(x))
        fold_conv_norm(conv, norm)
        torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_absorbed_frozen_norms_train_as_torchvisions_conv_then_norm(backbone):
    """The training backbone (each conv applying its frozen norm through its weights) against
    torchvision's own ResNet with FrozenBatchNorm2d layers: same state-dict keys, same outputs and
    same gradients of every trainable weight."""
    import torchvision
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.ops.misc import FrozenBatchNorm2d

    from detrkit.models.backbone import Backbone
    from detrkit.models.fold import ConvWithFrozenNorm

    torch.manual_seed(0)
    ours = Backbone(backbone, return_interm_layers=True).train()
    assert sum(isinstance(m, ConvWithFrozenNorm) for m in ours.modules()) > 0
    resnet = getattr(torchvision.models, backbone)(norm_layer=FrozenBatchNorm2d)
    reference = IntermediateLayerGetter(resnet, {f"layer{i}": str(i - 1) for i in range(1, 5)}).train()
    randomize_buffers(ours.body)
    assert ours.body.state_dict().keys() == reference.state_dict().keys()
    reference.load_state_dict(ours.body.state_dict())
    for name, parameter in reference.named_parameters():
        parameter.requires_grad_(name.startswith(("layer2", "layer3", "layer4")))

    images = torch.randn(2, 3, 64, 96)
    features = [f for f, _ in ours(images, None)]
    expected = list(reference(images).values())
    for actual, wanted in zip(features, expected, strict=True):  # relative to their size: the
        assert (actual - wanted).norm() <= 1e-5 * wanted.norm()  # activations grow through 50 layers
    weights = [torch.randn_like(f) for f in expected]
    sum((f * w).sum() for f, w in zip(features, weights)).backward()
    sum((f * w).sum() for f, w in zip(expected, weights)).backward()
    theirs = dict(reference.named_parameters())
    for name, parameter in ours.body.named_parameters():
        if parameter.requires_grad:
            wanted = theirs[name].grad  # sums over many products: compare relative to its size
            assert (parameter.grad - wanted).norm() <= 1e-5 * wanted.norm(), name


def test_absorbed_norms_follow_loaded_buffers_and_copies():
    """The norm a convolution applies is the registered one: loading a state dict or deep-copying
    (EMA) changes what it computes."""
    from detrkit.models.backbone import Backbone

    torch.manual_seed(0)
    model = Backbone("resnet18").eval()
    images = torch.randn(1, 3, 64, 64)
    before = model(images, None)[0][0]
    copied = copy.deepcopy(model)
    state = model.state_dict()
    state["body.bn1.weight"] = state["body.bn1.weight"] * 2
    copied.load_state_dict(state)
    assert copied.body.conv1.frozen_norm is copied.body.bn1
    assert not torch.allclose(copied(images, None)[0][0], before)
    torch.testing.assert_close(model(images, None)[0][0], before)  # the original is untouched
