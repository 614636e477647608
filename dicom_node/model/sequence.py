"""Variable number of windows <-> the fixed-length sequence of the stage-2 model (numpy only).

Ma et al. 2022: "If a sequence has less than 40 elements, zeros are padded to the end of the
sequence; otherwise, the sequence is resized to the length of 40." We resize by linear
interpolation along the sequence axis with the end points aligned (element 0 of the output is
window 0, element L-1 is window N-1). Training and the node both use these functions, so the
stage-2 model sees the same sequences in both.

:func:`from_fixed_length` maps per-step outputs (pass logits, not probabilities) back to the
original N windows: the first N steps when N <= L, linear interpolation back when N > L.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["SEQUENCE_LENGTH", "FixedLength", "to_fixed_length", "from_fixed_length"]

#: Sequence length of the published stage-2 model.
SEQUENCE_LENGTH = 40


class FixedLength(NamedTuple):
    """A fixed-length sequence; unpacks as ``x, mask, positions``."""

    x: np.ndarray  # (L, F) or (L,) float32; zeros on padded steps
    mask: np.ndarray  # (L,) float32, 1 on valid steps, 0 on padding
    positions: np.ndarray  # (L,) float64 source window position of each step; NaN on padding


def _positions(n: int, length: int) -> np.ndarray:
    if n <= length:
        return np.concatenate([np.arange(n, dtype=np.float64), np.full(length - n, np.nan)])
    return np.linspace(0.0, n - 1.0, length)


def to_fixed_length(features: np.ndarray, length: int = SEQUENCE_LENGTH) -> FixedLength:
    """(N, F) or (N,) per-window values -> :class:`FixedLength` with ``length`` steps.

    N <= length: copied to the first N steps, zero padding after, mask 1 then 0.
    N > length: linearly resized to ``length`` steps (end points aligned), mask all ones.
    Labels can go through the same function; resized labels become soft targets in [0, 1].
    """
    a = np.asarray(features)
    if a.ndim not in (1, 2):
        raise ValueError(f"to_fixed_length: expected (N, F) features or (N,) values, got shape {a.shape}")
    n = a.shape[0]
    if n == 0:
        raise ValueError("to_fixed_length: the series has no windows (N=0); nothing to classify")
    if length < 1:
        raise ValueError(f"to_fixed_length: length must be >= 1, got {length}")
    a = a.astype(np.float32, copy=False)
    pos = _positions(n, length)
    mask = np.zeros(length, dtype=np.float32)
    if n <= length:
        x = np.zeros((length, *a.shape[1:]), dtype=np.float32)
        x[:n] = a
        mask[:n] = 1.0
    else:
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n - 1)
        frac = (pos - lo).astype(np.float32)
        if a.ndim == 2:
            frac = frac[:, None]
        x = ((1.0 - frac) * a[lo] + frac * a[hi]).astype(np.float32)
        mask[:] = 1.0
    return FixedLength(x=x, mask=mask, positions=pos)


def from_fixed_length(values: np.ndarray, n: int) -> np.ndarray:
    """(L,) per-step outputs -> (n,) per-window outputs: inverse of :func:`to_fixed_length`.

    n <= L: the first n steps. n > L: linear interpolation of the L steps at each original
    window's position (exact for values that are linear in the window index).
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    length = v.shape[0]
    if n < 1:
        raise ValueError(f"from_fixed_length: n must be >= 1 windows, got {n}")
    if n <= length:
        return v[:n].copy()
    where = np.arange(n, dtype=np.float64) * (length - 1) / (n - 1)
    return np.interp(where, np.arange(length, dtype=np.float64), v)
