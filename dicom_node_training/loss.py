"""Losses of Ma et al. 2022 and the RSNA-STR competition metric.

Phase 1 (:func:`phase1_loss`): mean binary cross-entropy over the windows of a batch. With
``phase1.attention_loss_weight`` = lambda > 0 the attention loss of Shi et al. 2020 (eq. 3) is added,
L = L_cls + lambda * L_cdc (:func:`attention_dice_loss`): the window's class activation map,
normalised by its maximum, against the embolus mask pooled to the map's cells (empty for negative
windows), as a continuous Dice loss; windows without a mask contribute nothing.

Phase 2 (:func:`sequence_loss`), for a batch of M studies with N_i valid steps each
(``mask``; padded steps contribute nothing):

    l_window(i, j) = w * q_i * BCE(z_ij, y_ij)          w   = IMAGE_WEIGHT (0.0736)
    l_study(i, k)  = w_k * BCE(z_ik, y_ik)              w_k = STUDY_LABEL_WEIGHTS[k]
    numerator      = sum_i [ sum_j l_window(i, j) + sum_k l_study(i, k) ]

    normalization="paper":        L = numerator / sum_i (N_i + 9)                 (paper, eq. L_2nd)
    normalization="competition":  L = numerator / sum_i (w * q_i * N_i + sum_k w_k)

q_i is the proportion of positive windows in study i. By default it is computed from the
(possibly soft, when N > 40 was resized) window labels on the valid steps; pass ``q`` to use
the proportion over the original windows. The numerator is the same in both; only the batch
constant differs. "competition" makes the loss of a batch equal the competition's weighted log
loss on that batch (with steps in place of images); "paper" is the published formula. Both
give the same gradient direction within a batch, but weight batches differently.

:func:`weighted_log_loss` is the competition metric in numpy, over all studies at once:

    sum_i [ sum_k w_k BCE(p_ik, y_ik) + sum_j w q_i BCE(p_ij, y_ij) ]
    / sum_i [ sum_k w_k + sum_j w q_i ]

with probabilities clipped to [1e-15, 1 - 1e-15].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from dicom_node.labels import IMAGE_WEIGHT, STUDY_LABEL_WEIGHTS, STUDY_LABELS

__all__ = ["phase1_loss", "attention_dice_loss", "sequence_loss", "weighted_log_loss", "study_label_weights"]

_EPS = 1e-15


def study_label_weights() -> np.ndarray:
    """The nine competition weights in ``STUDY_LABELS`` order."""
    return np.array([STUDY_LABEL_WEIGHTS[k] for k in STUDY_LABELS], dtype=np.float64)


def phase1_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean binary cross-entropy over the windows of a batch (paper, L_1st)."""
    return F.binary_cross_entropy_with_logits(logits.reshape(-1), labels.reshape(-1).to(logits.dtype))


def attention_dice_loss(cam: Tensor, mask: Tensor, has_mask: Tensor, smooth: float = 1.0) -> Tensor:
    """Continuous Dice loss between class activation maps and cell masks (Shi et al. 2020, eq. 3).

    Parameters
    ----------
    cam
        (B, t, h, w) non-negative class activation maps of the positive class, differentiable.
    mask
        (B, t, h, w) 0/1 embolus mask pooled to the same cells (all zero for a negative window).
    has_mask
        (B,) 1 where the window's mask is known, 0 where it is not (the window is left out).
    smooth
        Added to numerator and denominator: an all-zero map against an all-zero mask scores 1,
        so negative windows are pushed towards an empty map rather than to an undefined ratio.

    Each map is divided by its own maximum (when non-zero), then
    ``1 - (2 sum(a m) + smooth) / (sum(a) + sum(m) + smooth)``; the mean over the windows with a
    mask is returned (0 when the batch has none, keeping the graph).
    """
    if cam.shape != mask.shape:
        raise ValueError(f"attention_dice_loss: cam {tuple(cam.shape)} and mask {tuple(mask.shape)} differ; "
                         "pool the mask to the CAM's cells (CamGrid.pool_mask)")
    a = cam.float().flatten(1)
    peak = a.amax(dim=1, keepdim=True)
    a = a / torch.where(peak > 0, peak, torch.ones_like(peak))
    m = mask.to(a.dtype).flatten(1)
    dice = (2 * (a * m).sum(1) + smooth) / (a.sum(1) + m.sum(1) + smooth)
    w = has_mask.to(a.dtype).reshape(-1)
    return ((1 - dice) * w).sum() / w.sum().clamp(min=1.0)


def sequence_loss(
    window_logits: Tensor,
    study_logits: Tensor,
    window_labels: Tensor,
    study_labels: Tensor,
    mask: Tensor,
    q: Tensor | None = None,
    normalization: Literal["paper", "competition"] = "paper",
) -> Tensor:
    """Phase-2 loss (see the module docstring). Shapes: (B, L), (B, 9), (B, L), (B, 9), (B, L), q (B,)."""
    if normalization not in ("paper", "competition"):
        raise ValueError(f"sequence_loss: normalization must be 'paper' or 'competition', got {normalization!r}")
    if study_logits.shape[-1] != len(STUDY_LABELS):
        raise ValueError(f"sequence_loss: expected {len(STUDY_LABELS)} study logits, got shape {tuple(study_logits.shape)}")
    dtype = window_logits.dtype
    m = mask.to(dtype)
    y_win = window_labels.to(dtype)
    n = m.sum(dim=1)  # (B,)
    if q is None:
        q = (y_win * m).sum(dim=1) / n.clamp_min(1.0)
    q = q.to(dtype)
    w_k = torch.as_tensor(study_label_weights(), dtype=dtype, device=window_logits.device)
    bce_win = F.binary_cross_entropy_with_logits(window_logits, y_win, reduction="none") * m
    bce_study = F.binary_cross_entropy_with_logits(study_logits, study_labels.to(dtype), reduction="none")
    numerator = (IMAGE_WEIGHT * q * bce_win.sum(dim=1)).sum() + (bce_study * w_k).sum()
    if normalization == "paper":
        denominator = (n + len(STUDY_LABELS)).sum()
    else:
        denominator = (IMAGE_WEIGHT * q * n).sum() + w_k.sum() * study_logits.shape[0]
    return numerator / denominator


def _bce(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1.0 - _EPS)
    y = np.asarray(y, dtype=np.float64)
    return -(y * np.log(p) + (1.0 - y) * np.log(1.0 - p))


def weighted_log_loss(
    window_probs: Sequence[np.ndarray],
    window_labels: Sequence[np.ndarray],
    study_probs: np.ndarray,
    study_labels: np.ndarray,
) -> float:
    """The RSNA-STR competition metric over S studies (window lists of per-study arrays, (S, 9) arrays)."""
    sp = np.asarray(study_probs, dtype=np.float64)
    sl = np.asarray(study_labels, dtype=np.float64)
    if sp.shape != sl.shape or sp.ndim != 2 or sp.shape[1] != len(STUDY_LABELS):
        raise ValueError(f"weighted_log_loss: study probs {sp.shape} and labels {sl.shape} must both be (S, {len(STUDY_LABELS)})")
    if not (len(window_probs) == len(window_labels) == sp.shape[0]):
        raise ValueError(f"weighted_log_loss: {len(window_probs)} window prob arrays, {len(window_labels)} label arrays, {sp.shape[0]} studies")
    w_k = study_label_weights()
    numerator = float((_bce(sp, sl) * w_k).sum())
    denominator = float(w_k.sum() * sp.shape[0])
    for i, (p, y) in enumerate(zip(window_probs, window_labels)):
        p = np.asarray(p, dtype=np.float64).reshape(-1)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if p.shape != y.shape:
            raise ValueError(f"weighted_log_loss: study {i} has {p.size} window probs but {y.size} labels")
        if y.size == 0:
            continue
        q = float(y.mean())
        numerator += IMAGE_WEIGHT * q * float(_bce(p, y).sum())
        denominator += IMAGE_WEIGHT * q * y.size
    return numerator / denominator
