"""Phase-1 (R3D-18 window encoder) and phase-2 (TCN/GRU + attention) models."""

from dicom_node_training.models.r3d import (
    PretrainedWeightsError,
    VideoResNet,
    WindowOutput,
    cam,
    load_pretrained,
    r3d_18,
    window_heatmap,
)
from dicom_node_training.models.sequence import (
    SequenceModel,
    SequenceOutput,
    fold_weight_norm,
    neighbour_differences,
    sequence_model,
)

__all__ = [
    "PretrainedWeightsError",
    "VideoResNet",
    "WindowOutput",
    "cam",
    "load_pretrained",
    "r3d_18",
    "window_heatmap",
    "SequenceModel",
    "SequenceOutput",
    "fold_weight_norm",
    "neighbour_differences",
    "sequence_model",
]
