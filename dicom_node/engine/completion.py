"""Series completion: quiet period -> complete -> selection -> job queued (background thread).

A series is complete `quiet_period_s` after its last instance; an association release completes
nothing early (a series can arrive over several associations). `force_complete` (the CLI's
`dicom-node complete SERIES_UID`) makes a series due at the next poll, also from another process.
A series that receives instances while its job runs is re-selected when it is quiet again, and the
running job is marked for exactly one re-run (`State.schedule_series`).

The quiet period counts from the later of the last instance and this scheduler's start: while the
node was down (a crash, a restart) a sender could not send, so that silence says nothing about
the series being complete (a partial series interrupted by a kill -9 waits for the re-send instead
of being analysed, or refused, on its gaps). A series forced complete is due at once.

A series that selection skips only for having too few slices is an incomplete CTPA, not another
kind of series: with `[results] not_analysed_sr` it is selected, and the job answers with a "not
analysed" SR that says so (`dicom_node.pipeline`).

Spool retention after delivery is `dicom_node.engine.retention`'s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.durability.state import SeriesState
from dicom_node.engine.background import BackgroundLoop
from dicom_node.engine.selection import SelectionDecision, read_header, select_series
from dicom_node.log import error_text, get_logger

if TYPE_CHECKING:
    from dicom_node.config import Config
    from dicom_node.durability.spool import Spool
    from dicom_node.durability.state import State

__all__ = ["CompletionScheduler"]


class CompletionScheduler(BackgroundLoop):
    """Completes quiet series, selects them and queues jobs."""

    thread_name = "completion"
    join_timeout_s = 10.0

    def __init__(self, config: Config, state: State, spool: Spool, *, on_queued: Callable[[int], None] | None = None) -> None:
        self.config = config
        self.state = state
        self.spool = spool
        self.on_queued = on_queued
        self.log = get_logger("dicom_node.engine.completion")
        self.started_at = time.time()
        super().__init__()

    def start(self) -> None:
        self.started_at = time.time()
        super().start()

    def poll_once(self, now: float | None = None) -> list[str]:
        """Complete quiet series and schedule every complete series; return the UIDs scheduled."""
        now = time.time() if now is None else now
        quiet_before = now - self.config.quiet_period_s
        for s in self.state.quiet_series(quiet_before):
            if s.last_instance_at > 0 and self.started_at > quiet_before:  # not quiet since start (0 = forced)
                continue
            if self.state.mark_complete(s.series_uid, quiet_before=quiet_before, at=now):
                self.log.info("series_completed", series_uid=s.series_uid, study_uid=s.study_uid, instances=s.n_instances,
                              calling_aet=s.calling_aet, quiet_s=round(now - s.last_instance_at, 3))
        done = []
        for s in self.state.series_in(SeriesState.COMPLETE):  # includes series left complete by a crash
            self._select_and_schedule(s.series_uid, s.study_uid)
            done.append(s.series_uid)
        return done

    def _select_and_schedule(self, series_uid: str, study_uid: str) -> None:
        paths = [Path(i.path) for i in self.state.instances(series_uid)]
        try:
            decision = select_series(read_header(paths), self.config.selection) if paths else None
        except Exception as e:  # unreadable header: skip with the reason
            decision = SelectionDecision(False, f"header unreadable: {error_text(e, 160)}")  # kept as skip_reason
        if decision is None:
            decision = SelectionDecision(False, "no instances in the spool")
        if decision.incomplete and self.config.results.not_analysed_sr:
            decision = SelectionDecision(True, f"selected to answer: {decision.reason}")
        action, job_id = self.state.schedule_series(series_uid, selected=decision.selected, reason=decision.reason)
        if action == "skipped":
            self.log.info("series_skipped", series_uid=series_uid, study_uid=study_uid, reason=decision.reason)
        elif action in ("queued", "pending", "rerun"):
            self.log.info("series_selected", series_uid=series_uid, study_uid=study_uid, action=action, job_id=job_id,
                          instances=len(paths))
            if action == "queued" and self.on_queued and job_id is not None:
                self.on_queued(job_id)

    # --- thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        poll = min(self.config.worker.poll_s, self.config.quiet_period_s / 4)
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:  # keep serving; the next poll retries
                self.log.error("completion_poll_failed", error=f"{type(e).__name__}: {e}")
            self._sleep(poll)
        self.state.close()

