"""Heatmaps of a `Prediction` on the original slices: hottest source slice per window, normalised maps.

Thin on purpose: the geometry (model space -> original voxels) is `dicom_node.imaging.preprocess.
heatmap_to_slices`; which windows become key images is `dicom_node.results.kos`. Here we only
normalise the stage-1 CAM maps over the whole series (so a faint window stays faint next to a hot
one) and pick, for each window, the original slice where its map peaks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from dicom_node.imaging.preprocess import Windows, heatmap_to_slices

__all__ = ["WindowHeatmap", "ExplainError", "normalised_heatmaps", "window_heatmap", "explain"]


class ExplainError(ValueError):
    """The prediction does not belong to these windows; the message says what differs."""


@dataclass(frozen=True)
class WindowHeatmap:
    """Window `window_index` on its hottest original slice `z` (index in CtSeries order).

    `heatmap` is (Y, X) float32 in [0, 1], normalised by the series-wide heatmap maximum;
    `peak` is its maximum (so comparable between windows of the same series).
    """

    window_index: int
    z: int
    sop_instance_uid: str
    peak: float
    window_probability: float
    heatmap: np.ndarray


def _check(windows: Windows, prediction) -> int:
    n = windows.array.shape[0]
    heat = np.asarray(prediction.heatmaps)
    if heat.ndim != 4 or heat.shape[0] != n or np.asarray(prediction.window_probs).size != n:
        raise ExplainError(f"series {windows.series_instance_uid}: prediction has heatmaps {heat.shape} and "
                           f"{np.asarray(prediction.window_probs).size} window probabilities for {n} windows; "
                           "run inference on these windows")
    if prediction.series_instance_uid != windows.series_instance_uid:
        raise ExplainError(f"prediction is for series {prediction.series_instance_uid}, windows for "
                           f"{windows.series_instance_uid}")
    return n


def normalised_heatmaps(heatmaps: np.ndarray) -> np.ndarray:
    """(N, t, h, w) non-negative maps divided by their series-wide maximum (all zeros stay zero)."""
    h = np.maximum(np.asarray(heatmaps, dtype=np.float32), 0.0)
    top = float(h.max()) if h.size else 0.0
    return h / top if top > 0 else np.zeros_like(h)


def window_heatmap(windows: Windows, prediction, window_index: int, *, normalised: np.ndarray | None = None) -> WindowHeatmap:
    """The hottest original slice of one window and its normalised map there."""
    _check(windows, prediction)
    norm = normalised_heatmaps(prediction.heatmaps) if normalised is None else normalised
    mapped = heatmap_to_slices(windows, window_index, norm[window_index])
    if not mapped:
        raise ExplainError(f"series {windows.series_instance_uid}: window {window_index} covers no original slice")
    z, hm = max(mapped, key=lambda zm: (float(zm[1].max()), float(zm[1].sum()), -zm[0]))
    indices = windows.slice_indices[window_index] if windows.slice_indices else windows.geometry.window_slice_indices()[window_index]
    uids = windows.slice_uids[window_index]
    uid = uids[list(indices).index(z)] if z in indices and len(uids) == len(indices) else ""
    hm = np.clip(hm, 0.0, 1.0).astype(np.float32)
    return WindowHeatmap(window_index=window_index, z=int(z), sop_instance_uid=uid, peak=float(hm.max()),
                         window_probability=float(np.asarray(prediction.window_probs)[window_index]), heatmap=hm)


def explain(windows: Windows, prediction, window_indices: Iterable[int] | None = None) -> tuple[WindowHeatmap, ...]:
    """`WindowHeatmap` for each requested window (default: all), in the order given."""
    n = _check(windows, prediction)
    norm = normalised_heatmaps(prediction.heatmaps)
    idx = range(n) if window_indices is None else window_indices
    return tuple(window_heatmap(windows, prediction, int(i), normalised=norm) for i in idx)
