"""SQLite state of the node: instances, series, jobs and deliveries, with explicit state machines.

WAL mode with `synchronous=FULL`: an instance is acknowledged only after its row commits, and FULL
makes that commit survive power loss, not just a process crash (NORMAL in WAL mode may lose the
last transactions on power loss, which would break "an acknowledged instance is never lost").
The cost is one WAL fsync per commit, measured by benchmarks/receive.py.

One connection per thread (`threading.local`); every method is one short transaction.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

__all__ = ["State", "SeriesState", "JobState", "DeliveryState", "InstanceRow", "SeriesRow", "JobRow",
           "DeliveryRow", "TransitionError", "JOB_TRANSITIONS"]


class SeriesState(str, Enum):
    RECEIVING = "receiving"
    COMPLETE = "complete"
    SELECTED = "selected"
    SKIPPED = "skipped"
    DONE = "done"


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    BUILT = "built"
    SENDING = "sending"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(str, Enum):
    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


#: allowed job transitions (recovery moves running -> queued; resend moves failed -> sending/queued)
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING}),
    JobState.RUNNING: frozenset({JobState.BUILT, JobState.FAILED, JobState.QUEUED}),
    JobState.BUILT: frozenset({JobState.SENDING}),
    JobState.SENDING: frozenset({JobState.DONE, JobState.FAILED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.SENDING}),
}


class TransitionError(RuntimeError):
    """A job state change that the state machine does not allow."""


@dataclass(frozen=True)
class InstanceRow:
    sop_uid: str
    series_uid: str
    study_uid: str
    path: str
    sop_class_uid: str
    transfer_syntax: str
    received_at: float
    bytes: int
    calling_aet: str


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    state: SeriesState
    first_instance_at: float
    last_instance_at: float
    n_instances: int
    skip_reason: str | None
    calling_aet: str
    completed_at: float | None


@dataclass(frozen=True)
class JobRow:
    id: int
    series_uid: str
    study_uid: str
    state: JobState
    attempts: int
    priority: int
    revision: int
    rerun_requested: bool
    predecessor_result_uids: tuple[str, ...]
    result_uids: tuple[str, ...]
    error: str | None
    times: dict  # stage -> unix time (queued, started, preprocessed, inferred, built, sent, ...)


@dataclass(frozen=True)
class DeliveryRow:
    id: int
    job_id: int
    destination: str
    state: DeliveryState
    attempts: int
    next_try_at: float
    last_error: str | None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
  sop_uid TEXT PRIMARY KEY, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL, path TEXT NOT NULL,
  sop_class_uid TEXT NOT NULL, transfer_syntax TEXT NOT NULL, received_at REAL NOT NULL,
  bytes INTEGER NOT NULL, calling_aet TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS instances_series ON instances(series_uid);
CREATE TABLE IF NOT EXISTS series (
  series_uid TEXT PRIMARY KEY, study_uid TEXT NOT NULL, state TEXT NOT NULL,
  first_instance_at REAL NOT NULL, last_instance_at REAL NOT NULL, n_instances INTEGER NOT NULL,
  skip_reason TEXT, calling_aet TEXT NOT NULL, completed_at REAL);
CREATE INDEX IF NOT EXISTS series_state ON series(state, last_instance_at);
CREATE TABLE IF NOT EXISTS jobs (
  id INTEGER PRIMARY KEY AUTOINCREMENT, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
  state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, priority INTEGER NOT NULL DEFAULT 0,
  revision INTEGER NOT NULL DEFAULT 1, rerun_requested INTEGER NOT NULL DEFAULT 0,
  predecessor_result_uids TEXT NOT NULL DEFAULT '[]', result_uids TEXT NOT NULL DEFAULT '[]',
  error TEXT, times TEXT NOT NULL DEFAULT '{}');
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, priority, id);
CREATE TABLE IF NOT EXISTS deliveries (
  id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL REFERENCES jobs(id),
  destination TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
  next_try_at REAL NOT NULL, last_error TEXT, UNIQUE(job_id, destination));
"""


def _job(r: sqlite3.Row) -> JobRow:
    return JobRow(r["id"], r["series_uid"], r["study_uid"], JobState(r["state"]), r["attempts"], r["priority"],
                  r["revision"], bool(r["rerun_requested"]), tuple(json.loads(r["predecessor_result_uids"])),
                  tuple(json.loads(r["result_uids"])), r["error"], json.loads(r["times"]))


def _series(r: sqlite3.Row) -> SeriesRow:
    return SeriesRow(r["series_uid"], r["study_uid"], SeriesState(r["state"]), r["first_instance_at"],
                     r["last_instance_at"], r["n_instances"], r["skip_reason"], r["calling_aet"], r["completed_at"])


def _delivery(r: sqlite3.Row) -> DeliveryRow:
    return DeliveryRow(r["id"], r["job_id"], r["destination"], DeliveryState(r["state"]), r["attempts"],
                       r["next_try_at"], r["last_error"])


class State:
    """Thread-safe access to the node's SQLite database (one connection per thread)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn().executescript(_SCHEMA)

    # --- connection -------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=True)
            c.row_factory = sqlite3.Row
            c.execute("PRAGMA journal_mode=WAL")
            c.execute("PRAGMA synchronous=FULL")
            c.execute("PRAGMA foreign_keys=ON")
            self._local.conn = c
        return c

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.c = conn

        def __enter__(self) -> sqlite3.Connection:
            self.c.execute("BEGIN IMMEDIATE")
            return self.c

        def __exit__(self, exc_type, exc, tb) -> None:
            self.c.execute("COMMIT" if exc_type is None else "ROLLBACK")

    def _tx(self) -> State._Tx:
        return State._Tx(self._conn())

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    # --- instances and series ---------------------------------------------------------------------
    def has_instance(self, sop_uid: str) -> bool:
        return self._conn().execute("SELECT 1 FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone() is not None

    def add_instance(self, row: InstanceRow) -> bool:
        """Record a spooled instance; False (and no change) when the SOP instance is already known."""
        with self._tx() as c:
            cur = c.execute("INSERT OR IGNORE INTO instances VALUES (?,?,?,?,?,?,?,?,?)",
                            (row.sop_uid, row.series_uid, row.study_uid, row.path, row.sop_class_uid,
                             row.transfer_syntax, row.received_at, row.bytes, row.calling_aet))
            if cur.rowcount == 0:
                return False
            c.execute(
                "INSERT INTO series(series_uid, study_uid, state, first_instance_at, last_instance_at, n_instances, calling_aet)"
                " VALUES (?,?,?,?,?,1,?) ON CONFLICT(series_uid) DO UPDATE SET state=?, skip_reason=NULL,"
                " last_instance_at=excluded.last_instance_at, n_instances=n_instances+1, completed_at=NULL",
                (row.series_uid, row.study_uid, SeriesState.RECEIVING.value, row.received_at, row.received_at,
                 row.calling_aet, SeriesState.RECEIVING.value))
            return True

    def instances(self, series_uid: str) -> list[InstanceRow]:
        rows = self._conn().execute("SELECT * FROM instances WHERE series_uid=? ORDER BY sop_uid", (series_uid,))
        return [InstanceRow(*tuple(r)) for r in rows]

    def series(self, series_uid: str) -> SeriesRow | None:
        r = self._conn().execute("SELECT * FROM series WHERE series_uid=?", (series_uid,)).fetchone()
        return _series(r) if r else None

    def all_series(self) -> list[SeriesRow]:
        return [_series(r) for r in self._conn().execute("SELECT * FROM series ORDER BY first_instance_at")]

    def quiet_series(self, older_than: float) -> list[SeriesRow]:
        """Series still receiving whose last instance arrived before `older_than`."""
        rows = self._conn().execute("SELECT * FROM series WHERE state=? AND last_instance_at<?",
                                    (SeriesState.RECEIVING.value, older_than))
        return [_series(r) for r in rows]

    def series_in(self, state: SeriesState) -> list[SeriesRow]:
        return [_series(r) for r in self._conn().execute("SELECT * FROM series WHERE state=?", (state.value,))]

    def set_series_state(self, series_uid: str, state: SeriesState, *, skip_reason: str | None = None,
                         expect: SeriesState | None = None, at: float | None = None) -> bool:
        """Set a series' state (only if currently `expect`, when given); True when changed."""
        sql = "UPDATE series SET state=?, skip_reason=?" + (", completed_at=?" if state is SeriesState.COMPLETE else "")
        args: list = [state.value, skip_reason] + ([at or time.time()] if state is SeriesState.COMPLETE else [])
        sql += " WHERE series_uid=?"
        args.append(series_uid)
        if expect is not None:
            sql += " AND state=?"
            args.append(expect.value)
        with self._tx() as c:
            return c.execute(sql, args).rowcount > 0

    # --- jobs -------------------------------------------------------------------------------------
    def job(self, job_id: int) -> JobRow | None:
        r = self._conn().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(r) if r else None

    def jobs(self, state: JobState | None = None, series_uid: str | None = None) -> list[JobRow]:
        sql, args = "SELECT * FROM jobs WHERE 1=1", []
        if state is not None:
            sql, args = sql + " AND state=?", args + [state.value]
        if series_uid is not None:
            sql, args = sql + " AND series_uid=?", args + [series_uid]
        return [_job(r) for r in self._conn().execute(sql + " ORDER BY id", args)]

    def latest_job(self, series_uid: str) -> JobRow | None:
        r = self._conn().execute("SELECT * FROM jobs WHERE series_uid=? ORDER BY revision DESC, id DESC LIMIT 1",
                                 (series_uid,)).fetchone()
        return _job(r) if r else None

    def create_job(self, series_uid: str, study_uid: str, *, priority: int = 0, revision: int = 1,
                   predecessor_result_uids: tuple[str, ...] = (), at: float | None = None) -> int:
        times = {"queued": at or time.time()}
        with self._tx() as c:
            cur = c.execute("INSERT INTO jobs(series_uid, study_uid, state, priority, revision, predecessor_result_uids, times)"
                            " VALUES (?,?,?,?,?,?,?)", (series_uid, study_uid, JobState.QUEUED.value, priority, revision,
                                                        json.dumps(list(predecessor_result_uids)), json.dumps(times)))
            return int(cur.lastrowid)

    def transition(self, job_id: int, to: JobState, *, error: str | None = None, stage: str | None = None,
                   at: float | None = None, result_uids: tuple[str, ...] | None = None,
                   extra_times: dict | None = None) -> JobRow:
        """Move a job to `to` if the state machine allows it; record a stage time; return the new row."""
        with self._tx() as c:
            r = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if r is None:
                raise KeyError(f"job {job_id}: no such job; `dicom-node status` lists jobs")
            cur = JobState(r["state"])
            if to not in JOB_TRANSITIONS[cur]:
                raise TransitionError(f"job {job_id}: cannot go from {cur.value} to {to.value}; "
                                      f"allowed: {sorted(s.value for s in JOB_TRANSITIONS[cur]) or 'none (final)'}")
            times = json.loads(r["times"])
            times.update(extra_times or {})
            if stage:
                times[stage] = at or time.time()
            attempts = r["attempts"] + (1 if to is JobState.RUNNING else 0)
            c.execute("UPDATE jobs SET state=?, error=?, times=?, attempts=?, result_uids=COALESCE(?, result_uids) WHERE id=?",
                      (to.value, error, json.dumps(times), attempts,
                       json.dumps(list(result_uids)) if result_uids is not None else None, job_id))
            r = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            return _job(r)

    def claim_next_job(self) -> JobRow | None:
        """Atomically take the highest-priority, oldest queued job and mark it running."""
        with self._tx() as c:
            r = c.execute("SELECT id FROM jobs WHERE state=? ORDER BY priority DESC, id ASC LIMIT 1",
                          (JobState.QUEUED.value,)).fetchone()
            if r is None:
                return None
        return self.transition(r["id"], JobState.RUNNING, stage="started")

    def request_rerun(self, job_id: int) -> None:
        with self._tx() as c:
            c.execute("UPDATE jobs SET rerun_requested=1 WHERE id=?", (job_id,))

    def clear_rerun(self, job_id: int) -> bool:
        """Clear the re-run flag; True if it was set (exactly one caller gets True)."""
        with self._tx() as c:
            return c.execute("UPDATE jobs SET rerun_requested=0 WHERE id=? AND rerun_requested=1", (job_id,)).rowcount > 0

    def job_counts(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT state, COUNT(*) n FROM jobs GROUP BY state")
        counts = {s.value: 0 for s in JobState}
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    # --- deliveries -------------------------------------------------------------------------------
    def add_deliveries(self, job_id: int, destinations: list[str], at: float | None = None) -> None:
        with self._tx() as c:
            for d in destinations:
                c.execute("INSERT OR IGNORE INTO deliveries(job_id, destination, state, next_try_at) VALUES (?,?,?,?)",
                          (job_id, d, DeliveryState.PENDING.value, at or time.time()))

    def deliveries(self, job_id: int | None = None, state: DeliveryState | None = None) -> list[DeliveryRow]:
        sql, args = "SELECT * FROM deliveries WHERE 1=1", []
        if job_id is not None:
            sql, args = sql + " AND job_id=?", args + [job_id]
        if state is not None:
            sql, args = sql + " AND state=?", args + [state.value]
        return [_delivery(r) for r in self._conn().execute(sql + " ORDER BY id", args)]

    def due_deliveries(self, now: float) -> list[DeliveryRow]:
        rows = self._conn().execute("SELECT * FROM deliveries WHERE state=? AND next_try_at<=? ORDER BY next_try_at",
                                    (DeliveryState.PENDING.value, now))
        return [_delivery(r) for r in rows]

    def next_delivery_time(self) -> float | None:
        r = self._conn().execute("SELECT MIN(next_try_at) t FROM deliveries WHERE state=?",
                                 (DeliveryState.PENDING.value,)).fetchone()
        return r["t"]

    def record_delivery(self, delivery_id: int, *, ok: bool, error: str | None = None,
                        next_try_at: float | None = None, give_up: bool = False) -> DeliveryRow:
        state = DeliveryState.DONE if ok else (DeliveryState.FAILED if give_up else DeliveryState.PENDING)
        with self._tx() as c:
            c.execute("UPDATE deliveries SET state=?, attempts=attempts+1, last_error=?, next_try_at=COALESCE(?, next_try_at)"
                      " WHERE id=?", (state.value, error, next_try_at, delivery_id))
            return _delivery(c.execute("SELECT * FROM deliveries WHERE id=?", (delivery_id,)).fetchone())

    def reset_deliveries(self, job_id: int, at: float | None = None) -> int:
        """Make a job's failed deliveries pending again with fresh attempts (for `resend`)."""
        with self._tx() as c:
            return c.execute("UPDATE deliveries SET state=?, attempts=0, next_try_at=? WHERE job_id=? AND state=?",
                             (DeliveryState.PENDING.value, at or time.time(), job_id, DeliveryState.FAILED.value)).rowcount

    def retry_now(self) -> None:
        """Make every pending delivery due now (used at start-up)."""
        with self._tx() as c:
            c.execute("UPDATE deliveries SET next_try_at=? WHERE state=?", (time.time(), DeliveryState.PENDING.value))

    # --- composite steps (one transaction each) ---------------------------------------------------
    def mark_complete(self, series_uid: str, *, quiet_before: float | None = None, at: float | None = None) -> bool:
        """receiving -> complete, only if no instance arrived after `quiet_before` (None = force)."""
        sql = "UPDATE series SET state=?, completed_at=? WHERE series_uid=? AND state=?"
        args: list = [SeriesState.COMPLETE.value, at or time.time(), series_uid, SeriesState.RECEIVING.value]
        if quiet_before is not None:
            sql += " AND last_instance_at<?"
            args.append(quiet_before)
        with self._tx() as c:
            return c.execute(sql, args).rowcount > 0

    def force_complete(self, series_uid: str) -> bool:
        """Make a receiving series due for completion now (used by `dicom-node complete`)."""
        with self._tx() as c:
            return c.execute("UPDATE series SET last_instance_at=0 WHERE series_uid=? AND state=?",
                             (series_uid, SeriesState.RECEIVING.value)).rowcount > 0

    def schedule_series(self, series_uid: str, *, selected: bool, reason: str, priority: int = 0) -> tuple[str, int | None]:
        """complete -> selected/skipped and queue work, atomically. Returns (action, job id).

        action: 'skipped', 'queued' (new job), 'pending' (a queued job will see the new instances),
        'rerun' (the running job is marked for one re-run), 'stale' (series no longer complete).
        """
        with self._tx() as c:
            r = c.execute("SELECT * FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            if r is None or r["state"] != SeriesState.COMPLETE.value:
                return "stale", None
            if not selected:
                c.execute("UPDATE series SET state=?, skip_reason=? WHERE series_uid=?",
                          (SeriesState.SKIPPED.value, reason, series_uid))
                return "skipped", None
            c.execute("UPDATE series SET state=?, skip_reason=NULL WHERE series_uid=?", (SeriesState.SELECTED.value, series_uid))
            j = c.execute("SELECT * FROM jobs WHERE series_uid=? ORDER BY revision DESC, id DESC LIMIT 1", (series_uid,)).fetchone()
            if j is not None and j["state"] == JobState.QUEUED.value:
                return "pending", j["id"]
            if j is not None and j["state"] in (JobState.RUNNING.value, JobState.BUILT.value, JobState.SENDING.value):
                c.execute("UPDATE jobs SET rerun_requested=1 WHERE id=?", (j["id"],))
                return "rerun", j["id"]
            revision = (j["revision"] + 1) if j is not None else 1
            pred = j["result_uids"] if j is not None else "[]"
            cur = c.execute("INSERT INTO jobs(series_uid, study_uid, state, priority, revision, predecessor_result_uids, times)"
                            " VALUES (?,?,?,?,?,?,?)", (series_uid, r["study_uid"], JobState.QUEUED.value, priority, revision,
                                                        pred, json.dumps({"queued": time.time(),
                                                                          "received": r["last_instance_at"],
                                                                          "complete": r["completed_at"]})))
            return "queued", int(cur.lastrowid)

    def finish_job(self, job_id: int, to: JobState, *, error: str | None = None) -> tuple[JobRow, int | None]:
        """sending/running -> done/failed; start the one requested re-run (revision+1) if any.

        Returns the finished job and the id of the re-run job (or None)."""
        job = self.transition(job_id, to, error=error, stage="finished")
        return job, self.start_rerun_if_requested(job)

    def start_rerun_if_requested(self, job: JobRow) -> int | None:
        """For a finished job: queue its one requested re-run (revision+1), else mark the series done."""
        with self._tx() as c:
            if c.execute("UPDATE jobs SET rerun_requested=0 WHERE id=? AND rerun_requested=1", (job.id,)).rowcount:
                r = c.execute("SELECT * FROM series WHERE series_uid=?", (job.series_uid,)).fetchone()
                cur = c.execute("INSERT INTO jobs(series_uid, study_uid, state, priority, revision, predecessor_result_uids, times)"
                                " VALUES (?,?,?,?,?,?,?)", (job.series_uid, job.study_uid, JobState.QUEUED.value, job.priority,
                                                            job.revision + 1, json.dumps(list(job.result_uids)),
                                                            json.dumps({"queued": time.time(), "received": r["last_instance_at"],
                                                                        "complete": r["completed_at"]})))
                return int(cur.lastrowid)
            c.execute("UPDATE series SET state=? WHERE series_uid=? AND state=?",
                      (SeriesState.DONE.value, job.series_uid, SeriesState.SELECTED.value))
            return None

    def delete_instances(self, series_uid: str) -> int:
        with self._tx() as c:
            return c.execute("DELETE FROM instances WHERE series_uid=?", (series_uid,)).rowcount

    def done_series_older_than(self, t: float) -> list[SeriesRow]:
        rows = self._conn().execute("SELECT * FROM series WHERE state=? AND last_instance_at<? AND n_instances>0",
                                    (SeriesState.DONE.value, t))
        return [_series(r) for r in rows]

    def mark_series_purged(self, series_uid: str) -> None:
        with self._tx() as c:
            c.execute("DELETE FROM instances WHERE series_uid=?", (series_uid,))
            c.execute("UPDATE series SET n_instances=0 WHERE series_uid=?", (series_uid,))
