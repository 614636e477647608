"""Where the cells of a coarse heatmap sit in the model input: the one rule for up- and down-sampling CAMs.

A convolutional network's last block sees the input through cells: cell ``j`` of an axis is centred on
input index ``stride * j + offset`` of that axis (input indices are voxel centres: 0, 1, ...). That
centre is the network's, not the image-resize convention's: for a 3D ResNet-18 (stem stride 1 x 2 x 2,
three stride-2 stages, symmetric padding) the centres are ``8 j`` along the window's slices and ``16 j``
in-plane, while the half-pixel resize rule would put them at ``5 j + 2`` and ``16 j + 7.5`` - about
half a cell too far down and to the patient's left. :class:`CamGrid` holds stride and offset per axis
(t, h, w); a bundle states its own (`BundleManifest.heatmap_grid`, written by the export from the
architecture) and everything that maps a heatmap back to the image (`heatmap_to_slices`) or a mask down
to the heatmap's cells (attention-supervised training) goes through this module.

Upsampling is linear between cell centres and constant beyond the first and last centre (there is no
evidence outside them). Pooling a mask to cells marks a cell when any mask voxel lies within half a
stride of its centre (``[c - stride/2, c + stride/2)``), the input region the cell stands for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["CamGrid", "AXES"]

#: the axes of a window heatmap, in order
AXES: tuple[str, str, str] = ("t", "h", "w")


@dataclass(frozen=True)
class CamGrid:
    """Cell centres of a (t, h, w) heatmap in model-input voxels: centre_j = stride * j + offset, per axis."""

    stride: tuple[float, float, float]
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        if len(self.stride) != 3 or len(self.offset) != 3:
            raise ValueError(f"CamGrid: stride {self.stride} and offset {self.offset} need three values (t, h, w) each")
        if any(not np.isfinite(s) or s <= 0 for s in self.stride):
            raise ValueError(f"CamGrid: stride {self.stride}; expected three positive numbers of input voxels per cell")
        if any(not np.isfinite(o) for o in self.offset):
            raise ValueError(f"CamGrid: offset {self.offset}; expected three finite numbers (input index of cell 0)")

    @classmethod
    def half_pixel(cls, input_shape: tuple[int, int, int], cells: tuple[int, int, int]) -> CamGrid:
        """The image-resize convention (torch ``align_corners=False``): cells tile the input evenly.

        Right for a map whose cells really tile the input (e.g. a mask pooled by area), not for a
        convolutional network's cells; kept for maps that state no grid.
        """
        stride = tuple(float(n) / float(c) for n, c in zip(input_shape, cells))
        return cls(stride=(stride[0], stride[1], stride[2]),
                   offset=(stride[0] / 2 - 0.5, stride[1] / 2 - 0.5, stride[2] / 2 - 0.5))

    def centres(self, axis: int, n_cells: int) -> np.ndarray:
        """Input index of each cell centre along `axis` (0 = t, 1 = h, 2 = w)."""
        return self.stride[axis] * np.arange(n_cells, dtype=np.float64) + self.offset[axis]

    def taps(self, axis: int, n_cells: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For input indices 0..n_in-1 of `axis`: the two cells each lies between and the weight of the second."""
        u = (np.arange(n_in, dtype=np.float64) - self.offset[axis]) / self.stride[axis]
        u = np.clip(u, 0.0, n_cells - 1)
        i0 = np.minimum(np.floor(u).astype(np.intp), n_cells - 1)
        i1 = np.minimum(i0 + 1, n_cells - 1)
        return i0, i1, (u - i0).astype(np.float32)

    def upsample(self, heatmap: npt.ArrayLike, input_shape: tuple[int, int, int]) -> np.ndarray:
        """(t, h, w) cells -> `input_shape` voxels, linear between cell centres, constant beyond the ends."""
        out = np.asarray(heatmap, dtype=np.float32)
        if out.ndim != 3:
            raise ValueError(f"CamGrid.upsample: heatmap shape {out.shape}; expected (t, h, w)")
        for axis, n_in in enumerate(input_shape):
            i0, i1, w = self.taps(axis, out.shape[axis], n_in)
            a, b = np.take(out, i0, axis=axis), np.take(out, i1, axis=axis)
            shape = [1, 1, 1]
            shape[axis] = n_in
            out = a + (b - a) * w.reshape(shape)
        return out

    def membership(self, axis: int, n_cells: int, n_in: int) -> np.ndarray:
        """(n_cells, n_in) bool: input index i belongs to cell j when it lies in [c_j - stride/2, c_j + stride/2)."""
        c = self.centres(axis, n_cells)[:, None]
        i = np.arange(n_in, dtype=np.float64)[None, :]
        half = self.stride[axis] / 2.0
        return (i >= c - half) & (i < c + half)

    def pool_mask(self, mask: npt.ArrayLike, cells: tuple[int, int, int]) -> np.ndarray:
        """(..., T, H, W) mask -> (..., t, h, w) bool: a cell is set when any mask voxel belongs to it."""
        m = np.asarray(mask).astype(np.float32)
        T, H, W = m.shape[-3:]
        mt, mh, mw = (self.membership(a, n, s).astype(np.float32) for a, (n, s) in enumerate(zip(cells, (T, H, W))))
        return np.einsum("...thw,at,bh,cw->...abc", m, mt, mh, mw) > 0

    def to_dict(self) -> dict[str, Any]:
        return {"stride": [float(s) for s in self.stride], "offset": [float(o) for o in self.offset]}

    @classmethod
    def from_dict(cls, data: Any) -> CamGrid:
        if not isinstance(data, dict) or "stride" not in data:
            raise ValueError(f"heatmap grid {data!r}; expected {{\"stride\": [t, h, w], \"offset\": [t, h, w]}}")
        stride = tuple(float(v) for v in data["stride"])
        offset = tuple(float(v) for v in data.get("offset", (0.0, 0.0, 0.0)))
        return cls(stride=stride, offset=offset)  # type: ignore[arg-type]  # __post_init__ checks the length
