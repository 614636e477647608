"""Tiny random-weight model bundles for the export and inference tests (torch needed)."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from dicom_node.imaging.preprocess import PreprocessConfig

#: small enough for 2 CPU cores: 4-channel stem, 24 x 24 crops
TINY_PREPROCESS = replace(PreprocessConfig(), resize=28, crop=24)
TINY_WIDTH = 4
TINY_HIDDEN = 8


def tiny_models(seed: int = 0, width: int = TINY_WIDTH, hidden: int = TINY_HIDDEN):
    import torch

    from dicom_node_training.models import r3d_18, sequence_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m1 = r3d_18(width=width)
    m2 = sequence_model(in_features=8 * width, hidden=hidden)
    # random weights with some spread, so outputs and heatmaps are not near-constant
    with torch.no_grad():
        m1.fc.weight.normal_(0.0, 1.0)
        for mod in m1.modules():
            if isinstance(mod, torch.nn.BatchNorm3d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    return m1.eval(), m2.eval()


def build_tiny_bundle(out: Path, *, seed: int = 0, fp16: bool = False, thresholds=None, metrics=None, **kw):
    from dicom_node_export.bundle import write_bundle

    m1, m2 = tiny_models(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # default-threshold warning when none are given
        return write_bundle(m1, m2, out, name="tiny-test", version="0.0.1", preprocess=TINY_PREPROCESS,
                            sequence_length=40, thresholds=thresholds, fp16=fp16,
                            metrics=metrics or {"data": "random weights, no data", "test_auroc": {}}, **kw)


#: the Shi et al. 2020 family at test size: 50 slabs of 5 slices, 32 px crops of 40 px (2 x 2 cells)
TINY_SHI_PREPROCESS = PreprocessConfig(spacing_mm=2.5, hu_windows=((-262.0, 1524.0),), resize=40, crop=32,
                                       window_slices=5, slabs=50, slab_stride=4)


def tiny_shi_models(seed: int = 0, width: int = 8, filters: int = 4):
    """A random slab ResNet-18 and Conv-LSTM with spread-out weights (eval mode)."""
    import torch

    from dicom_node_training.models.convlstm import conv_lstm_net
    from dicom_node_training.models.resnet2d import resnet18_slab

    torch.manual_seed(seed)
    m1 = resnet18_slab(in_channels=5, width=width)
    with torch.no_grad():
        m1.fc.weight.normal_(0.0, 1.0)
        for mod in m1.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    cells = TINY_SHI_PREPROCESS.crop // 16
    m2 = conv_lstm_net(8 * width, (cells, cells), filters=filters, units=1)
    return m1.eval(), m2.eval()


def build_tiny_shi_bundle(out: Path, *, seed: int = 0, thresholds=None, metrics=None, **kw):
    from dicom_node.labels import WINDOW_LABEL
    from dicom_node_export.bundle import write_bundle

    m1, m2 = tiny_shi_models(seed)
    return write_bundle(m1, m2, out, name="tiny-shi-test", version="0.0.1", preprocess=TINY_SHI_PREPROCESS,
                        sequence_length=TINY_SHI_PREPROCESS.slabs, family="shi2020",
                        thresholds=thresholds or {WINDOW_LABEL: 0.5},
                        metrics=metrics or {"data": "random weights, no data", "test_auroc": {}}, **kw)
