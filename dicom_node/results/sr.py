"""The findings as a Comprehensive 3D SR, TID 1500 Measurement Report (highdicom), built around the clinical statement.

Structure, in reading order (what dsr2html, OHIF or 3D Slicer show top to bottom)::

    Imaging Measurement Report (DCM 126000)                          CONTAINER, TID 1500
      Language of Content = English
      Observer Type = Device; Device Observer UID / Name "dicom-node PE" / Manufacturer /
        Model Name = bundle name / Serial Number = bundle version
      Procedure Reported = LN 24627-2 "CT Chest" and 99PENODE CTPA "CT pulmonary angiography"
      Qualitative Evaluations (UMLS C0034375)
        Impression (DCM 121073) = "AI suggests pulmonary embolism: present, central and right, acute;
                                   RV/LV ratio >= 1 likely"  |  "AI suggests no pulmonary embolism; ..."
        Comment (DCM 121106) = dicom_node.RESEARCH_USE_STATEMENT
        Comment = "Analysed with N missing slices between ... mm ..." (only when slices were missing and
                  filled: dicom_node.results.incomplete.missing_slices_statement)
      Image Library (TID 1600): one group, an entry (no descriptors) per key slice: the only images
        the content references
      Imaging Measurements
        Measurement Group "pulmonary_embolism"                         TID 1501
          Tracking Identifier / Tracking Unique Identifier (deterministic)
          Finding = SCT 59282003 Pulmonary embolism
          Finding Site = Pulmonary trunk / Left / Right pulmonary artery  (each location called present)
          Algorithm Name / Version / Parameters (TID 4019)
          Probability (DCM 122157) / Threshold Value (DCM 122411) of pe_present_on_window
          Probability / Threshold Value {Finding Site = site} of central_pe, leftsided_pe, rightsided_pe
          Probability / Threshold Value {PE acuity = Chronic | Acute on chronic} of chronic_pe,
            acute_and_chronic_pe
          Pulmonary embolism = Present (SCT 52101004) | Absent (SCT 272519000)
          PE acuity = Acute | Chronic | Acute on chronic             (PE present only)
          Source images = the key slices
        Measurement Group "pulmonary_embolism region k" (x key slices in a positive window; PE present only)
          Tracking Identifier / Tracking Unique Identifier            TID 1410
          Image Region = SCOORD POINT (column, row) at the hottest heatmap pixel of the key slice,
            SELECTED FROM that slice
          Finding = Pulmonary embolism
          Probability = the window's PE probability, INFERRED FROM the same POINT; Threshold Value
        Measurement Group "rv_lv_ratio_gte_1" / "rv_lv_ratio_lt_1"   Finding = RV/LV diameter ratio >= 1 / < 1
          Probability / Threshold Value; <finding> = Present | Absent
        Measurement Group "exam_quality"                             Finding = DCM 111101 Image Quality
          Probability / Threshold Value of indeterminate; Image Quality = Indeterminate | Diagnostic quality
        Measurement Group "negative_exam_for_pe"                     Finding = 99PENODE NEGEXAM
          Probability / Threshold Value; Negative exam for PE = Present | Absent

Every label keeps its probability, threshold and call; `dicom_node.results.codes.LABEL_CODING` says
where each one lives (group, NUM modifier, the CODE item that means "present"), and the demo's
reader (`dicom_node.tools.demo.read_findings`) reads it back with the same table. The TID 1500
rows are all present; the Qualitative Evaluations container comes before the Image Library so
that a reader meets the impression and the research-use statement before any image reference.

VerificationFlag UNVERIFIED, CompletionFlag PARTIAL, PreliminaryFlag PRELIMINARY. Evidence
(CurrentRequestedProcedureEvidenceSequence) lists every analysed slice; the Image Library only
the images the content tree references. A private code (scheme 99PENODE, declared in the
CodingSchemeIdentificationSequence) only where no DCMR code was found: docs/results.md lists
every code with its source.

UIDs are deterministic (`dicom_node.results.uids.result_uid`): the same source series, model UID, revision and object
kind always give the same UID (tracking UIDs too), so a re-run replaces rather than duplicates;
revision > 0 adds a Predecessor Documents Sequence pointing at the previous SR.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.uid import Comprehensive3DSRStorage

from dicom_node import RESEARCH_USE_STATEMENT, __version__
from dicom_node.labels import ALL_LABELS, WINDOW_LABEL, consistency_violations
from dicom_node.results.codes import (
    ABSENT,
    ACUTE,
    ACUTE_ON_CHRONIC,
    CHRONIC,
    COMMENT,
    DIAGNOSTIC_QUALITY,
    FINDING_GROUPS,
    FINDING_SITE,
    IMAGE_LIBRARY_ENTRY,
    IMPRESSION,
    INDETERMINATE,
    LABEL_CODING,
    PE_ACUITY,
    PE_FINDING,
    PROBABILITY,
    PROBABILITY_UNIT,
    PROCEDURE_CODES,
    QUALITATIVE_EVALUATIONS,
    THRESHOLD,
    private_scheme_item,
)
from dicom_node.results.sc import NOT_VALIDATED
from dicom_node.results.uids import result_uid

if TYPE_CHECKING:
    import highdicom as hd

    from dicom_node.imaging.preprocess import Windows
    from dicom_node.imaging.series import CtSeries
    from dicom_node.model.bundle import LabelValidation
    from dicom_node.model.inference import Prediction
    from dicom_node.results.key_slices import KeySlice

__all__ = [
    "DEVICE_NAME",
    "MANUFACTURER",
    "BundleInfo",
    "ReportError",
    "algorithm_identification",
    "build_sr",
    "check_prediction",
    "device_observer_context",
    "image_library",
    "impression",
    "labels_not_validated",
    "not_validated_comment",
    "predecessor_reference",
    "region_point",
    "research_sr",
]

DEVICE_NAME = "dicom-node PE"
MANUFACTURER = "dicom-node (research)"


class ReportError(ValueError):
    """The inputs cannot make a valid report; the message names the series, the value and the fix."""


@dataclass(frozen=True)
class BundleInfo:
    """What the results say about the model: from the bundle manifest (`BundleInfo.from_manifest`)."""

    name: str
    version: str
    model_uid: str
    manufacturer: str = MANUFACTURER
    parameters: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, manifest: Any) -> BundleInfo:
        """Accept a BundleInfo, a manifest object with name/version/model_uid attributes, or a dict."""
        if isinstance(manifest, BundleInfo):
            return manifest

        def get(key: str, default: Any = None) -> Any:
            if isinstance(manifest, Mapping):
                return manifest.get(key, default)
            return getattr(manifest, key, default)

        missing = [k for k in ("name", "version", "model_uid") if not get(k)]
        if missing:
            raise ReportError(f"bundle manifest lacks {missing}; expected name, version and model_uid")
        params = tuple(str(p) for p in (get("parameters") or ()))
        return cls(name=str(get("name")), version=str(get("version")), model_uid=str(get("model_uid")),
                   manufacturer=str(get("manufacturer") or MANUFACTURER), parameters=params)

    @classmethod
    def from_prediction(cls, prediction: Prediction) -> BundleInfo:
        return cls(name=prediction.model_name, version=prediction.model_version, model_uid=prediction.model_uid)


def predecessor_reference(study_uid: str, source_series_uid: str, model_uid: str, revision: int,
                          sop_instance_uid: str) -> Dataset:
    """A minimal dataset that stands for the SR of result revision `revision - 1` (for `predecessor=`).

    Only its SOP Instance UID needs to be known (the job's stored result UID): its series UID
    follows from the UID scheme.
    """
    if revision < 1:
        raise ReportError(f"revision {revision} has no predecessor; expected revision >= 1")
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = result_uid("sr-series", source_series_uid, model_uid, revision - 1)
    ds.SOPInstanceUID, ds.SOPClassUID = sop_instance_uid, Comprehensive3DSRStorage
    return ds


def check_prediction(series: CtSeries, prediction: Prediction) -> None:
    """Raise ReportError when the prediction does not belong to the series or breaks the RSNA rules."""
    if prediction.series_instance_uid != series.series_instance_uid:
        raise ReportError(
            f"Prediction is for series {prediction.series_instance_uid} but the CT series is "
            f"{series.series_instance_uid}; report on the series that was analysed"
        )
    labels = {k: bool(v) for k, v in prediction.labels.items()}
    # a bundle reports the labels it predicts: all ten (ma2022) or the window label alone (shi2020)
    expected = ALL_LABELS if prediction.family == "ma2022" else (WINDOW_LABEL,)
    missing = [k for k in expected if k not in labels or (k != WINDOW_LABEL and k not in prediction.study_probs)
               or k not in prediction.thresholds]
    if missing:
        raise ReportError(f"Series {series.series_instance_uid}: prediction lacks labels/probabilities/thresholds {missing}")
    broken = consistency_violations(np.asarray(prediction.window_positive, bool), labels) if expected == ALL_LABELS else []
    if broken:
        raise ReportError(
            f"Series {series.series_instance_uid}: labels break the RSNA consistency rules ({'; '.join(broken)}); "
            "apply dicom_node.labels.make_consistent before reporting"
        )
    if labels[WINDOW_LABEL] != bool(np.any(prediction.window_positive)):
        raise ReportError(
            f"Series {series.series_instance_uid}: label {WINDOW_LABEL}={labels[WINDOW_LABEL]} disagrees with "
            f"window_positive (any={bool(np.any(prediction.window_positive))}); take both from make_consistent"
        )


def device_observer_context(bundle: BundleInfo) -> hd.sr.ObserverContext:
    import highdicom as hd
    from pydicom.sr.codedict import codes

    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("device", "", bundle.model_uid),
            name=DEVICE_NAME,
            manufacturer_name=bundle.manufacturer,
            model_name=bundle.name[:64],
            serial_number=bundle.version[:64],
        ),
    )


def algorithm_identification(bundle: BundleInfo, prediction: Prediction) -> hd.sr.AlgorithmIdentification:
    import highdicom as hd

    params = [f"model_uid={bundle.model_uid}", f"execution_provider={prediction.execution_provider}",
              f"dicom_node={__version__}", *bundle.parameters]
    return hd.sr.AlgorithmIdentification(name=bundle.name, version=bundle.version, parameters=params,
                                         manufacturer=bundle.manufacturer)


def build_sr(
    series: CtSeries,
    windows: Windows,
    prediction: Prediction,
    *,
    bundle_manifest_info: Any = None,
    key_slices: Sequence[KeySlice] | None = None,
    k: int = 3,
    series_number: int,
    series_description: str,
    revision: int = 0,
    predecessor: Dataset | None = None,
    institution_name: str | None = None,
    validation: LabelValidation | None = None,
    omit_weak_labels: bool = False,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Comprehensive 3D SR for one analysed CT series.

    Parameters
    ----------
    key_slices
        From `dicom_node.results.key_slices.select_key_slices`: referenced as source images of the PE
        measurement group (and its regions); when omitted the top-`k` are selected here.
    predecessor
        The earlier SR dataset, or `predecessor_reference(...)`; required when `revision > 0`.
    validation
        The bundle's weak labels (`dicom_node.model.bundle.label_validation_of`). A group holding a
        weak label says so in a Comment ("low confidence, not validated"); unknown validation is
        stated once, after the research-use statement.
    omit_weak_labels
        Leave the weak labels' probabilities (and groups left empty by that) out of the report; the
        PE label itself is never left out, only marked. The statement names what was left out.
    """
    import highdicom as hd

    from dicom_node.results.key_slices import select_key_slices
    from dicom_node.results.references import source_image_datasets

    bundle = BundleInfo.from_prediction(prediction) if bundle_manifest_info is None else BundleInfo.from_manifest(
        bundle_manifest_info)
    if bundle.model_uid != prediction.model_uid:
        raise ReportError(
            f"Series {series.series_instance_uid}: prediction came from model {prediction.model_uid} but the bundle "
            f"info names {bundle.model_uid}; pass the manifest of the bundle that ran"
        )
    check_prediction(series, prediction)
    if revision > 0 and predecessor is None:
        raise ReportError(
            f"Series {series.series_instance_uid}: revision {revision} needs predecessor= (the previous SR); "
            "pass it or use revision=0"
        )
    if key_slices is None:
        key_slices = select_key_slices(series, windows, prediction, k=k)

    images = source_image_datasets(series)  # evidence: every analysed slice (built once per series)
    sop_class = images[0].SOPClassUID
    library = [images[z] for z in dict.fromkeys(ks.z for ks in key_slices)]  # the images the content references
    algo = algorithm_identification(bundle, prediction)
    labels = {k: bool(v) for k, v in prediction.labels.items()}
    track = _TrackingUids(series.series_instance_uid, bundle.model_uid, revision)
    sources = [hd.sr.SourceImageForMeasurementGroup(sop_class, ks.sop_instance_uid) for ks in key_slices]
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations]
    groups = []
    weak = set(validation.weak or ()) if validation is not None else set()
    floor = validation.floor if validation is not None else 0.0
    left_out = {label for label in weak if omit_weak_labels and label != WINDOW_LABEL}
    for finding, (tracking, _main) in FINDING_GROUPS.items():
        members = [label for label in ALL_LABELS if LABEL_CODING[label].finding == finding and label not in left_out
                   and label in labels]  # only the labels the bundle predicts (no RV/LV group from a shi2020 model)
        if not members:
            continue  # every label of this finding is weak and left out
        group = _finding_group(finding, tracking, prediction, labels, algo, track,
                               sources if finding == PE_FINDING else None, members)
        marked = [label for label in members if label in weak]
        if marked:
            group[0].ContentSequence.append(hd.sr.TextContentItem(
                name=COMMENT, relationship_type="CONTAINS", value=not_validated_comment(floor, marked)))
        groups.append(group)
        if finding == PE_FINDING and labels[WINDOW_LABEL]:
            positive = np.asarray(prediction.window_positive, bool)
            groups += [_region_group(ks, sop_class, prediction, track) for ks in key_slices
                       if positive[ks.window_index]]

    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device_observer_context(bundle)),
        procedure_reported=list(PROCEDURE_CODES),
        imaging_measurements=groups,
    )
    root = report[0]
    statement = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS",
                                           is_content_continuous=False)  # two statements, not one text
    statement.ContentSequence = PydicomSequence([
        hd.sr.TextContentItem(name=IMPRESSION, value=impression(labels), relationship_type="CONTAINS"),
        hd.sr.TextContentItem(name=COMMENT, value=RESEARCH_USE_STATEMENT, relationship_type="CONTAINS"),
        *(hd.sr.TextContentItem(name=COMMENT, value=text, relationship_type="CONTAINS")
          for text in [*_missing_slices(series), *weak_label_statements(validation, omit_weak_labels)]),
    ])
    # reading order: the statement right after the procedure reported, then the Image Library
    first_container = next(i for i, item in enumerate(root.ContentSequence) if item.ValueType == "CONTAINER")
    root.ContentSequence.insert(first_container, statement)
    root.ContentSequence.insert(first_container + 1, image_library(library))

    # slices interpolated over a gap are no instances
    return research_sr(root, [images[z] for z in series.received_indices], series.series_instance_uid, bundle,
                       revision=revision, series_number=series_number, series_description=series_description,
                       predecessor=predecessor, institution_name=institution_name)


def research_sr(content: Any, evidence: Sequence[Dataset], series_uid: str, bundle: BundleInfo, *, revision: int,
                series_number: int, series_description: str, predecessor: Any = None,
                institution_name: str | None = None) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR around `content` (a TID 1500 root) that every report of the node is: its UIDs
    derived from the source series, model and revision, never complete, final or verified (research use), the
    previous revision named when there is one, the node's and the model's versions in SoftwareVersions.
    `build_sr` (an analysed series) and `build_not_analysed_sr` (a refused one) both end here."""
    import highdicom as hd

    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=content,
        series_instance_uid=result_uid("sr-series", series_uid, bundle.model_uid, revision),
        series_number=series_number,
        sop_instance_uid=result_uid("sr", series_uid, bundle.model_uid, revision),
        instance_number=1,
        manufacturer=bundle.manufacturer,
        institution_name=institution_name,
        is_complete=False,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        performed_procedure_codes=[PROCEDURE_CODES[0]],
    )
    sr.SeriesDescription = series_description[:64]
    sr.ManufacturerModelName = bundle.name[:64]
    # a multi-valued LO: the pydicom stubs type the keyword as one string
    sr.SoftwareVersions = [f"dicom-node {__version__}", f"{bundle.name} {bundle.version}"[:64]]  # type: ignore[assignment]
    sr.CodingSchemeIdentificationSequence = [private_scheme_item()]
    return sr


def _missing_slices(series: CtSeries) -> list[str]:
    from dicom_node.results.incomplete import missing_slices_statement

    note = missing_slices_statement(series)
    return [note] if note else []


def not_validated_comment(floor: float, labels: Sequence[str]) -> str:
    """The Comment of a finding group whose `labels` are weak (validation AUROC below `floor`); read back by
    `labels_not_validated`."""
    return f"{NOT_VALIDATED} (validation AUROC below {floor:.2f}): " + ", ".join(labels)


def labels_not_validated(comment: str) -> list[str]:
    """The labels a `not_validated_comment` names; [] for any other comment."""
    if not comment.startswith(NOT_VALIDATED) or "): " not in comment:
        return []
    return [label.strip() for label in comment.split("): ", 1)[1].split(",") if label.strip()]


def weak_label_statements(validation: LabelValidation | None, omit_weak_labels: bool) -> list[str]:
    """The document-level Comments on label validation, after the research-use statement."""
    if validation is None:
        return []
    if not validation.known:
        return ["label validation unknown: the bundle records no validation AUROC"]
    if not validation.weak:
        return []
    floor = f"{validation.floor:.2f}"
    out = [f"low-confidence outputs, not validated (validation AUROC below {floor}): {', '.join(validation.weak)}"]
    left_out = [label for label in validation.weak if omit_weak_labels and label != WINDOW_LABEL]
    if left_out:
        out.append(f"left out of this report as configured ([results] omit_weak_labels): {', '.join(left_out)}")
    return out


def image_library(datasets: Sequence[Dataset]) -> hd.sr.ContainerContentItem:
    """TID 1600 Image Library: one Image Library Group with an IMAGE entry (TID 1601) per dataset.

    The entries carry no Image Library Entry Descriptors (TID 1602: optional at group and entry
    level); a viewer finds each image's geometry in the image itself, which is in the same study.
    highdicom's `ImageLibrary` writes some 17 descriptors per entry.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    group = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibraryGroup, relationship_type="CONTAINS")
    group.ContentSequence = hd.sr.ContentSequence([
        hd.sr.ImageContentItem(name=IMAGE_LIBRARY_ENTRY, referenced_sop_class_uid=ds.SOPClassUID,
                               referenced_sop_instance_uid=ds.SOPInstanceUID, relationship_type="CONTAINS")
        for ds in datasets])
    library = hd.sr.ContainerContentItem(name=codes.DCM.ImageLibrary, relationship_type="CONTAINS")
    library.ContentSequence = hd.sr.ContentSequence([group])
    return library


@dataclass(frozen=True)
class _TrackingUids:
    source_series_uid: str
    model_uid: str
    revision: int

    def __call__(self, identifier: str) -> hd.sr.TrackingIdentifier:
        import highdicom as hd

        uid = result_uid("tracking", self.source_series_uid, self.model_uid, self.revision, identifier)
        return hd.sr.TrackingIdentifier(uid=uid, identifier=identifier)


def impression(labels: Mapping[str, bool]) -> str:
    """The one-line reading at the top of the SR, from the (consistent) label calls.

    PE present: "AI suggests pulmonary embolism: present, <central / left / right joined by 'and'>,
    <acute | chronic | acute on chronic>; RV/LV ratio >= 1 likely" (or "< 1 likely"); otherwise
    "AI suggests no pulmonary embolism; exam quality adequate", or "...; exam indeterminate
    (quality not adequate to exclude pulmonary embolism)" when the exam is called indeterminate.
    """
    if WINDOW_LABEL in labels and len(labels) == 1:  # a model that predicts PE present only (shi2020)
        return "AI suggests pulmonary embolism: present" if labels[WINDOW_LABEL] else "AI suggests no pulmonary embolism"
    if labels[WINDOW_LABEL]:
        sites = [name for label, name in (("central_pe", "central"), ("leftsided_pe", "left"),
                                          ("rightsided_pe", "right")) if labels[label]]
        acuity = ("chronic" if labels["chronic_pe"] else "acute on chronic" if labels["acute_and_chronic_pe"]
                  else "acute")
        parts = ["present", *([" and ".join(sites)] if sites else []), acuity]
        text = "AI suggests pulmonary embolism: " + ", ".join(parts)
        if labels["rv_lv_ratio_gte_1"]:
            text += "; RV/LV ratio >= 1 likely"
        elif labels["rv_lv_ratio_lt_1"]:
            text += "; RV/LV ratio < 1 likely"
        return text
    if labels["indeterminate"]:
        return "AI suggests no pulmonary embolism; exam indeterminate (quality not adequate to exclude pulmonary embolism)"
    return "AI suggests no pulmonary embolism; exam quality adequate"


def region_point(ks: KeySlice) -> tuple[float, float]:
    """(column, row) image coordinates of the centre of the key slice's hottest heatmap pixel.

    DICOM SCOORD convention (PS3.3 C.18.6.1.1): the top left corner of the top left pixel is
    (0, 0), so the centre of pixel (row r, column c) is (c + 0.5, r + 0.5).
    """
    row, col = ks.hottest_point
    return col + 0.5, row + 0.5


def _probability_pair(label: str, prediction: Prediction, probs: Mapping[str, float]) -> list[hd.sr.Measurement]:
    """Probability and Threshold Value NUMs of one label, with its HAS CONCEPT MOD (`LabelCoding.modifier`)."""
    import highdicom as hd

    coding = LABEL_CODING[label]
    site = [hd.sr.FindingSite(coding.modifier[1])] if coding.modifier and coding.modifier[0] == FINDING_SITE else None
    out = [hd.sr.Measurement(name=name, value=round(float(value), 6), unit=PROBABILITY_UNIT, finding_sites=site)
           for name, value in ((PROBABILITY, probs[label]), (THRESHOLD, prediction.thresholds[label]))]
    if coding.modifier and coding.modifier[0] != FINDING_SITE:
        for m in out:
            item = m[0]
            if "ContentSequence" not in item:
                item.ContentSequence = hd.sr.ContentSequence()
            item.ContentSequence.append(hd.sr.CodeContentItem(name=coding.modifier[0], value=coding.modifier[1],
                                                              relationship_type="HAS CONCEPT MOD"))
    return out


def _finding_group(finding: Any, tracking: str, prediction: Prediction, labels: Mapping[str, bool],
                   algo: hd.sr.AlgorithmIdentification, track: _TrackingUids,
                   sources: list[hd.sr.SourceImageForMeasurementGroup] | None,
                   members: Sequence[str]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of one finding: its `members` (the labels coded under it, `LABEL_CODING`)."""
    import highdicom as hd

    probs = prediction.label_probabilities()
    measurements = [m for label in members for m in _probability_pair(label, prediction, probs)]
    sites, evaluations = [], []
    for label in members:
        name, value = LABEL_CODING[label].present
        if name == FINDING_SITE:
            if labels[label]:
                sites.append(hd.sr.FindingSite(value))
        elif name != PE_ACUITY:
            negative = DIAGNOSTIC_QUALITY if value == INDETERMINATE else ABSENT
            evaluations.append(hd.sr.QualitativeEvaluation(name=name, value=value if labels[label] else negative))
    if finding == PE_FINDING and labels[WINDOW_LABEL] and "chronic_pe" in labels:  # acuity only when predicted
        acuity = CHRONIC if labels["chronic_pe"] else ACUTE_ON_CHRONIC if labels["acute_and_chronic_pe"] else ACUTE
        evaluations.append(hd.sr.QualitativeEvaluation(name=PE_ACUITY, value=acuity))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=track(tracking),
        finding_type=finding,
        finding_sites=sites or None,
        algorithm_id=algo,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=sources,
    )


def _region_group(ks: KeySlice, sop_class: str, prediction: Prediction,
                  track: _TrackingUids) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 group of one key slice: a POINT at its hottest heatmap pixel, the window's probability."""
    import highdicom as hd

    point = np.array([region_point(ks)], dtype=np.float64)
    source = hd.sr.SourceImageForRegion(sop_class, ks.sop_instance_uid)
    probability = hd.sr.Measurement(name=PROBABILITY, value=round(ks.window_probability, 6), unit=PROBABILITY_UNIT)
    threshold = hd.sr.Measurement(name=THRESHOLD, value=round(float(prediction.thresholds[WINDOW_LABEL]), 6),
                                  unit=PROBABILITY_UNIT)
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=track(f"{FINDING_GROUPS[PE_FINDING][0]} region {ks.rank + 1}"),
        referenced_region=hd.sr.ImageRegion("POINT", point, source),
        finding_type=PE_FINDING,  # the algorithm is named once, in the PE finding group this region belongs to
        measurements=[probability, threshold],
    )
    # The probability is also INFERRED FROM the same POINT (TID 300 row "Image or Spatial Coordinates"):
    # OHIF's adapters take a TID 1410 group's geometry from its first NUM. highdicom's TID 1410 API does
    # not take coordinates on a measurement, so the item is added to the NUM here.
    num = next(item for item in group[0].ContentSequence
               if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == PROBABILITY.value)
    if "ContentSequence" not in num:
        num.ContentSequence = hd.sr.ContentSequence()
    num.ContentSequence.append(hd.sr.CoordinatesForMeasurement("POINT", point, source))
    return group
