"""End to end: a real node (the product pipeline with the bundled demo model) analyses a PE-positive
and a PE-negative phantom sent by dcmtk storescu, ranks them on the worklist, and notifies a real
webhook listener and a real MLLP listener on loopback about the positive study only (default rules),
with patient identity in the notifications when configured and never in the node's log."""

from __future__ import annotations

import json
import sys

import pydicom
import pytest

from dicom_node.config import load_config
from dicom_node.durability.state import NotificationState
from dicom_node.engine.node import Node
from dicom_node.engine.priority import READING_ORDER
from dicom_node.log import configure_logging
from dicom_node.notify.webhook import SIGNATURE_HEADER, verify_signature
from nodekit import PATIENT_BIRTH, PATIENT_ID, PATIENT_NAME, demo_like_studies, storescu, wait_until
from notify_peers import MllpListener, WebhookListener
from peers import needs_dcmtk

PHI = (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH, "Testperson", "Phantomina", "93817264")


@needs_dcmtk
@pytest.mark.slow
def test_a_real_node_ranks_the_positive_study_first_and_notifies_webhook_and_ris(tmp_path):
    studies = demo_like_studies(tmp_path / "in")
    hook, mllp = WebhookListener().start(), MllpListener().start()
    log_path = tmp_path / "node.log"
    log = open(log_path, "w")
    configure_logging(json=True, level="INFO", stream=log)
    cfg = load_config(None, environ={}, overrides={
        "port": 0, "host": "127.0.0.1", "data_dir": str(tmp_path / "data"), "quiet_period_s": 0.5,
        "min_free_disk_mb": 0, "inference.providers": ["CPUExecutionProvider"],
        "notify.webhook_url": hook.url, "notify.webhook_secret": "k", "notify.hl7_host": "127.0.0.1",
        "notify.hl7_port": mllp.port, "notify.include_patient_identity": True,
        "notify.study_url": "http://127.0.0.1:8080/studies/{study_uid}"})
    node = Node(cfg).start()  # default job body: the product pipeline and the demo bundle
    try:
        for name in ("negative", "positive"):  # the negative arrives first
            r = storescu(node.port, studies[name])
            assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
        wait_until(lambda: len([j for j in node.state.jobs() if j.priority_class]) == 2, 300, "both studies analysed")
        wait_until(lambda: hook.posts and mllp.messages, 60, "webhook and HL7 notified")
        wait_until(lambda: all(n.state is NotificationState.SENT for n in node.state.notifications()), 30, "sent")
        listed = node.state.worklist([p.value for p in READING_ORDER])
    finally:
        node.stop()
        hook.stop()
        mllp.stop()
        configure_logging(json=True, level="INFO", stream=sys.__stderr__)
        log.close()
    pos, neg = (pydicom.dcmread(studies[n][0], stop_before_pixels=True) for n in ("positive", "negative"))
    assert [r.study_uid for r in listed] == [pos.StudyInstanceUID, neg.StudyInstanceUID]  # positive first
    assert listed[0].priority == "critical" and listed[1].priority == "routine"
    assert listed[0].job.priority_reason.startswith("PE suspected (probability ") and "Central PE" in listed[0].job.priority_reason
    assert listed[1].job.priority_reason.startswith("no PE found")
    (post,) = hook.posts  # the negative study notifies nobody under the default rules
    assert verify_signature("k", post.body, post.headers[SIGNATURE_HEADER.lower()])
    doc = json.loads(post.body)
    assert doc["study_instance_uid"] == pos.StudyInstanceUID and doc["accession_number"] == pos.AccessionNumber
    assert doc["priority"] == "critical" and "central_pe" in doc["findings"]["present"]
    assert doc["patient"] == {"name": PATIENT_NAME, "id": PATIENT_ID, "birth_date": PATIENT_BIRTH}
    assert doc["study_url"] == f"http://127.0.0.1:8080/studies/{pos.StudyInstanceUID}"
    (msg,) = mllp.messages
    assert str(msg.segment("OBR")[3]) == pos.AccessionNumber and str(msg.segment("OBR")[5]) == "S"
    assert str(msg.segment("PID")[3]) == PATIENT_ID
    text = log_path.read_text()
    events = [json.loads(line)["event"] for line in text.splitlines() if line.startswith("{")]
    assert events.count("job_prioritised") == 2 and events.count("notification_sent") == 2
    assert not [p for p in PHI if p in text], "patient identity in the operational log"


@needs_dcmtk
def test_a_failed_analysis_is_check_on_the_worklist_and_sent_to_the_ris_as_a(tmp_path):
    from nodekit import phantom_series

    def broken_model(ctx):
        raise RuntimeError(f"bundle stage2.onnx cannot run on series {ctx.series_uid}")

    files = phantom_series(tmp_path / "in", n_slices=24, rows=64)
    hook, mllp = WebhookListener().start(), MllpListener().start()
    cfg = load_config(None, environ={}, overrides={
        "port": 0, "host": "127.0.0.1", "data_dir": str(tmp_path / "data"), "quiet_period_s": 0.5,
        "min_free_disk_mb": 0, "notify.webhook_url": hook.url, "notify.hl7_host": "127.0.0.1",
        "notify.hl7_port": mllp.port})
    node = Node(cfg, run_job=broken_model).start()
    try:
        r = storescu(node.port, files)
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
        wait_until(lambda: mllp.messages, 60, "HL7 notified")
        (job,) = node.state.jobs()
    finally:
        node.stop()
        hook.stop()
        mllp.stop()
    assert job.priority_class == "check" and job.priority_score == 0.0
    assert job.priority_reason == "analysis failed (RuntimeError): read without AI triage"
    assert hook.posts == []  # check is not in the default webhook_priorities
    (msg,) = mllp.messages
    assert str(msg.segment("OBR")[5]) == "A" and msg.unescape(str(msg.segment("OBX")[5])) == "check"
    assert str(msg.segment("OBR")[3]) == str(pydicom.dcmread(files[0], stop_before_pixels=True).AccessionNumber)
    assert not msg.segments("OBX")[3:]  # no findings: priority, reason, study UID only


@needs_dcmtk
def test_a_pending_notification_survives_kill_9_and_is_sent_once_after_restart(tmp_path):
    """The node (a real `dicom-node serve` process) analyses a study while the webhook receiver is down,
    is killed with SIGKILL, and after a restart delivers the stored notification exactly once."""
    from dicom_node.durability.state import State
    from nodekit import NodeProcess, phantom_series

    files = phantom_series(tmp_path / "in", n_slices=24, rows=64)
    hook = WebhookListener()  # its port, nothing listening yet
    node = NodeProcess(tmp_path, **{"notify.webhook_url": hook.url, "notify.webhook_priorities": ["check"],
                                    "notify.base_delay_s": 0.2, "notify.max_delay_s": 0.5}).start()
    db = tmp_path / "data" / "state.sqlite"

    def notification_rows():
        st = State(db)
        try:
            return st.notifications()
        finally:
            st.close()

    try:
        r = storescu(node.port, files)
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
        wait_until(lambda: [n for n in notification_rows() if n.attempts >= 2], 60, "two refused attempts")
        node.kill9()
        (row,) = notification_rows()
        assert row.state is NotificationState.PENDING and "ConnectionRefusedError" in (row.last_error or "")
        hook.start()
        node.start()
        wait_until(lambda: notification_rows()[0].state is NotificationState.SENT, 60, "sent after restart")
        wait_until(lambda: any(e.get("event") == "notification_sent" for e in node.events()), 10, "logged")
    finally:
        node.stop()
        hook.stop()
    assert len(hook.posts) == 1
    doc = json.loads(hook.posts[0].body)
    assert doc["priority"] == "check" and doc["reason"] == "no findings from the model: read without AI triage"
    assert doc["accession_number"] == str(pydicom.dcmread(files[0], stop_before_pixels=True).AccessionNumber)
