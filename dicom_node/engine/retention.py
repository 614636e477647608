"""Spool and outbox clean-up after delivery (`[spool] keep_days`, `delete_after_delivery`).

* `keep_days` (background thread, at start and then every minute): the spooled instances of
  delivered (`done`) series whose last instance is older than `keep_days`, and the outboxes of
  their delivered jobs, are deleted (0 = keep forever). The job rows with their result UIDs stay;
  a re-run rebuilds the results with the same UIDs.
* `delete_after_delivery`: the sender calls `after_delivery` when a job is finished; a job
  delivered to every destination, with no re-run started, has its series' spool deleted at once.
"""

from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING

from dicom_node.durability.state import JobState
from dicom_node.engine.background import BackgroundLoop
from dicom_node.log import get_logger

if TYPE_CHECKING:
    from dicom_node.config import Config
    from dicom_node.durability.spool import Spool
    from dicom_node.durability.state import JobRow, State

__all__ = ["Retention"]


class Retention(BackgroundLoop):
    """Deletes what the node no longer needs once results are delivered."""

    thread_name = "retention"
    join_timeout_s = 10.0
    interval_s = 60.0

    def __init__(self, config: Config, state: State, spool: Spool) -> None:
        self.config = config
        self.state = state
        self.spool = spool
        self.log = get_logger("dicom_node.engine.retention")
        super().__init__()

    def cleanup(self, now: float) -> int:
        """Delete the spooled instances of delivered series older than `keep_days` (0 = keep)."""
        days = self.config.spool.keep_days
        if days <= 0:
            return 0
        n = 0
        for s in self.state.done_series_older_than(now - days * 86400):
            n += self._purge(s.study_uid, s.series_uid)
            # delivered results too: they are in the PACS, and a re-run rebuilds them with the same UIDs
            outboxes = [self.spool.job_outbox(j.id) for j in self.state.jobs(JobState.DONE, series_uid=s.series_uid)]
            for box in outboxes:
                shutil.rmtree(box, ignore_errors=True)
            self.log.info("spool_purged", series_uid=s.series_uid, outboxes=len(outboxes),
                          reason=f"older than keep_days={days:g}")
        return n

    def _purge(self, study_uid: str, series_uid: str) -> int:
        """Delete the series' instances as its rows list them now, files first, then those rows only: an
        instance acknowledged while this runs (a late slice) keeps its file and row, and its series goes on
        from receiving (`State.add_instance`). Returns how many were deleted."""
        rows = self.state.instances(series_uid)
        n = self.spool.delete_instances(study_uid, series_uid, (r.path for r in rows))
        left = self.state.mark_series_purged(series_uid, (r.sop_uid for r in rows))
        if left:
            self.log.info("spool_purge_kept", series_uid=series_uid, instances=left,
                          note="instances that arrived during the purge are kept")
        return n

    def after_delivery(self, job: JobRow, rerun_job_id: int | None) -> None:
        """A job is finished: with `delete_after_delivery`, delete its series' spool if it was delivered
        and no re-run was started (the re-run needs the instances)."""
        if not self.config.spool.delete_after_delivery or job.state is not JobState.DONE or rerun_job_id is not None:
            return
        n = self._purge(job.study_uid, job.series_uid)
        self.log.info("spool_purged", series_uid=job.series_uid, instances=n, reason="delete_after_delivery")

    # --- thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.cleanup(time.time())
            except Exception as e:  # keep serving; the next round retries
                self.log.error("retention_failed", error=f"{type(e).__name__}: {e}")
            self._sleep(self.interval_s)
        self.state.close()
