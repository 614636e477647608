"""CT series -> model input, exactly as in Ma et al. 2022 (numpy/scipy only, no torch).

INTERFACE DRAFT (the dataclasses are the contract; implemented by the preprocessing task).
Shared by the node and by training so the model sees the same input in both.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["PreprocessConfig", "Geometry", "Windows", "PreprocessError", "preprocess", "PREPROCESSING_VERSION"]

PREPROCESSING_VERSION = "1"


class PreprocessError(ValueError):
    """Preprocessing failed (for example no lungs found); the message names the series and the fix."""


@dataclass(frozen=True)
class PreprocessConfig:
    spacing_mm: float = 1.0
    #: (level, width) HU windows -> channels: lung, PE, mediastinal
    hu_windows: tuple[tuple[float, float], ...] = ((-600.0, 1500.0), (100.0, 700.0), (40.0, 400.0))
    resize: int = 224
    crop: int = 192
    window_slices: int = 10
    version: str = PREPROCESSING_VERSION


@dataclass(frozen=True)
class Geometry:
    """Everything needed to map a model-space heatmap back onto the original slices.

    Model space of window w, slice s (0..window_slices-1), pixel (r, c) of the crop x crop image
    corresponds to resampled slice z = w*window_slices + s within the lung box, and so on back
    through resize and crop to original (Z, Y, X) voxel coordinates.
    """

    original_shape: tuple[int, int, int]
    original_spacing_mm: tuple[float, float, float]  # (z, y, x)
    resampled_shape: tuple[int, int, int]
    lung_box: tuple[int, int, int, int, int, int]  # z0, z1, y0, y1, x0, x1 in resampled voxels (end exclusive)
    resize: int
    crop: int
    crop_offset: tuple[int, int]  # (row, col) offset of the crop in the resized image
    window_slices: int


@dataclass(frozen=True)
class Windows:
    """Model input for one series: `array` is (N, 3, window_slices, crop, crop) float32 in [0, 1]."""

    array: np.ndarray
    series_instance_uid: str
    #: for each window, the SOP Instance UIDs of the original slices it covers (sorted order)
    slice_uids: tuple[tuple[str, ...], ...]
    geometry: Geometry
    #: (N,) int window labels (1 if any covered slice is positive) when slice labels were given
    labels: np.ndarray | None = None
    config: PreprocessConfig = field(default_factory=PreprocessConfig)


def preprocess(series, config: PreprocessConfig = PreprocessConfig(), slice_labels=None) -> Windows:  # pragma: no cover - draft
    raise NotImplementedError
