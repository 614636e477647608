"""Phase-1 window encoder: the torchvision ``r3d_18`` architecture (Tran et al. 2018) in our own code.

The module tree mirrors ``torchvision.models.video.resnet.VideoResNet`` with ``BasicBlock``,
``Conv3DSimple`` and the R3D stem, so a Kinetics-400 ``state_dict`` saved from torchvision loads
by name (``stem.0.weight``, ``layer1.0.conv1.0.weight``, ``layer1.0.conv1.1.running_mean``,
``layer2.0.downsample.0.weight``, ...). Only ``fc`` differs: it is replaced by a 1-output head.

Note on names: torchvision's video ``BasicBlock`` has no ``bn1``/``bn2``; its batch norms live
inside ``conv1``/``conv2`` as ``conv1.1`` and ``conv2.1`` (``conv1 = Sequential(conv, BN, ReLU)``).

The forward pass returns :class:`WindowOutput` ``(logit (B,), features (B, C), activations
(B, C, t, h, w))``: ``features`` is the global average of ``layer4`` and ``logit = fc(features)``.
Because the head is GAP -> linear, Grad-CAM of the logit over ``layer4`` equals the class
activation map :func:`cam` (``ReLU(sum_c w_c A_c)``), so the heatmap needs no backward pass.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from dicom_node.imaging.cam_grid import CamGrid

__all__ = [
    "WindowOutput",
    "VideoResNet",
    "BasicBlock",
    "Conv3DSimple",
    "BasicStem",
    "PretrainedWeightsError",
    "r3d_18",
    "load_pretrained",
    "read_state_dict",
    "cam",
    "cam_grid",
    "window_heatmap",
    "R3D18_PLANES",
]

#: Planes of layer1..layer4 at width 64 (the published r3d_18).
R3D18_PLANES: tuple[int, int, int, int] = (64, 128, 256, 512)
_LAYERS: tuple[int, int, int, int] = (2, 2, 2, 2)
_STRIDES: tuple[int, int, int, int] = (1, 2, 2, 2)


class WindowOutput(NamedTuple):
    """Stage-1 outputs for a batch of windows."""

    logit: Tensor  # (B,) window logit for pe_present_on_window
    features: Tensor  # (B, C) global average of layer4 (C = 8 * width; 512 for r3d_18)
    activations: Tensor  # (B, C, t, h, w) layer4 output, for CAM / Grad-CAM


class PretrainedWeightsError(ValueError):
    """A pretrained state_dict does not fit the model; the message lists the offending keys."""


class Conv3DSimple(nn.Conv3d):
    """3x3x3 convolution without bias (torchvision's ``Conv3DSimple``)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int = 1, padding: int = 1) -> None:
        super().__init__(in_planes, out_planes, kernel_size=(3, 3, 3), stride=stride, padding=padding, bias=False)


class BasicStem(nn.Sequential):
    """R3D stem: Conv3d(3, w, k=(3,7,7), s=(1,2,2), p=(1,3,3)) + BN + ReLU."""

    def __init__(self, width: int = 64) -> None:
        super().__init__(
            nn.Conv3d(3, width, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(inplace=True),
        )


class BasicBlock(nn.Module):
    """Two 3x3x3 conv + BN stages with an identity (or 1x1x1 conv + BN) shortcut."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(Conv3DSimple(inplanes, planes, stride), nn.BatchNorm3d(planes), nn.ReLU(inplace=True))
        self.conv2 = nn.Sequential(Conv3DSimple(planes, planes), nn.BatchNorm3d(planes))
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.conv2(self.conv1(x))
        return self.relu(out + residual)


def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes:
        downsample = nn.Sequential(
            nn.Conv3d(inplanes, planes, kernel_size=1, stride=(stride, stride, stride), bias=False),
            nn.BatchNorm3d(planes),
        )
    layers = [BasicBlock(inplanes, planes, stride, downsample)]
    layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class VideoResNet(nn.Module):
    """R3D-18 with a ``num_outputs`` linear head; ``width`` scales every layer's planes (64 = published)."""

    # set with setattr in __init__ (registered as submodules there); declared here for the type checker
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(self, num_outputs: int = 1, width: int = 64) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"r3d_18: width must be a positive integer, got {width}; the published model uses 64")
        if num_outputs < 1:
            raise ValueError(f"r3d_18: num_outputs must be >= 1, got {num_outputs}")
        planes = [p * width // 64 for p in R3D18_PLANES]
        if min(planes) < 1:
            raise ValueError(f"r3d_18: width {width} gives an empty layer; use width >= 1 (16 for the tiny preset)")
        self.width = width
        self.num_outputs = num_outputs
        self.feature_dim = planes[-1]
        self.stem = BasicStem(planes[0])
        inplanes = planes[0]
        for i, (p, n, s) in enumerate(zip(planes, _LAYERS, _STRIDES), start=1):
            setattr(self, f"layer{i}", _make_layer(inplanes, p, n, s))
            inplanes = p
        self.avgpool = nn.AdaptiveAvgPool3d(1)
        self.fc = nn.Linear(self.feature_dim, num_outputs)
        self._init_weights()

    def _init_weights(self) -> None:
        # Same scheme as torchvision's VideoResNet.
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: Tensor) -> WindowOutput:
        """``x``: (B, 3, D, H, W) windows in [0, 1] -> :class:`WindowOutput`."""
        a = self.layer4(self.layer3(self.layer2(self.layer1(self.stem(x)))))
        features = self.avgpool(a).flatten(1)
        logits = self.fc(features)
        logit = logits[:, 0] if self.num_outputs == 1 else logits
        return WindowOutput(logit=logit, features=features, activations=a)


def read_state_dict(path: Path) -> dict[str, Tensor]:
    """A local state_dict file (optionally under "state_dict"/"model", "module." prefixes dropped); never downloaded."""
    if not path.is_file():
        raise FileNotFoundError(f"pretrained weights {path}: no such file; pass a local torchvision r3d_18 state_dict (never downloaded)")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise PretrainedWeightsError(f"pretrained weights {path}: not a state_dict of tensors (got {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_pretrained(model: VideoResNet, path: Path | str) -> list[str]:
    """Load a local r3d_18 ``state_dict`` into ``model``, except ``fc``; return the skipped keys.

    Every non-``fc`` key must be present with the same shape; otherwise a
    :class:`PretrainedWeightsError` lists the missing, unexpected and shape-mismatched keys.
    """
    path = Path(path)
    state = read_state_dict(path)
    own = model.state_dict()
    skipped = sorted(k for k in state if k.startswith("fc."))
    body = {k: v for k, v in state.items() if not k.startswith("fc.")}
    own_body = {k for k in own if not k.startswith("fc.")}
    missing = sorted(own_body - body.keys())
    unexpected = sorted(body.keys() - own_body)
    mismatched = sorted(
        f"{k}: file {tuple(body[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own_body & body.keys()
        if body[k].shape != own[k].shape
    )
    if missing or unexpected or mismatched:
        def _fmt(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "") if items else "none"

        raise PretrainedWeightsError(
            f"pretrained weights {path} do not fit r3d_18(width={model.width}): "
            f"missing [{_fmt(missing)}]; unexpected [{_fmt(unexpected)}]; shape mismatch [{_fmt(mismatched)}]. "
            "Use a torchvision r3d_18 Kinetics-400 state_dict with width=64"
        )
    model.load_state_dict(body, strict=False)
    return skipped


def r3d_18(num_outputs: int = 1, width: int = 64, pretrained: Path | str | None = None) -> VideoResNet:
    """Build R3D-18. ``pretrained``: a local torchvision state_dict file (``fc`` is not loaded).

    Without ``pretrained`` the weights are random and a warning says so (the paper fine-tunes
    Kinetics-400 weights).
    """
    model = VideoResNet(num_outputs=num_outputs, width=width)
    if pretrained is None:
        warnings.warn(
            "r3d_18: no pretrained weights given, using random initialisation; "
            "pass pretrained=PATH to a local Kinetics-400 state_dict to fine-tune as in Ma et al. 2022",
            stacklevel=2,
        )
    else:
        load_pretrained(model, pretrained)
    return model


def cam(activations: Tensor, fc_weight: Tensor) -> Tensor:
    """Class activation map ``ReLU(sum_c w_c A_c)``: (B, C, t, h, w), (C,) or (1, C) -> (B, t, h, w).

    For a GAP -> linear head this equals Grad-CAM of the logit over ``activations``: the gradient
    of the logit w.r.t. ``A_c`` is ``w_c / (t*h*w)`` everywhere, so the Grad-CAM channel weights
    are ``w_c`` up to a positive constant which Grad-CAM's ReLU and any normalisation ignore.
    Here the constant is dropped (no division by t*h*w).
    """
    w = fc_weight.reshape(-1)
    if w.shape[0] != activations.shape[1]:
        raise ValueError(f"cam: fc weight has {w.shape[0]} channels, activations have {activations.shape[1]}")
    return torch.relu(torch.einsum("bcthw,c->bthw", activations, w))


def window_heatmap(model: VideoResNet, x: Tensor) -> Tensor:
    """Run ``model`` on ``x`` and return the CAM of the first output, (B, t, h, w)."""
    out = model(x)
    return cam(out.activations, model.fc.weight[0])


def cam_grid(model: VideoResNet) -> CamGrid:
    """Where the cells of ``layer4`` (the CAM) sit in the input, derived from the convolutions on the main path.

    Each convolution with kernel k, stride s and padding p puts output index j over input index
    ``s * j - p + (k - 1) / 2``; composing the stem and every block's two convolutions gives stride and
    offset per axis (the shortcuts' 1x1x1 convolutions with the same stride agree). For R3D-18 this is
    stride (8, 16, 16), offset (0, 0, 0): cell j of the 2 x 5 x 5 map of an 80 px, 10-slice window is
    centred on slice 8 j and pixel 16 j (tests/training/test_attention.py checks it against the
    centroid of input gradients of interior cells).
    """
    main_path = [model.stem, *(block.get_submodule(part) for layer in (model.layer1, model.layer2, model.layer3, model.layer4)
                               for block in layer for part in ("conv1", "conv2"))]
    convs = [cast(nn.Conv3d, seq.get_submodule("0")) for seq in main_path]
    stride, offset = [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]
    for conv in convs:
        for a in range(3):
            k, s, p = conv.kernel_size[a], conv.stride[a], conv.padding[a]
            if not isinstance(p, int):
                raise ValueError(f"cam_grid: convolution {conv} has padding {p!r}; expected explicit integers")
            offset[a] += stride[a] * ((k - 1) / 2 - p)
            stride[a] *= s
    return CamGrid(stride=(stride[0], stride[1], stride[2]), offset=(offset[0], offset[1], offset[2]))
