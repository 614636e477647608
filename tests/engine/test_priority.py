"""Worklist priority: the rules (`decide_priority` under `[priority]`), their validation, the stored
columns and the worklist order of `State.worklist`."""

from __future__ import annotations

import pytest

from dicom_node.config import PRIORITY_VALUES, ConfigError, PriorityConfig, load_config
from dicom_node.durability.state import InstanceRow, JobOutcome, JobState, State
from dicom_node.engine.priority import READING_ORDER, Findings, Priority, PriorityDecision, decide_priority
from dicom_node.labels import STUDY_LABELS

ORDER = [p.value for p in READING_ORDER]


def _findings(p: float, *present: str, positive: bool | None = None) -> Findings:
    labels = {k: k in present for k in STUDY_LABELS}
    return Findings(pe_probability=p, positive=(p >= 0.5) if positive is None else positive, labels=labels,
                    probabilities={"pe_present_on_window": p})


def test_reading_order_is_critical_urgent_check_routine_and_matches_the_config_names():
    assert ORDER == ["critical", "urgent", "check", "routine"] == list(PRIORITY_VALUES)
    assert [p.rank for p in Priority] == [0, 1, 2, 3]
    assert [p.hl7_code for p in READING_ORDER] == ["S", "A", "A", "R"]


@pytest.mark.parametrize("findings, priority, reason", [
    (_findings(0.91, "central_pe", "rv_lv_ratio_gte_1"), Priority.CRITICAL,
     "PE suspected (probability 0.91): Central PE, RV/LV ratio >= 1"),
    (_findings(0.83, "rv_lv_ratio_gte_1", "leftsided_pe"), Priority.CRITICAL,
     "PE suspected (probability 0.83): RV/LV ratio >= 1"),
    (_findings(0.72, "leftsided_pe", "rv_lv_ratio_lt_1"), Priority.URGENT, "PE suspected (probability 0.72)"),
    (_findings(0.30, "indeterminate"), Priority.CHECK, "Indeterminate exam (PE probability 0.30)"),
    (_findings(0.12, "negative_exam_for_pe"), Priority.ROUTINE, "no PE found (probability 0.12)"),
])
def test_default_rules_turn_findings_into_class_reason_and_score(findings, priority, reason):
    d = decide_priority(findings)
    assert d == PriorityDecision(priority, reason, findings.pe_probability)


def test_a_failed_analysis_is_check_with_the_error_kind_and_no_patient_data():
    d = decide_priority(None, error="SeriesError: Series 1.2.3: slice spacing varies (0.9-2.1 mm)")
    assert d == PriorityDecision(Priority.CHECK, "analysis failed (SeriesError): read without AI triage", 0.0)
    assert decide_priority(None, PriorityConfig(failed_is_check=False)).priority is Priority.ROUTINE


def test_rules_are_configurable_critical_labels_triage_threshold_and_indeterminate():
    central_only = PriorityConfig(critical_labels=("central_pe",))
    assert decide_priority(_findings(0.8, "rv_lv_ratio_gte_1", "rightsided_pe"), central_only).priority is Priority.URGENT
    sensitive = PriorityConfig(pe_min_probability=0.35)
    d = decide_priority(_findings(0.40, "negative_exam_for_pe", positive=False), sensitive)
    assert (d.priority, d.reason) == (Priority.URGENT, "PE suspected (probability 0.40 >= triage threshold 0.35)")
    assert decide_priority(_findings(0.34, "negative_exam_for_pe", positive=False), sensitive).priority is Priority.ROUTINE
    relaxed = PriorityConfig(indeterminate_is_check=False)
    assert decide_priority(_findings(0.2, "indeterminate"), relaxed).priority is Priority.ROUTINE


@pytest.mark.parametrize("overrides, message", [
    ({"priority.critical_labels": ["central_pe", "saddle_pe"]},
     r"priority.critical_labels\[1\]: 'saddle_pe' is not a study label; use one of negative_exam_for_pe, "),
    ({"priority.pe_min_probability": 1.5}, r"priority.pe_min_probability: 1.5 is not allowed; a probability 0-1"),
    ({"notify.webhook_priorities": ["urgent", "stat"]},
     r"notify.webhook_priorities\[1\]: 'stat' is not a priority; use some of critical, urgent, check, routine"),
    ({"notify.webhook_url": "ftp://x"}, r"notify.webhook_url: 'ftp://x' is not an http\(s\) URL"),
    ({"notify.hl7_sending_facility": "A|B"}, r"notify.hl7_sending_facility: 'A\|B' contains an HL7 delimiter"),
])
def test_bad_priority_and_notify_settings_name_key_value_and_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, environ={}, overrides=overrides)


def test_priority_rules_come_from_toml_and_environment(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text('[priority]\ncritical_labels = ["central_pe"]\nindeterminate_is_check = false\n')
    cfg = load_config(f, environ={"DICOM_NODE_PRIORITY_PE_MIN_PROBABILITY": "0.3"})
    assert cfg.priority == PriorityConfig(critical_labels=("central_pe",), pe_min_probability=0.3,
                                          indeterminate_is_check=False)


def _series(st: State, n: int, t: float) -> tuple[str, int]:
    series_uid = f"1.2.826.0.1.{n}.1"
    st.add_instance(InstanceRow(f"{series_uid}.1", series_uid, f"1.2.826.0.1.{n}", "/x.dcm", "1.2", "1.2", t, 10, "CT"))
    assert st.mark_complete(series_uid)
    action, job_id = st.schedule_series(series_uid, selected=True, reason="ok")
    assert action == "queued" and job_id is not None
    return series_uid, job_id


def _analyse(st: State, job_id: int, d: PriorityDecision, *, fail: bool = False) -> None:
    claimed = st.claim_next_job()
    assert claimed is not None and claimed.id == job_id
    outcome = JobOutcome(d.priority.value, d.reason, d.score)
    if fail:
        st.finish_job(job_id, JobState.FAILED, error="boom", outcome=outcome)
    else:
        st.transition(job_id, JobState.BUILT, stage="built", result_uids=("9.9",), outcome=outcome)


def test_worklist_orders_by_class_then_score_then_arrival_with_unanalysed_before_routine(tmp_path):
    st = State(tmp_path / "s.sqlite")
    cases = [  # arrival order; (findings or None for a failure)
        ("routine-early", _findings(0.05, "negative_exam_for_pe")),
        ("urgent-low", _findings(0.60, "leftsided_pe")),
        ("failed", None),
        ("critical", _findings(0.70, "central_pe")),
        ("urgent-high", _findings(0.95, "rightsided_pe")),
        ("routine-higher", _findings(0.20, "negative_exam_for_pe")),
        ("urgent-low-later", _findings(0.60, "leftsided_pe")),
        ("pending", "queued"),
    ]
    names = {}
    for i, (name, f) in enumerate(cases):
        series_uid, job_id = _series(st, i, 1000.0 + i)
        names[series_uid] = name
        if f == "queued":
            continue
        _analyse(st, job_id, decide_priority(f if isinstance(f, Findings) else None, error="X: y"), fail=f is None)
    listed = st.worklist(ORDER)
    assert [names[r.series_uid] for r in listed] == [
        "critical", "urgent-high", "urgent-low", "urgent-low-later", "failed", "pending", "routine-higher",
        "routine-early"]
    first = listed[0]
    assert first.priority == "critical" and first.job is not None
    assert (first.job.priority_reason, first.job.priority_score) == ("PE suspected (probability 0.70): Central PE", 0.7)
    assert listed[4].job.state is JobState.FAILED and listed[4].priority == "check"
    assert listed[5].job.state is JobState.QUEUED and listed[5].priority is None
    assert [names[r.series_uid] for r in st.worklist(ORDER, priorities=["urgent"])] == [
        "urgent-high", "urgent-low", "urgent-low-later"]
    assert [names[r.series_uid] for r in st.worklist(ORDER, priorities=["check", ""])] == ["failed", "pending"]
    assert [names[r.series_uid] for r in st.worklist(ORDER, limit=2, offset=1)] == ["urgent-high", "urgent-low"]
    st.close()
