"""onnxruntime inference over a verified model bundle (no torch).

INTERFACE DRAFT: `Prediction` is the contract between inference, explain, report and
secondary_capture. The `Predictor` is implemented by the export/inference task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Prediction"]


@dataclass(frozen=True)
class Prediction:
    """What the two-stage model says about one series.

    - `window_probs` (N,): PE probability per 10-slice window (stage 2 window head).
    - `study_probs`: probability per study label, keys = dicom_node.labels.STUDY_LABELS.
    - `attention` (9, N): attention weight of each study head over the windows (rows sum to 1).
    - `heatmaps` (N, t, h, w): non-negative Grad-CAM/CAM maps of the stage-1 window logit in
      model space (t slices, h x w of the crop), to be mapped back with `Windows.geometry`.
    - `thresholds`: decision threshold per label (WINDOW_LABEL and the nine study labels).
    - `window_positive` (N,) and `labels`: binary decisions after the RSNA consistency rules.
    """

    series_instance_uid: str
    window_probs: np.ndarray
    study_probs: dict[str, float]
    attention: np.ndarray
    heatmaps: np.ndarray
    thresholds: dict[str, float]
    window_positive: np.ndarray
    labels: dict[str, bool]
    model_name: str
    model_version: str
    model_uid: str
    execution_provider: str
