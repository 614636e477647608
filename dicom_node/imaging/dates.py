"""Malformed dates and times in a header are cleared, not copied: the results are still made.

Scanners and RIS interfaces write dates such as `19O10203`, `1950` or `19500000` (PatientBirthDate
above all). highdicom refuses to copy such a value into an SR or Secondary Capture (the job would
fail and no result would reach the radiologist), and pydicom names the raw value in its warnings.
`clear_malformed_dates(ds)` empties every top-level DA, DT and TM element that pydicom cannot parse
(the element stays, empty: these are type 2 in the result objects, "unknown") and returns the
keywords it cleared, never the values. The raw bytes are read without conversion, so no warning
naming the value is raised here.
"""

from __future__ import annotations

import warnings

from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

__all__ = ["clear_malformed_dates"]

_PARSERS = {"DA": DA, "DT": DT, "TM": TM}


def _text(elem: DataElement | RawDataElement) -> str | None:
    value = elem.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").rstrip("\x00 ")
    return None if value is None else str(value)


def clear_malformed_dates(ds: Dataset) -> tuple[str, ...]:
    """Empty the DA/DT/TM elements of `ds` (top level) whose value does not parse; return their keywords."""
    cleared = []
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        vr = getattr(raw, "VR", None)
        parse = _PARSERS.get(str(vr))
        if parse is None:
            continue
        text = _text(raw)
        if not text:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for part in text.split("\\"):
                    if part:
                        parse(part)
        except (ValueError, TypeError, OverflowError):
            ds[tag] = DataElement(tag, str(vr), "")
            cleared.append(keyword_for_tag(tag) or f"({tag.group:04X},{tag.element:04X})")
    return tuple(cleared)
