"""The findings as a Comprehensive 3D SR, TID 1500 Measurement Report (highdicom).

Structure (what a TID 1500 viewer such as OHIF or 3D Slicer shows)::

    Imaging Measurement Report (DCM 126000)                          CONTAINER, TID 1500
      Language of Content = English
      Observer Type = Device; Device Observer UID / Name "dicom-node PE" / Manufacturer /
        Model Name = bundle name / Serial Number = bundle version
      Procedure Reported = LN 24627-2 "CT Chest" and 99PENODE CTPA "CT pulmonary angiography"
      Image Library: every analysed slice of the CT series
      Imaging Measurements
        Measurement Group (x10, one per label, in dicom_node.labels.ALL_LABELS order)
          Tracking Identifier = the label name, Tracking Unique Identifier (deterministic)
          Finding = SCT 59282003 "Pulmonary embolism"
          Finding Site (central / left / right only)
          Algorithm Name / Version / Parameters (TID 4019; model UID, provider, preprocessing)
          Probability (DCM 122157) = p  {probability}
          Threshold Value (DCM 122411) = t  {probability}
          <label concept> = Present (SCT 52101004) | Absent (SCT 2667000)
          Source images = the key slices (PE group only)
      Qualitative Evaluations (UMLS C0034375)
        Comment (DCM 121106) = dicom_node.RESEARCH_USE_STATEMENT

VerificationFlag UNVERIFIED, CompletionFlag PARTIAL, PreliminaryFlag PRELIMINARY.

Codes (all defined in `dicom_node.results.codes`; a private code only where no standard code was
found; scheme 99PENODE is declared in the CodingSchemeIdentificationSequence):

=====================  ==========================  =================================================
label                  concept (qualitative eval.)  notes
=====================  ==========================  =================================================
pe_present_on_window   SCT 59282003 Pulmonary       study-level "PE present on any window"
                       embolism
negative_exam_for_pe   99PENODE NEGEXAM             no single standard concept "exam negative for PE"
indeterminate          SCT 82334004 Indeterminate   qualifier value (CID 4220), finding = PE
chronic_pe             SCT 90734009 Chronic         qualifier value (CID 6130), finding = PE
acute_and_chronic_pe   99PENODE ACUCHR              "Acute on chronic": no standard qualifier found
central_pe             SCT 26216008 Central         + Finding Site SCT 45341000 Pulmonary trunk
leftsided_pe           SCT 7771000 Left             + Finding Site SCT 50408007 Left pulmonary artery
rightsided_pe          SCT 24028007 Right           + Finding Site SCT 78480002 Right pulmonary artery
rv_lv_ratio_gte_1      99PENODE RVLVGE1             RV/LV diameter ratio >= 1 (no standard code)
rv_lv_ratio_lt_1       99PENODE RVLVLT1             RV/LV diameter ratio < 1 (no standard code)
=====================  ==========================  =================================================

Procedure reported: LOINC 24627-2 "CT Chest" (in DICOM CID 7000/LOINC) is the standard code we
could verify offline; a LOINC/RadLex code specific to CT pulmonary angiography could not be
verified here, so the private 99PENODE CTPA code refines it (both are listed).

UIDs are deterministic (`dicom_node.results.uids.result_uid`): the same source series, model UID, revision and object
kind always give the same UID, so a re-run replaces rather than duplicates; revision > 0 adds
a Predecessor Documents Sequence pointing at the previous SR.
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
    COMMENT,
    LABEL_CODES,
    PE_FINDING,
    PRESENT,
    PROBABILITY,
    PROBABILITY_UNIT,
    PROCEDURE_CODES,
    QUALITATIVE_EVALUATIONS,
    THRESHOLD,
    private_scheme_item,
)
from dicom_node.results.uids import result_uid

if TYPE_CHECKING:
    import highdicom as hd

    from dicom_node.imaging.preprocess import Windows
    from dicom_node.imaging.series import CtSeries
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
    "predecessor_reference",
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
    missing = [k for k in ALL_LABELS if k not in labels or (k != WINDOW_LABEL and k not in prediction.study_probs)
               or k not in prediction.thresholds]
    if missing:
        raise ReportError(f"Series {series.series_instance_uid}: prediction lacks labels/probabilities/thresholds {missing}")
    broken = consistency_violations(np.asarray(prediction.window_positive, bool), labels)
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
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Comprehensive 3D SR for one analysed CT series.

    `key_slices` (from `dicom_node.results.kos.select_key_slices`) are referenced as source images of
    the PE measurement group; when omitted the top-`k` are selected here. `predecessor` (the earlier
    SR dataset, or `previous_sr_reference(...)`) is required when `revision > 0`.
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

    images = source_image_datasets(series)
    sop_class = images[0].SOPClassUID
    algo = algorithm_identification(bundle, prediction)
    probs = prediction.label_probabilities()
    groups = []
    for label in ALL_LABELS:
        concept, site = LABEL_CODES[label]
        measurements = [
            hd.sr.Measurement(name=PROBABILITY, value=round(probs[label], 6), unit=PROBABILITY_UNIT),
            hd.sr.Measurement(name=THRESHOLD, value=round(float(prediction.thresholds[label]), 6),
                              unit=PROBABILITY_UNIT),
        ]
        evaluation = hd.sr.QualitativeEvaluation(name=concept, value=PRESENT if prediction.labels[label] else ABSENT)
        sources = None
        if label == WINDOW_LABEL:
            sources = [hd.sr.SourceImageForMeasurementGroup(sop_class, ks.sop_instance_uid) for ks in key_slices]
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=result_uid("tracking", series.series_instance_uid, bundle.model_uid, revision, label),
                identifier=label),
            finding_type=PE_FINDING,
            finding_sites=[hd.sr.FindingSite(site)] if site is not None else None,
            algorithm_id=algo,
            measurements=measurements,
            qualitative_evaluations=[evaluation],
            source_images=sources,
        ))

    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device_observer_context(bundle)),
        procedure_reported=list(PROCEDURE_CODES),
        imaging_measurements=groups,
        referenced_images=images,
    )
    root = report[0]
    statement = hd.sr.ContainerContentItem(name=QUALITATIVE_EVALUATIONS, relationship_type="CONTAINS")
    statement.ContentSequence = PydicomSequence([hd.sr.TextContentItem(name=COMMENT, value=RESEARCH_USE_STATEMENT,
                                                       relationship_type="CONTAINS")])
    root.ContentSequence.append(statement)

    sr = hd.sr.Comprehensive3DSR(
        evidence=images,
        content=root,
        series_instance_uid=result_uid("sr-series", series.series_instance_uid, bundle.model_uid, revision),
        series_number=series_number,
        sop_instance_uid=result_uid("sr", series.series_instance_uid, bundle.model_uid, revision),
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
