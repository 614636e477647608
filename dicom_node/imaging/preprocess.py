"""CT series -> model input, as in Ma et al. 2022 (numpy/scipy only, no torch).

Shared by the node and by training so the model sees the same input in both.

Steps (`prepare`): lung segmentation without learned weights (HU threshold, keep the air enclosed
by tissue along its row and column after closing breaks in the body wall, largest 1-2 3D
components, at least `min_lung_volume_ml`) on a strided ~4 mm view,
3D lung bounding box in the 1 mm resampled grid (+ margin), then the box is resampled to
`spacing_mm` along z and resized to `resize` x `resize` in-plane, three HU windows become the
channels, and the slices are split into windows of `window_slices` (the last window is padded by
repeating its last slice, `pad="edge"`; `pad="zero"` fills with 0). `preprocess` adds the centre
crop to `crop` x `crop` used for inference; training crops and rotates the `prepare` output itself.

Slabs (Shi et al. 2020, `slabs` > 0): instead of tiling the box with windows, the box's z range is
resized to `slabs * slab_stride` slices (half-pixel convention, like the in-plane resize; 50 x 4 = 200
in the paper) and slab k is the `window_slices` slices centred on resized slice
`slab_stride * k + slab_stride // 2` (edges clamped), so every study gives the same number of slabs.
One HU window (-1024..500 HU -> [0, 1], `SHI2020_PREPROCESSING`) makes one channel; the slab's slices
are its depth, as a Ma window's slices are. A slab covers (for key slices and heatmaps) the original
slices nearest to its centre: resized slices [slab_stride * k, slab_stride * (k + 1)).

Grids. The resampled grid has voxel k at k * spacing_mm from the centre of original voxel 0 on
every axis (original index = k * spacing_mm / original spacing). In-plane, resize pixel q of a
box [y0, y1) samples resampled coordinate y0 + (q + 0.5) * (y1 - y0) / resize - 0.5 (half-pixel
convention, edges clamped). Resampling to 1 mm and the resize are linear maps, so they are
evaluated as one separable (bi)linear interpolation on the original voxels: fast, no 1 mm volume
is ever materialised, and the geometry is exactly the two-step map documented in `Geometry`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from dicom_node.imaging.cam_grid import CamGrid
from dicom_node.log import get_logger

if TYPE_CHECKING:
    from typing import TypeAlias

    import numpy.typing as npt

    from dicom_node.imaging.series import CtSeries

    #: slice labels: {SOP Instance UID: label} or a sequence / array aligned with `CtSeries.sop_instance_uids`
    SliceLabels: TypeAlias = dict[str, Any] | npt.ArrayLike

__all__ = [
    "PreprocessConfig",
    "Geometry",
    "Windows",
    "PreprocessError",
    "preprocess",
    "prepare",
    "center_crop",
    "find_lung_box",
    "heatmap_to_slices",
    "mask_to_windows",
    "PREPROCESSING_VERSION",
    "SHI2020_PREPROCESSING",
    "slab_centre_slices",
]

PREPROCESSING_VERSION = "1"

_log = get_logger("dicom_node.imaging.preprocess")


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
    #: voxels below this HU are air/lung candidates
    lung_threshold_hu: float = -320.0
    #: the segmentation runs on a strided view with about this voxel size (mm)
    segmentation_spacing_mm: float = 4.0
    #: less lung than this (mL) means "no lungs": not a chest CT
    min_lung_volume_ml: float = 50.0
    #: gaps up to about this size (mm) in the body wall are closed before the outside air is removed
    body_closing_mm: float = 12.0
    #: margin added around the lung box on every side (mm)
    box_margin_mm: float = 5.0
    #: slices whose lung area is below this fraction of the largest one (trachea, tips) do not extend the box in z
    min_slice_area_fraction: float = 0.02
    #: padding of the last window: "edge" repeats the last slice, "zero" fills with 0
    pad: str = "edge"
    #: 0 = windows tile the lung box (Ma et al.); > 0 = this fixed number of slabs over the lung box (Shi et al.:
    #: 50), the box's z range resized to slabs * slab_stride slices (module docstring)
    slabs: int = 0
    #: resized slices between slab centres (Shi et al.: every 4th of 200); used only with slabs > 0
    slab_stride: int = 4

    def __post_init__(self) -> None:
        if self.crop is not None and not 0 < self.crop <= self.resize:
            raise ValueError(f"PreprocessConfig: crop={self.crop}; expected 0 < crop <= resize ({self.resize})")
        if self.window_slices < 1 or self.spacing_mm <= 0:
            raise ValueError(
                f"PreprocessConfig: window_slices={self.window_slices}, spacing_mm={self.spacing_mm}; expected positive values"
            )
        if self.pad not in ("edge", "zero"):
            raise ValueError(f"PreprocessConfig: pad={self.pad!r}; expected 'edge' or 'zero'")
        if any(w <= 0 for _, w in self.hu_windows):
            raise ValueError(f"PreprocessConfig: hu_windows={self.hu_windows}; expected positive widths")
        if self.slabs < 0 or self.slab_stride < 1:
            raise ValueError(f"PreprocessConfig: slabs={self.slabs}, slab_stride={self.slab_stride}; expected slabs >= 0 "
                             "(0 = tiling windows) and slab_stride >= 1")

    @property
    def channels(self) -> int:
        """Input channels of the model: one per HU window."""
        return len(self.hu_windows)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hu_windows"] = [list(w) for w in self.hu_windows]
        if not self.slabs:
            # tiling windows (Ma et al.): the slab keys are left out, so that every manifest, cache stamp and
            # model card written before slabs existed reads back equal
            del d["slabs"], d["slab_stride"]
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"PreprocessConfig: unknown keys {unknown}; expected a subset of {sorted(known)}")
        d = dict(data)
        if "hu_windows" in d:
            d["hu_windows"] = tuple(tuple(float(v) for v in w) for w in d["hu_windows"])
        return cls(**d)


#: Shi et al. 2020: 2.5 mm grid for the lung box, 50 slabs of 5 slices (every 4th of 200 resized lung slices),
#: centre crop 384 of 384 (the paper crops 384 x 384 around the centre; here the lung box is resized first),
#: -1024..500 HU -> [0, 1] as one channel
SHI2020_PREPROCESSING = PreprocessConfig(spacing_mm=2.5, hu_windows=((-262.0, 1524.0),), resize=384, crop=384,
                                         window_slices=5, slabs=50, slab_stride=4)


@dataclass(frozen=True)
class Geometry:
    """Everything needed to map a model-space heatmap back onto the original slices.

    Model space of window w, slice s (0..window_slices-1), pixel (r, c) of the crop x crop image
    corresponds to resampled slice z = lung_box[0] + w*window_slices + s, and in-plane to resize
    pixel (r + crop_offset[0], c + crop_offset[1]) of the box resized to resize x resize; resampled
    voxel k on any axis is original voxel k * spacing_mm / original spacing. See
    `model_to_original` / `original_to_model` and `heatmap_to_slices`.
    """

    original_shape: tuple[int, int, int]
    original_spacing_mm: tuple[float, float, float]  # (z, y, x)
    resampled_shape: tuple[int, int, int]
    lung_box: tuple[int, int, int, int, int, int]  # z0, z1, y0, y1, x0, x1 in resampled voxels (end exclusive)
    resize: int
    crop: int
    crop_offset: tuple[int, int]  # (row, col) offset of the crop in the resized image
    window_slices: int
    spacing_mm: float = 1.0
    n_windows: int = 0
    lung_volume_ml: float = 0.0
    #: slabs (PreprocessConfig.slabs > 0): the box's z range is resized to this many slices; 0 = tiling windows
    z_resize: int = 0
    #: resized slices between slab centres (with z_resize)
    slab_stride: int = 0

    @property
    def box_slices(self) -> int:
        return self.lung_box[1] - self.lung_box[0]

    def _z_model_to_resampled(self, window: npt.ArrayLike, s: npt.ArrayLike) -> np.ndarray:
        """Window (or slab) index and slice within it -> resampled z coordinate (slab slices clamped to the box)."""
        w = np.asarray(window, dtype=np.float64)
        s = np.asarray(s, dtype=np.float64)
        if not self.z_resize:
            return self.lung_box[0] + w * self.window_slices + s
        u = np.clip(self.slab_stride * w + self.slab_stride // 2 + s - self.window_slices // 2, 0, self.z_resize - 1)
        return self.lung_box[0] + (u + 0.5) * self.box_slices / self.z_resize - 0.5

    def _z_resampled_to_model(self, z_res: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Resampled z coordinate -> (window or slab index, slice within it); a slab is the one whose centre is nearest."""
        z_rel = np.asarray(z_res, dtype=np.float64) - self.lung_box[0]
        if not self.z_resize:
            window = np.floor((z_rel + 0.5) / self.window_slices).astype(int)
            return window, z_rel - window * self.window_slices
        u = (z_rel + 0.5) * self.z_resize / self.box_slices - 0.5
        slab = np.clip(np.floor(u / self.slab_stride), 0, self.n_windows - 1).astype(int)
        return slab, u - (self.slab_stride * slab + self.slab_stride // 2 - self.window_slices // 2)

    def _scale(self, axis: int) -> float:
        return self.spacing_mm / self.original_spacing_mm[axis]

    def _resize_to_resampled(self, q: npt.ArrayLike, axis: int) -> np.ndarray:
        lo, hi = self.lung_box[2 * axis], self.lung_box[2 * axis + 1]
        return lo + (np.asarray(q, dtype=np.float64) + 0.5) * (hi - lo) / self.resize - 0.5

    def _resampled_to_resize(self, v: npt.ArrayLike, axis: int) -> np.ndarray:
        lo, hi = self.lung_box[2 * axis], self.lung_box[2 * axis + 1]
        return (np.asarray(v, dtype=np.float64) - lo + 0.5) * self.resize / (hi - lo) - 0.5

    def model_to_original(
        self, window: int, s: npt.ArrayLike, r: npt.ArrayLike, c: npt.ArrayLike
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Model coordinates (window, slice s, row r, col c of the crop) -> original (z, y, x) voxel coordinates."""
        z_res = self._z_model_to_resampled(window, s)
        y_res = self._resize_to_resampled(np.asarray(r) + self.crop_offset[0], 1)
        x_res = self._resize_to_resampled(np.asarray(c) + self.crop_offset[1], 2)
        return z_res * self._scale(0), y_res * self._scale(1), x_res * self._scale(2)

    def original_to_model(
        self, z: npt.ArrayLike, y: npt.ArrayLike, x: npt.ArrayLike
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Original (z, y, x) voxel coordinates -> (window, s, r, c) in model space (floats; s within the window)."""
        window, s = self._z_resampled_to_model(np.asarray(z, dtype=np.float64) / self._scale(0))
        r = self._resampled_to_resize(np.asarray(y, dtype=np.float64) / self._scale(1), 1) - self.crop_offset[0]
        c = self._resampled_to_resize(np.asarray(x, dtype=np.float64) / self._scale(2), 2) - self.crop_offset[1]
        return window, s, r, c

    def window_slice_indices(self) -> tuple[tuple[int, ...], ...]:
        """Original slice indices whose centre falls in each window (a partition of the box's slices, in order);
        for slabs, the slices nearest to each slab's centre."""
        z_res = np.arange(self.original_shape[0]) / self._scale(0)
        z_rel = z_res - self.lung_box[0]
        inside = (z_rel >= -0.5) & (z_rel < self.box_slices - 0.5)
        window, _ = self._z_resampled_to_model(z_res)
        return tuple(tuple(int(i) for i in np.flatnonzero(inside & (window == w))) for w in range(self.n_windows))


@dataclass(frozen=True)
class Windows:
    """Model input for one series: `array` is (N, channels, window_slices, crop, crop) float32 in [0, 1] (three
    HU windows for Ma et al.; one for the Shi et al. slabs, N = `PreprocessConfig.slabs`)."""

    array: np.ndarray
    series_instance_uid: str
    #: for each window, the SOP Instance UIDs of the original slices it covers (sorted order)
    slice_uids: tuple[tuple[str, ...], ...]
    geometry: Geometry
    #: (N,) int window labels (1 if any covered slice is positive) when slice labels were given
    labels: np.ndarray | None = None
    config: PreprocessConfig = field(default_factory=PreprocessConfig)
    #: for each window, the indices (into CtSeries order) of the original slices it covers
    slice_indices: tuple[tuple[int, ...], ...] = ()


# ----------------------------------------------------------------------------- interpolation


def _linear_taps(n_in: int, n_out: int, lo: float = 0.0, step: float | None = None, scale: float = 1.0,
                 first: int = 0, count: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices and weights for linear sampling of an axis of length n_in at n_out positions.

    Positions (in the axis' own voxel units) are `scale * (lo + (i + 0.5) * step - 0.5)` for
    i in [first, first + count), clamped to [0, n_in - 1]; `step` defaults to the half-pixel resize
    step n_in / n_out.
    """
    if step is None:
        step = n_in / n_out
    count = n_out - first if count is None else count
    pos = scale * (lo + (np.arange(first, first + count) + 0.5) * step - 0.5)
    pos = np.clip(pos, 0.0, n_in - 1)
    i0 = np.minimum(np.floor(pos).astype(np.intp), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (pos - i0).astype(np.float32)


# ----------------------------------------------------------------------------- lungs


def _low_res_strides(shape: tuple[int, ...], spacing: tuple[float, float, float], target_mm: float) -> tuple[int, int, int]:
    zs = max(1, min(int(round(target_mm / spacing[0])), shape[0] // 32))
    ys = max(1, min(int(round(target_mm / spacing[1])), shape[1] // 96))
    xs = max(1, min(int(round(target_mm / spacing[2])), shape[2] // 96))
    return zs, ys, xs


def find_lung_box(series: CtSeries, config: PreprocessConfig = PreprocessConfig()) -> tuple[tuple[int, int, int, int, int, int], float]:
    """3D lung bounding box in resampled voxels (z0, z1, y0, y1, x0, x1, end exclusive) and the lung volume (mL).

    Raises PreprocessError when less than `config.min_lung_volume_ml` of lung is found.
    """
    spacing = series.spacing_mm
    strides = _low_res_strides(series.hu.shape, spacing, config.segmentation_spacing_mm)
    low = series.hu[:: strides[0], :: strides[1], :: strides[2]]
    air = low < config.lung_threshold_hu
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    # Lung candidates are air enclosed by tissue in all four in-plane directions (left, right,
    # up, down along the row and column through the voxel). Unlike "air not connected to the
    # border", this does not leak the whole lung out through a break in a thin or noisy body
    # wall; it only loses the rows and columns through the break. Thin breaks are closed first.
    low_px = min(strides[1] * spacing[1], strides[2] * spacing[2])
    iterations = max(1, int(math.ceil(config.body_closing_mm / low_px / 2)))
    tissue = ndimage.binary_closing(~air, structure=in_plane, iterations=iterations, border_value=0)
    inside = air.copy()
    for axis in (1, 2):
        inside &= np.logical_or.accumulate(tissue, axis=axis)
        inside &= np.flip(np.logical_or.accumulate(np.flip(tissue, axis=axis), axis=axis), axis=axis)
    del tissue
    comps, n_comps = ndimage.label(inside)
    voxel_ml = float(np.prod([st * sp for st, sp in zip(strides, spacing)])) / 1000.0
    sizes = np.bincount(comps.ravel(), minlength=n_comps + 1)[1:]
    keep: list[int] = []
    if n_comps:
        order = np.argsort(sizes)[::-1]
        keep = [int(order[0]) + 1]
        if n_comps > 1 and sizes[order[1]] >= 0.25 * sizes[order[0]]:
            keep.append(int(order[1]) + 1)
    volume_ml = float(sum(sizes[k - 1] for k in keep)) * voxel_ml
    if volume_ml < config.min_lung_volume_ml:
        raise PreprocessError(
            f"Series {series.series_instance_uid}: lung volume {volume_ml:.1f} mL found (largest air regions inside "
            f"the body below {config.lung_threshold_hu:g} HU); expected at least {config.min_lung_volume_ml:g} mL "
            "of lung: is this a chest CT (CTPA)?"
        )
    mask = np.isin(comps, keep)
    area = mask.sum(axis=(1, 2))
    rows_z = np.flatnonzero(area >= config.min_slice_area_fraction * area.max())
    sub = mask[rows_z[0] : rows_z[-1] + 1]
    ys = np.flatnonzero(sub.any(axis=(0, 2)))
    xs = np.flatnonzero(sub.any(axis=(0, 1)))
    box: list[int] = []
    for axis, (lo, hi) in enumerate(((rows_z[0], rows_z[-1]), (ys[0], ys[-1]), (xs[0], xs[-1]))):
        sp = spacing[axis]
        st = strides[axis]
        n_res = int(math.floor((series.hu.shape[axis] - 1) * sp / config.spacing_mm + 1e-6)) + 1
        lo_mm = lo * st * sp - 0.5 * st * sp - config.box_margin_mm
        hi_mm = hi * st * sp + 0.5 * st * sp + config.box_margin_mm
        k0 = max(0, int(math.ceil(lo_mm / config.spacing_mm)))
        k1 = min(n_res, int(math.floor(hi_mm / config.spacing_mm)) + 1)
        box += [k0, max(k1, k0 + 1)]
    z0, z1, y0, y1, x0, x1 = box
    return (z0, z1, y0, y1, x0, x1), volume_ml


# ----------------------------------------------------------------------------- main steps


def _resampled_shape(shape: tuple[int, ...], spacing: tuple[float, float, float], target: float) -> tuple[int, int, int]:
    nz, ny, nx = (int(math.floor((n - 1) * s / target + 1e-6)) + 1 for n, s in zip(shape, spacing))
    return nz, ny, nx


def _box_volume(hu: np.ndarray, spacing: tuple[float, float, float], box: tuple[int, int, int, int, int, int],
                config: PreprocessConfig, n_total: int, offset: int = 0, size: int | None = None,
                z_res: np.ndarray | None = None) -> np.ndarray:
    """(n_total, size, size) float32 HU: the box resampled to spacing_mm in z and resized in-plane to
    resize x resize, of which only pixels [offset, offset + size) are computed (a crop), padded in z.
    `z_res` (n_total,) = the resampled z coordinates to sample instead (slabs; no padding)."""
    z0, z1, y0, y1, x0, x1 = box
    R = config.resize
    size = R - offset if size is None else size
    sp = config.spacing_mm
    Z, Y, X = hu.shape
    # in-plane taps in original pixel units
    yi0, yi1, wy = _linear_taps(Y, R, lo=y0, step=(y1 - y0) / R, scale=sp / spacing[1], first=offset, count=size)
    xi0, xi1, wx = _linear_taps(X, R, lo=x0, step=(x1 - x0) / R, scale=sp / spacing[2], first=offset, count=size)
    R = size
    # z taps: resampled slice k at original index k * sp / sz
    zpos = np.clip((np.arange(z0, z1) if z_res is None else z_res) * sp / spacing[0], 0, Z - 1)
    zi0 = np.floor(zpos).astype(np.intp)
    zi1 = np.minimum(zi0 + 1, Z - 1)
    wz = (zpos - zi0).astype(np.float32)
    zlo, zhi = int(zi0.min()), int(zi1.max()) + 1
    xlo, xhi = int(xi0.min()), int(xi1.max()) + 1
    xi0 -= xlo
    xi1 -= xlo
    planes = np.empty((zhi - zlo, R, R), dtype=np.float32)
    wy_ = wy[None, :, None]
    wx_ = wx[None, None, :]
    chunk = 32
    for c0 in range(zlo, zhi, chunk):
        c1 = min(zhi, c0 + chunk)
        block = hu[c0:c1, :, xlo:xhi]
        a = block[:, yi0, :]
        b = block[:, yi1, :]
        b -= a
        b *= wy_
        a += b
        a2 = a[:, :, xi0]
        b2 = a[:, :, xi1]
        b2 -= a2
        b2 *= wx_
        a2 += b2
        planes[c0 - zlo : c1 - zlo] = a2
    vol = np.empty((n_total, R, R), dtype=np.float32)
    nb = z1 - z0 if z_res is None else len(z_res)
    for c0 in range(0, nb, chunk):
        c1 = min(nb, c0 + chunk)
        a = planes[zi0[c0:c1] - zlo]
        b = planes[zi1[c0:c1] - zlo]
        b -= a
        b *= wz[c0:c1, None, None]
        a += b
        vol[c0:c1] = a
    if n_total > nb:
        if config.pad == "edge":
            vol[nb:] = vol[nb - 1]
        else:
            vol[nb:] = np.nan  # becomes 0 after windowing (see _windows_array)
    return vol


def _windows_array(vol: np.ndarray, config: PreprocessConfig, n_windows: int) -> np.ndarray:
    R = vol.shape[-1]
    W = config.window_slices
    src = vol.reshape(n_windows, W, R, R)
    out = np.empty((n_windows, len(config.hu_windows), W, R, R), dtype=np.float32)
    for c, (level, width) in enumerate(config.hu_windows):
        lo = np.float32(level - width / 2.0)
        dst = out[:, c]
        np.subtract(src, lo, out=dst)
        np.multiply(dst, np.float32(1.0 / width), out=dst)
        np.clip(dst, 0.0, 1.0, out=dst)
    if config.pad == "zero":
        np.nan_to_num(out, copy=False, nan=0.0)
    return out


def _normalise_labels(series: CtSeries, slice_labels: SliceLabels) -> np.ndarray:
    n = len(series.sop_instance_uids)
    if isinstance(slice_labels, dict):
        missing = [u for u in series.sop_instance_uids if u not in slice_labels]
        if missing:
            raise PreprocessError(
                f"Series {series.series_instance_uid}: {len(missing)} slices without a label (e.g. {missing[0]}); "
                "expected a label for every SOP Instance UID"
            )
        return np.array([int(bool(slice_labels[u])) for u in series.sop_instance_uids], dtype=np.int64)
    arr = np.asarray(slice_labels).astype(np.int64).ravel()
    if arr.shape[0] != n:
        raise PreprocessError(
            f"Series {series.series_instance_uid}: {arr.shape[0]} slice labels; expected {n}, aligned with sop_instance_uids"
        )
    return (arr != 0).astype(np.int64)


def slab_centre_slices(geometry: Geometry) -> np.ndarray:
    """(N,) the original slice nearest to each slab's central slice (slabs only): the slice whose label and
    mask the slab carries (Shi et al. annotate the central slice of a slab)."""
    if not geometry.z_resize:
        raise ValueError("slab_centre_slices: the geometry has tiling windows, not slabs (PreprocessConfig.slabs = 0)")
    W = geometry.window_slices
    z_res = geometry._z_model_to_resampled(np.arange(geometry.n_windows), np.full(geometry.n_windows, W // 2))
    return np.clip(np.rint(z_res * geometry._scale(0)), 0, geometry.original_shape[0] - 1).astype(np.intp)


def _window_labels(geometry: Geometry, indices: tuple[tuple[int, ...], ...], labels: np.ndarray) -> np.ndarray:
    if geometry.z_resize:
        return labels[slab_centre_slices(geometry)].astype(np.int64)
    out = np.zeros(len(indices), dtype=np.int64)
    scale = geometry._scale(0)
    for w, idx in enumerate(indices):
        if not idx:  # slices thicker than a window: the two original slices it interpolates from
            centre = (geometry.lung_box[0] + w * geometry.window_slices + 0.5 * (geometry.window_slices - 1)) * scale
            lo = int(np.clip(math.floor(centre), 0, len(labels) - 1))
            idx = (lo, min(lo + 1, len(labels) - 1))
        out[w] = int(labels[list(idx)].any())
    return out


def prepare(series: CtSeries, config: PreprocessConfig = PreprocessConfig(),
            slice_labels: SliceLabels | None = None) -> Windows:
    """Series -> windows at `resize` x `resize` (no crop): training crops/augments this, inference centre-crops it.

    Parameters
    ----------
    series
        The loaded CT series (`dicom_node.imaging.series.load_series`).
    config
        The preprocessing; a bundle's is `BundleManifest.preprocessing`.
    slice_labels
        Optional per-slice PE labels, either {SOP Instance UID: label} covering every slice or
        a sequence / array of one label per slice in `series.sop_instance_uids` order; when
        given, `Windows.labels` holds one 0/1 label per window (1 if any covered slice is positive).
    """
    return _prepare(series, config, slice_labels, crop=None)


def _prepare(series: CtSeries, config: PreprocessConfig, slice_labels: SliceLabels | None, crop: int | None) -> Windows:
    """`prepare`, computing only the centre `crop` x `crop` pixels when `crop` is given
    (identical to `center_crop(prepare(...), crop)`, without the full-size array and the copy)."""
    t0 = time.perf_counter()
    size = config.resize if crop is None else crop
    offset = (config.resize - size) // 2
    spacing = series.spacing_mm
    box, volume_ml = find_lung_box(series, config)
    nb = box[1] - box[0]
    n_windows = config.slabs or int(math.ceil(nb / config.window_slices))
    nz, ny, nx = series.hu.shape
    geometry = Geometry(
        original_shape=(int(nz), int(ny), int(nx)),
        original_spacing_mm=spacing,
        resampled_shape=_resampled_shape(series.hu.shape, spacing, config.spacing_mm),
        lung_box=box,
        resize=config.resize,
        crop=size,
        crop_offset=(offset, offset),
        window_slices=config.window_slices,
        spacing_mm=config.spacing_mm,
        n_windows=n_windows,
        lung_volume_ml=volume_ml,
        z_resize=config.slabs * config.slab_stride,
        slab_stride=config.slab_stride if config.slabs else 0,
    )
    vol = _box_volume(series.hu, spacing, box, config, n_windows * config.window_slices, offset, size,
                      z_res=_slab_z(geometry))
    array = _windows_array(vol, config, n_windows)
    del vol
    indices = geometry.window_slice_indices()
    uids = tuple(tuple(series.sop_instance_uids[i] for i in idx) for idx in indices)
    labels = None
    if slice_labels is not None:
        labels = _window_labels(geometry, indices, _normalise_labels(series, slice_labels))
    _log.info(
        "preprocess_finished",
        series_uid=series.series_instance_uid,
        windows=n_windows,
        lung_box=list(box),
        lung_volume_ml=round(volume_ml, 1),
        resize=config.resize,
        duration_s=round(time.perf_counter() - t0, 3),
    )
    return Windows(
        array=array,
        series_instance_uid=series.series_instance_uid,
        slice_uids=uids,
        geometry=geometry,
        labels=labels,
        config=config,
        slice_indices=indices,
    )


def _slab_z(geometry: Geometry) -> np.ndarray | None:
    """Resampled z coordinate of every slab slice, slab-major (None for tiling windows)."""
    if not geometry.z_resize:
        return None
    W = geometry.window_slices
    k, s = np.meshgrid(np.arange(geometry.n_windows), np.arange(W), indexing="ij")
    return geometry._z_model_to_resampled(k.ravel(), s.ravel())


def mask_to_windows(series: CtSeries, mask: npt.ArrayLike, geometry: Geometry, config: PreprocessConfig) -> np.ndarray:
    """A (Z, Y, X) truth mask of `series` (slices in `series` order) -> (N, window_slices, R, R) bool in model space.

    `geometry` must come from `prepare(series, config)` (no crop: R = config.resize). The mask goes
    through the same resampling and box as the image, and a model voxel is set when it overlaps any
    mask voxel (value > 0 after linear resampling), so a thin clot is never lost; padding is empty.
    """
    m = np.asarray(mask)
    if m.shape != series.hu.shape:
        raise PreprocessError(
            f"Series {series.series_instance_uid}: mask shape {m.shape} differs from the series {series.hu.shape}; "
            "give one mask value per voxel, slices in the series' sorted order")
    if geometry.crop != config.resize:
        raise PreprocessError(f"mask_to_windows: geometry is cropped to {geometry.crop} px; pass the geometry of "
                              f"prepare() (resize {config.resize} px, no crop)")
    W = config.window_slices
    n = geometry.n_windows * W
    vol = _box_volume(m.astype(np.float32), series.spacing_mm, geometry.lung_box, config, n, z_res=_slab_z(geometry))
    if not geometry.z_resize:
        vol[geometry.box_slices:] = 0.0
    out: np.ndarray = np.nan_to_num(vol, nan=0.0) > 0
    return out.reshape(geometry.n_windows, W, config.resize, config.resize)


def center_crop(windows: Windows, crop: int) -> Windows:
    """Centre crop of every slice to `crop` x `crop` (a contiguous copy), geometry updated."""
    size = windows.array.shape[-1]
    if not 0 < crop <= size:
        raise ValueError(f"center_crop: crop={crop}; expected 0 < crop <= current size {size}")
    off = (size - crop) // 2
    array = np.ascontiguousarray(windows.array[..., off : off + crop, off : off + crop])
    g = windows.geometry
    geometry = replace(g, crop=crop, crop_offset=(g.crop_offset[0] + off, g.crop_offset[1] + off))
    return replace(windows, array=array, geometry=geometry)


def preprocess(series: CtSeries, config: PreprocessConfig = PreprocessConfig(),
               slice_labels: SliceLabels | None = None) -> Windows:
    """Series -> inference input (N, 3, window_slices, crop, crop) float32 in [0, 1]: `prepare` + `center_crop`.

    Parameters
    ----------
    series, config, slice_labels
        As for `prepare`.
    """
    return _prepare(series, config, slice_labels, crop=config.crop)


# ----------------------------------------------------------------------------- heatmaps


def heatmap_to_slices(windows_or_geometry: Windows | Geometry, window_index: int,
                      heatmap: npt.ArrayLike, grid: CamGrid | None = None) -> list[tuple[int, np.ndarray]]:
    """Map one window's model-space heatmap back onto the original slices it covers.

    Parameters
    ----------
    windows_or_geometry
        The windows the heatmap was computed on, or their geometry.
    window_index
        Which window.
    heatmap
        (t, h, w) (or (h, w)) non-negative, at any resolution up to (window_slices, crop, crop)
        (e.g. a 3D ResNet layer4 map of 2 x 5 x 5).
    grid
        Where the heatmap's cells sit in the window (`CamGrid`, from the bundle's manifest): the map
        is upsampled linearly between those cell centres to (window_slices, crop, crop). None = the
        half-pixel resize convention, which is only right for maps whose cells tile the window.

    Returns [(z, (Y, X) float32)] for each original slice z the window covers, resampled to the
    original grid; zero outside the lung box and the crop.
    """
    g = windows_or_geometry.geometry if isinstance(windows_or_geometry, Windows) else windows_or_geometry
    if not 0 <= window_index < g.n_windows:
        raise ValueError(f"heatmap_to_slices: window {window_index}; expected 0 <= window < {g.n_windows}")
    hm = np.asarray(heatmap, dtype=np.float32)
    if hm.ndim == 2:
        hm = hm[None]
    if hm.ndim != 3:
        raise ValueError(f"heatmap_to_slices: heatmap shape {hm.shape}; expected (t, h, w)")
    full = (g.window_slices, g.crop, g.crop)
    if hm.shape != full:
        cells = (hm.shape[0], hm.shape[1], hm.shape[2])
        hm = (grid or CamGrid.half_pixel(full, cells)).upsample(hm, full)
    Z, Y, X = g.original_shape
    # in-plane: original pixel -> crop coordinate, validity inside box and crop
    maps = []
    for axis, n_orig in ((1, Y), (2, X)):
        v = np.arange(n_orig) / g._scale(axis)  # resampled coordinate
        lo, hi = g.lung_box[2 * axis], g.lung_box[2 * axis + 1]
        q = g._resampled_to_resize(v, axis) - g.crop_offset[axis - 1]
        valid = (v >= lo - 0.5) & (v < hi - 0.5) & (q >= -0.5) & (q < g.crop - 0.5)
        qc = np.clip(q, 0, g.crop - 1)
        i0 = np.minimum(np.floor(qc).astype(np.intp), g.crop - 1)
        i1 = np.minimum(i0 + 1, g.crop - 1)
        maps.append((i0, i1, (qc - i0).astype(np.float32), valid))
    (yi0, yi1, wy, vy), (xi0, xi1, wx, vx) = maps
    # The valid pixels (inside the lung box and the crop) form one rectangle: both coordinates are
    # monotonic in the original pixel index. Interpolate there only; the rest of the slice is zero.
    ys, xs = np.flatnonzero(vy), np.flatnonzero(vx)
    r0, r1 = (int(ys[0]), int(ys[-1]) + 1) if ys.size else (0, 0)
    c0, c1 = (int(xs[0]), int(xs[-1]) + 1) if xs.size else (0, 0)
    yi0, yi1, wy = yi0[r0:r1], yi1[r0:r1], wy[r0:r1, None]
    xi0, xi1, wx = xi0[c0:c1], xi1[c0:c1], wx[None, c0:c1]
    out = []
    for z in g.window_slice_indices()[window_index]:
        _, s_at = g._z_resampled_to_model(z / g._scale(0))
        s = float(np.clip(s_at, 0, g.window_slices - 1))
        s0 = min(int(math.floor(s)), g.window_slices - 1)
        s1 = min(s0 + 1, g.window_slices - 1)
        plane = hm[s0] * (1 - (s - s0)) + hm[s1] * (s - s0)
        rows = plane[yi0] * (1 - wy) + plane[yi1] * wy
        img = np.zeros((Y, X), dtype=np.float32)
        img[r0:r1, c0:c1] = rows[:, xi0] * (1 - wx) + rows[:, xi1] * wx
        out.append((int(z), img))
    return out
