"""Load one CT series into a typed, validated `CtSeries` (numpy only, no torch).

INTERFACE DRAFT (the dataclass is the contract; the loader is implemented by the series task).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

__all__ = ["CtSeries", "SeriesError", "load_series"]


class SeriesError(ValueError):
    """A series cannot be used; the message names the series UID, the value and what was expected."""


@dataclass(frozen=True)
class CtSeries:
    """One CT series in patient space, slices sorted by position along the slice normal.

    `hu` is (Z, Y, X) float32 Hounsfield units; index z matches `sop_instance_uids[z]`
    and `positions_mm[z]` (position of slice z along the normal, increasing).
    """

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uids: tuple[str, ...]
    hu: np.ndarray
    pixel_spacing_mm: tuple[float, float]  # (row spacing = along Y, column spacing = along X)
    slice_spacing_mm: float
    positions_mm: np.ndarray  # (Z,) along the slice normal
    image_orientation: tuple[float, ...]  # 6 direction cosines (row, column)
    image_position_first: tuple[float, float, float]  # ImagePositionPatient of slice 0
    ref_dataset: Dataset  # header of slice 0 without pixel data (patient/study context for results)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)  # type: ignore[return-value]


def load_series(source, *, series_uid: str | None = None, min_slices: int = 20) -> CtSeries:  # pragma: no cover - draft
    raise NotImplementedError
