"""Shi et al. 2020 models: the slab ResNet-18 (torchvision names, the 5-slice stem and how ImageNet's RGB
stem maps onto it, Grad-CAM by autograd against the closed form, the cell grid) and the bidirectional
Conv-LSTM (shapes, both directions read the whole study)."""

from __future__ import annotations

import pytest
import torch

from dicom_node_training.loss import attention_dice_loss
from dicom_node_training.models.convlstm import conv_lstm_net
from dicom_node_training.models.r3d import PretrainedWeightsError
from dicom_node_training.models.resnet2d import (
    cam_grid_2d,
    grad_cam,
    load_pretrained_2d,
    resnet18_slab,
    slab_cam,
)


def test_rgb_resnet18_has_torchvision_parameter_names_and_count():
    with pytest.warns(UserWarning, match="random initialisation"):
        model = resnet18_slab(in_channels=3, width=64, layer4_stride=2)
    names = dict(model.named_parameters())
    # torchvision.models.resnet18() has 11,689,512 parameters (with a 1000-way fc: 513,000 of them)
    assert sum(p.numel() for p in names.values()) - 513 == 11_689_512 - 513_000
    for key, shape in (("conv1.weight", (64, 3, 7, 7)), ("bn1.weight", (64,)), ("layer1.0.conv1.weight", (64, 64, 3, 3)),
                       ("layer2.0.downsample.0.weight", (128, 64, 1, 1)), ("layer2.0.downsample.1.bias", (128,)),
                       ("layer4.1.bn2.weight", (512,)), ("fc.weight", (1, 512))):
        assert tuple(names[key].shape) == shape
    assert "layer4.1.bn2.running_var" in model.state_dict()


def test_a_slab_becomes_the_stem_channels_and_layer4_stride_1_gives_the_papers_24_by_24_cells():
    model = resnet18_slab(in_channels=5, width=8).eval()
    out = model(torch.rand(2, 1, 5, 384, 384))
    assert out.logit.shape == (2,) and out.features.shape == (2, 64) and out.activations.shape == (2, 64, 1, 24, 24)
    assert model(torch.rand(2, 5, 384, 384)).activations.shape == (2, 64, 1, 24, 24)
    grid = cam_grid_2d(model, slices=5)
    assert (grid.stride, grid.offset) == ((5.0, 16.0, 16.0), (2.0, 0.0, 0.0))
    assert cam_grid_2d(resnet18_slab(width=8, layer4_stride=2), 5).stride == (5.0, 32.0, 32.0)


def test_imagenet_rgb_stem_maps_to_the_slab_stem_so_a_grey_slab_excites_it_as_the_grey_image_did(tmp_path):
    torch.manual_seed(0)
    with pytest.warns(UserWarning):
        rgb = resnet18_slab(in_channels=3, width=64, layer4_stride=2)
    path = tmp_path / "resnet18.pth"
    torch.save({k: v for k, v in rgb.state_dict().items()}, path)
    slab = resnet18_slab(in_channels=5, width=64, pretrained=path)
    grey = torch.rand(1, 1, 32, 32)
    assert torch.allclose(slab.conv1(grey.expand(1, 5, 32, 32)), rgb.conv1(grey.expand(1, 3, 32, 32)), atol=1e-5)
    assert torch.equal(slab.layer3[1].conv2.weight, rgb.layer3[1].conv2.weight)
    with pytest.raises(PretrainedWeightsError, match="conv1.weight: file"):
        load_pretrained_2d(resnet18_slab(in_channels=5, width=32), path)


def test_grad_cam_by_autograd_equals_the_closed_form_and_trains_through_the_attention_loss():
    torch.manual_seed(1)
    model = resnet18_slab(in_channels=5, width=8).train()
    out = model(torch.rand(3, 1, 5, 64, 64))
    by_autograd = grad_cam(out, create_graph=True)
    assert by_autograd.shape == (3, 1, 4, 4)
    assert torch.allclose(by_autograd, slab_cam(model, out), atol=1e-7)
    mask = torch.zeros(3, 1, 4, 4)
    mask[:, :, 1:3, 1:3] = 1
    attention_dice_loss(by_autograd, mask, torch.ones(3)).backward()
    assert model.conv1.weight.grad is not None and model.conv1.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is not None and model.fc.weight.grad.abs().sum() > 0


def test_conv_lstm_maps_a_study_of_slab_features_to_one_logit_and_reads_it_in_both_directions():
    torch.manual_seed(2)
    net = conv_lstm_net(in_channels=16, in_hw=(6, 6), filters=8, units=2).eval()
    x = torch.rand(2, 7, 16, 6, 6)
    assert net(x).shape == (2,)
    asc, desc = net.units[0], net.units[1]
    y = asc(x)
    x2 = x.clone()
    x2[:, -1] += 1.0  # the last slab changes ...
    assert torch.equal(asc(x2)[:, 0], y[:, 0])  # ... the ascending pass has not seen it at slab 0
    assert not torch.allclose(desc(asc(x2))[:, 0], desc(y)[:, 0])  # the descending pass carries it back
    with pytest.raises(ValueError, match="leave no cells"):
        conv_lstm_net(in_channels=16, in_hw=(3, 3), filters=8, units=2)
