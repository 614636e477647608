"""The admin actions of the CLI and the web worklist, in one place: force complete, re-run, resend.

`dicom-node complete|rerun|resend` and the worklist's buttons (and `POST /api/v1/...`) call these
functions, so both say and do the same. Each works on the state database only; the running node's
loops (completion, worker, sender, notifier) pick the change up at their next poll, which is why
the CLI works beside a running node and the web app needs no handle on the loops.

Every function returns an `ActionResult`: `code` 0 done, 1 nothing to do or not possible, 2 bad
input; `lines` what was done (one sentence each), `error` the one line saying why not, naming the
object, the value and the fix.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dicom_node.config import ConfigError, parse_destination
from dicom_node.durability.spool import InvalidUid, validate_uid
from dicom_node.durability.state import DeliveryState, JobState, SeriesRow, SeriesState

if TYPE_CHECKING:
    from dicom_node.config import Config
    from dicom_node.durability.state import State

__all__ = ["ActionResult", "ACTIONS", "complete_series", "rerun_series", "resend_job"]

#: action name (CLI command, web button, API path) -> what it does, for help texts and the audit log
ACTIONS = {"complete": "declare a receiving series complete now (skip the quiet period)",
           "rerun": "analyse a finished series again (a new revision when results were delivered)",
           "resend": "re-queue a failed job's deliveries (or the job) and its dead notifications; run a job "
                     "waiting for its inference backend now"}


@dataclass(frozen=True)
class ActionResult:
    code: int
    lines: tuple[str, ...] = ()
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.code == 0


def _known_series(st: State, series_uid: str) -> SeriesRow | ActionResult:
    """The state row of `series_uid`, or the refusal (2: not a UID; 1: unknown here) that every series action gives."""
    try:
        uid = validate_uid(series_uid, "SERIES_UID")
    except InvalidUid as e:
        return ActionResult(2, error=str(e))
    s = st.series(uid)
    return ActionResult(1, error=f"series {uid} is unknown to this node") if s is None else s


def complete_series(st: State, series_uid: str) -> ActionResult:
    s = _known_series(st, series_uid)
    if isinstance(s, ActionResult):
        return s
    uid = s.series_uid
    if not st.force_complete(uid):
        return ActionResult(1, error=f"series {uid} is {s.state.value}, not receiving; nothing to do")
    return ActionResult(0, (f"series {uid}: will be completed at the node's next poll",))


def rerun_series(st: State, series_uid: str) -> ActionResult:
    """Analyse the series again: a running job is marked for one re-run when it ends; a finished one
    gets a new job (the revision rule of `State` decides its number); a queued one needs nothing."""
    s = _known_series(st, series_uid)
    if isinstance(s, ActionResult):
        return s
    uid = s.series_uid
    job = st.latest_job(uid)
    if job is None or s.state in (SeriesState.RECEIVING, SeriesState.COMPLETE, SeriesState.SKIPPED):
        why = s.skip_reason if s.state is SeriesState.SKIPPED else "it has not been analysed yet"
        return ActionResult(1, error=f"series {uid} is {s.state.value} ({why}); nothing to re-run"
                                     + ("; `dicom-node complete` it first" if s.state is SeriesState.RECEIVING else ""))
    if not st.instances(uid):
        return ActionResult(1, error=f"series {uid}: its instances were deleted from the spool (retention); "
                                     "send the series to the node again to analyse it")
    if job.state is JobState.QUEUED:
        return ActionResult(1, error=f"series {uid}: job {job.id} is queued and will run; nothing to do")
    if job.state in (JobState.RUNNING, JobState.BUILT, JobState.SENDING):
        st.request_rerun(job.id)
        return ActionResult(0, (f"series {uid}: job {job.id} is {job.state.value}; it runs once more when it ends",))
    new = st.create_job(uid, s.study_uid, at=time.time())
    return ActionResult(0, (f"series {uid}: job {new} queued to analyse it again (after job {job.id}, {job.state.value})",))


def resend_job(cfg: Config, st: State, job_id: int, to: str | None = None) -> ActionResult:
    job = st.job(job_id)
    if job is None:
        return ActionResult(1, error=f"job {job_id} does not exist; `dicom-node status` lists jobs")
    lines: list[str] = []
    notified = st.reset_notifications(job.id)
    if notified:
        lines.append(f"job {job.id}: {notified} notification(s) pending again: "
                     + ", ".join(n.target for n in st.notifications(job.id) if n.state.value == "pending"))
    if job.deferred and st.run_deferred_now(job.id):
        wait = time.strftime("%H:%M:%S", time.localtime(job.not_before))
        lines.append(f"job {job.id}: was waiting for its inference backend (next try at {wait}); it runs now, "
                     f"with fresh tries")
        return ActionResult(0, tuple(lines))
    if job.state is not JobState.FAILED:
        if notified:
            return ActionResult(0, tuple(lines))
        return ActionResult(1, tuple(lines), f"job {job.id} is {job.state.value}, not failed, and has no dead "
                                             "notification; nothing to do")
    try:
        override = parse_destination(to, "--to") if to else None
    except ConfigError as e:
        return ActionResult(2, tuple(lines), str(e))
    failed = st.deliveries(job.id, DeliveryState.FAILED)
    configured = {d.ae_title: d for d in (*cfg.destinations, *cfg.peers)}
    targets: dict[int, str] = {}
    if override is not None:
        same = [d for d in failed if parse_destination(d.destination).ae_title == override.ae_title]
        chosen = same or (failed if len(failed) == 1 else [])
        if not chosen:
            return ActionResult(2, tuple(lines), (
                f"--to {to}: job {job.id} has {len(failed)} failed deliveries "
                f"({', '.join(d.destination for d in failed) or 'none'}) and none with AE title {override.ae_title}; "
                "give the AE title of the one to replace"))
        targets = {d.id: override.address for d in chosen}
    else:
        for d in failed:
            now = configured.get(parse_destination(d.destination).ae_title)
            if now is None:
                lines.append(f"job {job.id}: {d.destination} is no longer configured; re-sending to the stored address "
                             "(pass --to AE@HOST:PORT to change it)")
            elif now.address != d.destination:
                targets[d.id] = now.address
    for d in failed:
        if d.id in targets and targets[d.id] != d.destination:
            st.retarget_delivery(d.id, targets[d.id])
            lines.append(f"job {job.id}: {d.destination} -> {targets[d.id]}")
    n = st.reset_deliveries(job.id)
    if st.deliveries(job.id) and job.result_uids:
        st.transition(job.id, JobState.SENDING, stage="resend")
        lines.append(f"job {job.id}: {n} delivery(ies) pending again: "
                     + ", ".join(d.destination for d in st.deliveries(job.id, DeliveryState.PENDING)))
    else:
        st.transition(job.id, JobState.QUEUED, stage="requeued")
        lines.append(f"job {job.id}: queued to run again")
    return ActionResult(0, tuple(lines))
