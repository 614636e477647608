"""SQLite state of the node: instances, series, jobs, deliveries and notifications, with explicit state machines.

Series, jobs, deliveries and notifications have a state (instances have none: a row exists once the file is
spooled). Every state change goes through one function, `_move`, which reads the row's current
state, checks it against that entity's transition table (`SERIES_TRANSITIONS`, `JOB_TRANSITIONS`,
`DELIVERY_TRANSITIONS`, `NOTIFICATION_TRANSITIONS`, all in `TRANSITIONS`) and runs the UPDATE, in the caller's transaction.
A change the table does not allow raises `TransitionError` naming the entity, its id and both
states. Rows are created in their first state (series `receiving`, job `queued`, delivery and
notification `pending`); jobs are created in one place (`_insert_job`).

Worklist priority: when a job's analysis ends (running -> built, or -> failed) the worker passes a
`JobOutcome` to `transition`/`finish_job`; its priority class, reason and score go into the job row
(`priority_class`, `priority_reason`, `priority_score`; the older integer `priority` column is the
queue order of `claim_next_job`, a different thing) and its notifications into `notifications`, in
the same transaction as the state change, so a finished analysis never lacks its priority or loses
a notification. `worklist(order)` lists each series' newest job ordered by priority class (in the
reading order the caller passes: `dicom_node.engine.priority.READING_ORDER`), score, arrival.

Revisions count what was delivered, not what was tried; `_next_revision` is the one place that
says so. A job's revision and predecessor are those of the series' newest *delivered* result (a job
that reached `done`, or one with at least one `done` delivery) plus one; with none delivered the
job is revision 1 without a predecessor. Failed runs are attempts of the same revision: a job
created after them, or a failed job queued again by `dicom-node resend`, gets the same number
(re-derived when the worker claims the job), so a full re-send after failed runs gives a first SR.

A series is bound to one study and one patient (`series_conflict`): an instance whose study UID or
patient key (a digest of PatientID and IssuerOfPatientID, never the values) differs from the
series' first instance is refused by the receiver. A series whose newest job failed goes back to
`receiving` when a duplicate of one of its instances arrives (`duplicate_received`): a sender's
re-send is what repairs it. An instance whose row exists but whose spooled file is gone is stored
again (`restore_instance`).

WAL mode with `synchronous=FULL`: an instance is acknowledged only after its row commits, and FULL
makes that commit survive power loss, not just a process crash (NORMAL in WAL mode may lose the
last transactions on power loss, which would break "an acknowledged instance is never lost").
The cost is one WAL fsync per commit, measured by benchmarks/receive.py.

One connection per thread (`threading.local`); every method is one short transaction.

Integrity: opening a `State` runs `PRAGMA quick_check`; a file that is not a database (garbage in its
header) or fails the check raises `StateDamaged` (a `StateSchemaError`) naming the file, what SQLite
found and the fix (`REBUILD_HINT`: `dicom-node serve --rebuild-state`, `dicom_node.durability.rebuild`),
never a traceback. A new database file is created 0600.

Schema versions: `PRAGMA user_version` is the schema version; `MIGRATIONS` lists the steps in
order (1 = the tables of the unversioned schema, which installed nodes have at version 0) and
opening a `State` applies every step from the file's version to `SCHEMA_VERSION`, each in its own
transaction, after copying an existing database to `<file>.v<version>.bak` (SQLite's backup API:
a consistent copy of a WAL database). A file newer than `SCHEMA_VERSION` raises
`StateSchemaError` and is left untouched. A schema change is a new step at the end of
`MIGRATIONS`, never an edit of an old one.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

from dicom_node.log import get_logger

__all__ = ["State", "SeriesState", "JobState", "DeliveryState", "InstanceRow", "SeriesRow", "JobRow",
           "DeliveryRow", "NotificationState", "NotificationRow", "JobOutcome", "WorklistRow", "TransitionError",
           "SeriesConflict", "patient_key", "StateMachine", "SERIES_TRANSITIONS", "JOB_TRANSITIONS",
           "DELIVERY_TRANSITIONS", "NOTIFICATION_TRANSITIONS", "SERIES_MACHINE", "JOB_MACHINE", "DELIVERY_MACHINE",
           "NOTIFICATION_MACHINE", "MACHINES", "TRANSITIONS",
           "JOB_STAGES", "stage_durations", "Migration", "MIGRATIONS", "SCHEMA_VERSION", "StateSchemaError",
           "StateDamaged", "REBUILD_HINT"]


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


class NotificationState(str, Enum):
    PENDING = "pending"
    SENT = "sent"
    DEAD = "dead"


_S = TypeVar("_S", SeriesState, JobState, DeliveryState, NotificationState)

#: allowed series transitions. Any state -> receiving: another (or a late) instance arrived
#: (`add_instance`); receiving -> complete: quiet period over (`mark_complete`); complete ->
#: selected/skipped: selection (`schedule_series`); selected -> done: its last job finished
#: without a requested re-run (`start_rerun_if_requested`).
SERIES_TRANSITIONS: dict[SeriesState, frozenset[SeriesState]] = {
    SeriesState.RECEIVING: frozenset({SeriesState.RECEIVING, SeriesState.COMPLETE}),
    SeriesState.COMPLETE: frozenset({SeriesState.RECEIVING, SeriesState.SELECTED, SeriesState.SKIPPED}),
    SeriesState.SELECTED: frozenset({SeriesState.RECEIVING, SeriesState.DONE}),
    SeriesState.SKIPPED: frozenset({SeriesState.RECEIVING}),
    SeriesState.DONE: frozenset({SeriesState.RECEIVING}),
}

#: allowed job transitions. queued -> running: claimed by the worker; running -> built/failed: the
#: job body finished or raised; built -> sending: deliveries queued (worker, or recovery at start);
#: sending -> done/failed: every delivery final (sender); running -> queued: recovery at start, or
#: deferred because the inference backend did not answer (`defer_job`: the job waits until its
#: `not_before`, then runs again); failed -> sending/queued: `dicom-node resend`.
JOB_TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING}),
    JobState.RUNNING: frozenset({JobState.BUILT, JobState.FAILED, JobState.QUEUED}),
    JobState.BUILT: frozenset({JobState.SENDING}),
    JobState.SENDING: frozenset({JobState.DONE, JobState.FAILED}),
    JobState.DONE: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.SENDING}),
}

#: allowed delivery transitions. pending -> pending: an attempt failed, retried later; pending ->
#: done: delivered; pending -> failed: `max_attempts` used up; failed -> pending: `dicom-node resend`.
DELIVERY_TRANSITIONS: dict[DeliveryState, frozenset[DeliveryState]] = {
    DeliveryState.PENDING: frozenset({DeliveryState.PENDING, DeliveryState.DONE, DeliveryState.FAILED}),
    DeliveryState.DONE: frozenset(),
    DeliveryState.FAILED: frozenset({DeliveryState.PENDING}),
}


#: allowed notification transitions. pending -> pending: an attempt failed, retried later; pending ->
#: sent: the peer accepted it (HTTP 2xx, HL7 ACK AA); pending -> dead: `[notify] max_attempts` used up
#: or the peer refused it for good (HL7 AR/AE); dead -> pending: `dicom-node resend` of its job.
NOTIFICATION_TRANSITIONS: dict[NotificationState, frozenset[NotificationState]] = {
    NotificationState.PENDING: frozenset({NotificationState.PENDING, NotificationState.SENT, NotificationState.DEAD}),
    NotificationState.SENT: frozenset(),
    NotificationState.DEAD: frozenset({NotificationState.PENDING}),
}


class TransitionError(RuntimeError):
    """A state change (of a series, job or delivery) that its transition table does not allow."""


class SeriesConflict(ValueError):
    """An instance names a series that belongs to another study or patient; the message says which."""


def patient_key(patient_id: object, issuer: object = None) -> str:
    """The patient a series is bound to, as a digest of PatientID and IssuerOfPatientID (never stored or
    logged as the values themselves)."""
    text = f"{str(patient_id or '').strip()}\x1f{str(issuer or '').strip()}"
    return hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()[:32]


#: a series' study and the patient it is bound to (patient_key NULL when not recorded)
_BINDING = ("SELECT s.study_uid, p.patient_key FROM series s LEFT JOIN series_patient p ON p.series_uid = s.series_uid"
            " WHERE s.series_uid=?")


def _conflict(series_uid: str, study_uid: str, key: str | None, known: sqlite3.Row | None) -> str | None:
    if known is None:
        return None
    if known["study_uid"] != study_uid:
        return (f"Series {series_uid} belongs to study {known['study_uid']} but this instance names study {study_uid}; "
                "a series is part of one study: the sender must give each study's series its own SeriesInstanceUID")
    if key is not None and known["patient_key"] is not None and known["patient_key"] != key:
        return (f"Series {series_uid}: this instance is of another patient than the series' first instance (their "
                "patient identifier or its issuer differ; values not logged); a series is one patient's: correct the patient data at the sender")
    return None


@dataclass(frozen=True)
class StateMachine(Generic[_S]):
    """One entity's states, where its rows live, and its transition table."""

    entity: str  # the word in messages: "series", "job", "delivery"
    table: str
    key: str  # primary key column
    states: type[_S]
    allowed: Mapping[_S, frozenset[_S]]
    listed_by: str  # where an operator finds the ids (for the "no such ..." message)

    def missing(self, key: object) -> KeyError:
        return KeyError(f"{self.entity} {key}: no such {self.entity}; {self.listed_by}")

    def check(self, key: object, frm: _S, to: _S) -> None:
        """Raise TransitionError unless `frm` -> `to` is in the table."""
        allowed = self.allowed[frm]
        if to not in allowed:
            raise TransitionError(f"{self.entity} {key}: cannot go from {frm.value} to {to.value}; "
                                  f"allowed: {sorted(s.value for s in allowed) or 'none (final)'}")


SERIES_MACHINE = StateMachine("series", "series", "series_uid", SeriesState, SERIES_TRANSITIONS,
                              "`dicom-node status` lists series")
JOB_MACHINE = StateMachine("job", "jobs", "id", JobState, JOB_TRANSITIONS, "`dicom-node status` lists jobs")
DELIVERY_MACHINE = StateMachine("delivery", "deliveries", "id", DeliveryState, DELIVERY_TRANSITIONS,
                                "`dicom-node status` lists failed deliveries")
NOTIFICATION_MACHINE = StateMachine("notification", "notifications", "id", NotificationState, NOTIFICATION_TRANSITIONS,
                                    "`dicom-node status` lists dead notifications")
MACHINES = (SERIES_MACHINE, JOB_MACHINE, DELIVERY_MACHINE, NOTIFICATION_MACHINE)

#: the one transition table, per entity: entity -> {from state: allowed next states}
TRANSITIONS: dict[str, Mapping[Any, frozenset[Any]]] = {m.entity: m.allowed for m in MACHINES}


def _move(c: sqlite3.Connection, m: StateMachine[_S], key: str | int, to: _S, sets: str = "",
          args: Sequence[object] = ()) -> _S:
    """The one place a state changes: check `m`'s table for the row's state -> `to`, then UPDATE it.

    `sets` are further column assignments of the same UPDATE (`"error=?, times=?"`) with their
    `args`. Runs in the caller's transaction; returns the state the row came from."""
    r = c.execute(f"SELECT state FROM {m.table} WHERE {m.key}=?", (key,)).fetchone()
    if r is None:
        raise m.missing(key)
    frm = m.states(r["state"])
    m.check(key, frm, to)
    c.execute(f"UPDATE {m.table} SET state=?{', ' + sets if sets else ''} WHERE {m.key}=?", (to.value, *args, key))
    return frm


#: stages a job's `times` may record (unix seconds), in the order they happen
JOB_STAGES = ("received", "complete", "queued", "started", "preprocessed", "inferred", "built", "sent", "finished")


def stage_durations(times: Mapping[str, float | None]) -> dict[str, float]:
    """Seconds between consecutive recorded stages of a job (`received_to_complete_s`, ...)."""
    have = [(k, t) for k in JOB_STAGES if (t := times.get(k))]
    return {f"{a}_to_{b}_s": round(tb - ta, 3) for (a, ta), (b, tb) in zip(have, have[1:])}


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
    times: dict[str, float | None]  # stage (JOB_STAGES, requeued, resend, ...) -> unix time
    #: worklist priority ("critical", "urgent", "check", "routine"), its reason and score; None until analysed
    priority_class: str | None = None
    priority_reason: str | None = None
    priority_score: float | None = None
    #: a queued job runs no earlier than this (unix time; 0 = at once): set by `defer_job`
    not_before: float = 0.0
    #: runs deferred since the job was last queued by hand (`resend`): what `[worker] retry_unavailable_max`
    #: counts; `attempts` keeps counting every run of the job's life
    deferrals: int = 0

    @property
    def deferred(self) -> bool:
        """Queued and waiting for its inference backend (`defer_job`) rather than for a worker."""
        return self.state is JobState.QUEUED and self.not_before > 0


@dataclass(frozen=True)
class JobOutcome:
    """What the end of a job's analysis writes with its state change: the worklist priority
    (`dicom_node.engine.priority.PriorityDecision` as plain values) and the notifications it
    triggers, as (target, JSON document) pairs."""

    priority: str
    reason: str
    score: float
    notifications: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class NotificationRow:
    id: int
    job_id: int
    target: str  # "webhook" or "hl7"
    state: NotificationState
    attempts: int
    next_try_at: float
    last_error: str | None
    document: str  # the JSON document built when the job's analysis ended
    created_at: float
    sent_at: float | None


@dataclass(frozen=True)
class WorklistRow:
    """One series on the worklist: the series, its newest job (None while receiving or skipped) and its priority."""

    series_uid: str
    study_uid: str
    series_state: SeriesState
    first_instance_at: float  # arrival
    last_instance_at: float
    n_instances: int
    skip_reason: str | None
    job: JobRow | None

    @property
    def priority(self) -> str | None:
        return self.job.priority_class if self.job else None


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

_PRIORITY_AND_NOTIFICATIONS = """
ALTER TABLE jobs ADD COLUMN priority_class TEXT;
ALTER TABLE jobs ADD COLUMN priority_reason TEXT;
ALTER TABLE jobs ADD COLUMN priority_score REAL;
CREATE TABLE IF NOT EXISTS notifications (
  id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL REFERENCES jobs(id), target TEXT NOT NULL,
  state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_try_at REAL NOT NULL, last_error TEXT,
  document TEXT NOT NULL, created_at REAL NOT NULL, sent_at REAL, UNIQUE(job_id, target));
CREATE INDEX IF NOT EXISTS notifications_due ON notifications(state, next_try_at);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_uid, revision, id)
"""


@dataclass(frozen=True)
class Migration:
    """One schema step: the statements that take a version-(`version` - 1) database to `version`."""

    version: int
    what: str
    statements: tuple[str, ...]


def _statements(script: str) -> tuple[str, ...]:
    return tuple(sql.strip() for sql in script.split(";") if sql.strip())


#: the schema steps, in order; append, never edit a released one
MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "tables and indexes of the unversioned schema (version 0 files already have them)",
              _statements(_SCHEMA)),
    Migration(2, "index deliveries(state, next_try_at) for the sender's due and next-try queries",
              ("CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_try_at)",)),
    Migration(3, "series_patient: digest of the patient each series is bound to (none for series received before)",
              ("CREATE TABLE IF NOT EXISTS series_patient (series_uid TEXT PRIMARY KEY, patient_key TEXT NOT NULL)",)),
    Migration(4, "worklist priority of each job (class, reason, score) and the notifications outbox",
              _statements(_PRIORITY_AND_NOTIFICATIONS)),
    Migration(5, "jobs.not_before: a queued job deferred while its inference backend did not answer waits until then",
              ("ALTER TABLE jobs ADD COLUMN not_before REAL NOT NULL DEFAULT 0",)),
    Migration(6, "jobs.deferrals: runs deferred since the job was last queued by hand; `resend` gives fresh tries",
              ("ALTER TABLE jobs ADD COLUMN deferrals INTEGER NOT NULL DEFAULT 0",)),
)
SCHEMA_VERSION = MIGRATIONS[-1].version
assert [m.version for m in MIGRATIONS] == list(range(1, SCHEMA_VERSION + 1)), "MIGRATIONS: versions 1, 2, ... in order"


class StateSchemaError(RuntimeError):
    """The state database cannot be brought to this code's schema; the message names file, versions and fix."""


#: how an operator gets a working database back (docs/operations.md, "State database damaged or lost")
REBUILD_HINT = ("stop the node and start it once with `dicom-node serve --rebuild-state` (it moves the damaged files "
                "aside and rebuilds the instance records from the spool; the series are analysed again), or restore "
                "state.sqlite from a back-up")


class StateDamaged(StateSchemaError):
    """The state database is not a readable SQLite database or fails `PRAGMA quick_check`; the message names the
    file, what SQLite said and the fix (`REBUILD_HINT`)."""


def _quick_check(c: sqlite3.Connection, path: Path) -> None:
    """Raise StateDamaged unless SQLite's quick_check passes (pages, free list, record formats; not indexes)."""
    problems = [str(r[0]) for r in c.execute("PRAGMA quick_check(5)")]
    if problems != ["ok"]:
        found = "; ".join(" ".join(p.replace("*** in database main ***", "").split()) for p in problems)
        raise StateDamaged(f"state database {path} is damaged (quick_check: {found[:300]}); {REBUILD_HINT}")


def _user_version(c: sqlite3.Connection) -> int:
    v: int = c.execute("PRAGMA user_version").fetchone()[0]
    return v


def _backup_path(path: Path, version: int) -> Path:
    """`state.sqlite.v0.bak`, or `.v0.2.bak`, ... when an earlier back-up of that version is there."""
    bak, n = path.with_name(f"{path.name}.v{version}.bak"), 1
    while bak.exists():
        n += 1
        bak = path.with_name(f"{path.name}.v{version}.{n}.bak")
    return bak


def _migrate(c: sqlite3.Connection, path: Path) -> None:
    """Bring the database on `c` to SCHEMA_VERSION (see the module docstring); no-op when it is there."""
    found = _user_version(c)
    if found > SCHEMA_VERSION:
        raise StateSchemaError(
            f"state database {path} has schema version {found}, newer than this dicom-node knows "
            f"(newest {SCHEMA_VERSION}); upgrade dicom-node to the release that wrote it, or restore a back-up "
            f"made before that upgrade (e.g. {path.name}.v{SCHEMA_VERSION}.bak next to it)")
    if found == SCHEMA_VERSION:
        return
    existing = c.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] > 0
    backup = None
    if existing:
        backup = _backup_path(path, found)
        try:
            dst = sqlite3.connect(backup)
            try:
                c.backup(dst)
            finally:
                dst.close()
        except (sqlite3.Error, OSError) as e:
            backup.unlink(missing_ok=True)
            raise StateSchemaError(
                f"state database {path}: cannot write the back-up {backup} before migrating schema version {found} "
                f"to {SCHEMA_VERSION} ({e}); free disk space or fix the folder's permissions and start again") from None
    for m in MIGRATIONS[found:]:
        c.execute("BEGIN IMMEDIATE")
        try:
            if _user_version(c) < m.version:  # another process may have taken this step meanwhile
                for sql in m.statements:
                    c.execute(sql)
                c.execute(f"PRAGMA user_version={m.version}")
        except BaseException:
            c.execute("ROLLBACK")
            raise
        c.execute("COMMIT")
    if existing:
        get_logger("dicom_node.durability.state").info(
            "state_migrated", path=str(path), from_version=found, to_version=SCHEMA_VERSION, backup=str(backup))


def _job(r: sqlite3.Row) -> JobRow:
    return JobRow(r["id"], r["series_uid"], r["study_uid"], JobState(r["state"]), r["attempts"], r["priority"],
                  r["revision"], bool(r["rerun_requested"]), tuple(json.loads(r["predecessor_result_uids"])),
                  tuple(json.loads(r["result_uids"])), r["error"], json.loads(r["times"]),
                  r["priority_class"], r["priority_reason"], r["priority_score"], r["not_before"], r["deferrals"])


def _series(r: sqlite3.Row) -> SeriesRow:
    return SeriesRow(r["series_uid"], r["study_uid"], SeriesState(r["state"]), r["first_instance_at"],
                     r["last_instance_at"], r["n_instances"], r["skip_reason"], r["calling_aet"], r["completed_at"])


def _notification(r: sqlite3.Row) -> NotificationRow:
    return NotificationRow(r["id"], r["job_id"], r["target"], NotificationState(r["state"]), r["attempts"],
                           r["next_try_at"], r["last_error"], r["document"], r["created_at"], r["sent_at"])


def _write_outcome(c: sqlite3.Connection, job_id: int, outcome: JobOutcome, at: float) -> None:
    """Priority columns and notification rows of a job whose analysis ended (caller's transaction)."""
    c.execute("UPDATE jobs SET priority_class=?, priority_reason=?, priority_score=? WHERE id=?",
              (outcome.priority, outcome.reason, float(outcome.score), job_id))
    for target, document in outcome.notifications:
        c.execute("INSERT OR IGNORE INTO notifications(job_id, target, state, next_try_at, document, created_at)"
                  " VALUES (?,?,?,?,?,?)", (job_id, target, NotificationState.PENDING.value, at, document, at))


def _delivery(r: sqlite3.Row) -> DeliveryRow:
    return DeliveryRow(r["id"], r["job_id"], r["destination"], DeliveryState(r["state"]), r["attempts"],
                       r["next_try_at"], r["last_error"])


#: a job whose result reached a destination: it reached `done`, or one of its deliveries did
_DELIVERED = ("(state='done' OR EXISTS (SELECT 1 FROM deliveries d WHERE d.job_id=jobs.id AND d.state='done'))")


def _next_revision(c: sqlite3.Connection, series_uid: str, *, exclude_job: int | None = None) -> tuple[int, tuple[str, ...]]:
    """The revision rule, in one place: (revision, predecessor result UIDs) of the series' next result.

    A revision exists only once its results were delivered (`_DELIVERED`); failed or unfinished
    runs are attempts of the revision after the newest delivered one. `exclude_job` leaves a job's
    own row out (when re-deriving for a job that is being claimed)."""
    r = c.execute(f"SELECT revision, result_uids FROM jobs WHERE series_uid=? AND id IS NOT ? AND {_DELIVERED} "
                  "ORDER BY revision DESC, id DESC LIMIT 1", (series_uid, exclude_job)).fetchone()
    if r is None:
        return 1, ()
    return int(r["revision"]) + 1, tuple(json.loads(r["result_uids"]))


def _insert_job(c: sqlite3.Connection, series_uid: str, study_uid: str, *, priority: int,
                times: Mapping[str, float | None], revision: int | None = None,
                predecessor_result_uids: Sequence[str] = ()) -> int:
    """Create a job (state queued); the only INSERT into jobs. Returns its id.

    Its revision and predecessor come from `_next_revision` unless given (only `create_job`'s
    callers that build fixtures give them)."""
    if revision is None:
        revision, predecessor_result_uids = _next_revision(c, series_uid)
    cur = c.execute("INSERT INTO jobs(series_uid, study_uid, state, priority, revision, predecessor_result_uids, times)"
                    " VALUES (?,?,?,?,?,?,?)", (series_uid, study_uid, JobState.QUEUED.value, priority, revision,
                                                json.dumps(list(predecessor_result_uids)), json.dumps(dict(times))))
    job_id = cur.lastrowid
    assert job_id is not None  # set by every successful INSERT
    return job_id


class State:
    """Thread-safe access to the node's SQLite database (one connection per thread)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        if not self.path.exists():  # created private: it holds which studies were received when
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        try:
            try:
                c = self._conn()
                _quick_check(c, self.path)
            except sqlite3.DatabaseError as e:  # garbage header ("file is not a database"), malformed pages
                raise StateDamaged(f"state database {self.path} is damaged ({e}); {REBUILD_HINT}") from None
            _migrate(c, self.path)
        except BaseException:
            self.close()
            raise

    # --- connection -------------------------------------------------------------------------------
    def _conn(self) -> sqlite3.Connection:
        c: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if c is None:
            c = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=True)
            c.row_factory = sqlite3.Row
            try:
                c.execute("PRAGMA journal_mode=WAL")
                c.execute("PRAGMA synchronous=FULL")
                c.execute("PRAGMA foreign_keys=ON")
            except BaseException:
                c.close()  # a damaged file: no descriptor left behind
                raise
            self._local.conn = c
        return c

    class _Tx:
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.c = conn

        def __enter__(self) -> sqlite3.Connection:
            self.c.execute("BEGIN IMMEDIATE")
            return self.c

        def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                     tb: TracebackType | None) -> None:
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

    def instance(self, sop_uid: str) -> InstanceRow | None:
        """The instance's row (where its file is spooled), or None when it was never stored."""
        r = self._conn().execute("SELECT * FROM instances WHERE sop_uid=?", (sop_uid,)).fetchone()
        return InstanceRow(*tuple(r)) if r else None

    def series_conflict(self, series_uid: str, study_uid: str, patient_key: str | None) -> str | None:
        """Why an instance of `study_uid` / `patient_key` cannot join `series_uid`, or None when it can.

        A series belongs to the study and patient of its first instance. The message names the UIDs,
        never patient values."""
        return _conflict(series_uid, study_uid, patient_key, self._conn().execute(_BINDING, (series_uid,)).fetchone())

    def add_instance(self, row: InstanceRow, *, patient_key: str | None = None) -> bool:
        """Record a spooled instance; False (and no change) when the SOP instance is already known.

        A new series starts receiving, bound to the instance's study and `patient_key`; a known one
        (in any state) goes back to receiving. An instance of another study or patient than its
        series raises `SeriesConflict` (nothing recorded)."""
        with self._tx() as c:
            known = c.execute(_BINDING, (row.series_uid,)).fetchone()
            conflict = _conflict(row.series_uid, row.study_uid, patient_key, known)
            if conflict:
                raise SeriesConflict(conflict)
            cur = c.execute("INSERT OR IGNORE INTO instances VALUES (?,?,?,?,?,?,?,?,?)",
                            (row.sop_uid, row.series_uid, row.study_uid, row.path, row.sop_class_uid,
                             row.transfer_syntax, row.received_at, row.bytes, row.calling_aet))
            if cur.rowcount == 0:
                return False
            cur = c.execute(
                "INSERT INTO series(series_uid, study_uid, state, first_instance_at, last_instance_at, n_instances, calling_aet)"
                " VALUES (?,?,?,?,?,1,?) ON CONFLICT(series_uid) DO NOTHING",
                (row.series_uid, row.study_uid, SeriesState.RECEIVING.value, row.received_at, row.received_at,
                 row.calling_aet))
            if cur.rowcount == 0:  # known series
                _move(c, SERIES_MACHINE, row.series_uid, SeriesState.RECEIVING,
                      "skip_reason=NULL, last_instance_at=?, n_instances=n_instances+1, completed_at=NULL",
                      (row.received_at,))
            if patient_key is not None and (known is None or known["patient_key"] is None):
                c.execute("INSERT OR IGNORE INTO series_patient VALUES (?,?)", (row.series_uid, patient_key))
            return True

    def restore_instance(self, row: InstanceRow) -> None:
        """A known instance whose spooled file had gone was stored again at `row.path`: point its row
        there and send its series back to receiving, so it is analysed (again) after its quiet period."""
        with self._tx() as c:
            n = c.execute("UPDATE instances SET path=?, transfer_syntax=?, received_at=?, bytes=?, calling_aet=?"
                          " WHERE sop_uid=?", (row.path, row.transfer_syntax, row.received_at, row.bytes,
                                               row.calling_aet, row.sop_uid)).rowcount
            if n != 1:
                raise KeyError(f"instance {row.sop_uid}: no such instance; store it with add_instance")
            _move(c, SERIES_MACHINE, row.series_uid, SeriesState.RECEIVING,
                  "skip_reason=NULL, last_instance_at=MAX(last_instance_at, ?), completed_at=NULL", (row.received_at,))

    def duplicate_received(self, series_uid: str, at: float | None = None) -> bool:
        """A duplicate of an instance of `series_uid` arrived. When the series' newest job failed (and no
        newer one is queued or running), the re-send is the repair: the series goes back to receiving
        and is analysed again after its quiet period. Returns True when it did."""
        t = at or time.time()
        with self._tx() as c:
            j = c.execute("SELECT state FROM jobs WHERE series_uid=? ORDER BY id DESC LIMIT 1", (series_uid,)).fetchone()
            if j is None or j["state"] != JobState.FAILED.value:
                return False
            _move(c, SERIES_MACHINE, series_uid, SeriesState.RECEIVING,
                  "skip_reason=NULL, last_instance_at=MAX(last_instance_at, ?), completed_at=NULL", (t,))
            return True

    def instance_count(self) -> int:
        n: int = self._conn().execute("SELECT COUNT(*) FROM instances").fetchone()[0]
        return n

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

    # --- jobs -------------------------------------------------------------------------------------
    def job(self, job_id: int) -> JobRow | None:
        r = self._conn().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return _job(r) if r else None

    def jobs(self, state: JobState | None = None, series_uid: str | None = None) -> list[JobRow]:
        sql = "SELECT * FROM jobs WHERE 1=1"
        args: list[object] = []
        if state is not None:
            sql, args = sql + " AND state=?", args + [state.value]
        if series_uid is not None:
            sql, args = sql + " AND series_uid=?", args + [series_uid]
        return [_job(r) for r in self._conn().execute(sql + " ORDER BY id", args)]

    def latest_job(self, series_uid: str) -> JobRow | None:
        r = self._conn().execute("SELECT * FROM jobs WHERE series_uid=? ORDER BY revision DESC, id DESC LIMIT 1",
                                 (series_uid,)).fetchone()
        return _job(r) if r else None

    def create_job(self, series_uid: str, study_uid: str, *, priority: int = 0, revision: int | None = None,
                   predecessor_result_uids: tuple[str, ...] = (), at: float | None = None) -> int:
        """Queue a job for a series; revision and predecessor by the revision rule (`_next_revision`) unless given."""
        with self._tx() as c:
            return _insert_job(c, series_uid, study_uid, priority=priority, revision=revision,
                               predecessor_result_uids=predecessor_result_uids, times={"queued": at or time.time()})

    def transition(self, job_id: int, to: JobState, *, error: str | None = None, stage: str | None = None,
                   at: float | None = None, result_uids: tuple[str, ...] | None = None,
                   extra_times: Mapping[str, float] | None = None, outcome: JobOutcome | None = None) -> JobRow:
        """Move a job to `to` if the state machine allows it; record a stage time; return the new row.

        `outcome`: the priority and notifications of a job whose analysis ended, written in the same
        transaction."""
        with self._tx() as c:
            if outcome is not None:
                _write_outcome(c, job_id, outcome, at or time.time())
            return self._job_transition(c, job_id, to, error=error, stage=stage, at=at, result_uids=result_uids,
                                        extra_times=extra_times)

    @staticmethod
    def _job_transition(c: sqlite3.Connection, job_id: int, to: JobState, *, error: str | None = None,
                        stage: str | None = None, at: float | None = None, result_uids: tuple[str, ...] | None = None,
                        extra_times: Mapping[str, float] | None = None) -> JobRow:
        r = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        if r is None:
            raise JOB_MACHINE.missing(job_id)
        times = json.loads(r["times"])
        times.update(extra_times or {})
        if stage:
            times[stage] = at or time.time()
        attempts = r["attempts"] + (1 if to is JobState.RUNNING else 0)
        # failed -> queued is `resend`: the job's tries while its inference backend is away count afresh
        deferrals = 0 if r["state"] == JobState.FAILED.value and to is JobState.QUEUED else r["deferrals"]
        _move(c, JOB_MACHINE, job_id, to,
              "error=?, times=?, attempts=?, deferrals=?, result_uids=COALESCE(?, result_uids)",
              (error, json.dumps(times), attempts, deferrals,
               json.dumps(list(result_uids)) if result_uids is not None else None))
        return _job(c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())

    def claim_next_job(self, now: float | None = None) -> JobRow | None:
        """Atomically take the highest-priority, oldest queued job that is due (`not_before`) and mark it running."""
        with self._tx() as c:
            r = c.execute("SELECT id FROM jobs WHERE state=? AND not_before<=? ORDER BY priority DESC, id ASC LIMIT 1",
                          (JobState.QUEUED.value, time.time() if now is None else now)).fetchone()
            if r is None:
                return None
            # the revision rule again at the start of every attempt (a job queued again by `resend` or at
            # recovery runs as the revision after what has been delivered by then)
            series_uid = c.execute("SELECT series_uid FROM jobs WHERE id=?", (r["id"],)).fetchone()["series_uid"]
            revision, predecessor = _next_revision(c, series_uid, exclude_job=r["id"])
            c.execute("UPDATE jobs SET revision=?, predecessor_result_uids=? WHERE id=?",
                      (revision, json.dumps(list(predecessor)), r["id"]))
            return self._job_transition(c, r["id"], JobState.RUNNING, stage="started")

    def defer_job(self, job_id: int, *, not_before: float, error: str) -> JobRow:
        """running -> queued until `not_before`: the inference backend did not answer. `deferrals` counts
        one more (the worker holds it against `[worker] retry_unavailable_max`) and `error` says why the job
        waits; its revision is decided again when it runs (`claim_next_job`)."""
        with self._tx() as c:
            self._job_transition(c, job_id, JobState.QUEUED, error=error, stage="deferred")
            c.execute("UPDATE jobs SET not_before=?, deferrals=deferrals+1 WHERE id=?", (not_before, job_id))
            return _job(c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone())

    def deferred_job_count(self) -> int:
        """Queued jobs waiting for their inference backend (`defer_job`)."""
        return int(self._conn().execute("SELECT COUNT(*) FROM jobs WHERE state=? AND not_before>0",
                                        (JobState.QUEUED.value,)).fetchone()[0])

    def run_deferred_now(self, job_id: int | None = None) -> int:
        """Make deferred jobs due now (one, or all when `job_id` is None); returns how many were waiting.

        One job is what `resend` asks for: it gets fresh tries (`deferrals` 0). All is what a restart
        does: the jobs keep their count, so a node restarting in a loop while the server is away still
        fails them in the end."""
        with self._tx() as c:
            if job_id is None:
                return c.execute("UPDATE jobs SET not_before=0 WHERE state=? AND not_before>0",
                                 (JobState.QUEUED.value,)).rowcount
            return c.execute("UPDATE jobs SET not_before=0, deferrals=0 WHERE state=? AND not_before>0 AND id=?",
                             (JobState.QUEUED.value, job_id)).rowcount

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
        sql = "SELECT * FROM deliveries WHERE 1=1"
        args: list[object] = []
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
        t: float | None = r["t"]
        return t

    def record_delivery(self, delivery_id: int, *, ok: bool, error: str | None = None,
                        next_try_at: float | None = None, give_up: bool = False) -> DeliveryRow:
        """Record one attempt of a pending delivery: done, failed for good (`give_up`), or pending again."""
        state = DeliveryState.DONE if ok else (DeliveryState.FAILED if give_up else DeliveryState.PENDING)
        with self._tx() as c:
            _move(c, DELIVERY_MACHINE, delivery_id, state,
                  "attempts=attempts+1, last_error=?, next_try_at=COALESCE(?, next_try_at)", (error, next_try_at))
            return _delivery(c.execute("SELECT * FROM deliveries WHERE id=?", (delivery_id,)).fetchone())

    def reset_deliveries(self, job_id: int, at: float | None = None) -> int:
        """Make a job's failed deliveries pending again with fresh attempts (for `resend`)."""
        t = at or time.time()
        with self._tx() as c:
            failed = [r["id"] for r in c.execute("SELECT id FROM deliveries WHERE job_id=? AND state=?",
                                                 (job_id, DeliveryState.FAILED.value)).fetchall()]
            for delivery_id in failed:
                _move(c, DELIVERY_MACHINE, delivery_id, DeliveryState.PENDING, "attempts=0, next_try_at=?", (t,))
            return len(failed)

    def retarget_delivery(self, delivery_id: int, destination: str) -> None:
        """Point a failed delivery at another address (`resend` after a destination moved); not a state change."""
        with self._tx() as c:
            n = c.execute("UPDATE deliveries SET destination=? WHERE id=? AND state=?",
                          (destination, delivery_id, DeliveryState.FAILED.value)).rowcount
            if n != 1:
                raise DELIVERY_MACHINE.missing(delivery_id)

    def retry_now(self) -> None:
        """Make every pending delivery due now (used at start-up)."""
        with self._tx() as c:
            c.execute("UPDATE deliveries SET next_try_at=? WHERE state=?", (time.time(), DeliveryState.PENDING.value))

    # --- worklist --------------------------------------------------------------------------------
    def worklist(self, order: Sequence[str], *, priorities: Sequence[str] | None = None, limit: int = 500,
                 offset: int = 0, study_uid: str | None = None) -> list[WorklistRow]:
        """Every series with its newest job, read-first first: priority class in `order` (the
        reading order, `dicom_node.engine.priority.READING_ORDER` values), series not analysed yet
        just before the last class of `order` (routine), then higher score, then earlier arrival.

        `priorities`: only these classes (use "" for series without a priority yet); `study_uid`:
        only that study's series. Every value is a bound parameter, never part of the SQL text."""
        n = len(order)
        rank = "CASE j.priority_class " + " ".join("WHEN ? THEN ?" for _ in order) + f" ELSE {max(n - 1, 0)} END"
        rank_args: list[object] = []
        for i, p in enumerate(order):
            rank_args += [p, i if i < n - 1 else n]
        where, args = "", []
        if priorities is not None:
            wanted = [p for p in priorities if p]
            where = "WHERE (j.priority_class IN (" + ",".join("?" * len(wanted)) + ")" if wanted else "WHERE (0"
            where += " OR j.priority_class IS NULL)" if "" in priorities else ")"
            args = list(wanted)
        if study_uid is not None:
            where = (where + " AND" if where else "WHERE") + " s.study_uid = ?"
            args.append(study_uid)
        rows = self._conn().execute(
            "SELECT s.series_uid s_series_uid, s.study_uid s_study_uid, s.state s_state, s.first_instance_at,"
            " s.last_instance_at, s.n_instances, s.skip_reason, j.* FROM series s"
            " LEFT JOIN jobs j ON j.id = (SELECT id FROM jobs WHERE series_uid=s.series_uid"
            "                              ORDER BY revision DESC, id DESC LIMIT 1) "
            f"{where} ORDER BY {rank}, COALESCE(j.priority_score, 0) DESC, s.first_instance_at, s.series_uid"
            " LIMIT ? OFFSET ?", (*args, *rank_args, int(limit), int(offset)))
        return [WorklistRow(r["s_series_uid"], r["s_study_uid"], SeriesState(r["s_state"]), r["first_instance_at"],
                            r["last_instance_at"], r["n_instances"], r["skip_reason"],
                            _job(r) if r["id"] is not None else None) for r in rows]

    def first_instance_paths(self, series_uids: Sequence[str]) -> dict[str, str]:
        """series UID -> the spooled path of one of its instances (the web worklist reads study and
        patient fields from that file's header: they are not kept in this database)."""
        out: dict[str, str] = {}
        uids = list(series_uids)
        for i in range(0, len(uids), 500):  # well under SQLite's bound-parameter limit
            chunk = uids[i:i + 500]
            rows = self._conn().execute("SELECT series_uid, MIN(path) p FROM instances WHERE series_uid IN ("
                                        + ",".join("?" * len(chunk)) + ") GROUP BY series_uid", chunk)
            out.update({r["series_uid"]: r["p"] for r in rows})
        return out

    # --- notifications ----------------------------------------------------------------------------
    def notifications(self, job_id: int | None = None, state: NotificationState | None = None) -> list[NotificationRow]:
        sql = "SELECT * FROM notifications WHERE 1=1"
        args: list[object] = []
        if job_id is not None:
            sql, args = sql + " AND job_id=?", args + [job_id]
        if state is not None:
            sql, args = sql + " AND state=?", args + [state.value]
        return [_notification(r) for r in self._conn().execute(sql + " ORDER BY id", args)]

    def due_notifications(self, now: float) -> list[NotificationRow]:
        rows = self._conn().execute("SELECT * FROM notifications WHERE state=? AND next_try_at<=? ORDER BY next_try_at, id",
                                    (NotificationState.PENDING.value, now))
        return [_notification(r) for r in rows]

    def next_notification_time(self) -> float | None:
        r = self._conn().execute("SELECT MIN(next_try_at) t FROM notifications WHERE state=?",
                                 (NotificationState.PENDING.value,)).fetchone()
        t: float | None = r["t"]
        return t

    def record_notification(self, notification_id: int, *, ok: bool, error: str | None = None,
                            next_try_at: float | None = None, give_up: bool = False) -> NotificationRow:
        """Record one attempt of a pending notification: sent, dead (`give_up`), or pending again."""
        state = NotificationState.SENT if ok else (NotificationState.DEAD if give_up else NotificationState.PENDING)
        with self._tx() as c:
            _move(c, NOTIFICATION_MACHINE, notification_id, state,
                  "attempts=attempts+1, last_error=?, next_try_at=COALESCE(?, next_try_at), sent_at=?",
                  (error, next_try_at, time.time() if ok else None))
            return _notification(c.execute("SELECT * FROM notifications WHERE id=?", (notification_id,)).fetchone())

    def reset_notifications(self, job_id: int, at: float | None = None) -> int:
        """Make a job's dead notifications pending again with fresh attempts (for `resend`)."""
        t = at or time.time()
        with self._tx() as c:
            dead = [r["id"] for r in c.execute("SELECT id FROM notifications WHERE job_id=? AND state=?",
                                               (job_id, NotificationState.DEAD.value)).fetchall()]
            for notification_id in dead:
                _move(c, NOTIFICATION_MACHINE, notification_id, NotificationState.PENDING, "attempts=0, next_try_at=?", (t,))
            return len(dead)

    def notification_counts(self) -> dict[str, int]:
        rows = self._conn().execute("SELECT state, COUNT(*) n FROM notifications GROUP BY state")
        counts = {s.value: 0 for s in NotificationState}
        counts.update({r["state"]: r["n"] for r in rows})
        return counts

    # --- composite steps (one transaction each) ---------------------------------------------------
    def mark_complete(self, series_uid: str, *, quiet_before: float | None = None, at: float | None = None) -> bool:
        """receiving -> complete, only if no instance arrived after `quiet_before` (None = force)."""
        t = at or time.time()
        with self._tx() as c:
            r = c.execute("SELECT state, last_instance_at FROM series WHERE series_uid=?", (series_uid,)).fetchone()
            if r is None or r["state"] != SeriesState.RECEIVING.value:
                return False
            if quiet_before is not None and not r["last_instance_at"] < quiet_before:
                return False
            _move(c, SERIES_MACHINE, series_uid, SeriesState.COMPLETE, "completed_at=?", (t,))
            return True

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
                _move(c, SERIES_MACHINE, series_uid, SeriesState.SKIPPED, "skip_reason=?", (reason,))
                return "skipped", None
            _move(c, SERIES_MACHINE, series_uid, SeriesState.SELECTED, "skip_reason=NULL")
            j = c.execute("SELECT * FROM jobs WHERE series_uid=? ORDER BY revision DESC, id DESC LIMIT 1", (series_uid,)).fetchone()
            if j is not None and j["state"] == JobState.QUEUED.value:
                return "pending", j["id"]
            if j is not None and j["state"] in (JobState.RUNNING.value, JobState.BUILT.value, JobState.SENDING.value):
                c.execute("UPDATE jobs SET rerun_requested=1 WHERE id=?", (j["id"],))
                return "rerun", j["id"]
            job_id = _insert_job(c, series_uid, r["study_uid"], priority=priority,
                                 times={"queued": time.time(), "received": r["last_instance_at"],
                                        "complete": r["completed_at"]})
            return "queued", job_id

    def finish_job(self, job_id: int, to: JobState, *, error: str | None = None,
                   outcome: JobOutcome | None = None) -> tuple[JobRow, int | None]:
        """sending/running -> done/failed; start the one requested re-run (`start_rerun_if_requested`) if any.

        Returns the finished job and the id of the re-run job (or None)."""
        job = self.transition(job_id, to, error=error, stage="finished", outcome=outcome)
        return job, self.start_rerun_if_requested(job)

    def start_rerun_if_requested(self, job: JobRow) -> int | None:
        """For a finished job: queue its one requested re-run (the next revision when this job's results
        were delivered, the same one when it failed), else mark the series done."""
        with self._tx() as c:
            r = c.execute("SELECT * FROM series WHERE series_uid=?", (job.series_uid,)).fetchone()
            if c.execute("UPDATE jobs SET rerun_requested=0 WHERE id=? AND rerun_requested=1", (job.id,)).rowcount:
                return _insert_job(c, job.series_uid, job.study_uid, priority=job.priority,
                                   times={"queued": time.time(), "received": r["last_instance_at"],
                                          "complete": r["completed_at"]})
            if r is not None and r["state"] == SeriesState.SELECTED.value:
                _move(c, SERIES_MACHINE, job.series_uid, SeriesState.DONE)
            return None

    def delete_instances(self, series_uid: str) -> int:
        with self._tx() as c:
            return c.execute("DELETE FROM instances WHERE series_uid=?", (series_uid,)).rowcount

    def done_series_older_than(self, t: float) -> list[SeriesRow]:
        rows = self._conn().execute("SELECT * FROM series WHERE state=? AND last_instance_at<? AND n_instances>0",
                                    (SeriesState.DONE.value, t))
        return [_series(r) for r in rows]

    def mark_series_purged(self, series_uid: str, sop_uids: Iterable[str]) -> int:
        """Forget these instances of a series (their files were deleted by retention); returns how many
        instances the series still has: those that arrived after the purge listed them stay, rows and all."""
        with self._tx() as c:
            c.executemany("DELETE FROM instances WHERE series_uid=? AND sop_uid=?", ((series_uid, u) for u in sop_uids))
            left = int(c.execute("SELECT COUNT(*) FROM instances WHERE series_uid=?", (series_uid,)).fetchone()[0])
            c.execute("UPDATE series SET n_instances=? WHERE series_uid=?", (left, series_uid))
            return left
