"""Key slices of a prediction: what the radiologist should look at first (one rule, used everywhere).

The key slices are chosen once per analysed series and shared by the SR (image references), the
heatmap Secondary Captures and the KOS:

1. every window w gets the score ``window_probs[w] * mean_h(attention[h, w])`` (PE probability
   weighted by how much the nine study heads attend to the window);
2. the top-k windows by that score are kept (default k = 3, ties broken by window index);
3. within each kept window, the model-space heatmap is mapped back to the original slices the
   window covers (`dicom_node.imaging.preprocess.heatmap_to_slices`, through the bundle's
   `CamGrid`: the network's own cell centres, not the image-resize convention) and
   `key_slice_of_window` picks the slice at the heatmap's centre of mass along the window: the
   slice nearest to the peak-weighted mean position of the window's slices. A 10-slice window
   has only two heatmap cells along z (centred on its slices 0 and 8), so the per-slice peak is
   linear between them and its maximum always sits on slice 0 or 8 (or on a tie); the centre of
   mass lands on the slice between them that the two cells' evidence points to (docs/results.md).

`KeySlice.hottest_point` is the (row, column) of the heatmap maximum on the key slice: the point the
SR marks with an image-region SCOORD (and `dicom_node_phantoms.truth.hottest_point` measures against truth).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dicom_node.imaging.preprocess import heatmap_to_slices

if TYPE_CHECKING:
    from dicom_node.imaging.cam_grid import CamGrid
    from dicom_node.imaging.preprocess import Windows
    from dicom_node.imaging.series import CtSeries
    from dicom_node.model.inference import Prediction

__all__ = [
    "KeySlice",
    "KeySliceError",
    "key_slice_of_window",
    "map_heatmap_to_slices",
    "select_key_slices",
    "window_scores",
]


class KeySliceError(ValueError):
    """The prediction, windows and series do not fit together; the message says which and why."""


@dataclass(frozen=True)
class KeySlice:
    """One key slice: window `window_index`, original slice `z` of the series (SOP `sop_instance_uid`).

    `heatmap` is the window's heatmap mapped onto that slice, (Y, X) float32, non-negative.
    `score` is the window's attention-weighted PE probability; `peak` the heatmap maximum on the slice.
    """

    rank: int
    window_index: int
    z: int
    sop_instance_uid: str
    window_probability: float
    score: float
    peak: float
    heatmap: np.ndarray

    @property
    def hottest_point(self) -> tuple[int, int]:
        """(row, column) of the heatmap maximum on this slice (the first one in row-major order on a tie)."""
        row, col = np.unravel_index(int(np.argmax(self.heatmap)), self.heatmap.shape)
        return int(row), int(col)


def window_scores(prediction: Prediction) -> np.ndarray:
    """(N,) PE probability of each window times the mean attention the study heads give it."""
    probs = np.asarray(prediction.window_probs, dtype=np.float64).reshape(-1)
    att = np.asarray(prediction.attention, dtype=np.float64)
    if att.ndim != 2 or att.shape[1] != probs.size:
        raise KeySliceError(
            f"Series {prediction.series_instance_uid}: attention has shape {att.shape}, expected (9, {probs.size}) "
            "to match window_probs; pass the stage-2 attention weights unchanged"
        )
    return probs * att.mean(axis=0)


def map_heatmap_to_slices(series: CtSeries, windows: Windows, window_index: int,
                          heatmap: np.ndarray, grid: CamGrid | None = None) -> list[tuple[int, np.ndarray]]:
    """[(z, (Y, X) heatmap)] for the original slices covered by window `window_index` (via preprocess;
    `grid`: where the heatmap's cells sit, `Prediction.heatmap_grid`)."""
    mapped = heatmap_to_slices(windows, window_index, heatmap, grid)
    for z, m in mapped:
        if not 0 <= z < len(series.sop_instance_uids) or m.shape != tuple(series.hu.shape[1:]):
            raise KeySliceError(
                f"Series {series.series_instance_uid}: window {window_index} maps to slice {z} of shape {m.shape}, "
                f"but the series has {len(series.sop_instance_uids)} slices of {tuple(series.hu.shape[1:])}; "
                "build the Windows from this CtSeries"
            )
    return [(int(z), np.asarray(m, dtype=np.float32)) for z, m in mapped]


def key_slice_of_window(mapped: Sequence[tuple[int, np.ndarray]]) -> tuple[int, np.ndarray]:
    """The (z, heatmap) at the heatmap's centre of mass along the window (see the module doc).

    Weights are the per-slice heatmap peaks; the slice nearest to their weighted mean position is
    chosen (on an exact half-way tie, the one with the higher peak, then the earlier). An all-zero
    heatmap gives the window's middle slice.
    """
    if not mapped:
        raise KeySliceError("no slices to choose from: the window covers no original slice")
    z = np.array([zm[0] for zm in mapped], dtype=np.float64)
    peaks = np.array([float(zm[1].max()) for zm in mapped], dtype=np.float64)
    centre = float((z * peaks).sum() / peaks.sum()) if peaks.sum() > 0 else float(z.mean())
    best = min(range(len(mapped)), key=lambda i: (abs(z[i] - centre), -peaks[i], z[i]))
    return mapped[best]


def select_key_slices(series: CtSeries, windows: Windows, prediction: Prediction, k: int = 3) -> tuple[KeySlice, ...]:
    """The top-k windows by attention-weighted PE probability, each with its hottest original slice."""
    n = len(windows.slice_uids)
    window_probs = np.asarray(prediction.window_probs)
    if window_probs.size != n or len(prediction.heatmaps) != n:
        raise KeySliceError(
            f"Series {series.series_instance_uid}: prediction has {window_probs.size} window "
            f"probabilities and {len(prediction.heatmaps)} heatmaps but the windows are {n}; "
            "run inference on these windows"
        )
    if k < 1:
        raise KeySliceError(f"key slice count k={k}; expected k >= 1")
    scores = window_scores(prediction)
    order = sorted(range(n), key=lambda i: (-scores[i], i))[: min(k, n)]
    out = []
    for rank, wi in enumerate(order):
        mapped = map_heatmap_to_slices(series, windows, wi, prediction.heatmaps[wi], prediction.heatmap_grid)
        # a slice interpolated over a gap of missing slices is never a key slice while a received one is covered
        mapped = [(z, m) for z, m in mapped if not series.is_interpolated(z)] or mapped
        if not mapped:
            raise KeySliceError(f"Series {series.series_instance_uid}: window {wi} covers no original slice")
        z, hm = key_slice_of_window(mapped)
        out.append(KeySlice(
            rank=rank, window_index=wi, z=z, sop_instance_uid=series.sop_instance_uids[z],
            window_probability=float(window_probs[wi]), score=float(scores[wi]),
            peak=float(hm.max()), heatmap=hm,
        ))
    return tuple(out)
