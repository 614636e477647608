"""HL7 v2.5 ORU^R01 over MLLP against a real listener on loopback (the `hl7` library's asyncio MLLP
server): the message's fields, MLLP framing, ACK codes AA/AE/AR, a retry after no ACK, and a
listener that is down and comes back (delivered once)."""

from __future__ import annotations

import socket
import threading

import hl7
import pytest
from structlog.testing import capture_logs

from dicom_node.config import Config, load_config
from dicom_node.durability.state import InstanceRow, JobOutcome, JobState, NotificationState, State
from dicom_node.engine.priority import Findings, decide_priority
from dicom_node.labels import STUDY_LABELS
from dicom_node.notify.document import StudyContext, notification_document, notifications_for
from dicom_node.notify.hl7 import END_BLOCK, START_BLOCK, build_oru, send_mllp
from dicom_node.notify.outbox import NotificationSender, control_id
from nodekit import wait_until
from notify_peers import MllpListener


def _config(port: int, **kw: object) -> Config:
    return load_config(None, environ={}, overrides={
        "ae_title": "PENODE", "notify.hl7_host": "127.0.0.1", "notify.hl7_port": port, "notify.base_delay_s": 0.05,
        "notify.max_delay_s": 0.2, "notify.timeout_s": 1.0, "notify.hl7_sending_facility": "RADIOLOGY",
        "notify.hl7_receiving_application": "RIS", "notify.hl7_receiving_facility": "HOSP", **kw})


def _findings(p: float, *present: str) -> Findings:
    return Findings(p, p >= 0.5, {k: k in present for k in STUDY_LABELS},
                    {"pe_present_on_window": p, **{k: 0.8 for k in present}})


def _analysed_job(st: State, cfg: Config, findings: Findings, *, n: int = 1, accession: str = "ACC-7") -> int:
    series_uid, study_uid = f"1.2.826.0.1.3680043.{n}.2", f"1.2.826.0.1.3680043.{n}"
    st.add_instance(InstanceRow(f"{series_uid}.1", series_uid, study_uid, "/x.dcm", "1.2", "1.2", 100.0, 1, "CT"))
    st.mark_complete(series_uid)
    _, job_id = st.schedule_series(series_uid, selected=True, reason="ok")
    assert job_id is not None and st.claim_next_job() is not None
    decision = decide_priority(findings, cfg.priority)
    notes = notifications_for(job_id, StudyContext(study_uid, series_uid, accession), decision, findings, cfg.notify,
                              at=1_700_000_000.0)
    st.transition(job_id, JobState.BUILT, stage="built", result_uids=("9.9",),
                  outcome=JobOutcome(decision.priority.value, decision.reason, decision.score, notes))
    return job_id


@pytest.fixture
def mllp():
    listener = MllpListener().start()
    yield listener
    listener.stop()


@pytest.mark.parametrize("findings, obr5", [
    (_findings(0.93, "central_pe", "rv_lv_ratio_gte_1"), "S"),
    (_findings(0.71, "leftsided_pe", "rv_lv_ratio_lt_1"), "A"),
    (_findings(0.08, "negative_exam_for_pe"), "R"),
])
def test_oru_carries_priority_in_obr5_accession_in_obr3_and_one_obx_per_finding(findings, obr5):
    decision = decide_priority(findings)
    doc = notification_document(4, StudyContext("1.2.3", "1.2.3.4", "A|CC^9"), decision, findings,
                                _config(2575).notify, at=1_700_000_000.0)
    msg = hl7.parse(build_oru(doc, control_id="PENODE-4-1", sending_application="PENODE"))
    assert str(msg.segment("MSH")[9]) == "ORU^R01^ORU_R01" and str(msg.segment("MSH")[12]) == "2.5"
    assert str(msg.segment("MSH")[10]) == "PENODE-4-1"
    obr = msg.segment("OBR")
    assert str(obr[5]) == obr5 and msg.unescape(str(obr[3])) == "A|CC^9"  # escaped, read back whole
    assert str(obr[4]) == "PEAI^PE detection AI triage^L" and str(obr[25]) == "P"
    obx = {str(s[3][0][0]): s for s in msg.segments("OBX")}
    assert str(obx["PRIORITY"][5]) == decision.priority.value
    assert msg.unescape(str(obx["REASON"][5])) == decision.reason
    assert str(obx["110180"][5]) == "1.2.3"
    assert float(str(obx["pe_present_on_window"][5])) == pytest.approx(findings.pe_probability)
    present = [k for k in STUDY_LABELS if findings.labels[k]]
    assert [k for k in obx if k in STUDY_LABELS] == present and all(str(obx[k][8]) == "A" for k in present)
    assert [str(s[1]) for s in msg.segments("OBX")] == [str(i) for i in range(1, len(obx) + 1)]
    assert str(msg.segment("PID")[5]) == ""  # no identity unless configured


def test_patient_identity_goes_into_pid_only_when_configured():
    cfg = _config(2575, **{"notify.include_patient_identity": True})
    ctx = StudyContext("1.2.3", "1.2.3.4", "ACC", "Testperson^Phantomina", "PID-1", "19470213")
    doc = notification_document(1, ctx, decide_priority(_findings(0.9, "central_pe")), None, cfg.notify, at=0.0)
    pid = hl7.parse(build_oru(doc, control_id="c", sending_application="PENODE")).segment("PID")
    assert (str(pid[3]), str(pid[5]), str(pid[7])) == ("PID-1", "Testperson^Phantomina", "19470213")


def test_the_message_goes_out_mllp_framed_and_an_aa_ack_marks_it_sent(tmp_path):
    """A raw socket peer sees the exact bytes: VT, the message, FS CR."""
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    got: list[bytes] = []

    def serve() -> None:
        conn, _ = srv.accept()
        buf = b""
        while not buf.endswith(END_BLOCK):
            buf += conn.recv(65536)
        got.append(buf)
        ack = hl7.parse(buf[1:-2].decode()).create_ack("AA")
        conn.sendall(START_BLOCK + str(ack).encode() + END_BLOCK)
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ack = send_mllp("127.0.0.1", port, "MSH|^~\\&|PENODE||RIS||20260101||ORU^R01^ORU_R01|X1|P|2.5\rPID|1", timeout_s=5)
    t.join(5)
    srv.close()
    assert got[0].startswith(b"\x0bMSH|") and got[0].endswith(b"\x1c\x0d") and got[0].count(b"\x0b") == 1
    assert str(ack.segment("MSA")[1]) == "AA" and str(ack.segment("MSA")[2]) == "X1"


def test_aa_ack_from_the_library_mllp_server_marks_the_notification_sent(tmp_path, mllp):
    cfg = _config(mllp.port)
    st = State(tmp_path / "s.sqlite")
    job_id = _analysed_job(st, cfg, _findings(0.93, "central_pe", "rv_lv_ratio_gte_1"))
    NotificationSender(cfg, st).poll_once()
    (row,) = st.notifications(job_id)
    assert (row.state, row.attempts, row.last_error) == (NotificationState.SENT, 1, None)
    (msg,) = mllp.messages
    assert str(msg.segment("MSH")[10]) == control_id(row) and str(msg.segment("MSH")[3]) == "PENODE"
    assert str(msg.segment("MSH")[4]) == "RADIOLOGY" and str(msg.segment("MSH")[6]) == "HOSP"
    assert str(msg.segment("OBR")[5]) == "S" and str(msg.segment("OBR")[3]) == "ACC-7"
    st.close()


@pytest.mark.parametrize("no_ack", ["silent", "hang"])
def test_no_ack_is_retried_with_the_same_control_id_then_sent(tmp_path, mllp, no_ack):
    """No ACK: the listener closes the connection ("silent") or keeps it open past notify.timeout_s ("hang")."""
    mllp.script = [no_ack]
    cfg = _config(mllp.port)
    st = State(tmp_path / "s.sqlite")
    job_id = _analysed_job(st, cfg, _findings(0.8, "rightsided_pe", "rv_lv_ratio_lt_1"))
    sender = NotificationSender(cfg, st)
    with capture_logs() as logs:
        sender.start()
        try:
            wait_until(lambda: st.notifications(job_id)[0].state is NotificationState.SENT, 20, "HL7 sent")
        finally:
            sender.stop()
    assert mllp.answered == [no_ack, "AA"]
    (retry,) = [e for e in logs if e["event"] == "notification_retry"]
    assert retry["error"] == (f"HL7 MLLP 127.0.0.1:{mllp.port}: "
                              + ("no ACK within 1 s" if no_ack == "hang" else "connection closed before an ACK"))
    assert len({str(m.segment("MSH")[10]) for m in mllp.messages}) == 1  # the repeat is recognisable
    row = st.notifications(job_id)[0]
    assert row.attempts == 2 and str(mllp.messages[0].segment("OBR")[5]) == "A"
    st.close()


def test_ae_is_retried_and_ar_is_dead_at_once(tmp_path, mllp):
    mllp.script = ["AE", "AA", "AR"]
    cfg = _config(mllp.port)
    st = State(tmp_path / "s.sqlite")
    retried = _analysed_job(st, cfg, _findings(0.9, "central_pe"), n=1)
    sender = NotificationSender(cfg, st)
    sender.start()
    try:
        wait_until(lambda: st.notifications(retried)[0].state is NotificationState.SENT, 20, "HL7 sent after AE")
        rejected = _analysed_job(st, cfg, _findings(0.9, "central_pe"), n=2)
        wait_until(lambda: st.notifications(rejected)[0].state is NotificationState.DEAD, 20, "HL7 dead after AR")
    finally:
        sender.stop()
    assert mllp.answered == ["AE", "AA", "AR"]
    assert st.notifications(retried)[0].attempts == 2
    dead = st.notifications(rejected)[0]
    assert dead.attempts == 1 and f"message {control_id(dead)} rejected (AR)" in (dead.last_error or "")
    st.close()


def test_a_listener_that_is_down_and_comes_back_gets_the_message_once(tmp_path):
    mllp = MllpListener()  # its port, nothing listening yet
    cfg = _config(mllp.port)
    st = State(tmp_path / "s.sqlite")
    job_id = _analysed_job(st, cfg, _findings(0.95, "central_pe", "rv_lv_ratio_gte_1"))
    sender = NotificationSender(cfg, st)
    sender.start()
    try:
        wait_until(lambda: st.notifications(job_id)[0].attempts >= 3, 20, "three refused attempts")
        assert "ConnectionRefusedError" in (st.notifications(job_id)[0].last_error or "")
        mllp.start()
        wait_until(lambda: st.notifications(job_id)[0].state is NotificationState.SENT, 20, "HL7 sent")
        wait_until(lambda: sender.state.next_notification_time() is None, 5, "nothing pending")
    finally:
        sender.stop()
        mllp.stop()
    assert len(mllp.messages) == 1 and mllp.answered == ["AA"]
    st.close()
