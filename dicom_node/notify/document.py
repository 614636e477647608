"""The notification document of one analysed study, and which targets a priority notifies.

Contract: when a job's analysis ends the worker calls `notifications_for(...)`, which returns the
(target, JSON document) pairs the `[notify]` rules ask for (`webhook` when the priority is in
`webhook_priorities` and a URL is set, `hl7` likewise); the state database stores them with the
job's priority in one transaction and `dicom_node.notify.outbox` delivers them. The document is
the webhook body as is and the source of the HL7 ORU^R01 (`dicom_node.notify.hl7`), so both
targets say the same thing.

Document (version 1): event, version, job_id, study_instance_uid, series_instance_uid,
accession_number, priority, hl7_priority (S/A/R), reason, score, analysis_failed, findings
(`Findings.as_dict()` or null), study_url (or null), analysed_at (ISO 8601 UTC) and, only with
`include_patient_identity`, patient {name, id, birth_date}. The patient block is written into the
state database and the peers only, never into a log line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pydicom

from dicom_node.config import NotifyConfig
from dicom_node.engine.priority import Findings, PriorityDecision

__all__ = ["StudyContext", "study_context", "notification_document", "notifications_for", "TARGETS", "DOCUMENT_VERSION"]

#: the notification targets there are
TARGETS = ("webhook", "hl7")
DOCUMENT_VERSION = 1


@dataclass(frozen=True)
class StudyContext:
    """Identifiers of the analysed series from its first spooled instance (patient fields empty unless asked for)."""

    study_uid: str
    series_uid: str
    accession_number: str = ""
    patient_name: str = ""
    patient_id: str = ""
    birth_date: str = ""


def study_context(study_uid: str, series_uid: str, instance: Path | None, *, identity: bool) -> StudyContext:
    """Read accession (and, when `identity`, patient name/ID/birth date) from one spooled instance's header."""
    if instance is None:
        return StudyContext(study_uid, series_uid)
    try:
        ds = pydicom.dcmread(instance, stop_before_pixels=True, specific_tags=[
            "AccessionNumber", "PatientName", "PatientID", "PatientBirthDate"])
    except (OSError, ValueError, pydicom.errors.InvalidDicomError):
        return StudyContext(study_uid, series_uid)
    accession = str(ds.get("AccessionNumber", "") or "")
    if not identity:
        return StudyContext(study_uid, series_uid, accession)
    return StudyContext(study_uid, series_uid, accession, str(ds.get("PatientName", "") or ""),
                        str(ds.get("PatientID", "") or ""), str(ds.get("PatientBirthDate", "") or ""))


def notification_document(job_id: int, context: StudyContext, decision: PriorityDecision, findings: Findings | None,
                          notify: NotifyConfig, *, at: float) -> dict[str, object]:
    """The JSON-ready document (see module docstring)."""
    doc: dict[str, object] = {
        "event": "study_prioritised", "version": DOCUMENT_VERSION, "job_id": job_id,
        "study_instance_uid": context.study_uid, "series_instance_uid": context.series_uid,
        "accession_number": context.accession_number, "priority": decision.priority.value,
        "hl7_priority": decision.priority.hl7_code, "reason": decision.reason, "score": round(decision.score, 4),
        "analysis_failed": findings is None, "findings": findings.as_dict() if findings is not None else None,
        "study_url": notify.study_url.replace("{study_uid}", context.study_uid) if notify.study_url else None,
        "analysed_at": datetime.fromtimestamp(at, timezone.utc).isoformat(timespec="seconds"),
    }
    if notify.include_patient_identity:
        doc["patient"] = {"name": context.patient_name, "id": context.patient_id, "birth_date": context.birth_date}
    return doc


def notifications_for(job_id: int, context: StudyContext, decision: PriorityDecision, findings: Findings | None,
                      notify: NotifyConfig, *, at: float) -> tuple[tuple[str, str], ...]:
    """(target, JSON document) for every target whose rule includes this priority."""
    targets = []
    p = decision.priority.value
    if notify.webhook_url and p in notify.webhook_priorities:
        targets.append("webhook")
    if notify.hl7_host and p in notify.hl7_priorities:
        targets.append("hl7")
    if not targets:
        return ()
    text = json.dumps(notification_document(job_id, context, decision, findings, notify, at=at), sort_keys=True)
    return tuple((t, text) for t in targets)
