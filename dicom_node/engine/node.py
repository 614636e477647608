"""The node: receive + completion + worker + send + retention + metrics assembled from one `Config`.

    node = Node(config, run_job=my_job)   # a JobBody or a run_job callable; default dicom_node.pipeline.JOB_BODY
    node.start()                          # non-blocking; node.port is the DICOM port
    ...
    node.stop()                           # or node.request_stop() to end a blocking start(block=True)

`start` first runs the job body's `prepare(config)` (the product pipeline loads, verifies and
warms up the model bundle there) and refuses to start with `NodeError` when it fails.

Start-up recovery (before the SCP accepts anything): stray temp files are removed; jobs that were
running go back to the queue (their deterministic result UIDs make a re-run overwrite, never
duplicate, in PACS); built jobs get their deliveries and are sent from the outbox; pending
deliveries are due at once; a re-run requested before a crash is started; series left complete
are selected again; receiving series complete after their quiet period as usual.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from dicom_node.durability.spool import Spool
from dicom_node.durability.state import JobState, State
from dicom_node.engine.completion import CompletionScheduler
from dicom_node.engine.delivery import Sender
from dicom_node.engine.metrics import MetricsServer, NodeMetrics
from dicom_node.engine.retention import Retention
from dicom_node.engine.worker import JobBody, Worker, destinations_for
from dicom_node.log import get_logger
from dicom_node.network.receive import Receiver

if TYPE_CHECKING:
    from types import TracebackType

    from dicom_node.config import Config
    from dicom_node.engine.worker import RunJob

__all__ = ["Node", "NodeError", "default_job_body", "recover"]


class NodeError(RuntimeError):
    """The node cannot start; the message says what is missing and how to fix it."""


def default_job_body() -> JobBody:
    """The product pipeline's job body (`dicom_node.pipeline.JOB_BODY`), or a NodeError saying why not.

    Imported only when it is the body: the pipeline pulls in the imaging, model and results stages,
    which a node running another body (`--job`, the tests' stand-in) does not need, and an import
    failure there becomes a NodeError saying what to do."""
    try:
        from dicom_node import pipeline
    except ImportError as e:
        raise NodeError(f"dicom_node.pipeline cannot be imported ({e}); install the full package or pass "
                        "--job MODULE:FUNCTION (a run_job(JobContext) -> JobResult function)") from None
    return pipeline.JOB_BODY


def recover(config: Config, state: State, spool: Spool) -> dict[str, int]:
    """Resume every unfinished job after a restart; return counts of what was resumed."""
    log = get_logger("dicom_node.engine.node")
    counts = {"temp_files_removed": spool.sweep_temp_files(), "requeued": 0, "resent": 0, "reruns": 0}
    for j in state.jobs(JobState.RUNNING):
        state.transition(j.id, JobState.QUEUED, stage="requeued")
        counts["requeued"] += 1
        log.info("job_resumed", job_id=j.id, series_uid=j.series_uid, was="running", now="queued")
    for j in state.jobs(JobState.BUILT):
        rows = state.instances(j.series_uid)
        state.add_deliveries(j.id, [str(d) for d in destinations_for(config, rows[0].calling_aet if rows else "")])
        state.transition(j.id, JobState.SENDING, stage="sending")
        counts["resent"] += 1
        log.info("job_resumed", job_id=j.id, series_uid=j.series_uid, was="built", now="sending")
    counts["resent"] += len(state.jobs(JobState.SENDING))
    for st in (JobState.DONE, JobState.FAILED):
        for j in state.jobs(st):
            if j.rerun_requested and state.start_rerun_if_requested(j) is not None:
                counts["reruns"] += 1
    state.retry_now()
    return counts


class Node:
    """The whole node; `run_job` is the job body (a `JobBody`, or a plain `run_job(ctx)` callable with
    nothing to prepare), by default the product pipeline's."""

    def __init__(self, config: Config, run_job: JobBody | RunJob | None = None) -> None:
        self.config = config
        self.job_body = JobBody.of(run_job) if run_job is not None else default_job_body()
        self.log = get_logger("dicom_node.engine.node")
        self.spool = Spool(config.data_dir, min_free_disk_mb=config.min_free_disk_mb)
        self.state = State(config.data_path / "state.sqlite")
        self.metrics = NodeMetrics(self.state)
        self.retention = Retention(config, self.state, self.spool)
        self.sender = Sender(config, self.state, self.spool, on_failure=self.metrics.send_failed,
                             on_deliveries_final=self.retention.after_delivery,
                             on_finished=self.metrics.job_finished, on_rerun=self._wake_worker)
        self.worker = Worker(config, self.state, self.spool, self.job_body.run, on_built=self.sender.wake,
                             on_finished=self.metrics.job_finished, on_inference=self.metrics.inference_seconds.observe)
        self.completion = CompletionScheduler(config, self.state, self.spool, on_queued=self.worker.wake)
        self.receiver = Receiver(config, self.spool, self.state, on_stored=self.metrics.stored, on_refused=self.metrics.refused)
        self.metrics_server: MetricsServer | None = None
        self._stopped = threading.Event()
        self.started_at: float | None = None

    def _wake_worker(self, job_id: int) -> None:
        self.worker.wake(job_id)

    @property
    def port(self) -> int:
        return self.receiver.port

    @property
    def metrics_port(self) -> int | None:
        return self.metrics_server.port if self.metrics_server else None

    @property
    def stopping(self) -> bool:
        """True once `request_stop` or `stop` was called."""
        return self._stopped.is_set()

    def request_stop(self) -> None:
        """Ask the node to stop: a blocking `start(block=True)` returns and stops everything.

        Only sets an event, so it is safe from a signal handler (`dicom-node serve` on SIGTERM)."""
        self._stopped.set()

    def health(self) -> dict[str, Any]:
        ok = self.receiver.server is not None and not self._stopped.is_set()
        free = self.spool.free_mb()
        counts = self.state.job_counts()
        self.state.close()
        return {"ok": ok and free >= self.config.min_free_disk_mb, "ae_title": self.config.ae_title, "port": self.port,
                "free_disk_mb": round(free), "min_free_disk_mb": self.config.min_free_disk_mb, "jobs": counts,
                "uptime_s": round(time.time() - (self.started_at or time.time()), 1)}

    def start(self, block: bool = False) -> Node:
        # The job body may need set-up that must fail at start, not at the first study: the product
        # pipeline loads and verifies the model bundle, checks require_gpu and warms the graphs up.
        try:
            self.job_body.prepare(self.config)
        except Exception as e:
            self.state.close()
            raise NodeError(f"cannot start: {e}") from e
        counts = recover(self.config, self.state, self.spool)
        self.log.info("node_recovered", **counts)
        self.sender.start()
        self.worker.start()
        self.completion.start()
        self.retention.start()
        self.receiver.start()
        if self.config.metrics_port:
            self.metrics_server = MetricsServer(self.metrics, self.config.metrics_host, self.config.metrics_port,
                                                self.health).start()
        self.started_at = time.time()
        self.log.info("node_started", ae_title=self.config.ae_title, port=self.port, metrics_port=self.metrics_port,
                      destinations=[str(d) for d in self.config.destinations], quiet_period_s=self.config.quiet_period_s)
        if block:
            try:
                self._stopped.wait()
            except KeyboardInterrupt:
                pass
            finally:
                self.stop()
        return self

    def stop(self) -> None:
        if self.receiver.server is None and self._stopped.is_set():
            return
        self._stopped.set()
        self.receiver.stop()  # no new instances first
        self.completion.stop()
        self.retention.stop()
        self.worker.stop()
        self.sender.stop()
        if self.metrics_server:
            self.metrics_server.stop()
        self.state.close()
        self.log.info("node_stopped", ae_title=self.config.ae_title)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
