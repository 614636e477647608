"""Result delivery: C-STORE SCU from the outbox, retries with capped exponential backoff + jitter.

Each (job, destination) pair is one delivery row. An attempt opens one association proposing only
the SOP classes (and transfer syntaxes) of the files it sends, and stores every file of the job.
Success (0x0000) and the warning statuses 0xB000, 0xB006 and 0xB007 count as delivered. A failed
attempt is retried after `min(max_delay_s, base_delay_s * 2**(attempt-1))` +-25 % jitter; after
`max_attempts` the delivery is kept as failed (listed by `dicom-node status`, re-queued by
`dicom-node resend JOB`). When every delivery of a job is final the job is done or failed, and the
`on_deliveries_final` callback is told (the node passes its retention: `delete_after_delivery`).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import uid as U
from pynetdicom import AE
from pynetdicom.sop_class import Verification as VerificationSOPClass  # type: ignore[attr-defined]  # made at import

from dicom_node.config import Config, Destination, parse_destination
from dicom_node.durability.spool import Spool
from dicom_node.durability.state import DeliveryRow, DeliveryState, JobRow, JobState, State, stage_durations
from dicom_node.engine.background import BackgroundLoop
from dicom_node.log import get_logger
from dicom_node.network.tls import client_ssl_context

__all__ = ["SendResult", "SendError", "send_files", "echo", "Sender", "backoff_delay", "DELIVERED_STATUSES"]

DELIVERED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class SendError(RuntimeError):
    """A delivery attempt failed; the message names the destination and the status or error."""


@dataclass(frozen=True)
class SendResult:
    destination: str
    sent: int
    statuses: tuple[int, ...]
    seconds: float


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (1-based): capped exponential with +-25 % jitter."""
    d = min(max_s, base_s * 2 ** max(0, attempt - 1))
    return min(max_s, d * (rng or random).uniform(0.75, 1.25))


def _client_ae(config: Config | None, ae_title: str) -> AE:
    ae = AE(ae_title=ae_title)
    if config is not None:
        ae.acse_timeout = config.timeouts.acse_s
        ae.dimse_timeout = config.timeouts.dimse_s
        ae.network_timeout = config.timeouts.network_s
    return ae


def send_files(paths: Iterable[Path], dest: Destination, *, calling_aet: str = "PENODE",
               config: Config | None = None) -> SendResult:
    """C-STORE every file to `dest` over one association; raise SendError unless all delivered."""
    t0 = time.perf_counter()
    datasets = [pydicom.dcmread(p) for p in paths]
    if not datasets:
        return SendResult(str(dest), 0, (), 0.0)
    ae = _client_ae(config, calling_aet)
    contexts: dict[str, set[str]] = {}
    for ds in datasets:
        contexts.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    for sop, syntaxes in contexts.items():
        ae.add_requested_context(sop, sorted(syntaxes | {U.ExplicitVRLittleEndian, U.ImplicitVRLittleEndian}))
    tls_args = None
    if dest.tls:
        if config is None:
            raise SendError(f"{dest}: TLS destination needs a Config with [tls] cert/key/ca")
        tls_args = (client_ssl_context(config), None)
    try:
        # pynetdicom annotates tls_args as (context, str); the server_hostname None (no SNI) is valid for ssl
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)  # type: ignore[arg-type]
    except Exception as e:  # socket errors surface here on some platforms
        raise SendError(f"{dest}: association failed: {type(e).__name__}: {e}") from None
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise SendError(f"{dest}: association {why}; check that the peer is running and knows AE {calling_aet}")
    statuses: list[int] = []
    try:
        for ds in datasets:
            st = assoc.send_c_store(ds)
            code = int(st.Status) if st and "Status" in st else -1
            statuses.append(code)
            if code not in DELIVERED_STATUSES:
                raise SendError(f"{dest}: C-STORE of {ds.SOPInstanceUID} answered "
                                f"{'no response' if code < 0 else f'0x{code:04X}'}")
    finally:
        if assoc.is_established:
            assoc.release()
    return SendResult(str(dest), len(datasets), tuple(statuses), time.perf_counter() - t0)


def echo(dest: Destination, *, calling_aet: str = "ECHOSCU", config: Config | None = None) -> int:
    """C-ECHO `dest`; return the status (raises SendError when no association)."""
    ae = _client_ae(config, calling_aet)
    ae.add_requested_context(VerificationSOPClass)
    tls_args = (client_ssl_context(config), None) if dest.tls and config else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)  # type: ignore[arg-type]
    if not assoc.is_established:
        raise SendError(f"{dest}: association {'rejected' if assoc.is_rejected else 'failed'}")
    try:
        st = assoc.send_c_echo()
        return int(st.Status) if st and "Status" in st else -1
    finally:
        assoc.release()


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
        self.log = get_logger("dicom_node.network.send")
        super().__init__()

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
            res = send_files(files, parse_destination(d.destination), calling_aet=self.config.ae_title, config=self.config)
        except Exception as e:
            err = str(e)[:500]
            give_up = d.attempts + 1 >= self.config.retry.max_attempts
            delay = backoff_delay(d.attempts + 1, self.config.retry.base_delay_s, self.config.retry.max_delay_s)
            self.state.record_delivery(d.id, ok=False, error=err, next_try_at=time.time() + delay, give_up=give_up)
            if self.on_failure:
                self.on_failure(d.destination)
            if give_up:
                log.error("delivery_failed", error=err, final=True, attempts=d.attempts + 1)
            else:
                log.warning("delivery_retry", error=err, retry_in_s=round(delay, 2))
            return
        self.state.record_delivery(d.id, ok=True)
        log.info("results_sent", instances=res.sent, s=round(res.seconds, 3),
                 warnings=[f"0x{s:04X}" for s in res.statuses if s != 0])

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
