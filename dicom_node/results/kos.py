"""The Key Object Selection (KOS, TID 2010) document that lists the key slices.

The key slices themselves are chosen by `dicom_node.results.key_slices`. The KOS uses the title
"Of Interest" (DCM 113000) by default, or "For Teaching" (DCM 113004)
(`dicom_node.results.codes.KOS_TITLES`), and a description that says it is an AI selection for
research use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset

from dicom_node import RESEARCH_USE_STATEMENT
from dicom_node.results.codes import KOS_TITLES
from dicom_node.results.key_slices import KeySlice
from dicom_node.results.references import source_image_datasets

if TYPE_CHECKING:
    from dicom_node.imaging.series import CtSeries

__all__ = ["KeyObjectError", "build_kos"]


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
    images = source_image_datasets(series)  # per slice z; key slices are received slices (not interpolated)
    refs = [images[ks.z] for ks in key_slices]
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
