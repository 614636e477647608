"""Webhook notifications against a real `http.server` on loopback: signed JSON, retries with the same
delivery id, a listener that is down and comes back (delivered once), dead letters and resend."""

from __future__ import annotations

import json
import time

import pytest

from dicom_node.config import Config, load_config
from dicom_node.durability.state import InstanceRow, JobOutcome, JobState, NotificationState, State
from dicom_node.engine.priority import Findings, decide_priority
from dicom_node.labels import STUDY_LABELS
from dicom_node.notify.document import StudyContext, notifications_for
from dicom_node.notify.outbox import NotificationSender, control_id
from dicom_node.notify.webhook import DELIVERY_HEADER, SIGNATURE_HEADER, sign, verify_signature
from nodekit import wait_until
from notify_peers import WebhookListener

SECRET = "s3cret-key-for-tests"


def _config(url: str, **kw: object) -> Config:
    return load_config(None, environ={}, overrides={
        "notify.webhook_url": url, "notify.webhook_secret": SECRET, "notify.base_delay_s": 0.05,
        "notify.max_delay_s": 0.2, "notify.timeout_s": 2.0, "notify.study_url": "https://pe-node:8443/studies/{study_uid}",
        **kw})


def _analysed_job(st: State, cfg: Config, *, p: float = 0.93, present: tuple[str, ...] = ("central_pe", "rv_lv_ratio_gte_1"),
                  n: int = 1) -> int:
    series_uid, study_uid = f"1.2.826.0.1.3680043.{n}.2", f"1.2.826.0.1.3680043.{n}"
    st.add_instance(InstanceRow(f"{series_uid}.1", series_uid, study_uid, "/x.dcm", "1.2", "1.2", 100.0, 1, "CT"))
    st.mark_complete(series_uid)
    _, job_id = st.schedule_series(series_uid, selected=True, reason="ok")
    assert job_id is not None and st.claim_next_job() is not None
    findings = Findings(p, p >= 0.5, {k: k in present for k in STUDY_LABELS}, {"pe_present_on_window": p})
    decision = decide_priority(findings, cfg.priority)
    notes = notifications_for(job_id, StudyContext(study_uid, series_uid, "ACC-0042"), decision, findings, cfg.notify,
                              at=1_700_000_000.0)
    st.transition(job_id, JobState.BUILT, stage="built", result_uids=("9.9",),
                  outcome=JobOutcome(decision.priority.value, decision.reason, decision.score, notes))
    return job_id


@pytest.fixture
def hook():
    listener = WebhookListener().start()
    yield listener
    listener.stop()


def test_a_critical_study_is_posted_once_as_signed_json(tmp_path, hook):
    cfg = _config(hook.url)
    st = State(tmp_path / "s.sqlite")
    job_id = _analysed_job(st, cfg)
    sender = NotificationSender(cfg, st)
    sender.poll_once()
    assert len(hook.posts) == 1
    post = hook.posts[0]
    assert post.path == "/hook" and post.headers["content-type"] == "application/json"
    assert verify_signature(SECRET, post.body, post.headers[SIGNATURE_HEADER.lower()])
    assert post.headers[SIGNATURE_HEADER.lower()] == sign(SECRET, post.body)
    assert not verify_signature("another-key", post.body, post.headers[SIGNATURE_HEADER.lower()])
    assert not verify_signature(SECRET, post.body + b" ", post.headers[SIGNATURE_HEADER.lower()])  # any change breaks it
    doc = json.loads(post.body)
    assert doc["priority"] == "critical" and doc["hl7_priority"] == "S"
    assert doc["reason"] == "PE suspected (probability 0.93): Central PE, RV/LV ratio >= 1"
    assert doc["accession_number"] == "ACC-0042" and doc["job_id"] == job_id
    assert doc["study_instance_uid"] == "1.2.826.0.1.3680043.1" and doc["series_instance_uid"] == "1.2.826.0.1.3680043.1.2"
    assert doc["findings"]["present"] == ["central_pe", "rv_lv_ratio_gte_1"] and doc["findings"]["pe_present"]
    assert doc["study_url"] == "https://pe-node:8443/studies/1.2.826.0.1.3680043.1"
    assert "patient" not in doc  # identity only when configured
    (row,) = st.notifications(job_id)
    assert post.headers[DELIVERY_HEADER.lower()] == control_id(row)
    assert (row.state, row.attempts, row.last_error) == (NotificationState.SENT, 1, None) and row.sent_at
    sender.poll_once()
    assert len(hook.posts) == 1  # sent stays sent
    st.close()


def test_rules_pick_targets_by_priority(tmp_path, hook):
    cfg = _config(hook.url, **{"notify.webhook_priorities": ["critical"]})
    st = State(tmp_path / "s.sqlite")
    urgent = _analysed_job(st, cfg, p=0.8, present=("leftsided_pe", "rv_lv_ratio_lt_1"), n=1)
    routine = _analysed_job(st, cfg, p=0.1, present=("negative_exam_for_pe",), n=2)
    critical = _analysed_job(st, cfg, n=3)
    assert st.notifications(urgent) == [] and st.notifications(routine) == []
    assert [n.target for n in st.notifications(critical)] == ["webhook"]
    st.close()


def test_an_error_answer_is_retried_with_backoff_and_the_same_delivery_id(tmp_path, hook):
    hook.statuses = [500, 503]
    cfg = _config(hook.url)
    st = State(tmp_path / "s.sqlite")
    job_id = _analysed_job(st, cfg)
    sender = NotificationSender(cfg, st)
    sender.start()
    try:
        wait_until(lambda: st.notifications(job_id)[0].state is NotificationState.SENT, 20, "webhook sent")
    finally:
        sender.stop()
    assert len(hook.posts) == 3
    assert len({p.headers[DELIVERY_HEADER.lower()] for p in hook.posts}) == 1 and len({p.body for p in hook.posts}) == 1
    (row,) = st.notifications(job_id)
    assert row.attempts == 3 and row.last_error is None
    st.close()


def test_a_listener_that_is_down_and_comes_back_gets_the_notification_once(tmp_path):
    hook = WebhookListener()  # port chosen, nothing listening yet
    cfg = _config(hook.url)
    st = State(tmp_path / "s.sqlite")
    job_id = _analysed_job(st, cfg)
    sender = NotificationSender(cfg, st)
    sender.start()
    try:
        wait_until(lambda: st.notifications(job_id)[0].attempts >= 3, 20, "three refused attempts")
        row = st.notifications(job_id)[0]
        assert row.state is NotificationState.PENDING and "ConnectionRefusedError" in (row.last_error or "")
        hook.start()
        wait_until(lambda: st.notifications(job_id)[0].state is NotificationState.SENT, 20, "webhook sent")
        time.sleep(0.5)  # more polls: nothing is sent again
    finally:
        sender.stop()
        hook.stop()
    assert len(hook.posts) == 1
    st.close()


def test_dead_after_max_attempts_then_resend_delivers(tmp_path, hook, capsys):
    from dicom_node.cli import main as node_main  # the CLI's status and resend

    down = WebhookListener()
    cfg = _config(down.url, **{"notify.max_attempts": 2, "data_dir": str(tmp_path / "data")})
    st = State(tmp_path / "data" / "state.sqlite")
    job_id = _analysed_job(st, cfg)
    sender = NotificationSender(cfg, st)
    for _ in range(2):
        sender.poll_once()
        time.sleep(0.3)
    (row,) = st.notifications(job_id)
    assert (row.state, row.attempts) == (NotificationState.DEAD, 2)
    assert node_main(["status", "--data-dir", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "notifications: pending=0, sent=0, dead=1" in out
    assert f"job {job_id} webhook notification dead after 2 attempt(s): webhook {down.url}: ConnectionRefusedError" in out
    assert f"job {job_id} has dead notifications; re-send with: dicom-node resend {job_id}" in out
    assert node_main(["resend", str(job_id), "--data-dir", str(tmp_path / "data")]) == 0
    assert f"job {job_id}: 1 notification(s) pending again: webhook" in capsys.readouterr().out
    sender.config = _config(hook.url)  # the receiver is reachable now (a reload of notify.webhook_url)
    sender.poll_once()
    assert st.notifications(job_id)[0].state is NotificationState.SENT and len(hook.posts) == 1
    st.close()


def test_dicom_node_config_does_not_print_the_webhook_secret(tmp_path, capsys):
    from dicom_node.cli import main as node_main

    f = tmp_path / "node.toml"
    f.write_text(f'[notify]\nwebhook_url = "http://127.0.0.1:9/hook"\nwebhook_secret = "{SECRET}"\n')
    assert node_main(["config", "--config", str(f)]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out and json.loads(out)["notify"]["webhook_secret"] == "(set; not shown)"
