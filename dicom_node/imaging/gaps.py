"""Missing slices: which gaps in a series can be bridged, and the regular grid that bridges them.

A CT series is a stack of slices at a regular spacing along the slice normal. When a few slices
never arrived (a sender that dropped them, a transfer cut short and not yet repeated) the stack
has gaps that are whole multiples of that spacing. `classify_gaps` sorts every gap into regular,
bridgeable (at most `max_gap_factor` times the median spacing and a multiple of it, within the
spacing tolerance) or not; `regular_grid` says, for every slice of the gap-free grid, which two
received slices it is interpolated from and with what weight. `dicom_node.imaging.series` builds
the `CtSeries` from that (received slices unchanged, missing ones linearly interpolated), so
everything after loading sees a regular series and the SR can name what was filled
(`CtSeries.gaps`).

Positions are in mm along the slice normal, increasing (as `load_series` sorts them).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["SliceGap", "GapPlan", "Bridged", "bridge", "classify_gaps", "regular_grid", "spacing_tolerance"]


def spacing_tolerance(median_mm: float) -> float:
    """How far (mm) a gap may differ from the median spacing (or a multiple of it) and still count as regular."""
    return max(0.05, 0.1 * median_mm)


@dataclass(frozen=True)
class SliceGap:
    """Slices missing between two received ones (indices among the received slices, sorted)."""

    after: int  # index of the received slice before the gap
    from_mm: float  # its position along the slice normal
    to_mm: float  # position of the received slice after the gap
    missing: int  # slices missing in between

    @property
    def width_mm(self) -> float:
        return self.to_mm - self.from_mm


@dataclass(frozen=True)
class GapPlan:
    """What `classify_gaps` found: the spacing, the gaps it bridges, and the first it cannot (if any)."""

    median_mm: float
    bridged: tuple[SliceGap, ...]
    refused: SliceGap | None  # the first gap that is too wide or not a multiple of the spacing
    refused_reason: str = ""  # "too wide" | "irregular"

    @property
    def missing(self) -> int:
        return sum(g.missing for g in self.bridged)


def classify_gaps(positions_mm: np.ndarray, max_gap_factor: float) -> GapPlan:
    """Sort the gaps between consecutive `positions_mm` (>= 2, increasing) into regular, bridged or refused."""
    pos = np.asarray(positions_mm, dtype=np.float64)
    diffs = np.diff(pos)
    median = float(np.median(diffs))
    tol = spacing_tolerance(median)
    bridged: list[SliceGap] = []
    for i in np.flatnonzero(np.abs(diffs - median) > tol):
        g = float(diffs[i])
        n = int(round(g / median)) if median > 0 else 0
        gap = SliceGap(int(i), float(pos[i]), float(pos[i + 1]), max(0, n - 1))
        if n < 2 or abs(g - n * median) > tol * n:
            return GapPlan(median, tuple(bridged), gap, "irregular")
        if g > max_gap_factor * median + tol:
            return GapPlan(median, tuple(bridged), gap, "too wide")
        bridged.append(gap)
    return GapPlan(median, tuple(bridged), None)


def regular_grid(n_received: int, gaps: tuple[SliceGap, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, t) per slice of the bridged grid: slice = (1 - t) * received[lo] + t * received[hi].

    Received slices have lo == hi and t == 0; the k-th of m missing slices after received slice i
    has lo = i, hi = i + 1, t = k / (m + 1)."""
    by_index = {g.after: g.missing for g in gaps}
    lo: list[int] = []
    hi: list[int] = []
    t: list[float] = []
    for i in range(n_received):
        lo.append(i)
        hi.append(i)
        t.append(0.0)
        m = by_index.get(i, 0)
        for k in range(1, m + 1):
            lo.append(i)
            hi.append(i + 1)
            t.append(k / (m + 1))
    return np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64), np.array(t, dtype=np.float64)


@dataclass(frozen=True)
class Bridged:
    """A (Z, Y, X) volume on the gap-free grid and how each of its slices was made (`regular_grid`)."""

    hu: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    t: np.ndarray

    @property
    def nearest(self) -> tuple[int, ...]:
        """Per grid slice: the received slice nearest to it (itself for a received one)."""
        return tuple(int(i) for i in np.where(self.t <= 0.5, self.lo, self.hi))

    @property
    def interpolated(self) -> tuple[bool, ...]:
        return tuple(bool(w > 0.0) for w in self.t)

    def along(self, per_slice: np.ndarray) -> np.ndarray:
        """A per-received-slice array (positions, (Z, 3) coordinates) interpolated onto the grid."""
        a = np.asarray(per_slice, dtype=np.float64)
        t = self.t.reshape((-1,) + (1,) * (a.ndim - 1))
        out: np.ndarray = (1.0 - t) * a[self.lo] + t * a[self.hi]
        return out


def bridge(hu: np.ndarray, gaps: tuple[SliceGap, ...]) -> Bridged:
    """The received (Z, Y, X) float32 slices with every bridged gap filled by linear interpolation."""
    lo, hi, t = regular_grid(hu.shape[0], gaps)
    out = np.empty((lo.size, *hu.shape[1:]), dtype=np.float32)
    for z in range(lo.size):
        if t[z] == 0.0:
            out[z] = hu[lo[z]]
        else:
            np.multiply(hu[lo[z]], np.float32(1.0 - t[z]), out=out[z])
            out[z] += np.float32(t[z]) * hu[hi[z]]
    return Bridged(out, lo, hi, t)
