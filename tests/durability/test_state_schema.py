"""Schema versions of the state database: migration of an installed (version 0) file, back-up, refusal.

`data/state_v0.sqlite` was written by the code before versioning (`data/make_v0_state.py`):
instances, series in every state, jobs in every state, pending/done/failed deliveries.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from dicom_node.durability import state as state_module
from dicom_node.durability.state import (
    MIGRATIONS,
    SCHEMA_VERSION,
    DeliveryState,
    JobState,
    Migration,
    State,
    StateSchemaError,
)

V0 = Path(__file__).parent / "data" / "state_v0.sqlite"
TABLES = {"instances": "sop_uid", "series": "series_uid", "jobs": "id", "deliveries": "id"}


def _columns(path: Path, table: str) -> list[str]:
    c = sqlite3.connect(path)
    try:
        return [r[1] for r in c.execute(f"PRAGMA table_info({table})")]
    finally:
        c.close()


def _rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the version-0 tables, in the version-0 columns (later steps may add columns)."""
    c = sqlite3.connect(path)
    try:
        return {t: c.execute(f"SELECT {', '.join(_columns(V0, t))} FROM {t} ORDER BY {key}").fetchall()
                for t, key in TABLES.items()}
    finally:
        c.close()


def _version(path: Path) -> int:
    c = sqlite3.connect(path)
    try:
        v: int = c.execute("PRAGMA user_version").fetchone()[0]
        return v
    finally:
        c.close()


def _installed_node(tmp_path: Path) -> Path:
    db = tmp_path / "data" / "state.sqlite"
    db.parent.mkdir()
    shutil.copyfile(V0, db)
    return db


def test_the_fixture_is_an_unversioned_database_with_every_job_state():
    assert _version(V0) == 0
    rows = _rows(V0)
    assert {r[3] for r in rows["jobs"]} == {s.value for s in JobState}
    assert {r[3] for r in rows["deliveries"]} == {s.value for s in DeliveryState}
    assert len(rows["instances"]) == 7 and len(rows["series"]) == 4


def test_a_version_0_database_is_backed_up_then_migrated_without_losing_a_row(tmp_path):
    db = _installed_node(tmp_path)
    # a committed row that is still only in the WAL (the writer stays open): a plain file copy would miss it
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("PRAGMA journal_mode=WAL")
    writer.execute("INSERT INTO instances VALUES ('1.2.4.1.1','1.2.4.1','1.2.4','/x.dcm','1.2','1.2',4001.0,5,'CT01')")
    assert Path(f"{db}-wal").stat().st_size > 0
    before = _rows(db)
    with capture_logs() as logs:
        st = State(db)
    writer.close()

    assert _version(db) == SCHEMA_VERSION == MIGRATIONS[-1].version >= 3
    assert _rows(db) == before  # row by row, every column
    assert [j.state for j in st.jobs()] == [JobState.DONE, JobState.FAILED, JobState.RUNNING, JobState.BUILT,
                                            JobState.SENDING, JobState.QUEUED]
    assert st.job(3).rerun_requested and st.job(2).predecessor_result_uids == ("2.25.1", "2.25.2")
    assert [d.state for d in st.deliveries()] == [DeliveryState.DONE, DeliveryState.DONE, DeliveryState.FAILED,
                                                  DeliveryState.PENDING]
    assert [d.id for d in st.due_deliveries(now=3000.0)] == [4]
    indexes = {r[0] for r in st._conn().execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert "deliveries_due" in indexes
    st.close()

    backup = db.with_name("state.sqlite.v0.bak")
    assert _version(backup) == 0 and _rows(backup) == before
    assert "1.2.4.1.1" in {r[0] for r in before["instances"]}
    assert logs == [{"event": "state_migrated", "log_level": "info", "path": str(db), "from_version": 0,
                     "to_version": SCHEMA_VERSION, "backup": str(backup)}]


def test_a_second_open_does_not_migrate_or_back_up_again(tmp_path):
    db = _installed_node(tmp_path)
    State(db).close()
    backup = db.with_name("state.sqlite.v0.bak")
    stamp = backup.stat().st_mtime_ns
    with capture_logs() as logs:
        State(db).close()
    assert logs == []
    assert sorted(p.name for p in db.parent.glob("*.bak")) == ["state.sqlite.v0.bak"]
    assert backup.stat().st_mtime_ns == stamp and _version(db) == SCHEMA_VERSION


def test_an_earlier_back_up_of_the_same_version_is_kept(tmp_path):
    db = _installed_node(tmp_path)
    earlier = db.with_name("state.sqlite.v0.bak")
    earlier.write_bytes(b"an operator's own copy")
    State(db).close()
    assert earlier.read_bytes() == b"an operator's own copy"
    assert _rows(db.with_name("state.sqlite.v0.2.bak")) == _rows(V0)


def test_a_fresh_database_starts_at_the_current_version_without_a_back_up(tmp_path):
    db = tmp_path / "new" / "state.sqlite"
    with capture_logs() as logs:
        st = State(db)
    assert _version(db) == SCHEMA_VERSION and logs == []
    assert st.create_job("1.2.3", "1.2") == 1
    st.close()
    assert list(db.parent.glob("*.bak")) == []


def test_a_database_newer_than_the_code_is_refused_and_left_untouched(tmp_path):
    db = _installed_node(tmp_path)
    State(db).close()
    c = sqlite3.connect(db)
    c.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    c.close()
    before = db.read_bytes()
    with pytest.raises(StateSchemaError) as e:
        State(db)
    assert str(e.value) == (
        f"state database {db} has schema version {SCHEMA_VERSION + 1}, newer than this dicom-node knows "
        f"(newest {SCHEMA_VERSION}); upgrade dicom-node to the release that wrote it, or restore a back-up made "
        f"before that upgrade (e.g. state.sqlite.v{SCHEMA_VERSION}.bak next to it)")
    assert db.read_bytes() == before and _version(db) == SCHEMA_VERSION + 1
    assert sorted(p.name for p in db.parent.glob("*.bak")) == ["state.sqlite.v0.bak"]


def test_a_failing_migration_step_rolls_back_and_leaves_the_last_completed_version(tmp_path, monkeypatch):
    db = _installed_node(tmp_path)
    broken = Migration(SCHEMA_VERSION + 1, "a step that fails halfway",
                       ("CREATE TABLE half_done (x)", "INSERT INTO no_such_table VALUES (1)"))
    monkeypatch.setattr(state_module, "MIGRATIONS", (*MIGRATIONS, broken))
    monkeypatch.setattr(state_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        State(db)
    assert _version(db) == SCHEMA_VERSION and _rows(db) == _rows(V0)
    c = sqlite3.connect(db)
    assert c.execute("SELECT name FROM sqlite_master WHERE name='half_done'").fetchone() is None
    c.close()


def test_dicom_node_serve_on_a_newer_database_exits_2_with_one_line(tmp_path):
    db = _installed_node(tmp_path)
    State(db).close()
    c = sqlite3.connect(db)
    c.execute("PRAGMA user_version=7")
    c.close()
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--port", "0", "--data-dir", str(db.parent)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.splitlines() == [
        f"dicom-node serve: state database {db} has schema version 7, newer than this dicom-node knows "
        f"(newest {SCHEMA_VERSION}); upgrade dicom-node to the release that wrote it, or restore a back-up made "
        f"before that upgrade (e.g. state.sqlite.v{SCHEMA_VERSION}.bak next to it)"]
    assert _version(db) == 7


@pytest.mark.parametrize("command", [["status"], ["status", "--json"], ["resend", "1"], ["complete", "1.2.3"]])
def test_commands_that_read_a_newer_database_exit_2_with_one_line(tmp_path, command):
    db = _installed_node(tmp_path)
    State(db).close()
    c = sqlite3.connect(db)
    c.execute("PRAGMA user_version=7")
    c.close()
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", *command, "--data-dir", str(db.parent)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    (line,) = r.stderr.splitlines()
    assert f"state database {db} has schema version 7, newer than this dicom-node knows" in line
    assert _version(db) == 7
