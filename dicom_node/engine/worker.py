"""Jobs off the network thread: bounded concurrency, priority order, stage timings, outbox.

The job body is pluggable: a `JobBody` with `run(ctx: JobContext) -> JobResult`, called once per
job, and `prepare(config)`, called once by `Node.start` before any study is accepted (raise there
to refuse to start). The product's is `dicom_node.pipeline.JOB_BODY`; a plain `run_job` callable
is a body without preparation (`JobBody.of`). The worker claims the highest-priority queued job,
calls the body, writes every result durably into `outbox/<job id>/` (so a crash after this point
re-sends instead of re-computing), records the result UIDs and queues one delivery per destination.

Stage times recorded in the job row (unix seconds, `dicom_node.durability.state.JOB_STAGES`):
received (last instance), complete, queued, started, any stage the body marks with `ctx.mark(...)`
(preprocessed, inferred), built, sent, finished. `job_built` and `job_finished` log the durations
between consecutive stages (`stage_durations`).

Worklist priority: when the analysis ends (built, or failed) the worker decides the job's priority
from `JobResult.findings` (`dicom_node.engine.priority.decide_priority` under `[priority]`) and
writes it, with the notifications `[notify]` asks for (`dicom_node.notify.document`), in the same
transaction as the state change (`JobOutcome`). `job_prioritised` logs class, reason and score.

A backend that does not answer: a body that raises an exception whose `retry_later` attribute is true
(`dicom_node.model.inference.BackendUnavailable`: the Triton server did not answer a request nor a
liveness check) does not fail its job. The job goes back to the queue (`State.defer_job`) and runs
again after `[worker] retry_unavailable_s`, doubled at each try up to `RETRY_UNAVAILABLE_CAP_S`, for
`retry_unavailable_max` tries; `job_deferred` (WARNING) says why, which try it was and when the next one
is. Only after the last try does the job fail (then `dicom-node resend`). A deferred job has no priority
and sends no notification yet: nothing was analysed. `dicom-node resend` runs a deferred job at once, and
so does a restart.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicom_node.config import Config, Destination, ResultsConfig
from dicom_node.durability.spool import Spool
from dicom_node.durability.state import JobOutcome, JobRow, JobState, State, stage_durations
from dicom_node.engine.background import BackgroundLoop
from dicom_node.engine.priority import Findings, decide_priority
from dicom_node.log import error_text, get_logger
from dicom_node.notify.document import notifications_for, study_context

__all__ = ["JobContext", "JobResult", "RunJob", "JobBody", "Worker", "destinations_for"]


@dataclass(frozen=True)
class JobContext:
    """Everything a job body needs; built by the worker from the state database."""

    job_id: int
    series_uid: str
    study_uid: str
    instance_paths: tuple[Path, ...]  # spooled Part 10 files of the series (any order)
    revision: int  # 1 for the first delivered result of a series, +1 per delivered re-run (State._next_revision)
    predecessor_result_uids: tuple[str, ...]  # SOP Instance UIDs of the previous revision's results
    bundle: str  # config inference.bundle ('' = bundled demo model)
    config: Config
    mark: Callable[[str], None] = field(default=lambda stage: None, compare=False)  # ctx.mark("inferred")

    @property
    def results(self) -> ResultsConfig:
        return self.config.results


@dataclass(frozen=True)
class JobResult:
    """What a job produced: datasets and/or Part 10 files to deliver, and their SOP Instance UIDs."""

    datasets: tuple[Dataset, ...] = ()
    files: tuple[Path, ...] = ()
    result_uids: tuple[str, ...] = ()  # defaults to the SOPInstanceUIDs of datasets + files
    inference_s: float | None = None
    summary: Mapping[str, object] = field(default_factory=dict)  # non-PHI facts for the log (e.g. probabilities)
    findings: Findings | None = None  # what the model said (worklist priority, notifications); None = no model output


RunJob = Callable[[JobContext], JobResult]


def _nothing_to_prepare(config: Config) -> None:
    """The preparation of a job body that needs none."""


@dataclass(frozen=True)
class JobBody:
    """What the worker runs: `run(ctx)` per job; `prepare(config)` once at node start, before any study
    is accepted (the product pipeline loads and verifies the model bundle there; an exception stops
    the start with `NodeError`)."""

    run: RunJob
    prepare: Callable[[Config], None] = _nothing_to_prepare

    @classmethod
    def of(cls, body: JobBody | RunJob) -> JobBody:
        """`body` itself, or a plain `run_job` callable as a body with nothing to prepare."""
        return body if isinstance(body, JobBody) else cls(body)


#: the longest wait between two tries of a job whose inference backend does not answer
RETRY_UNAVAILABLE_CAP_S = 900.0


def retry_delay(first_s: float, tries: int) -> float:
    """Seconds before the next try of a job deferred after its `tries`-th try while the backend was away:
    `first_s` doubled for each earlier deferral, at most `RETRY_UNAVAILABLE_CAP_S`."""
    return float(min(first_s * 2.0 ** max(tries - 1, 0), RETRY_UNAVAILABLE_CAP_S))


def destinations_for(config: Config, calling_aet: str) -> list[Destination]:
    """Configured destinations, plus the sender when `send_back_to_sender` and it is a known peer."""
    out = list(config.destinations)
    if config.send_back_to_sender:
        for p in config.peers:
            if p.ae_title == calling_aet.strip() and p not in out:
                out.append(p)
    return out


class Worker(BackgroundLoop):
    """Runs queued jobs on a bounded thread pool (`[worker] concurrency`)."""

    thread_name = "worker-dispatch"
    join_timeout_s = 10.0

    def __init__(self, config: Config, state: State, spool: Spool, run_job: RunJob, *,
                 on_built: Callable[[int], None] | None = None,
                 on_finished: Callable[[JobRow, float | None], None] | None = None,
                 on_inference: Callable[[float], None] | None = None) -> None:
        self.config = config
        self.state = state
        self.spool = spool
        self.run_job = run_job
        self.on_built = on_built
        self.on_finished = on_finished
        self.on_inference = on_inference
        self.log = get_logger("dicom_node.engine.worker")
        self._slots = threading.Semaphore(config.worker.concurrency)
        self._pool = ThreadPoolExecutor(max_workers=config.worker.concurrency, thread_name_prefix="job")
        super().__init__()

    def stop(self) -> None:
        super().stop()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:  # dispatch loop
        while not self._stop.is_set():
            if not self._slots.acquire(timeout=self.config.worker.poll_s):
                continue
            job = None
            try:
                job = self.state.claim_next_job()
            except Exception as e:
                self.log.error("job_claim_failed", error=f"{type(e).__name__}: {e}")
            if job is None:
                self._slots.release()
                self._sleep(self.config.worker.poll_s)
                continue
            self._pool.submit(self._run_guarded, job)
        self.state.close()

    def _run_guarded(self, job: JobRow) -> None:
        try:
            self.run_one(job)
        finally:
            self._slots.release()
            self.state.close()

    def run_one(self, job: JobRow) -> None:
        """Run one claimed (running) job to `built`+`sending`, or to `failed`."""
        t0 = time.perf_counter()
        rows = self.state.instances(job.series_uid)
        calling = rows[0].calling_aet if rows else ""
        log = self.log.bind(job_id=job.id, series_uid=job.series_uid, study_uid=job.study_uid, revision=job.revision)
        marks: dict[str, float] = {}
        ctx = JobContext(job.id, job.series_uid, job.study_uid, tuple(Path(r.path) for r in rows), job.revision,
                         job.predecessor_result_uids, self.config.inference.bundle, self.config,
                         mark=lambda stage: marks.__setitem__(stage, time.time()))
        log.info("job_started", instances=len(rows), attempt=job.attempts)
        try:
            result = self.run_job(ctx)
            uids = self._write_outbox(job.id, result)
        except Exception as e:
            err = error_text(e)  # another library's message may quote a field value: not into the log or database
            tries = self.config.worker.retry_unavailable_max + 1
            if getattr(e, "retry_later", False) and job.deferrals + 1 < tries:
                wait = retry_delay(self.config.worker.retry_unavailable_s, job.deferrals + 1)
                self.state.defer_job(job.id, not_before=time.time() + wait, error=err)
                log.warning("job_deferred", error=err, attempt=job.deferrals + 1, tries=tries, retry_in_s=round(wait, 1),
                            note="the inference backend did not answer; the job runs again by itself")
                return
            log.error("job_failed", error=err, stage="run", s=round(time.perf_counter() - t0, 3))
            outcome = self._outcome(job, rows[0].path if rows else None, None, err)
            finished, rerun = self.state.finish_job(job.id, JobState.FAILED, error=err, outcome=outcome)
            if self.on_finished:
                self.on_finished(finished, None)
            if rerun:
                self.wake()
            return
        if result.inference_s is not None and self.on_inference:
            self.on_inference(result.inference_s)
        outcome = self._outcome(job, rows[0].path if rows else None, result.findings, None)
        built = self.state.transition(job.id, JobState.BUILT, stage="built", result_uids=uids, extra_times=marks,
                                      outcome=outcome)
        dests = [d.address for d in destinations_for(self.config, calling)]
        self.state.add_deliveries(job.id, dests)
        self.state.transition(job.id, JobState.SENDING, stage="sending")
        inference_s = round(result.inference_s, 3) if result.inference_s is not None else None
        log.info("job_built", results=len(uids), destinations=dests, inference_s=inference_s,
                 **{k: v for k, v in result.summary.items() if isinstance(v, (int, float, str, bool))},
                 **stage_durations(built.times))
        if self.on_built:
            self.on_built(job.id)

    def _outcome(self, job: JobRow, instance: str | None, findings: Findings | None, error: str | None) -> JobOutcome:
        """The job's priority (from its findings, or the failure) and the notifications it triggers."""
        decision = decide_priority(findings, self.config.priority, error=error)
        now = time.time()
        notify = self.config.notify
        wanted = bool(notify.webhook_url or notify.hl7_host)
        context = study_context(job.study_uid, job.series_uid, Path(instance) if instance and wanted else None,
                                identity=notify.include_patient_identity)
        notes = notifications_for(job.id, context, decision, findings, notify, at=now) if wanted else ()
        self.log.info("job_prioritised", job_id=job.id, series_uid=job.series_uid, study_uid=job.study_uid,
                      priority=decision.priority.value, reason=decision.reason, score=decision.score,
                      notifications=[t for t, _ in notes])
        return JobOutcome(decision.priority.value, decision.reason, decision.score, notes)

    def _write_outbox(self, job_id: int, result: JobResult) -> tuple[str, ...]:
        outbox = self.spool.job_outbox(job_id)
        uids: list[str] = []
        for ds in result.datasets:
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            self.spool.store_result(job_id, str(ds.SOPInstanceUID), buf.getvalue())
            uids.append(str(ds.SOPInstanceUID))
        for f in result.files:
            data = Path(f).read_bytes()
            sop = str(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)
            self.spool.store_result(job_id, sop, data)
            uids.append(sop)
        keep = {f"{u}.dcm" for u in uids}
        for stale in outbox.glob("*.dcm") if outbox.is_dir() else ():
            if stale.name not in keep:  # left by an earlier attempt that produced other objects
                stale.unlink()
        return tuple(result.result_uids) or tuple(uids)
