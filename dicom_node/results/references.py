"""Header-only datasets that stand for the slices of the analysed CT series in every result object.

The SR's image library and evidence, the KOS's references and each heatmap SC's source image are
built from these, so all of them name the same SOP instances with the same geometry.

`source_image_datasets` builds them once per `CtSeries` object (later calls for the same object,
e.g. the SR's evidence and the KOS, get the same list back while the series is alive); treat the
datasets as read-only.
"""

from __future__ import annotations

import copy
import weakref
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset

if TYPE_CHECKING:
    from dicom_node.imaging.series import CtSeries

__all__ = ["source_image_dataset", "source_image_datasets"]

#: id(series) -> (weak reference to that series, its datasets); an entry leaves when its series is collected
_BUILT: dict[int, tuple[weakref.ref[CtSeries], list[Dataset]]] = {}


def source_image_datasets(series: CtSeries) -> list[Dataset]:
    """Header-only datasets of every slice of the series (for evidence lists and image libraries).

    Built from `series.ref_dataset` (slice 0) with each slice's SOP Instance UID, instance number
    and ImagePositionPatient (slice 0 position moved along the slice normal by `positions_mm`).
    The header is copied once; the per-slice datasets share its unchanged elements (read-only).
    Built once per series object: a second call for the same series returns the same list.
    """
    key = id(series)
    hit = _BUILT.get(key)
    if hit is not None and hit[0]() is series:
        return hit[1]
    base = _copy_header(series.ref_dataset)
    positions = _positions(series)
    datasets = [_slice_dataset(series, z, base, positions[z]) for z in range(len(series.sop_instance_uids))]
    _BUILT[key] = (weakref.ref(series, _Forget(key)), datasets)
    return datasets


class _Forget:
    """Weak-reference callback: drop the datasets of a collected series."""

    def __init__(self, key: int) -> None:
        self.key = key

    def __call__(self, _ref: weakref.ref[CtSeries]) -> None:
        _BUILT.pop(self.key, None)


def source_image_dataset(series: CtSeries, z: int, *, base: Dataset | None = None) -> Dataset:
    """Header-only dataset of slice `z` (see `source_image_datasets`)."""
    base = _copy_header(series.ref_dataset) if base is None else base
    return _slice_dataset(series, z, base, _positions(series)[z])


def _positions(series: CtSeries) -> np.ndarray:
    """(Z, 3) ImagePositionPatient of every slice: slice 0's moved along the normal by `positions_mm`."""
    row, col = np.array(series.image_orientation[:3], float), np.array(series.image_orientation[3:], float)
    normal = np.cross(row, col)
    first = np.array(series.image_position_first, float)
    pos = np.asarray(series.positions_mm, float)
    return first[None, :] + normal[None, :] * (pos - pos[0])[:, None]


def _slice_dataset(series: CtSeries, z: int, base: Dataset, position: np.ndarray) -> Dataset:
    ds = Dataset(dict(base._dict))  # own mapping over the shared elements; the ones set below are new objects
    ds.add_new(0x00080018, "UI", series.sop_instance_uids[z])  # SOPInstanceUID
    ds.add_new(0x00200013, "IS", _instance_number(series, z))  # InstanceNumber: the source's own
    ds.add_new(0x00200032, "DS", [float(v) for v in position])  # ImagePositionPatient
    ds.add_new(0x0020000E, "UI", series.series_instance_uid)  # SeriesInstanceUID
    ds.add_new(0x0020000D, "UI", series.study_instance_uid)  # StudyInstanceUID
    if "FrameOfReferenceUID" not in ds and series.frame_of_reference_uid:
        ds.add_new(0x00200052, "UI", series.frame_of_reference_uid)
    return ds


def _instance_number(series: CtSeries, z: int) -> int:
    """The slice's own InstanceNumber as received; z + 1 only for a source that had none."""
    numbers = series.instance_numbers
    own = numbers[z] if z < len(numbers) else None
    return z + 1 if own is None else int(own)


def _copy_header(ref: Dataset) -> Dataset:
    ds = Dataset()
    for elem in ref:
        if elem.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            ds.add(copy.deepcopy(elem))
    return ds
