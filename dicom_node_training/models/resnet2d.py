"""Shi et al. 2020 stage I: a 2D ResNet-18 slab classifier whose Grad-CAM is trained to land on the clot.

The module tree mirrors ``torchvision.models.resnet.resnet18`` (``conv1``, ``bn1``, ``layer1.0.conv1``,
``layer1.0.bn1``, ``layer2.0.downsample.0``, ..., ``fc``), so an ImageNet ``state_dict`` saved from
torchvision loads by name with :func:`load_pretrained`. Two differences, both without new parameters:

* the stem takes a slab: ``conv1`` has ``slices * channels`` input channels (5 slices x 1 HU window in the
  paper) instead of RGB. ImageNet's ``conv1.weight`` (64, 3, 7, 7) is mapped by averaging its three colour
  filters and repeating the average for every slab slice, scaled by 3 / slices, so that a slab of equal
  slices excites ``conv1`` exactly as the same grey image did in RGB (the filters see intensity, not colour);
* ``layer4`` may run at stride 1 (``layer4_stride=1``, the default): the paper's attention map is 24 x 24 at
  384 px, i.e. 16 px per cell, which torchvision's stride-32 ResNet-18 (12 x 12) cannot give. The 1 x 1
  shortcut of ``layer4.0`` keeps its shape, so pretrained weights still fit. ``layer3`` may run at stride 1
  as well (``layer3_stride=1``: 8 px cells), which a small CPU crop needs to keep cells near a clot's size
  (80 px -> 10 x 10 cells instead of 5 x 5); it costs layer3 and layer4 four times their arithmetic.

Input: slabs (B, channels, slices, H, W) as the shared preprocessing makes them (``Windows.array``) or
(B, slices, H, W); the slices become the input channels. The forward pass returns the Ma family's
:class:`~dicom_node_training.models.r3d.WindowOutput` (logit, GAP features, layer4 activations as
(B, C, 1, h, w): one "slice" of cells per slab), so CAM, the cell grid and the attention loss are shared.

Grad-CAM (eq. 1-2 of the paper) is :func:`grad_cam`: the gradient of the logit over ``layer4`` by
autograd (``create_graph=True`` in training, so the attention loss trains the network through it),
averaged over the cells, weights the activation maps, then ReLU. With the GAP -> linear head that
gradient is ``fc.weight / (h w)`` everywhere, so Grad-CAM equals the closed-form :func:`cam` divided by
``h w`` (tests/training/test_shi_models.py checks it); the export writes the closed form as an ONNX
output. The paper uses two softmax outputs; one logit with BCE is the same classifier for two classes
(the softmax of (0, z) is the sigmoid of z), and its Grad-CAM is that of the positive class.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import cast

import torch
from torch import Tensor, nn

from dicom_node.imaging.cam_grid import CamGrid
from dicom_node_training.models.r3d import PretrainedWeightsError, WindowOutput, cam, read_state_dict

__all__ = ["ResNet2d", "resnet18_slab", "load_pretrained_2d", "grad_cam", "slab_cam", "cam_grid_2d", "RESNET18_PLANES"]

#: planes of layer1..layer4 at width 64 (torchvision's resnet18)
RESNET18_PLANES: tuple[int, int, int, int] = (64, 128, 256, 512)


class BasicBlock2d(nn.Module):
    """torchvision's ``BasicBlock``: conv3x3-BN-ReLU-conv3x3-BN plus the (1x1 conv + BN) shortcut, ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return cast(Tensor, self.relu(out + identity))


class ResNet2d(nn.Module):
    """ResNet-18 over slabs with a ``num_outputs`` linear head; ``width`` scales every layer (64 = published)."""

    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, in_channels: int = 5, width: int = 64, layer4_stride: int = 1, num_outputs: int = 1,
                 layer3_stride: int = 2) -> None:
        super().__init__()
        planes = [p * width // 64 for p in RESNET18_PLANES]
        if width < 1 or min(planes) < 1:
            raise ValueError(f"resnet18_slab: width {width} gives an empty layer; use width >= 8 (64 = published)")
        if layer4_stride not in (1, 2):
            raise ValueError(f"resnet18_slab: layer4_stride {layer4_stride}; expected 1 (16 px cells, the paper's "
                             "24 x 24 at 384 px) or 2 (torchvision's 32 px cells)")
        if layer3_stride not in (1, 2):
            raise ValueError(f"resnet18_slab: layer3_stride {layer3_stride}; expected 2 (torchvision's) or 1 "
                             "(half the cell size again: 8 px cells with layer4_stride 1)")
        self.in_channels, self.width, self.layer4_stride = in_channels, width, layer4_stride
        self.layer3_stride = layer3_stride
        self.feature_dim = planes[-1]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = planes[0]
        for i, (p, s) in enumerate(zip(planes, (1, 2, layer3_stride, layer4_stride)), start=1):
            setattr(self, f"layer{i}", nn.Sequential(BasicBlock2d(inplanes, p, s), BasicBlock2d(p, p)))
            inplanes = p
        self.fc = nn.Linear(self.feature_dim, num_outputs)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> WindowOutput:
        """(B, C, D, H, W) or (B, D, H, W) slabs in [0, 1] -> `WindowOutput` (activations (B, F, 1, h, w))."""
        if x.dim() == 5:
            x = x.flatten(1, 2)
        a = self.layer4(self.layer3(self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))))
        a = a[:, :, None]  # (B, F, 1, h, w): the tensor Grad-CAM differentiates, so the head reads this view
        features = a.mean(dim=(2, 3, 4))
        logits = self.fc(features)
        return WindowOutput(logit=logits[:, 0] if logits.shape[1] == 1 else logits, features=features, activations=a)


def load_pretrained_2d(model: ResNet2d, path: Path | str) -> list[str]:
    """Load a local torchvision resnet18 ImageNet ``state_dict`` except ``fc``; map ``conv1`` (module doc).

    Returns the skipped keys; raises :class:`PretrainedWeightsError` naming missing, unexpected and
    mis-shaped keys when the file does not fit (e.g. a width other than 64).
    """
    path = Path(path)
    state = read_state_dict(path)
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    skipped = sorted(k for k in state if k.startswith("fc."))
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    w = body.get("conv1.weight")
    if w is not None and w.dim() == 4 and w.shape[1] == 3 and model.in_channels != 3:
        body["conv1.weight"] = w.mean(dim=1, keepdim=True).repeat(1, model.in_channels, 1, 1) * (3.0 / model.in_channels)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(own.keys() - body.keys()), sorted(body.keys() - own.keys())
    mismatched = sorted(f"{k}: file {tuple(body[k].shape)} vs model {tuple(own[k].shape)}"
                        for k in own.keys() & body.keys() if body[k].shape != own[k].shape)
    if missing or unexpected or mismatched:
        raise PretrainedWeightsError(
            f"pretrained weights {path} do not fit resnet18_slab(width={model.width}): missing {missing[:8]}; "
            f"unexpected {unexpected[:8]}; shape mismatch {mismatched[:8]}. Use a torchvision resnet18 ImageNet "
            "state_dict with width=64")
    model.load_state_dict(body, strict=False)
    return skipped


def resnet18_slab(in_channels: int = 5, width: int = 64, layer4_stride: int = 1,
                  pretrained: Path | str | None = None, layer3_stride: int = 2) -> ResNet2d:
    """Build the stage-I network; ``pretrained``: a local torchvision resnet18 state_dict (never downloaded)."""
    model = ResNet2d(in_channels=in_channels, width=width, layer4_stride=layer4_stride, layer3_stride=layer3_stride)
    if pretrained is not None:
        load_pretrained_2d(model, pretrained)
    elif width == 64:
        warnings.warn("resnet18_slab: no pretrained weights given, using random initialisation", stacklevel=2)
    return model


def grad_cam(out: WindowOutput, create_graph: bool = True) -> Tensor:
    """Grad-CAM of the logit over the layer4 activations, by autograd: (B, 1, h, w), not normalised.

    alpha_k = mean over cells of d logit / d f_k (eq. 1), A = ReLU(sum_k alpha_k f_k) (eq. 2). With
    ``create_graph=True`` the map stays differentiable (the attention loss trains through it).
    """
    grads = torch.autograd.grad(out.logit.sum(), out.activations, create_graph=create_graph)[0]
    alpha = grads.mean(dim=(2, 3, 4), keepdim=True)
    return torch.relu((alpha * out.activations).sum(dim=1))


def slab_cam(model: ResNet2d, out: WindowOutput) -> Tensor:
    """The closed form of :func:`grad_cam` for the GAP -> linear head: ReLU(sum_k w_k f_k) / (h w), (B, 1, h, w)."""
    h, w = out.activations.shape[-2:]
    return cam(out.activations, model.fc.weight[0]) / float(h * w)


def cam_grid_2d(model: ResNet2d, slices: int) -> CamGrid:
    """Where layer4's cells sit in the slab: one cell on the central slice in depth; in-plane, stride and offset
    composed from the stem, the max-pool and each block's main-path convolutions (as r3d's ``cam_grid``)."""
    layers = [model.conv1, model.maxpool,
              *(getattr(block, c) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
                for block in layer for c in ("conv1", "conv2"))]
    stride, offset = 1.0, 0.0
    for m in layers:
        k, s, p = (m.kernel_size, m.stride, m.padding)
        k, s, p = (v[0] if isinstance(v, tuple) else v for v in (k, s, p))
        offset += stride * ((int(k) - 1) / 2 - int(p))
        stride *= int(s)
    return CamGrid(stride=(float(slices), stride, stride), offset=((slices - 1) / 2, offset, offset))
