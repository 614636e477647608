"""What the results say about an incomplete series: the note on filled gaps, and the "not analysed" SR.

Two answers the node gives instead of silence (`[selection] max_gap_factor`, `[results]
not_analysed_sr`; docs/results.md):

* A series analysed over a few missing slices (`CtSeries.gaps`, filled by interpolation) says so in
  its SR: `missing_slices_statement` is a Comment in the Qualitative Evaluations, after the
  research-use statement, e.g. "Analysed with 5 missing slices between -120.0 and 85.0 mm ...".
* A selected series that cannot be analysed (a gap too wide to bridge, too few slices, irregular
  geometry) gets `build_not_analysed_sr`: a short Comprehensive 3D SR whose impression is "Not
  analysed by AI: <the reason in plain words>", then the research-use statement and what to do.
  It has no probabilities or calls: one measurement group (TID 1500 needs one) names the PE finding
  with the Comment "not evaluated", and its evidence lists the received instances. Its UIDs follow the SR scheme (`result_uid("sr", ...)`, same series UID per
  revision), so a complete re-send analysed later is the next revision and names this report as
  its predecessor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as PydicomSequence

from dicom_node import RESEARCH_USE_STATEMENT
from dicom_node.imaging.dates import clear_malformed_dates
from dicom_node.results.codes import (
    COMMENT,
    IMPRESSION,
    PE_FINDING,
    PROCEDURE_CODES,
    QUALITATIVE_EVALUATIONS,
)
from dicom_node.results.sr import BundleInfo, ReportError, device_observer_context, research_sr
from dicom_node.results.uids import result_uid

if TYPE_CHECKING:
    import highdicom as hd

    from dicom_node.imaging.series import CtSeries

__all__ = ["NOT_ANALYSED", "WHAT_TO_DO", "missing_slices_statement", "build_not_analysed_sr"]

#: the first words of a "not analysed" SR's impression
NOT_ANALYSED = "Not analysed by AI"
#: what the reader of a "not analysed" SR can do about it
WHAT_TO_DO = ("No AI result exists for this series. If slices are missing, sending the complete series again "
              "makes the node analyse it; the new report then replaces this one.")


def missing_slices_statement(series: CtSeries) -> str | None:
    """The SR's note on slices filled by interpolation, or None when every slice arrived."""
    if not series.gaps:
        return None
    n = series.missing_slices
    first, last = series.gaps[0], series.gaps[-1]
    where = (f"between {first.from_mm:.1f} and {last.to_mm:.1f} mm along the slice normal"
             + (f" ({len(series.gaps)} gaps)" if len(series.gaps) > 1 else ""))
    return (f"Analysed with {n} missing slice{'s' if n != 1 else ''} {where}, filled by interpolation from the "
            f"neighbouring slices (spacing {series.slice_spacing_mm:.2f} mm); findings there rest on interpolated images.")


def build_not_analysed_sr(
    headers: Sequence[Dataset],
    reason: str,
    bundle_info: Any,
    *,
    series_number: int,
    series_description: str,
    revision: int = 0,
    predecessor: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """A short SR saying the series was not analysed and why (`reason`: plain words, no UIDs).

    `headers`: datasets (pixel data not needed) of the received instances of one series; they give
    the patient and study context and are the SR's evidence. `revision > 0` needs `predecessor`
    (the previous SR, or `dicom_node.results.sr.predecessor_reference`)."""
    import highdicom as hd

    if not headers:
        raise ReportError("no instance headers to report on; a 'not analysed' SR needs the received instances")
    series_uid = str(headers[0].SeriesInstanceUID)
    if revision > 0 and predecessor is None:
        raise ReportError(f"Series {series_uid}: revision {revision} needs predecessor= (the previous SR); "
                          "pass it or use revision=0")
    bundle = BundleInfo.from_manifest(bundle_info)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device_observer_context(bundle)),
        procedure_reported=list(PROCEDURE_CODES),
        imaging_measurements=[_not_evaluated(series_uid, bundle.model_uid, revision)],
    )
    root = report[0]
    statement = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS",
                                           is_content_continuous=False)
    text = f"{NOT_ANALYSED}: {reason}"
    statement.ContentSequence = PydicomSequence([
        hd.sr.TextContentItem(name=IMPRESSION, value=text[:1024], relationship_type="CONTAINS"),
        hd.sr.TextContentItem(name=COMMENT, value=RESEARCH_USE_STATEMENT, relationship_type="CONTAINS"),
        hd.sr.TextContentItem(name=COMMENT, value=WHAT_TO_DO, relationship_type="CONTAINS"),
    ])
    containers = [i for i, item in enumerate(root.ContentSequence) if item.ValueType == "CONTAINER"]
    root.ContentSequence.insert(containers[0] if containers else len(root.ContentSequence), statement)
    evidence = list({str(h.SOPInstanceUID): _evidence(h) for h in headers}.values())
    return research_sr(root, evidence, series_uid, bundle, revision=revision, series_number=series_number,
                       series_description=series_description, predecessor=predecessor)


def _not_evaluated(series_uid: str, model_uid: str, revision: int) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The one measurement group TID 1500 needs: the PE finding with no measurement, marked not evaluated."""
    import highdicom as hd

    tracking = "not_analysed"
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=result_uid("tracking", series_uid, model_uid, revision, tracking), identifier=tracking),
        finding_type=PE_FINDING,
    )
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=COMMENT, relationship_type="CONTAINS", value="not evaluated: the series was not analysed"))
    return group


def _evidence(header: Dataset) -> Dataset:
    """The header without pixel data (evidence needs the UIDs and the patient/study context only); the
    patient and study attributes an SR must carry (type 2) are added empty where the sender left them out."""
    clear_malformed_dates(header)  # a birth date such as 19O10203 would make highdicom refuse the SR
    ds = Dataset()
    for elem in header:
        if elem.keyword not in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
            ds.add(elem)
    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


#: patient/study attributes highdicom copies from the first evidence dataset into the SR
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")
