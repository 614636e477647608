"""State database, spool, configuration, selection rules and backoff (real SQLite and files)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import pytest
import tomllib

from dicom_node.config import ConfigError, configuration_markdown, default_config_toml, load_config
from dicom_node.durability.spool import DiskFull, InvalidUid, Spool, validate_uid
from dicom_node.durability.state import (
    MACHINES,
    SERIES_MACHINE,
    TRANSITIONS,
    DeliveryState,
    InstanceRow,
    JobState,
    SeriesState,
    State,
    TransitionError,
)
from dicom_node.engine.selection import SeriesHeader, select_series
from dicom_node.engine.worker import RETRY_UNAVAILABLE_CAP_S, retry_delay
from dicom_node.network.send import backoff_delay


def _row(sop, series="1.2.3", study="1.2", t=100.0):
    return InstanceRow(sop, series, study, f"/x/{sop}.dcm", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", t, 10, "SCU")


def test_duplicate_instance_is_one_row(tmp_path):
    st = State(tmp_path / "s.sqlite")
    assert st.add_instance(_row("1.2.3.1")) is True
    assert st.add_instance(_row("1.2.3.1")) is False
    assert st.series("1.2.3").n_instances == 1
    assert st._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert st._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


def test_job_state_machine_rejects_illegal_transitions(tmp_path):
    st = State(tmp_path / "s.sqlite")
    job = st.create_job("1.2.3", "1.2")
    with pytest.raises(TransitionError, match=r"job 1: cannot go from queued to done; allowed: \['running'\]"):
        st.transition(job, JobState.DONE)
    assert st.claim_next_job().state is JobState.RUNNING
    st.transition(job, JobState.BUILT, result_uids=("9.9",))
    st.transition(job, JobState.SENDING)
    st.finish_job(job, JobState.DONE)
    with pytest.raises(TransitionError, match="none \\(final\\)"):
        st.transition(job, JobState.QUEUED)


def test_series_and_delivery_changes_are_checked_by_their_tables(tmp_path):
    st = State(tmp_path / "s.sqlite")
    st.add_instance(_row("1.2.3.1"))
    with pytest.raises(TransitionError, match=r"series 1\.2\.3: cannot go from receiving to done; "
                                              r"allowed: \['complete', 'receiving'\]"):
        SERIES_MACHINE.check("1.2.3", SeriesState.RECEIVING, SeriesState.DONE)
    job = st.create_job("1.2.3", "1.2")
    st.add_deliveries(job, ["A@h:1", "B@h:2"])
    a, b = st.deliveries(job)
    assert st.record_delivery(a.id, ok=False, error="refused", next_try_at=1.0).state is DeliveryState.PENDING
    assert st.record_delivery(a.id, ok=False, error="refused", give_up=True).state is DeliveryState.FAILED
    assert st.record_delivery(b.id, ok=True).state is DeliveryState.DONE
    with pytest.raises(TransitionError, match=rf"delivery {b.id}: cannot go from done to pending; allowed: none"):
        st.record_delivery(b.id, ok=False, error="late")
    assert st.reset_deliveries(job) == 1  # only the failed one
    assert [(d.state, d.attempts) for d in st.deliveries(job)] == [(DeliveryState.PENDING, 0), (DeliveryState.DONE, 1)]
    with pytest.raises(KeyError, match="job 99: no such job"):
        st.transition(99, JobState.RUNNING)


def test_every_state_change_goes_through_the_transition_table():
    """The only `UPDATE ... SET state` is the generic one in `_move`; jobs are inserted in one place."""
    assert set(TRANSITIONS) == {"series", "job", "delivery", "notification"}
    for m in MACHINES:
        assert set(m.allowed) == set(m.states), f"{m.entity}: every state needs a row in the table"
    root = Path(__file__).resolve().parents[2] / "dicom_node"
    state_updates, job_inserts = [], []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        where = str(path.relative_to(root))
        state_updates += [(where, m.group(0)) for m in re.finditer(r"UPDATE\s+\S+\s+SET\s+state\b", text)]
        job_inserts += [where for _ in re.finditer(r"INSERT\s+INTO\s+jobs\b", text)]
    assert state_updates == [("durability/state.py", "UPDATE {m.table} SET state")]
    assert job_inserts == ["durability/state.py"]


def test_claim_order_is_priority_then_age(tmp_path):
    st = State(tmp_path / "s.sqlite")
    a = st.create_job("1.1", "1")
    b = st.create_job("1.2", "1", priority=5)
    c = st.create_job("1.3", "1")
    assert [st.claim_next_job().id for _ in range(3)] == [b, a, c]
    assert st.claim_next_job() is None


def test_a_deferred_job_waits_until_its_time_keeps_its_attempts_and_runs_at_once_when_asked(tmp_path):
    st = State(tmp_path / "s.sqlite")
    a = st.create_job("1.1", "1", priority=5)
    b = st.create_job("1.2", "1")
    assert st.claim_next_job(now=1000.0).id == a
    waiting = st.defer_job(a, not_before=1030.0, error="BackendUnavailable: Triton server grpc://h:1: down")
    assert (waiting.state, waiting.attempts, waiting.not_before) == (JobState.QUEUED, 1, 1030.0)
    assert waiting.error.startswith("BackendUnavailable") and "deferred" in waiting.times
    assert st.claim_next_job(now=1029.0).id == b  # the higher priority of a waits for its time
    assert st.claim_next_job(now=1029.9) is None
    again = st.claim_next_job(now=1030.0)
    assert (again.id, again.state, again.attempts, again.revision) == (a, JobState.RUNNING, 2, 1)
    st.defer_job(a, not_before=2000.0, error="down again")
    assert st.run_deferred_now(b) == 0  # running, not waiting
    assert st.run_deferred_now(a) == 1 and st.job(a).not_before == 0
    assert st.claim_next_job(now=1031.0).id == a
    with pytest.raises(TransitionError, match=r"job 3: cannot go from queued to queued; allowed: \[.running.\]"):
        st.defer_job(st.create_job("1.3", "1"), not_before=0.0, error="x")  # only a running job is deferred


def test_tries_while_the_backend_is_away_count_afresh_after_resend_while_attempts_count_the_jobs_whole_life(tmp_path):
    st = State(tmp_path / "s.sqlite")
    a = st.create_job("1.1", "1")
    for t in (1000.0, 2000.0, 3000.0):
        st.claim_next_job(now=t)
        st.defer_job(a, not_before=t + 1, error="BackendUnavailable: down")
    assert (st.job(a).deferrals, st.job(a).attempts) == (3, 3)
    assert st.run_deferred_now() == 1 and st.job(a).deferrals == 3  # a restart runs it now but keeps the count
    st.claim_next_job(now=4000.0)
    st.finish_job(a, JobState.FAILED, error="BackendUnavailable: down")
    resent = st.transition(a, JobState.QUEUED, stage="requeued")  # what `dicom-node resend` does
    assert (resent.deferrals, resent.attempts) == (0, 4)
    st.claim_next_job(now=5000.0)
    st.defer_job(a, not_before=6000.0, error="BackendUnavailable: down")
    assert st.job(a).deferrals == 1
    assert st.run_deferred_now(a) == 1 and st.job(a).deferrals == 0  # `resend` of a waiting job: fresh tries too


def test_completion_waits_for_quiet_and_reruns_once(tmp_path):
    st = State(tmp_path / "s.sqlite")
    st.add_instance(_row("1.2.3.1", t=100.0))
    assert not st.mark_complete("1.2.3", quiet_before=100.0)  # not quiet yet
    assert st.mark_complete("1.2.3", quiet_before=100.5)
    action, job = st.schedule_series("1.2.3", selected=True, reason="selected")
    assert action == "queued"
    st.claim_next_job()
    st.transition(job, JobState.BUILT, result_uids=("5.5.1",))
    for k in (2, 3):  # two late batches while the job is busy
        st.add_instance(_row(f"1.2.3.{k}", t=200.0 + k))
        assert st.series("1.2.3").state is SeriesState.RECEIVING
        st.mark_complete("1.2.3")
        assert st.schedule_series("1.2.3", selected=True, reason="selected") == ("rerun", job)
    st.transition(job, JobState.SENDING)
    _, rerun = st.finish_job(job, JobState.DONE)
    rerun_job = st.job(rerun)
    assert (rerun_job.revision, rerun_job.predecessor_result_uids, rerun_job.state) == (2, ("5.5.1",), JobState.QUEUED)
    assert len(st.jobs()) == 2
    st.claim_next_job()
    st.transition(rerun, JobState.FAILED)
    assert st.start_rerun_if_requested(st.job(rerun)) is None
    assert st.series("1.2.3").state is SeriesState.DONE


def test_skipped_series_keeps_reason(tmp_path):
    st = State(tmp_path / "s.sqlite")
    st.add_instance(_row("1.2.3.1"))
    st.mark_complete("1.2.3")
    assert st.schedule_series("1.2.3", selected=False, reason="localizer (ImageType LOCALIZER)") == ("skipped", None)
    assert st.series("1.2.3").skip_reason == "localizer (ImageType LOCALIZER)"
    assert st.jobs() == []


@pytest.mark.parametrize("bad", ["", "1.2.a", "../../etc/passwd", "1.2/3", "1." + "2" * 64, None, "1..2"])
def test_invalid_uids_never_become_paths(tmp_path, bad):
    spool = Spool(tmp_path)
    with pytest.raises(InvalidUid, match="SOPInstanceUID|not text"):
        spool.instance_path("1.2", "1.2.3", bad)
    assert validate_uid("1.2.840.10008\x00") == "1.2.840.10008"


def test_durable_store_and_disk_minimum(tmp_path):
    spool = Spool(tmp_path, min_free_disk_mb=0)
    p = spool.store("1.2", "1.2.3", "1.2.3.4", b"DICM")
    assert p == tmp_path / "spool" / "1.2" / "1.2.3" / "1.2.3.4.dcm" and p.read_bytes() == b"DICM"
    assert [f.name for f in p.parent.iterdir()] == ["1.2.3.4.dcm"]
    full = Spool(tmp_path, min_free_disk_mb=10**12)
    with pytest.raises(DiskFull, match="below min_free_disk_mb=1000000000000"):
        full.store("1.2", "1.2.3", "1.2.3.5", b"x")
    assert not (tmp_path / "spool" / "1.2" / "1.2.3" / "1.2.3.5.dcm").exists()


def test_config_layers_and_errors(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text('ae_title = "FILEAE"\nport = 4000\n[retry]\nmax_attempts = 3\n'
                 '[[destinations]]\nae_title = "PACS"\nhost = "10.0.0.5"\nport = 104\n')
    cfg = load_config(f, environ={"DICOM_NODE_PORT": "4001", "DICOM_NODE_RETRY_MAX_DELAY_S": "9"},
                      overrides={"ae_title": "CLIAE"})
    assert (cfg.ae_title, cfg.port, cfg.retry.max_attempts, cfg.retry.max_delay_s) == ("CLIAE", 4001, 3, 9.0)
    assert str(cfg.destinations[0]) == "PACS@10.0.0.5:104"
    with pytest.raises(ConfigError, match=r"port: 70000 is not allowed; 0-65535"):
        load_config(None, overrides={"port": 70000}, environ={})
    with pytest.raises(ConfigError, match=r"retry.max_attempts: 'many' is not an integer"):
        load_config(None, environ={"DICOM_NODE_RETRY_MAX_ATTEMPTS": "many"})
    with pytest.raises(ConfigError, match=r"accept_other_storage: 'drop' is not allowed; 'ignore' or 'reject'"):
        load_config(None, overrides={"accept_other_storage": "drop"}, environ={})
    with pytest.raises(ConfigError, match=r"destinations\[0\]: 'PACS:104' is not AE@HOST:PORT"):
        load_config(None, overrides={"destinations": ["PACS:104"]}, environ={})
    f.write_text('[selection]\nmin_slices = 10\nwhat = 1\n')
    with pytest.raises(ConfigError, match=r"selection.what: unknown key at \[selection\]"):
        load_config(f, environ={})
    with pytest.raises(ConfigError, match=r"tls.cert: '' is not allowed; an existing PEM file"):
        load_config(None, overrides={"tls.enabled": True}, environ={})
    with pytest.raises(ConfigError, match="DICOM_NODE_NOPE: unknown setting"):
        load_config(None, environ={"DICOM_NODE_NOPE": "1"})


def test_default_toml_documents_and_loads_every_key(tmp_path):
    text = default_config_toml()
    data = tomllib.loads(text)
    (tmp_path / "d.toml").write_text(text)
    assert load_config(tmp_path / "d.toml", environ={}) == load_config(None, environ={})
    md = configuration_markdown()
    for section in ("timeouts", "tls", "retry", "spool", "worker", "selection", "results", "inference", "log"):
        for key in data[section]:
            assert f"`{section}.{key}`" in md
    assert "`quiet_period_s`" in md and "DICOM_NODE_RETRY_MAX_ATTEMPTS" in md


def _header(**kw):
    base = dict(sop_class_uid="1.2.840.10008.5.1.4.1.1.2", modality="CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                slice_thickness_mm=1.0, series_description="CTPA 1mm", contrast_agent="IOHEXOL", n_slices=200)
    return SeriesHeader(**{**base, **kw})


@pytest.mark.parametrize("kw,reason", [
    ({}, "selected"),
    ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "localizer"),
    ({"sop_class_uid": "1.2.840.10008.5.1.4.1.1.88.67"}, "dose report"),
    ({"modality": "MR"}, "Modality 'MR' is not 'CT'"),
    ({"image_type": ("DERIVED", "SECONDARY", "AXIAL")}, "lacks ORIGINAL/PRIMARY"),
    ({"slice_thickness_mm": 5.0}, "SliceThickness 5 mm outside 0-3 mm"),
    ({"n_slices": 12}, "12 slices, fewer than min_slices=20"),
    ({"series_description": "Scout view"}, "matches description_exclude 'scout'"),
])
def test_selection_rules_name_the_reason(kw, reason):
    d = select_series(_header(**kw), load_config(None, environ={}).selection)
    assert d.selected == (reason == "selected") and reason in d.reason


def test_selection_include_and_contrast_rules():
    rules = load_config(None, overrides={"selection.description_include": ["ctpa", "angio"],
                                         "selection.require_contrast": True}, environ={}).selection
    assert select_series(_header(series_description="Chest routine"), rules).reason.endswith("matches no description_include pattern")
    assert "no ContrastBolusAgent" in select_series(_header(contrast_agent=""), rules).reason


def test_backoff_is_exponential_jittered_and_capped():
    rng = random.Random(1)
    delays = [backoff_delay(k, 2.0, 30.0, rng) for k in range(1, 9)]
    assert 1.5 <= delays[0] <= 2.5 and 6.0 <= delays[2] <= 10.0
    assert all(d <= 30.0 for d in delays) and delays[-1] >= 22.5


def test_a_deferred_jobs_wait_doubles_from_the_first_wait_up_to_15_minutes():
    assert [retry_delay(30.0, attempts) for attempts in range(1, 8)] == [30, 60, 120, 240, 480, 900, 900]
    assert RETRY_UNAVAILABLE_CAP_S == 15 * 60 and retry_delay(1.0, 0) == 1.0
    # the default tries span about 90 minutes of waiting before the job fails
    assert sum(retry_delay(30.0, a) for a in range(1, 11)) == 30 + 60 + 120 + 240 + 480 + 5 * 900
