"""The Key Object Selection (KOS, TID 2010) document that lists the key slices.

The key slices themselves are chosen by `dicom_node.results.key_slices`. The KOS uses the title
"Of Interest" (DCM 113000) by default, or "For Teaching" (DCM 113004)
(`dicom_node.results.codes.KOS_TITLES`), and a description that says it is an AI selection for
research use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset

from dicom_node import RESEARCH_USE_STATEMENT
from dicom_node.results.codes import KOS_TITLES
from dicom_node.results.key_slices import KeySlice
from dicom_node.results.references import source_image_datasets

if TYPE_CHECKING:
    from dicom_node.imaging.series import CtSeries

__all__ = ["KeyObjectError", "build_kos", "hottest_point", "heatmap_hits_embolus"]


class KeyObjectError(ValueError):
    """The key slices cannot make a KOS (unknown title, nothing to list); the message says which."""


def build_kos(
    series: CtSeries,
    key_slices: Sequence[KeySlice],
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int,
    manufacturer: str,
    title: str = "of_interest",
    description: str | None = None,
    observer_device_context: Any = None,
    series_description: str,
) -> Dataset:
    """A Key Object Selection Document listing `key_slices` (same patient and study, own series)."""
    import highdicom as hd

    if title not in KOS_TITLES:
        raise KeyObjectError(f"KOS title {title!r}; expected one of {sorted(KOS_TITLES)}")
    if not key_slices:
        raise KeyObjectError(f"Series {series.series_instance_uid}: no key slices to list in a KOS")
    datasets = {ds.SOPInstanceUID: ds for ds in source_image_datasets(series)}
    refs = [datasets[ks.sop_instance_uid] for ks in key_slices]
    if description is None:
        description = (
            "AI-selected key images: slices with the strongest heatmap in the windows with the highest "
            "attention-weighted PE probability. " + RESEARCH_USE_STATEMENT
        )
    content = hd.ko.KeyObjectSelection(
        document_title=KOS_TITLES[title],
        referenced_objects=refs,
        observer_device_context=observer_device_context,
        description=description[:1024],
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=refs,
        content=content,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
    )
    kos.SeriesDescription = series_description
    return kos


def hottest_point(key_slices: Sequence[KeySlice]) -> tuple[int, int, int]:
    """(z, y, x) of the hottest heatmap pixel over all key slices (original voxel indices)."""
    if not key_slices:
        raise KeyObjectError("no key slices: cannot locate the hottest heatmap point")
    best = max(key_slices, key=lambda ks: (ks.peak, -ks.rank))
    y, x = np.unravel_index(int(np.argmax(best.heatmap)), best.heatmap.shape)
    return best.z, int(y), int(x)


def heatmap_hits_embolus(key_slices: Sequence[KeySlice], embolus_mask: np.ndarray, *, tolerance_px: int = 2) -> bool:
    """True when the hottest heatmap point lies on the embolus mask (dilated by `tolerance_px` in-plane).

    `embolus_mask` is (Z, Y, X) bool in the series' slice order (the phantom's `embolus_mask`).
    """
    from scipy.ndimage import binary_dilation

    mask = np.asarray(embolus_mask, bool)
    z, y, x = hottest_point(key_slices)
    if mask.ndim != 3 or not (0 <= z < mask.shape[0]) or mask.shape[1:] != key_slices[0].heatmap.shape:
        raise KeyObjectError(
            f"embolus mask shape {mask.shape} does not fit the key slices (z={z}, slice {key_slices[0].heatmap.shape}); "
            "pass the mask of the same series"
        )
    plane = mask[z]
    if tolerance_px > 0:
        plane = binary_dilation(plane, iterations=tolerance_px)
    return bool(plane[y, x])
