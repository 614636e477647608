"""Revisions count what was delivered (`State._next_revision`), series are bound to one study and patient,
and a re-send repairs a series whose job failed (real SQLite)."""

from __future__ import annotations

import pytest

from dicom_node.durability.state import InstanceRow, JobState, SeriesConflict, SeriesState, State, patient_key


def _row(sop: str, series: str = "1.2.3", study: str = "1.2", t: float = 100.0, path: str | None = None) -> InstanceRow:
    return InstanceRow(sop, series, study, path or f"/x/{sop}.dcm", "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1",
                       t, 10, "SCU")


def _run(st: State, *, built: tuple[str, ...] | None, delivered: bool) -> int:
    """Claim the next job and take it to done (delivered) or failed (before or after building results)."""
    job = st.claim_next_job()
    assert job is not None
    if built is None:
        st.finish_job(job.id, JobState.FAILED, error="SeriesError: ...")
        return job.id
    st.transition(job.id, JobState.BUILT, result_uids=built)
    st.add_deliveries(job.id, ["PACS@h:1"])
    st.transition(job.id, JobState.SENDING)
    (d,) = st.deliveries(job.id)
    st.record_delivery(d.id, ok=delivered, error=None if delivered else "refused", give_up=not delivered)
    st.finish_job(job.id, JobState.DONE if delivered else JobState.FAILED)
    return job.id


def _complete_and_schedule(st: State, series: str = "1.2.3") -> tuple[str, int | None]:
    st.mark_complete(series)
    return st.schedule_series(series, selected=True, reason="selected")


def test_failed_runs_are_attempts_of_the_same_revision_and_a_full_resend_gives_a_first_sr(tmp_path):
    st = State(tmp_path / "s.sqlite")
    st.add_instance(_row("1.2.3.1"))
    for attempt in range(4):  # four partial series completing and failing, one of them after building results
        action, job_id = _complete_and_schedule(st)
        assert action == "queued"
        assert (st.job(job_id).revision, st.job(job_id).predecessor_result_uids) == (1, ())
        _run(st, built=("9.9.1",) if attempt == 2 else None, delivered=False)
        st.add_instance(_row(f"1.2.3.{attempt + 2}", t=200.0 + attempt))
    _action, job_id = _complete_and_schedule(st)
    _run(st, built=("2.25.1",), delivered=True)
    assert (st.job(job_id).revision, st.job(job_id).predecessor_result_uids) == (1, ())  # the first SR
    st.add_instance(_row("1.2.3.9", t=300.0))  # late instances: the next revision names the delivered one
    _action, second = _complete_and_schedule(st)
    claimed = st.claim_next_job()
    assert claimed.id == second and (claimed.revision, claimed.predecessor_result_uids) == (2, ("2.25.1",))


def test_a_failed_job_queued_again_runs_as_the_revision_after_what_was_delivered(tmp_path):
    st = State(tmp_path / "s.sqlite")
    st.add_instance(_row("1.2.3.1"))
    _complete_and_schedule(st)
    _run(st, built=("2.25.1",), delivered=True)
    st.add_instance(_row("1.2.3.2", t=200.0))
    _complete_and_schedule(st)
    failed = _run(st, built=None, delivered=False)
    assert st.job(failed).revision == 2
    st.transition(failed, JobState.QUEUED, stage="requeued")  # what `dicom-node resend` does
    again = st.claim_next_job()
    assert (again.id, again.revision, again.predecessor_result_uids) == (failed, 2, ("2.25.1",))


def test_a_job_whose_only_delivery_failed_delivered_nothing(tmp_path):
    st = State(tmp_path / "s.sqlite")
    st.add_instance(_row("1.2.3.1"))
    _complete_and_schedule(st)
    _run(st, built=("2.25.1",), delivered=False)
    assert st.duplicate_received("1.2.3", at=500.0)  # the sender's re-send reopens the series
    _action, job_id = _complete_and_schedule(st)
    assert (st.job(job_id).revision, st.job(job_id).predecessor_result_uids) == (1, ())


def test_a_duplicate_reopens_only_a_series_whose_newest_job_failed(tmp_path):
    st = State(tmp_path / "s.sqlite")
    st.add_instance(_row("1.2.3.1"))
    assert not st.duplicate_received("1.2.3")  # receiving, no job yet
    _complete_and_schedule(st)
    assert not st.duplicate_received("1.2.3")  # queued
    _run(st, built=None, delivered=False)
    assert st.series("1.2.3").state is SeriesState.DONE
    assert st.duplicate_received("1.2.3", at=500.0)
    s = st.series("1.2.3")
    assert (s.state, s.last_instance_at, s.n_instances) == (SeriesState.RECEIVING, 500.0, 1)
    _complete_and_schedule(st)
    _run(st, built=("2.25.1",), delivered=True)
    assert not st.duplicate_received("1.2.3")  # delivered: a re-send changes nothing
    assert st.series("1.2.3").state is SeriesState.DONE


def test_a_series_is_bound_to_the_study_and_patient_of_its_first_instance(tmp_path):
    st = State(tmp_path / "s.sqlite")
    alice, bob = patient_key("PID-1"), patient_key("PID-2")
    assert alice != bob and "PID" not in alice
    assert st.add_instance(_row("1.2.3.1"), patient_key=alice)
    assert st.series_conflict("1.2.3", "1.2", alice) is None
    with pytest.raises(SeriesConflict, match=r"Series 1\.2\.3 belongs to study 1\.2 but this instance names study 1\.7; "
                                             r"a series is part of one study"):
        st.add_instance(_row("1.2.3.2", study="1.7"), patient_key=alice)
    with pytest.raises(SeriesConflict, match=r"Series 1\.2\.3: this instance is of another patient than the series' "
                                             r"first instance \(their patient identifier or its issuer differ; values not logged\)"):
        st.add_instance(_row("1.2.3.3"), patient_key=bob)
    assert "PID" not in st.series_conflict("1.2.3", "1.2", bob)
    assert st.series("1.2.3").n_instances == 1 and not st.has_instance("1.2.3.2") and not st.has_instance("1.2.3.3")


def test_restoring_a_missing_file_points_the_row_at_it_and_reopens_the_series(tmp_path):
    st = State(tmp_path / "s.sqlite")
    st.add_instance(_row("1.2.3.1"))
    _complete_and_schedule(st)
    _run(st, built=None, delivered=False)
    st.restore_instance(_row("1.2.3.1", t=700.0, path="/y/1.2.3.1.dcm"))
    assert st.instance("1.2.3.1").path == "/y/1.2.3.1.dcm"
    s = st.series("1.2.3")
    assert (s.state, s.last_instance_at, s.n_instances) == (SeriesState.RECEIVING, 700.0, 1)
    with pytest.raises(KeyError, match="instance 9.9: no such instance"):
        st.restore_instance(_row("9.9"))
