"""The node: receive + completion + worker + send + retention + metrics assembled from one `Config`.

    node = Node(config, run_job=my_job)   # a JobBody or a run_job callable; default dicom_node.pipeline.JOB_BODY
    node.start()                          # non-blocking; node.port is the DICOM port
    ...
    node.stop()                           # or node.request_stop() to end a blocking start(block=True)

`start` first opens the metrics port (when `metrics_port` is set; `/readyz` answers 503 until the
job body is prepared), then runs the job body's `prepare(config)` (the product pipeline loads,
verifies and warms up the model bundle there), then opens the DICOM port. Each failure (a port in
use, a bundle that does not load) is a `NodeError` naming the key, the value and the fix, raised
before `scp_listening` for the metrics port, and nothing is left running.

`health()` (served as `/healthz`) is unhealthy, with `reasons`, when the spool disk has less free
space than `min_free_disk_mb`, when every delivery to a destination has failed for longer than
`[health] delivery_failure_s`, when the SCP is not listening after start, or when one of the worker
threads (completion, worker dispatch, sender, notifier, retention) has died (`dicom_node.engine.health`,
the thread named). Its `log_sink` says how many log lines could not be written (a closed pipe, a full
disk): a failing log never stops the node (`dicom_node.log`). `reload(config)`
applies the keys that can change while running (`LIVE_KEYS`: destinations, selection, allow-list,
retry, health, quiet period, log level, priority rules, notification targets) and reports the others as needing a restart; `dicom-node
serve` calls it on SIGHUP.

The state database must match the spool: a damaged one (`StateDamaged`, `PRAGMA quick_check` at open)
or one without instance records over a spool that holds instances (deleted, truncated, replaced)
stops the node with one line naming the file and the fix (`dicom-node serve --rebuild-state`,
`dicom_node.durability.rebuild`).

Start-up recovery (before the SCP accepts anything): stray temp files are removed; jobs that were
running go back to the queue (their deterministic result UIDs make a re-run overwrite, never
duplicate, in PACS); built jobs get their deliveries and are sent from the outbox; pending
deliveries are due at once (pending notifications keep their next try time); a re-run requested
before a crash is started; series left complete are selected again; receiving series complete after
their quiet period counted from the start (`dicom_node.engine.completion`: a partial series cut off
by the crash waits for the re-send).
"""

from __future__ import annotations

import dataclasses
import errno
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dicom_node.durability.flush import native_available
from dicom_node.durability.rebuild import spool_has_instances
from dicom_node.durability.spool import Spool
from dicom_node.durability.state import REBUILD_HINT, JobState, State
from dicom_node.engine.background import BackgroundLoop
from dicom_node.engine.completion import CompletionScheduler
from dicom_node.engine.delivery import Sender
from dicom_node.engine.health import thread_liveness
from dicom_node.engine.metrics import NodeMetrics
from dicom_node.engine.retention import Retention
from dicom_node.engine.worker import JobBody, Worker, destinations_for
from dicom_node.log import get_logger, log_sink_status
from dicom_node.network.receive import Receiver
from dicom_node.network.tls import CERTIFICATE_WARN_DAYS, certificate_dates, uses_own_certificate
from dicom_node.notify.outbox import NotificationSender
from dicom_node.web.server import HttpServer

if TYPE_CHECKING:
    from types import TracebackType

    from dicom_node.config import Config
    from dicom_node.engine.worker import RunJob

__all__ = ["LIVE_KEYS", "Node", "NodeError", "default_job_body", "recover"]

#: keys (or `section.` prefixes) `Node.reload` applies without a restart
LIVE_KEYS = ("priority.", "notify.", "destinations", "peers", "send_back_to_sender", "allowed_calling_aets", "quiet_period_s", "selection.",
             "retry.", "health.", "log.level")


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
    counts = {"temp_files_removed": spool.sweep_temp_files(), "requeued": 0, "resent": 0, "reruns": 0,
              # jobs deferred while the inference backend did not answer are tried at once: a restart is what an
              # admin does after fixing the server (a try that still finds it away is deferred again)
              "deferred_run_now": state.run_deferred_now()}
    for j in state.jobs(JobState.RUNNING):
        state.transition(j.id, JobState.QUEUED, stage="requeued")
        counts["requeued"] += 1
        log.info("job_resumed", job_id=j.id, series_uid=j.series_uid, was="running", now="queued")
    for j in state.jobs(JobState.BUILT):
        rows = state.instances(j.series_uid)
        state.add_deliveries(j.id, [d.address for d in destinations_for(config, rows[0].calling_aet if rows else "")])
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
        if self.state.instance_count() == 0 and spool_has_instances(self.spool.spool_dir):
            self.state.close()
            raise NodeError(f"state database {self.state.path} has no instance records but the spool {self.spool.spool_dir} "
                            "holds received instances (the database was deleted, truncated or replaced); the node will "
                            f"not start over them with its history lost: {REBUILD_HINT}")
        self.metrics = NodeMetrics(self.state)
        self.retention = Retention(config, self.state, self.spool)
        self.sender = Sender(config, self.state, self.spool, on_failure=self.metrics.send_failed,
                             on_deliveries_final=self.retention.after_delivery,
                             on_finished=self.metrics.job_finished, on_rerun=self._wake_worker)
        self.worker = Worker(config, self.state, self.spool, self.job_body.run, on_built=self.sender.wake,
                             on_finished=self.metrics.job_finished, on_inference=self.metrics.inference_seconds.observe)
        self.notifier = NotificationSender(config, self.state)
        self.completion = CompletionScheduler(config, self.state, self.spool, on_queued=self.worker.wake)
        self.receiver = Receiver(config, self.spool, self.state, on_stored=self.metrics.stored, on_refused=self.metrics.refused)
        self.metrics_server: HttpServer | None = None
        self._stopped = threading.Event()
        self._reload = threading.Event()
        self._prepared = False
        self.started_at: float | None = None
        #: `start(block=True)` calls this on `request_reload()` and applies its Config with `reload`
        self.reloader: Callable[[], Config] | None = None
        #: told the applied Config after a reload (`dicom-node serve` re-applies the log level)
        self.on_reloaded: Callable[[Config], None] | None = None

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

    def request_reload(self) -> None:
        """Ask a blocking `start(block=True)` to reload the configuration (`reloader`); signal-safe."""
        self._reload.set()

    def health(self) -> dict[str, Any]:
        """The `/healthz` body: `ok`, and `reasons` (one line each) when not ok."""
        cfg = self.config
        now = time.time()
        reasons: list[str] = []
        if self._stopped.is_set():
            reasons.append("the node is stopping")
        elif self.started_at is not None and self.receiver.server is None:
            reasons.append(f"the DICOM SCP is not listening on port {self.port}")
        free = self.spool.free_mb()
        if free < cfg.min_free_disk_mb:
            reasons.append(f"spool disk {cfg.data_dir}: {free:.0f} MiB free, below min_free_disk_mb "
                           f"{cfg.min_free_disk_mb}; free space or move data_dir")
        failing = {}
        for dest, (since, err) in sorted(self.sender.failing().items()):
            failing[dest] = {"failing_s": round(now - since, 1), "last_error": err}
            if cfg.health.delivery_failure_s and now - since > cfg.health.delivery_failure_s:
                reasons.append(f"deliveries to {dest} have failed for {now - since:.0f} s (more than "
                               f"health.delivery_failure_s {cfg.health.delivery_failure_s:g}); last error: {err}")
        if self.started_at is not None:
            reasons += thread_liveness(self._loops())[1]
        counts = self.state.job_counts()
        self.state.close()
        return {"ok": not reasons, "reasons": reasons, "ready": self._prepared, "ae_title": cfg.ae_title,
                "port": self.port, "free_disk_mb": round(free), "min_free_disk_mb": cfg.min_free_disk_mb,
                "failing_destinations": failing, "jobs": counts,
                "uptime_s": round(now - (self.started_at or now), 1), "log_sink": log_sink_status()}

    def _loops(self) -> tuple[BackgroundLoop, ...]:
        """The node's worker threads, for `/healthz` (`thread_liveness`)."""
        return (self.completion, self.worker, self.sender, self.notifier, self.retention)

    def ready(self) -> dict[str, Any]:
        """The `/readyz` body: `ready` once the job body is prepared (model loaded) and the SCP listens."""
        ready = self._prepared and self.receiver.server is not None and not self._stopped.is_set()
        reason = ("" if ready else "stopping" if self._stopped.is_set() else
                  "the job body (model bundle) is being prepared" if not self._prepared else "the SCP is not listening yet")
        return {"ready": ready, **({"reason": reason} if reason else {})}

    def reload(self, new: Config) -> dict[str, list[str]]:
        """Apply the `LIVE_KEYS` of `new`; return {"changed": keys applied, "restart_needed": other changed keys}."""
        old_flat, new_flat = _flat(dataclasses.asdict(self.config)), _flat(dataclasses.asdict(new))
        changed = sorted(k for k in old_flat.keys() | new_flat.keys() if old_flat.get(k) != new_flat.get(k))
        live = [k for k in changed if any(k == p or (p.endswith(".") and k.startswith(p)) for p in LIVE_KEYS)]
        top = sorted({k.split("[")[0] for k in live})
        cfg = self.config.replace(**{k: _get_dotted(dataclasses.asdict(new), k) for k in top})
        for component in (self, self.sender, self.notifier, self.worker, self.completion, self.retention, self.receiver):
            component.config = cfg
        return {"changed": sorted(set(top)), "restart_needed": sorted({k.split("[")[0] for k in changed} - set(top))}

    def _reload_now(self) -> None:
        if self.reloader is None:
            return
        try:
            res = self.reload(self.reloader())
        except Exception as e:  # a bad file must not stop a running node
            self.log.error("config_reload_failed", error=f"{type(e).__name__}: {e}"[:500],
                           fix="correct the file and send SIGHUP again; the running configuration is unchanged")
            return
        if self.on_reloaded:
            self.on_reloaded(self.config)
        self.log.info("config_reloaded", changed=res["changed"], restart_needed=res["restart_needed"],
                      destinations=[d.address for d in self.config.destinations])

    def start(self, block: bool = False) -> Node:
        c = self.config
        if c.metrics_port:  # bound first: a busy metrics port fails before anything listens or runs
            try:
                self.metrics_server = self._http_server().start()
            except OSError as e:
                self.state.close()
                raise NodeError(_port_error("metrics_port", c.metrics_host, c.metrics_port, e, "--metrics-port")) from None
        # The job body may need set-up that must fail at start, not at the first study: the product
        # pipeline loads and verifies the model bundle, checks require_gpu and warms the graphs up.
        try:
            self.job_body.prepare(self.config)
        except Exception as e:
            self._abort_start()
            raise NodeError(f"cannot start: {e}") from e
        self._prepared = True
        counts = recover(self.config, self.state, self.spool)
        self.log.info("node_recovered", **counts)
        try:
            self.receiver.start()
        except OSError as e:
            self._abort_start()
            raise NodeError(_port_error("port", c.host, c.port, e, "--port")) from None
        self._report_certificate()
        self.sender.start()
        self.notifier.start()
        self.worker.start()
        self.completion.start()
        self.retention.start()
        self.started_at = time.time()
        self.log.info("node_started", ae_title=self.config.ae_title, port=self.port, metrics_port=self.metrics_port,
                      worklist=bool(c.web.enabled and self.metrics_server), https=bool(c.web.tls and self.metrics_server),
                      destinations=[d.address for d in self.config.destinations], quiet_period_s=self.config.quiet_period_s,
                      fsync="posix_aio" if native_available() else "thread_pool")
        if block:
            try:
                while not self._stopped.wait(0.5):
                    if self._reload.is_set():
                        self._reload.clear()
                        self._reload_now()
            except KeyboardInterrupt:
                pass
            finally:
                self.stop()
        return self

    def _http_server(self) -> HttpServer:
        """The HTTP port: /metrics, /healthz, /readyz, and the worklist + API when [web] enabled."""
        from dicom_node.web.app import WebContext, create_app

        c = self.config
        app = create_app(WebContext(c, self.state, self.spool, self.metrics, self.health, self.ready))
        return HttpServer(app, c.metrics_host, c.metrics_port, max_connections=c.web.max_connections,
                          read_timeout_s=c.web.read_timeout_s, keepalive_s=c.web.keepalive_s,
                          certfile=c.tls.cert if c.web.tls else "", keyfile=c.tls.key if c.web.tls else "",
                          trusted_proxies=c.web.trusted_proxies)

    def _report_certificate(self) -> None:
        """`tls_certificate`: the validity of the certificate the node presents (info; a warning within
        `CERTIFICATE_WARN_DAYS` of its end, an error once it has ended or before it begins: peers refuse it
        then, the node's own TLS stack does not); and the expiry metric."""
        c = self.config
        if not uses_own_certificate(c):
            return
        try:
            dates = certificate_dates(c.tls.cert)
        except (OSError, ValueError) as e:
            self.log.warning("tls_certificate", file=c.tls.cert, error=str(e))
            return
        self.metrics.tls_certificate_expiry.labels(file=c.tls.cert).set(dates.not_after.timestamp())
        fields = dict(file=c.tls.cert, not_before=dates.not_before.isoformat(), not_after=dates.not_after.isoformat(),
                      days_left=round(dates.days_left, 1))
        if not dates.valid_now:
            self.log.error("tls_certificate", **fields, note="not valid now: TLS peers refuse the node; install a "
                                                             "valid certificate and restart")
        elif dates.days_left < CERTIFICATE_WARN_DAYS:
            self.log.warning("tls_certificate", **fields, note="renew it, then restart the node")
        else:
            self.log.info("tls_certificate", **fields)

    def _abort_start(self) -> None:
        if self.metrics_server:
            self.metrics_server.stop()
            self.metrics_server = None
        self.state.close()

    def stop(self) -> None:
        if self.receiver.server is None and self._stopped.is_set():
            return
        self._stopped.set()
        self.receiver.stop()  # no new instances first
        self.completion.stop()
        self.retention.stop()
        self.worker.stop()
        self.sender.stop()
        self.notifier.stop()
        if self.metrics_server:
            self.metrics_server.stop()
        self.state.close()
        self.log.info("node_stopped", ae_title=self.config.ae_title)

    def __enter__(self) -> Node:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _port_error(key: str, host: str, port: int, e: OSError, flag: str) -> str:
    if e.errno == errno.EADDRINUSE:
        return (f"{key}: {port} is already in use on {host} (another node, PACS or server listens there); stop it "
                f"or set {key} ({flag}) to a free port")
    return f"{key}: {port} cannot be opened on {host} ({e.strerror or e}); set {key} ({flag}) to another port or fix the host"


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    """{"retry.max_attempts": 8, "destinations": [...], ...} from a dataclasses.asdict() dict."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def _get_dotted(d: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        d = d[part]
    return d
