"""Which completed series to analyse: configurable rules over the spooled headers.

`select_series` reads one header (no pixel data) and the instance count, and returns a
`SelectionDecision` whose `reason` says, in words, which rule skipped the series.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pydicom

from dicom_node.config import SelectionConfig

__all__ = ["SelectionDecision", "SeriesHeader", "select_series", "read_header"]

_DOSE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.68",  # Radiopharmaceutical Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.7",      # Secondary Capture (dose screens)
}


@dataclass(frozen=True)
class SeriesHeader:
    """The attributes the rules look at (no PHI)."""

    sop_class_uid: str
    modality: str
    image_type: tuple[str, ...]
    slice_thickness_mm: float | None
    series_description: str
    contrast_agent: str
    n_slices: int


@dataclass(frozen=True)
class SelectionDecision:
    selected: bool
    reason: str
    #: skipped only for too few slices (the series passes every other rule): an incomplete CTPA, which
    #: the node answers with a "not analysed" SR when `[results] not_analysed_sr` is on
    incomplete: bool = False


def read_header(paths: list[Path]) -> SeriesHeader:
    """Header of the first instance (pixel data not read) plus the number of slices in the series."""
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    n = len(paths)
    if len(paths) == 1 and int(ds.get("NumberOfFrames", 1) or 1) > 1:
        n = int(ds.NumberOfFrames)
    thickness = ds.get("SliceThickness")
    if thickness is None and "SharedFunctionalGroupsSequence" in ds:
        try:
            thickness = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness
        except (AttributeError, IndexError):
            thickness = None
    return SeriesHeader(
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        modality=str(ds.get("Modality", "")),
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
        slice_thickness_mm=float(thickness) if thickness not in (None, "") else None,
        series_description=str(ds.get("SeriesDescription", "")),
        contrast_agent=str(ds.get("ContrastBolusAgent", "") or ""),
        n_slices=n,
    )


def select_series(h: SeriesHeader, rules: SelectionConfig) -> SelectionDecision:
    """Apply the rules in a fixed order; the first that fails gives the skip reason."""
    if h.sop_class_uid in _DOSE_CLASSES or "DOSE" in h.series_description.upper() and "REPORT" in h.series_description.upper():
        return SelectionDecision(False, "dose report")
    if "LOCALIZER" in h.image_type:
        return SelectionDecision(False, "localizer (ImageType LOCALIZER)")
    if rules.modality and h.modality != rules.modality:
        return SelectionDecision(False, f"Modality {h.modality!r} is not {rules.modality!r}")
    missing = [v for v in rules.image_type if v.upper() not in h.image_type]
    if missing:
        return SelectionDecision(False, f"ImageType {'/'.join(h.image_type) or '(none)'} lacks {'/'.join(missing)}")
    if h.slice_thickness_mm is None:
        return SelectionDecision(False, "SliceThickness missing")
    if not rules.min_slice_thickness_mm <= h.slice_thickness_mm <= rules.max_slice_thickness_mm:
        return SelectionDecision(False, f"SliceThickness {h.slice_thickness_mm:g} mm outside "
                                        f"{rules.min_slice_thickness_mm:g}-{rules.max_slice_thickness_mm:g} mm")
    desc = h.series_description
    if rules.description_include and not any(re.search(p, desc, re.I) for p in rules.description_include):
        return SelectionDecision(False, f"SeriesDescription {desc!r} matches no description_include pattern")
    for p in rules.description_exclude:
        if re.search(p, desc, re.I):
            return SelectionDecision(False, f"SeriesDescription {desc!r} matches description_exclude {p!r}")
    if rules.require_contrast and not h.contrast_agent.strip():
        return SelectionDecision(False, "no ContrastBolusAgent (require_contrast=true)")
    if h.n_slices < rules.min_slices:  # last: every other rule says this is the series to analyse
        return SelectionDecision(False, f"{h.n_slices} slices, fewer than min_slices={rules.min_slices}", incomplete=True)
    return SelectionDecision(True, "selected")
