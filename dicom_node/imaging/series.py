"""Load one CT series into a typed, validated `CtSeries` (numpy + pydicom only, no torch).

`load_series` accepts a directory, an iterable of file paths or an iterable of pydicom
Datasets. Slices are sorted by their position along the slice normal (the cross product of
the ImageOrientationPatient row and column cosines, dotted with ImagePositionPatient), never
by file name or InstanceNumber. Every refusal raises `SeriesError` whose message names the
series, the offending value and what was expected.

Enhanced CT (multi-frame) instances are split into frames using the shared / per-frame
functional groups (PlanePositionSequence, PlaneOrientationSequence, PixelMeasuresSequence,
PixelValueTransformationSequence).

Missing slices (`max_gap_factor`, the node's `[selection] max_gap_factor`): gaps of a whole
multiple of the median spacing, up to that factor, are filled by linear interpolation between
their received neighbours (`dicom_node.imaging.gaps`), so the `CtSeries` is regular; `gaps` and
`interpolated` say what was filled, and an interpolated slice carries the SOP Instance UID of its
nearest received neighbour (results reference only received slices: `received_indices`). The
default factor 1 fills nothing. A refusal's `SeriesError.plain` says the reason in plain words for
a "not analysed" report.

Geometry is checked before anything is computed from it: ImageOrientationPatient must be two
orthogonal unit vectors (within `GEOMETRY_TOLERANCE`) and RescaleSlope non-zero (absent = 1), else
`SeriesError` (a "not analysed" SR says why). Dates and times in the header that do not parse
(`PatientBirthDate` `19O10203`) are emptied in `ref_dataset` (`dicom_node.imaging.dates`), so the
results are still made and the raw value is never copied or logged.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.imaging.dates import clear_malformed_dates
from dicom_node.imaging.gaps import SliceGap, bridge, classify_gaps
from dicom_node.log import get_logger

__all__ = [
    "CtSeries",
    "SeriesError",
    "SliceGap",
    "load_series",
    "group_series",
    "read_datasets",
    "CT_IMAGE_STORAGE",
    "ENHANCED_CT_IMAGE_STORAGE",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
_CT_SOP_CLASSES = {CT_IMAGE_STORAGE: "CT Image Storage", ENHANCED_CT_IMAGE_STORAGE: "Enhanced CT Image Storage"}

#: tags dropped from `ref_dataset` (pixel data of every kind)
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}

#: which decoder plugin handles which transfer syntax (for error messages)
_DECODER_HINTS = {
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg or python-gdcm (JPEG-LS)",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg or python-gdcm (JPEG-LS)",
    "1.2.840.10008.1.2.4.90": "pylibjpeg-openjpeg or python-gdcm (JPEG 2000)",
    "1.2.840.10008.1.2.4.91": "pylibjpeg-openjpeg or python-gdcm (JPEG 2000)",
    "1.2.840.10008.1.2.5": "pylibjpeg-rle (RLE)",
    "1.2.840.10008.1.2.4.50": "pylibjpeg-libjpeg or python-gdcm (JPEG baseline)",
    "1.2.840.10008.1.2.4.51": "pylibjpeg-libjpeg or python-gdcm (JPEG extended)",
    "1.2.840.10008.1.2.4.57": "pylibjpeg-libjpeg or python-gdcm (JPEG lossless)",
    "1.2.840.10008.1.2.4.70": "pylibjpeg-libjpeg or python-gdcm (JPEG lossless SV1)",
}

#: two slices closer than this (mm) along the normal are at the same position
DUPLICATE_TOLERANCE_MM = 0.01
_ORIENTATION_TOLERANCE = 1e-3
_SPACING_TOLERANCE_MM = 1e-3

_log = get_logger("dicom_node.imaging.series")

if TYPE_CHECKING:
    from typing import TypeAlias

    #: what `read_datasets`, `group_series` and `load_series` accept: a directory or file path,
    #: one Dataset, or an iterable of file paths and/or Datasets
    SeriesSource: TypeAlias = str | os.PathLike[str] | Dataset | Iterable[str | os.PathLike[str] | Dataset]


class SeriesError(ValueError):
    """A series cannot be used; the message names the series UID, the value and what was expected.

    `plain`: the reason in plain words for a reader of the report (no UIDs), e.g. "12 slices are
    missing between 10.0 and 25.0 mm"; by default the message without its "Series <UID>: " prefix."""

    def __init__(self, message: str, plain: str | None = None) -> None:
        super().__init__(message)
        self.plain = plain if plain is not None else message.split(": ", 1)[-1] if message.startswith("Series ") else message


@dataclass(frozen=True)
class CtSeries:
    """One CT series in patient space, slices sorted by position along the slice normal.

    `hu` is (Z, Y, X) float32 Hounsfield units; index z matches `sop_instance_uids[z]`
    and `positions_mm[z]` (position of slice z along the normal, increasing).
    For Enhanced CT, `frame_numbers[z]` is the 1-based frame of that instance (0 for
    single-frame instances); `image_positions[z]` is ImagePositionPatient of slice z.
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
    frame_numbers: tuple[int, ...] = ()
    image_positions: np.ndarray | None = None  # (Z, 3) ImagePositionPatient per slice
    duplicates_removed: int = 0
    #: InstanceNumber of the source instance of each slice (None where the instance has none or an unreadable one);
    #: for Enhanced CT every frame of one instance shares its number (`frame_numbers` tells the frames apart)
    instance_numbers: tuple[int | None, ...] = ()
    #: gaps of missing slices filled by interpolation (empty when every slice arrived)
    gaps: tuple[SliceGap, ...] = ()
    #: per slice z: True when it was interpolated over a gap (empty = none was)
    interpolated: tuple[bool, ...] = ()

    @property
    def missing_slices(self) -> int:
        """Slices that were missing and were filled by interpolation."""
        return sum(g.missing for g in self.gaps)

    def is_interpolated(self, z: int) -> bool:
        return bool(self.interpolated) and bool(self.interpolated[z])

    @property
    def received_indices(self) -> tuple[int, ...]:
        """The slices z that are received instances (not interpolated over a gap)."""
        return tuple(z for z in range(self.hu.shape[0]) if not self.is_interpolated(z))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.hu.shape)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """(z, y, x) voxel spacing in mm."""
        return (float(self.slice_spacing_mm), float(self.pixel_spacing_mm[0]), float(self.pixel_spacing_mm[1]))

    @property
    def normal(self) -> np.ndarray:
        o = np.asarray(self.image_orientation, dtype=np.float64)
        return np.cross(o[:3], o[3:])


@dataclass
class _Slice:
    """One 2D image of the series (a single-frame instance or one frame of a multi-frame one)."""

    ds: Dataset
    sop_uid: str
    frame: int  # 0 = single frame, else 1-based frame number
    position: np.ndarray  # ImagePositionPatient (3,)
    orientation: np.ndarray  # (6,)
    pixel_spacing: np.ndarray  # (2,)
    rows: int
    cols: int
    slope: float
    intercept: float
    normal_position: float = field(default=0.0)


# ----------------------------------------------------------------------------- reading


def _iter_paths(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def read_datasets(source: SeriesSource) -> list[Dataset]:
    """Datasets from a directory (recursive), one path, or an iterable of paths / Datasets.

    Files that are not DICOM are skipped in a directory, refused when named explicitly.
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if root.is_dir():
            out: list[Dataset] = []
            for p in _iter_paths(root):
                try:
                    out.append(pydicom.dcmread(p))
                except InvalidDicomError:
                    _log.debug("non_dicom_file_skipped", path=str(p))
            return out
        return [pydicom.dcmread(root)]
    if isinstance(source, Dataset):
        return [source]
    out = []
    for item in source:
        if isinstance(item, Dataset):
            out.append(item)
        else:
            try:
                out.append(pydicom.dcmread(item))
            except InvalidDicomError as exc:
                raise SeriesError(f"{item}: not a DICOM file ({exc}); expected DICOM Part 10 files") from exc
    return out


def group_series(datasets_or_paths: SeriesSource) -> dict[str, list[Dataset]]:
    """Group datasets (or files) by SeriesInstanceUID, in input order."""
    groups: dict[str, list[Dataset]] = {}
    for ds in read_datasets(datasets_or_paths):
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        groups.setdefault(uid, []).append(ds)
    return groups


def _describe_series(uid: str, items: list[Dataset]) -> str:
    ds = items[0]
    desc = str(ds.get("SeriesDescription", "") or "")
    modality = str(ds.get("Modality", "") or "?")
    return f"{uid} ({modality}, {len(items)} instances{', ' + repr(desc) if desc else ''})"


# ----------------------------------------------------------------------------- frames


def _functional_group(ds: Dataset, frame_index: int, name: str) -> Dataset | None:
    """Item 0 of functional group `name` for one frame: per-frame first, then shared."""
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and frame_index < len(per):
        seq = per[frame_index].get(name)
        if seq:
            return seq[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        seq = shared[0].get(name)
        if seq:
            return seq[0]
    return None


def _floats(value: Any, n: int, what: str, series_uid: str, sop_uid: str) -> np.ndarray:
    """`value` as a (n,) float64 array; `SeriesError` naming the instance and `what` otherwise.

    Parameters
    ----------
    value
        The raw value of a DICOM element (a MultiValue, a list, a single number, None, ...),
        anything that is not exactly `n` numbers is refused.
    n
        The number of values expected.
    what
        The element keyword, for the error message.
    series_uid, sop_uid
        The series and the instance the value comes from, for the error message.
    """
    try:
        arr = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.zeros(0)
    if arr.shape != (n,):
        raise SeriesError(
            f"Series {series_uid}: instance {sop_uid} has {what}={value!r}; expected {n} numbers"
        )
    return arr


def _rescale_slope(item: Dataset) -> float:
    """RescaleSlope of an instance or functional group item: 1 when absent or empty, else its value as written
    (0 included: `_check_consistent` refuses it rather than reading it as 1)."""
    value = item.get("RescaleSlope")
    return 1.0 if value is None or value == "" else float(value)


def _slices_of(ds: Dataset, series_uid: str) -> list[_Slice]:
    sop_uid = str(ds.get("SOPInstanceUID", "") or "")
    sop_class = str(ds.get("SOPClassUID", "") or "")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if sop_class == ENHANCED_CT_IMAGE_STORAGE:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
        out = []
        for i in range(n_frames):
            pos_item = _functional_group(ds, i, "PlanePositionSequence")
            ori_item = _functional_group(ds, i, "PlaneOrientationSequence")
            pix_item = _functional_group(ds, i, "PixelMeasuresSequence")
            val_item = _functional_group(ds, i, "PixelValueTransformationSequence")
            if pos_item is None or ori_item is None or pix_item is None:
                raise SeriesError(
                    f"Series {series_uid}: Enhanced CT instance {sop_uid} frame {i + 1} lacks "
                    "PlanePositionSequence/PlaneOrientationSequence/PixelMeasuresSequence; expected "
                    "them in the shared or per-frame functional groups"
                )
            slope = _rescale_slope(val_item if val_item is not None else ds)
            intercept = (
                float(val_item.get("RescaleIntercept", 0.0)) if val_item is not None else float(ds.get("RescaleIntercept", 0.0))
            )
            out.append(
                _Slice(
                    ds=ds,
                    sop_uid=sop_uid,
                    frame=i + 1,
                    position=_floats(pos_item.get("ImagePositionPatient"), 3, "ImagePositionPatient", series_uid, sop_uid),
                    orientation=_floats(ori_item.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", series_uid, sop_uid),
                    pixel_spacing=_floats(pix_item.get("PixelSpacing"), 2, "PixelSpacing", series_uid, sop_uid),
                    rows=rows,
                    cols=cols,
                    slope=slope,
                    intercept=intercept,
                )
            )
        return out
    return [
        _Slice(
            ds=ds,
            sop_uid=sop_uid,
            frame=0,
            position=_floats(ds.get("ImagePositionPatient"), 3, "ImagePositionPatient", series_uid, sop_uid),
            orientation=_floats(ds.get("ImageOrientationPatient"), 6, "ImageOrientationPatient", series_uid, sop_uid),
            pixel_spacing=_floats(ds.get("PixelSpacing"), 2, "PixelSpacing", series_uid, sop_uid),
            rows=rows,
            cols=cols,
            slope=_rescale_slope(ds),
            intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
        )
    ]


# ----------------------------------------------------------------------------- checks


def _check_instances(uid: str, items: list[Dataset]) -> None:
    for ds in items:
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        modality = str(ds.get("Modality", "") or "")
        sop_class = str(ds.get("SOPClassUID", "") or "")
        if modality != "CT":
            raise SeriesError(
                f"Series {uid}: instance {sop_uid} has Modality {modality or '(missing)'!r}; expected 'CT'"
            )
        if sop_class not in _CT_SOP_CLASSES:
            raise SeriesError(
                f"Series {uid}: instance {sop_uid} has SOP Class {sop_class or '(missing)'}; expected "
                f"CT Image Storage ({CT_IMAGE_STORAGE}) or Enhanced CT Image Storage ({ENHANCED_CT_IMAGE_STORAGE})"
            )
        if "PixelData" not in ds:
            raise SeriesError(f"Series {uid}: instance {sop_uid} has no PixelData; expected image pixels in every instance")
    frames_of_ref = sorted({str(ds.get("FrameOfReferenceUID", "") or "") for ds in items})
    if len(frames_of_ref) != 1 or not frames_of_ref[0]:
        raise SeriesError(
            f"Series {uid}: {len(frames_of_ref)} frames of reference {frames_of_ref}; "
            "expected exactly one FrameOfReferenceUID for the whole series"
        )


#: how far from 1 a direction cosine's length, and from 0 the row and column cosines' dot product, may be:
#: scanners write 4-6 decimals, so real orientations are within 1e-4; 0.01 still refuses (1,0,0,0.6,0.8,0)
#: (dot 0.6) and (2,0,0,0,2,0) (length 2)
GEOMETRY_TOLERANCE = 0.01


def _check_geometry(uid: str, s: _Slice) -> None:
    """Orientation made of two orthogonal unit vectors, and a usable RescaleSlope: the voxel grid and HU rest on them."""
    row, col = s.orientation[:3], s.orientation[3:]
    lengths = (float(np.linalg.norm(row)), float(np.linalg.norm(col)))
    dot = float(np.dot(row, col))
    where = f"instance {s.sop_uid}{_frame_txt(s)}"
    if max(abs(n - 1.0) for n in lengths) > GEOMETRY_TOLERANCE:
        raise SeriesError(
            f"Series {uid}: {where} has ImageOrientationPatient {np.round(s.orientation, 4).tolist()} whose row and "
            f"column cosines have lengths {lengths[0]:.3f} and {lengths[1]:.3f}; expected unit vectors",
            plain=f"the image orientation is invalid (direction cosines of length {lengths[0]:.2f} and "
                  f"{lengths[1]:.2f}, not 1): the slice geometry cannot be trusted")
    if abs(dot) > GEOMETRY_TOLERANCE:
        angle = float(np.degrees(np.arccos(np.clip(dot / (lengths[0] * lengths[1]), -1.0, 1.0))))
        raise SeriesError(
            f"Series {uid}: {where} has ImageOrientationPatient {np.round(s.orientation, 4).tolist()} whose row and "
            f"column cosines are {angle:.1f} degrees apart; expected orthogonal unit vectors",
            plain=f"the image orientation is invalid (image rows and columns {angle:.0f} degrees apart, not 90): "
                  "the slice geometry cannot be trusted")
    if not np.isfinite(s.slope) or s.slope == 0.0:
        raise SeriesError(
            f"Series {uid}: {where} has RescaleSlope {s.slope:g}; expected a non-zero number (HU = value x slope + "
            "intercept)",
            plain=f"the pixel values cannot be converted to Hounsfield units (RescaleSlope {s.slope:g})")


def _check_consistent(uid: str, slices: list[_Slice]) -> None:
    first = slices[0]
    for s in slices:
        _check_geometry(uid, s)
    for s in slices[1:]:
        if np.max(np.abs(s.orientation - first.orientation)) > _ORIENTATION_TOLERANCE:
            raise SeriesError(
                f"Series {uid}: mixed orientation, instance {s.sop_uid} has ImageOrientationPatient "
                f"{np.round(s.orientation, 4).tolist()} but {first.sop_uid} has {np.round(first.orientation, 4).tolist()}; "
                "expected one orientation for all slices"
            )
        if np.max(np.abs(s.pixel_spacing - first.pixel_spacing)) > _SPACING_TOLERANCE_MM:
            raise SeriesError(
                f"Series {uid}: mixed pixel spacing, instance {s.sop_uid} has {s.pixel_spacing.tolist()} mm but "
                f"{first.sop_uid} has {first.pixel_spacing.tolist()} mm; expected one PixelSpacing for all slices"
            )
        if (s.rows, s.cols) != (first.rows, first.cols):
            raise SeriesError(
                f"Series {uid}: mixed image size, instance {s.sop_uid} is {s.rows}x{s.cols} but "
                f"{first.sop_uid} is {first.rows}x{first.cols}; expected one Rows x Columns for all slices"
            )
    if first.rows <= 0 or first.cols <= 0:
        raise SeriesError(f"Series {uid}: image size {first.rows}x{first.cols}; expected positive Rows and Columns")
    if np.min(first.pixel_spacing) <= 0:
        raise SeriesError(f"Series {uid}: PixelSpacing {first.pixel_spacing.tolist()}; expected positive values")


def _sort_and_deduplicate(uid: str, slices: list[_Slice]) -> tuple[list[_Slice], int]:
    o = slices[0].orientation
    normal = np.cross(o[:3], o[3:])
    norm = float(np.linalg.norm(normal))
    if norm < 0.5:
        raise SeriesError(
            f"Series {uid}: ImageOrientationPatient {o.tolist()} has parallel row and column cosines; "
            "expected orthogonal unit vectors"
        )
    normal = normal / norm
    for s in slices:
        s.normal_position = float(np.dot(s.position, normal))
    ordered = sorted(slices, key=lambda s: (s.normal_position, s.sop_uid, s.frame))
    kept: list[_Slice] = [ordered[0]]
    removed = 0
    for s in ordered[1:]:
        prev = kept[-1]
        if abs(s.normal_position - prev.normal_position) < DUPLICATE_TOLERANCE_MM:
            if (s.sop_uid, s.frame) == (prev.sop_uid, prev.frame):
                removed += 1
                continue
            raise SeriesError(
                f"Series {uid}: two different instances at position {s.normal_position:.3f} mm along the "
                f"slice normal ({prev.sop_uid}{_frame_txt(prev)} and {s.sop_uid}{_frame_txt(s)}); "
                "expected one slice per position"
            )
        kept.append(s)
    return kept, removed


def _frame_txt(s: _Slice) -> str:
    return f" frame {s.frame}" if s.frame else ""


def _check_spacing(uid: str, slices: list[_Slice], min_slices: int, max_gap_factor: float) -> tuple[float, tuple[SliceGap, ...]]:
    """(median spacing, gaps to fill), or SeriesError for too few slices or a gap that cannot be bridged."""
    if len(slices) < max(2, min_slices):
        raise SeriesError(
            f"Series {uid}: {len(slices)} slices; expected at least {max(2, min_slices)} "
            "(a localizer or a truncated transfer?)",
            plain=f"the series has {len(slices)} slices; at least {max(2, min_slices)} are needed "
                  "(was the transfer cut short?)",
        )
    pos = np.array([s.normal_position for s in slices])
    gaps = np.diff(pos)
    plan = classify_gaps(pos, max_gap_factor)
    median = plan.median_mm
    bad = plan.refused
    if bad is not None:
        i = bad.after
        if bad.to_mm - bad.from_mm > median:
            plain = (f"slices are missing between {bad.from_mm:.1f} and {bad.to_mm:.1f} mm (a gap of "
                     f"{bad.width_mm:.1f} mm, {bad.width_mm / median:.1f} times the slice spacing of {median:.2f} mm; "
                     f"the analysis bridges gaps up to {max_gap_factor:g} times the spacing)")
        else:
            plain = (f"the slice spacing is irregular ({bad.width_mm:.2f} mm between {bad.from_mm:.1f} and "
                     f"{bad.to_mm:.1f} mm where the spacing is {median:.2f} mm): extra or misplaced slices")
        raise SeriesError(
            f"Series {uid}: slice spacing varies ({gaps.min():.2f}-{gaps.max():.2f} mm, median {median:.2f} mm); "
            f"first irregular gap of {gaps[i]:.2f} mm between {pos[i]:.2f} and {pos[i + 1]:.2f} mm "
            f"(slices {i} and {i + 1}); expected regular spacing (missing or extra slices?)",
            plain=plain,
        )
    return median, plan.bridged


# ----------------------------------------------------------------------------- pixels


_NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def _decode_native(ds: Dataset) -> np.ndarray | None:
    """Fast path for uncompressed little-endian 16-bit single-frame grayscale (most CT); else None."""
    meta = getattr(ds, "file_meta", None)
    ts = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    if ts not in _NATIVE_LITTLE_ENDIAN or ds.get("BitsAllocated") != 16 or ds.get("SamplesPerPixel", 1) != 1:
        return None
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return None
    rows, cols = int(ds.Rows), int(ds.Columns)
    data = ds.PixelData
    if not isinstance(data, bytes) or len(data) < rows * cols * 2:
        return None
    signed = ds.get("PixelRepresentation", 0) == 1
    arr = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=rows * cols).reshape(rows, cols)
    stored = int(ds.get("BitsStored", 16) or 16)
    if stored < 16:
        if signed:  # sign-extend from BitsStored
            shift = 16 - stored
            arr = (arr << shift) >> shift
        else:
            arr = arr & ((1 << stored) - 1)
    return arr


def _decode(uid: str, ds: Dataset) -> np.ndarray:
    native = _decode_native(ds)
    if native is not None:
        return native
    try:
        return ds.pixel_array
    except Exception as exc:  # pydicom raises several types depending on the plugin state
        ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "(none)")
        name = getattr(pydicom.uid.UID(ts), "name", ts) if ts != "(none)" else ts
        hint = _DECODER_HINTS.get(ts, "a pydicom pixel-data plugin for it (pylibjpeg, python-gdcm)")
        raise SeriesError(
            f"Series {uid}: cannot decode pixel data of instance {ds.get('SOPInstanceUID', '?')} "
            f"(transfer syntax {name} {ts}): {exc}; install {hint}"
        ) from exc


def _fill_hu(uid: str, slices: list[_Slice], rows: int, cols: int) -> np.ndarray:
    hu = np.empty((len(slices), rows, cols), dtype=np.float32)
    cache: dict[int, np.ndarray] = {}
    for z, s in enumerate(slices):
        key = id(s.ds)
        arr = cache.get(key)
        if arr is None:
            arr = _decode(uid, s.ds)
            if s.frame:
                cache[key] = arr
        frame = arr[s.frame - 1] if s.frame and arr.ndim == 3 else arr
        if frame.shape != (rows, cols):
            raise SeriesError(
                f"Series {uid}: instance {s.sop_uid}{_frame_txt(s)} decoded to shape {frame.shape}; "
                f"expected ({rows}, {cols}) grayscale pixels"
            )
        out = hu[z]
        if s.slope != 1.0:
            np.multiply(frame, np.float32(s.slope), out=out, dtype=np.float32)
            out += np.float32(s.intercept)
        else:
            np.add(frame, np.float32(s.intercept), out=out, dtype=np.float32)
    return hu


def _instance_number(ds: Dataset) -> int | None:
    """InstanceNumber (0020,0013) of an instance as an int, None when absent, empty or not a number."""
    value = ds.get("InstanceNumber")
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _ref_dataset(ds: Dataset) -> Dataset:
    cleared = clear_malformed_dates(ds)  # before the copy: copying converts values, and pydicom warns with them
    if cleared:
        _log.warning("malformed_dates_cleared", series_uid=str(ds.get("SeriesInstanceUID", "") or ""),
                     keywords=list(cleared), note="values not logged; the results carry these attributes empty")
    ref = Dataset()
    for elem in ds:
        if elem.tag not in _PIXEL_TAGS:
            ref.add(elem)
    if hasattr(ds, "file_meta"):
        ref.file_meta = ds.file_meta
    return ref


# ----------------------------------------------------------------------------- entry point


def load_series(source: SeriesSource, *, series_uid: str | None = None, min_slices: int = 20,
                max_gap_factor: float = 1.0) -> CtSeries:
    """Load, check and sort one CT series.

    `source` is a directory (searched recursively), an iterable of file paths, or an iterable of
    pydicom Datasets. When it holds several series, pass `series_uid` to pick one.
    `max_gap_factor` > 1 fills gaps of missing slices up to that many times the median spacing
    (module docstring).
    """
    t0 = time.perf_counter()
    groups = group_series(source)
    if not groups:
        raise SeriesError(f"{source!r}: no DICOM instances found; expected the files of one CT series")
    if series_uid is None:
        if len(groups) > 1:
            listing = "; ".join(_describe_series(u, items) for u, items in groups.items())
            raise SeriesError(
                f"{len(groups)} series found ({listing}); expected one series, pass series_uid= to choose"
            )
        series_uid = next(iter(groups))
    elif series_uid not in groups:
        raise SeriesError(f"Series {series_uid}: not among the series found ({', '.join(groups)}); expected one of them")
    uid = series_uid
    items = groups[uid]
    _check_instances(uid, items)
    slices = [s for ds in items for s in _slices_of(ds, uid)]
    _check_consistent(uid, slices)
    slices, removed = _sort_and_deduplicate(uid, slices)
    slice_spacing, gaps = _check_spacing(uid, slices, min_slices, max_gap_factor)
    first = slices[0]
    hu = _fill_hu(uid, slices, first.rows, first.cols)
    positions = np.array([s.normal_position for s in slices], dtype=np.float64)
    image_positions = np.array([s.position for s in slices], dtype=np.float64)
    numbers = [_instance_number(s.ds) for s in slices]
    order: list[int] = list(range(len(slices)))
    interpolated: tuple[bool, ...] = ()
    if gaps:
        grid = bridge(hu, gaps)
        hu, positions, image_positions = grid.hu, grid.along(positions), grid.along(image_positions)
        order, interpolated = list(grid.nearest), grid.interpolated
    ref_ds = first.ds
    series = CtSeries(
        study_instance_uid=str(ref_ds.get("StudyInstanceUID", "") or ""),
        series_instance_uid=uid,
        frame_of_reference_uid=str(ref_ds.get("FrameOfReferenceUID", "") or ""),
        sop_instance_uids=tuple(slices[i].sop_uid for i in order),
        hu=hu,
        pixel_spacing_mm=(float(first.pixel_spacing[0]), float(first.pixel_spacing[1])),
        slice_spacing_mm=float(slice_spacing),
        positions_mm=positions,
        image_orientation=tuple(float(v) for v in first.orientation),
        image_position_first=(float(first.position[0]), float(first.position[1]), float(first.position[2])),
        ref_dataset=_ref_dataset(ref_ds),
        frame_numbers=tuple(slices[i].frame for i in order),
        image_positions=image_positions,
        duplicates_removed=removed,
        instance_numbers=tuple(numbers[i] for i in order),
        gaps=gaps,
        interpolated=interpolated,
    )
    _log.info(
        "series_loaded",
        series_uid=uid,
        slices=len(slices),
        shape=list(hu.shape),
        slice_spacing_mm=round(slice_spacing, 3),
        duplicates_removed=removed,
        missing_slices_filled=series.missing_slices,
        duration_s=round(time.perf_counter() - t0, 3),
    )
    return series

