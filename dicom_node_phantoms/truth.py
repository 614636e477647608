"""Scoring a model's heatmap against a phantom's ground truth: does the hottest point lie on the embolus?

    keys = select_key_slices(series, windows, prediction)    # dicom_node.results.kos
    heatmap_hits_embolus(keys, study.embolus_mask)          # True / False

Only a phantom has an exact embolus mask, so this is phantom-truth scoring, used by the tests
and `benchmarks/heatmap_hits.py`, never by the node. The key slices are anything with the
attributes of `dicom_node.results.key_slices.KeySlice` that the rule reads (`KeySliceLike`: `z`,
`rank`, `peak`, `heatmap`). They are typed by that protocol rather than by importing KeySlice,
even for type checking only: phantoms must not depend on the node's results stage (the node may
not import phantoms, and mypy would follow the import into the whole node). Both functions
raise ValueError naming what is wrong when key slices and mask do not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

__all__ = ["KeySliceLike", "hottest_point", "heatmap_hits_embolus"]


class KeySliceLike(Protocol):
    """What the rule reads of a key slice (`dicom_node.results.key_slices.KeySlice` has it).

    Read-only properties, so that frozen dataclasses match."""

    @property
    def z(self) -> int:
        """Index of the slice in the series, in the series' slice order."""

    @property
    def rank(self) -> int:
        """0 for the best window, 1 for the next, ..."""

    @property
    def peak(self) -> float:
        """Maximum of `heatmap`."""

    @property
    def heatmap(self) -> np.ndarray:
        """The window's heatmap on this slice, (Y, X), non-negative."""


def hottest_point(key_slices: Sequence[KeySliceLike]) -> tuple[int, int, int]:
    """(z, y, x) of the hottest heatmap pixel over all key slices (original voxel indices).

    The slice with the highest `peak` wins, the better-ranked one on a tie (as the node ranks them).
    """
    if not key_slices:
        raise ValueError("no key slices: cannot locate the hottest heatmap point; pass select_key_slices(...) "
                         "of a prediction with at least one window")
    best = max(key_slices, key=lambda ks: (ks.peak, -ks.rank))
    y, x = np.unravel_index(int(np.argmax(best.heatmap)), best.heatmap.shape)
    return best.z, int(y), int(x)


def heatmap_hits_embolus(key_slices: Sequence[KeySliceLike], embolus_mask: np.ndarray, *, tolerance_px: int = 2) -> bool:
    """True when the hottest heatmap point lies on the embolus mask (dilated by `tolerance_px` in-plane).

    `embolus_mask` is (Z, Y, X) bool in the series' slice order (the phantom's `embolus_mask`).
    The dilation is in-plane only: a point on the slice above or below the embolus is a miss,
    because the key slice a reader is sent to must itself show the embolus.
    """
    from scipy.ndimage import binary_dilation

    mask = np.asarray(embolus_mask, bool)
    z, y, x = hottest_point(key_slices)
    if mask.ndim != 3 or not (0 <= z < mask.shape[0]) or mask.shape[1:] != key_slices[0].heatmap.shape:
        raise ValueError(
            f"embolus mask shape {mask.shape} does not fit the key slices (z={z}, slice {key_slices[0].heatmap.shape}); "
            "pass the mask of the same series"
        )
    plane = mask[z]
    if tolerance_px > 0:
        plane = binary_dilation(plane, iterations=tolerance_px)
    return bool(plane[y, x])
