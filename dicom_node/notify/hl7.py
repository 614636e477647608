"""HL7 v2.5 ORU^R01 of a prioritised study, sent over MLLP, with the ACK checked.

Contract:
- `build_oru(document, ...)` turns the notification document (`dicom_node.notify.document`) into an
  ORU^R01 message string (segments joined by CR), built and re-parsed with the `hl7` library:
  MSH (MSH-3 the node's AE title, MSH-4/5/6 from `[notify]`, MSH-9 `ORU^R01^ORU_R01`, MSH-10 the
  control id, MSH-11 `P`, MSH-12 `2.5`), PID (identity only with `include_patient_identity`),
  OBR (OBR-3 accession number = filler order number, OBR-4 `PEAI^PE detection AI triage^L`,
  OBR-5 priority S/A/R, OBR-7 analysis time, OBR-25 `P`: preliminary, a triage result), then OBX
  segments: priority (ST), reason (TX), the study instance UID (ST), the PE probability (NM), and
  one OBX per study label called present (NM probability, OBX-8 `A`).
- `send_mllp(host, port, message, timeout_s)` frames it (VT ... FS CR), waits for one framed
  answer and returns the parsed ACK. `check_ack(ack, control_id)`: MSA-1 AA (or CA) is success;
  AE/CE (the receiver failed to process it) raises a retryable `NotificationError`; AR/CR (the
  receiver rejects the message) raises a final one; no answer (closed, timed out) or an ACK for
  another MSH-10 is retryable. The control id is the same on every retry, so a receiver that
  processed a message whose ACK was lost can recognise the repeat.

Values are escaped with the library (`Message.escape`), so a `|` or `^` in a reason or an
accession number cannot break the message structure.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from datetime import datetime

import hl7

from dicom_node.labels import display_name
from dicom_node.notify.webhook import NotificationError

__all__ = ["build_oru", "send_mllp", "check_ack", "frame", "unframe", "START_BLOCK", "END_BLOCK", "SERVICE"]

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
#: OBR-4 universal service identifier of the node's result
SERVICE = ("PEAI", "PE detection AI triage", "L")
_SEPARATORS = "MSH|^~\\&"


def _ts(iso: str | None) -> str:
    """HL7 TS (YYYYMMDDHHMMSS+ZZZZ) of an ISO 8601 time; now when None."""
    t = datetime.fromisoformat(iso) if iso else datetime.now().astimezone()
    return t.strftime("%Y%m%d%H%M%S%z")


def build_oru(document: Mapping[str, object], *, control_id: str, sending_application: str,
              sending_facility: str = "", receiving_application: str = "", receiving_facility: str = "") -> str:
    """The ORU^R01 message of one notification document (see module docstring)."""
    esc = hl7.parse(_SEPARATORS + "|").escape  # the library's escaping for the standard separators

    def f(value: object) -> str:
        return esc(str(value)) if value is not None else ""

    def cwe(*parts: str) -> str:
        return "^".join(esc(p) for p in parts)

    when = _ts(str(document["analysed_at"]) if document.get("analysed_at") else None)
    segments = ["|".join([_SEPARATORS, f(sending_application), f(sending_facility), f(receiving_application),
                          f(receiving_facility), _ts(None), "", "ORU^R01^ORU_R01", f(control_id), "P", "2.5"])]
    patient = document.get("patient")
    pid = ["PID", "1", "", "", "", "", "", ""]
    if isinstance(patient, Mapping):
        pid[3] = f(patient.get("id", ""))
        pid[5] = "^".join(esc(p) for p in str(patient.get("name", "")).split("^"))  # DICOM PN -> XPN components
        pid[7] = f(patient.get("birth_date", ""))
    segments.append("|".join(pid))
    obr = ["OBR", "1", "", f(document.get("accession_number", "")), cwe(*SERVICE), f(document["hl7_priority"]),
           "", when] + [""] * 17 + ["P"]
    segments.append("|".join(obr))
    obx: list[tuple[str, str, str, str, str]] = [  # value type, identifier, value, units, abnormal flag
        ("ST", cwe("PRIORITY", "Worklist priority", "L"), f(document["priority"]), "", ""),
        ("TX", cwe("REASON", "Priority reason", "L"), f(document["reason"]), "", ""),
        ("ST", cwe("110180", "Study Instance UID", "DCM"), f(document["study_instance_uid"]), "", ""),
    ]
    findings = document.get("findings")
    if isinstance(findings, Mapping):
        obx.append(("NM", cwe("pe_present_on_window", "PE probability", "L"), f(findings.get("pe_probability")),
                    "", "A" if findings.get("pe_present") else "N"))
        probabilities = findings.get("probabilities")
        probs = probabilities if isinstance(probabilities, Mapping) else {}
        present = findings.get("present")
        for label in present if isinstance(present, list) else []:
            obx.append(("NM", cwe(str(label), display_name(str(label)), "L"), f(probs.get(label, "")), "", "A"))
    for i, (vt, ident, value, units, flag) in enumerate(obx, 1):
        segments.append("|".join(["OBX", str(i), vt, ident, "", value, units, "", flag, "", "", "P"]))
    text = "\r".join(segments)
    parsed = hl7.parse(text)  # the library must read back what was built
    if str(parsed.segment("OBR")[5]) != document["hl7_priority"] or str(parsed.segment("MSH")[10]) != control_id:
        raise ValueError(f"ORU^R01 for job {document.get('job_id')}: built message does not parse back")  # pragma: no cover
    return text


def frame(message: str) -> bytes:
    """MLLP block: VT, the message (UTF-8), FS CR."""
    return START_BLOCK + message.encode("utf-8") + END_BLOCK


def unframe(block: bytes) -> str:
    """The message inside one MLLP block (raises ValueError when the framing is wrong)."""
    if not (block.startswith(START_BLOCK) and block.endswith(END_BLOCK)):
        raise ValueError(f"MLLP block of {len(block)} bytes: expected VT ... FS CR framing")
    return block[1:-2].decode("utf-8")


def send_mllp(host: str, port: int, message: str, *, timeout_s: float = 10.0) -> hl7.Message:
    """Send one framed message and return the parsed answer (raises NotificationError: no answer)."""
    where = f"HL7 MLLP {host}:{port}"
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as s:
            s.sendall(frame(message))
            buf = b""
            while END_BLOCK not in buf:
                s.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = s.recv(65536)
                if not chunk:
                    raise NotificationError(f"{where}: connection closed before an ACK")
                buf += chunk
    except TimeoutError:
        raise NotificationError(f"{where}: no ACK within {timeout_s:g} s") from None
    except OSError as e:
        raise NotificationError(f"{where}: {type(e).__name__}: {e}") from None
    start = buf.find(START_BLOCK)
    try:
        return hl7.parse(unframe(buf[start:buf.index(END_BLOCK) + 2] if start >= 0 else buf))
    except (ValueError, hl7.exceptions.ParseException) as e:
        raise NotificationError(f"{where}: the answer is not a framed HL7 message ({e})") from None


def check_ack(ack: hl7.Message, control_id: str, where: str = "HL7") -> str:
    """MSA-1 of an ACK to `control_id`: returns AA/CA, raises NotificationError otherwise (see module docstring)."""
    try:
        msa = ack.segment("MSA")
    except KeyError:
        raise NotificationError(f"{where}: answer without an MSA segment; expected an ACK") from None
    code, acked = str(msa[1]), str(msa[2])
    text = str(msa[3]) if len(msa) > 3 else ""
    if acked != control_id:
        raise NotificationError(f"{where}: ACK for message {acked!r}, expected {control_id!r}")
    if code in ("AA", "CA"):
        return code
    if code in ("AR", "CR"):
        raise NotificationError(f"{where}: message {control_id} rejected ({code}) {text}".rstrip(), final=True)
    if code in ("AE", "CE"):
        raise NotificationError(f"{where}: receiver error ({code}) for message {control_id} {text}".rstrip())
    raise NotificationError(f"{where}: unknown acknowledgment code {code!r} for message {control_id}")
