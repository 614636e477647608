"""Write `state_v0.sqlite`: a state database as installed nodes have it before schema versioning.

Version 0 = no `PRAGMA user_version`, tables exactly as `State` created them at commit fdfebf8
(the last change of dicom_node/durability/state.py before versioning). The script loads that
commit's state.py from git, not today's, so rerunning it always writes a version-0 file:

    .venv/bin/python tests/durability/data/make_v0_state.py

Contents: 7 instances in 4 series (receiving, complete, skipped, selected, done), 6 jobs (queued,
running with a re-run requested, built, sending, done, failed; re-runs with predecessor UIDs)
and 4 deliveries (pending after a failed attempt, done, failed). tests/durability/test_state_schema.py
migrates a copy and compares it row by row with this file.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
V0_COMMIT = "fdfebf8"
OUT = HERE / "state_v0.sqlite"


def _v0_state_module() -> ModuleType:
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{V0_COMMIT}:dicom_node/durability/state.py"],
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "state_v0_code.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("state_v0_code", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    s = _v0_state_module()
    OUT.unlink(missing_ok=True)
    st = s.State(OUT)
    ct, ts = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"

    def add(sop: str, series: str, study: str, t: float, aet: str = "CT01") -> None:
        st.add_instance(s.InstanceRow(sop, series, study, f"/data/spool/{study}/{series}/{sop}.dcm", ct, ts, t,
                                      1000 + len(sop), aet))

    # series A: done, two jobs (revision 1 done, revision 2 failed then resend pending)
    for i in range(3):
        add(f"1.2.1.1.{i}", "1.2.1.1", "1.2.1", 1000.0 + i)
    # series B: selected, jobs running / built / sending
    add("1.2.2.1.0", "1.2.2.1", "1.2.2", 2000.0, aet="CT02")
    add("1.2.2.1.1", "1.2.2.1", "1.2.2", 2001.0, aet="CT02")
    # series C: skipped (localizer)
    add("1.2.3.1.0", "1.2.3.1", "1.2.3", 3000.0)
    # series D: still receiving
    add("1.2.4.1.0", "1.2.4.1", "1.2.4", 4000.0)

    assert st.mark_complete("1.2.1.1", at=1010.0)
    action, j1 = st.schedule_series("1.2.1.1", selected=True, reason="ok", priority=1)
    assert action == "queued" and j1 is not None
    st.claim_next_job()
    st.transition(j1, s.JobState.BUILT, stage="built", at=1020.0, result_uids=("2.25.1", "2.25.2"))
    st.add_deliveries(j1, ["PACS@10.0.0.1:104", "ARCHIVE@10.0.0.2:11112"], at=1021.0)
    st.transition(j1, s.JobState.SENDING, stage="sending", at=1021.0)
    st.request_rerun(j1)
    for d in st.deliveries(j1):
        st.record_delivery(d.id, ok=True)
    _job, j2 = st.finish_job(j1, s.JobState.DONE)  # starts the requested re-run (revision 2)
    assert j2 is not None
    st.claim_next_job()
    st.transition(j2, s.JobState.BUILT, stage="built", at=1040.0, result_uids=("2.25.3",))
    st.add_deliveries(j2, ["PACS@10.0.0.1:104"], at=1041.0)
    st.transition(j2, s.JobState.SENDING, stage="sending", at=1041.0)
    (d2,) = st.deliveries(j2)
    st.record_delivery(d2.id, ok=False, error="association rejected", give_up=True)
    st.finish_job(j2, s.JobState.FAILED, error="delivery failed: PACS@10.0.0.1:104")

    assert st.mark_complete("1.2.2.1", at=2010.0)
    _action, j3 = st.schedule_series("1.2.2.1", selected=True, reason="ok")
    assert j3 is not None
    st.claim_next_job()  # j3 running, with a re-run requested
    st.request_rerun(j3)
    j4 = st.create_job("1.2.2.1", "1.2.2", revision=2, predecessor_result_uids=("2.25.9",), at=2020.0)
    st.claim_next_job()
    st.transition(j4, s.JobState.BUILT, stage="built", at=2030.0, result_uids=("2.25.10",))
    j5 = st.create_job("1.2.2.1", "1.2.2", revision=3, at=2040.0)
    st.claim_next_job()
    st.transition(j5, s.JobState.BUILT, stage="built", at=2050.0, result_uids=("2.25.11", "2.25.12"))
    st.add_deliveries(j5, ["PACS@10.0.0.1:104"], at=2051.0)
    st.transition(j5, s.JobState.SENDING, stage="sending", at=2051.0)
    (d5,) = st.deliveries(j5)
    st.record_delivery(d5.id, ok=False, error="timeout", next_try_at=2111.0)

    assert st.mark_complete("1.2.3.1", at=3010.0)
    st.schedule_series("1.2.3.1", selected=False, reason="localizer")

    st.create_job("1.2.4.1", "1.2.4", priority=5, at=4010.0)  # queued (stays queued)

    counts = st.job_counts()
    assert all(counts[k.value] >= 1 for k in s.JobState), counts
    st._conn().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    assert st._conn().execute("PRAGMA user_version").fetchone()[0] == 0
    st.close()  # the last connection: the WAL is checkpointed into the file and removed
    for extra in ("-wal", "-shm"):
        Path(str(OUT) + extra).unlink(missing_ok=True)
    print(f"wrote {OUT.relative_to(ROOT)}: jobs {counts}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
