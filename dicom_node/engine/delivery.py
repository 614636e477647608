"""Result delivery: the background loop that sends each job's outbox to its destinations.

Each (job, destination) pair is one delivery row. An attempt stores every file of the job in one
association (`dicom_node.network.send.send_files`). A failed attempt is retried after
`backoff_delay` (capped exponential, +-25 % jitter); after `[retry] max_attempts` the delivery is
kept as failed (listed by `dicom-node status`, re-queued by `dicom-node resend JOB`). When every
delivery of a job is final the job is done or failed, and the `on_deliveries_final` callback is
told (the node passes its retention: `delete_after_delivery`).

`failing()` says, per destination, since when every attempt has failed (cleared by the next
success); the node's `/healthz` turns unhealthy when that is longer than `[health] delivery_failure_s`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from dicom_node.config import Config, Destination, parse_destination
from dicom_node.durability.spool import Spool
from dicom_node.durability.state import DeliveryRow, DeliveryState, JobRow, JobState, State, stage_durations
from dicom_node.engine.background import BackgroundLoop
from dicom_node.log import get_logger
from dicom_node.network.send import backoff_delay, send_files

__all__ = ["Sender"]


class Sender(BackgroundLoop):
    """Background thread delivering due outbox entries and finishing jobs."""

    thread_name = "sender"
    join_timeout_s = 30.0

    def __init__(self, config: Config, state: State, spool: Spool, *,
                 on_failure: Callable[[str], None] | None = None,
                 on_deliveries_final: Callable[[JobRow, int | None], None] | None = None,
                 on_finished: Callable[[JobRow, float | None], None] | None = None,
                 on_rerun: Callable[[int], None] | None = None) -> None:
        self.config = config
        self.state = state
        self.spool = spool
        self.on_failure = on_failure
        self.on_deliveries_final = on_deliveries_final  # (finished job, re-run job id or None)
        self.on_finished = on_finished
        self.on_rerun = on_rerun
        self.log = get_logger("dicom_node.engine.delivery")
        self._failing: dict[str, tuple[float, str]] = {}  # destination -> (first failure since last success, last error)
        self._failing_lock = threading.Lock()
        super().__init__()

    def failing(self) -> dict[str, tuple[float, str]]:
        """{destination: (unix time of its first failed attempt since its last success, last error)}."""
        with self._failing_lock:
            return dict(self._failing)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception as e:
                self.log.error("send_poll_failed", error=f"{type(e).__name__}: {e}")
            nxt = self.state.next_delivery_time()
            wait = self.config.worker.poll_s if nxt is None else max(0.0, min(nxt - time.time(), 1.0))
            self._sleep(max(wait, 0.01))
        self.state.close()

    def poll_once(self) -> None:
        for d in self.state.due_deliveries(time.time()):
            if self._stop.is_set():
                return
            self._attempt(d)
        for job in self.state.jobs(JobState.SENDING):
            self._maybe_finish(job)

    def _attempt(self, d: DeliveryRow) -> None:
        files = sorted(self.spool.job_outbox(d.job_id).glob("*.dcm"))
        log = self.log.bind(job_id=d.job_id, destination=d.destination, attempt=d.attempts + 1)
        try:
            res = send_files(files, self._destination(d.destination), calling_aet=self.config.ae_title, config=self.config)
        except Exception as e:
            err = str(e)[:500]
            give_up = d.attempts + 1 >= self.config.retry.max_attempts
            delay = backoff_delay(d.attempts + 1, self.config.retry.base_delay_s, self.config.retry.max_delay_s)
            self.state.record_delivery(d.id, ok=False, error=err, next_try_at=time.time() + delay, give_up=give_up)
            with self._failing_lock:
                self._failing[d.destination] = (self._failing.get(d.destination, (time.time(), ""))[0], err)
            if self.on_failure:
                self.on_failure(d.destination)
            cause = getattr(e, "cause", type(e).__name__)
            if give_up:
                log.error("delivery_failed", error=err, cause=cause, final=True, attempts=d.attempts + 1)
            else:
                log.warning("delivery_retry", error=err, cause=cause, retry_in_s=round(delay, 2))
            return
        self.state.record_delivery(d.id, ok=True)
        with self._failing_lock:
            self._failing.pop(d.destination, None)
        log.info("results_sent", instances=res.sent, s=round(res.seconds, 3),
                 warnings=[f"0x{s:04X}" for s in res.statuses if s != 0])

    def _destination(self, text: str) -> Destination:
        """The stored address (`Destination.address`: `+tls` for TLS). A row written before rows carried `+tls`
        gets TLS when it names a configured TLS destination or peer."""
        d = parse_destination(text)
        for c in (*self.config.destinations, *self.config.peers):
            if (c.ae_title, c.host, c.port) == (d.ae_title, d.host, d.port) and c.tls and not d.tls:
                return c
        return d

    def _maybe_finish(self, job: JobRow) -> None:
        ds = self.state.deliveries(job.id)
        if any(d.state is DeliveryState.PENDING for d in ds):
            return
        ok = all(d.state is DeliveryState.DONE for d in ds)
        finished, rerun = self.state.finish_job(
            job.id, JobState.DONE if ok else JobState.FAILED,
            error=None if ok else "; ".join(f"{d.destination}: {d.last_error}" for d in ds if d.state is DeliveryState.FAILED))
        start = finished.times.get("received")
        end = finished.times.get("finished")  # set by finish_job
        ttr = (end - start) if ok and start and end is not None else None
        self.log.info("job_finished", job_id=job.id, series_uid=job.series_uid, state=finished.state.value,
                      revision=job.revision, rerun_job_id=rerun, **_durations(finished.times))
        if self.on_deliveries_final:
            self.on_deliveries_final(finished, rerun)
        if self.on_finished:
            self.on_finished(finished, ttr)
        if rerun and self.on_rerun:
            self.on_rerun(rerun)


def _durations(times: Mapping[str, float | None]) -> dict[str, float]:
    return stage_durations({**times, "sent": times.get("finished")})
