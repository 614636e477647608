"""Prometheus metrics of the node; served with health and readiness on `metrics_port` (`/metrics`,
`/healthz`, `/readyz`) by the node's ASGI app (`dicom_node.web.app`, prometheus-client's ASGI app for
`/metrics`) in a uvicorn thread (`dicom_node.web.server.HttpServer`).

`/healthz` answers 200 with a JSON body while the node is healthy and 503 with the same body, whose
`reasons` say why, when it is not (`Node.health`: spool disk below `min_free_disk_mb`, deliveries to
a destination failing for longer than `[health] delivery_failure_s`, the SCP not listening).
`/readyz` answers 200 once the job body is prepared (the model bundle loaded) and 503 before.

Metrics (own registry, prefix `dicom_node_`): instances_received_total, bytes_received_total,
stores_refused_total{reason}, jobs{state} and jobs_waiting_for_backend (read from the state database
at scrape time),
time_to_result_seconds (last instance received -> results delivered), inference_seconds,
send_failures_total{destination}, deliveries_total, tls_certificate_expiry_timestamp_seconds{file} (when the
node presents a certificate).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from dicom_node.durability.state import JobRow, State

__all__ = ["NodeMetrics"]


class _JobsCollector:
    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily("dicom_node_jobs", "Jobs by state", labels=["state"])
        waiting = GaugeMetricFamily("dicom_node_jobs_waiting_for_backend",
                                    "Queued jobs deferred because their inference backend did not answer")
        try:
            for state, n in self.state.job_counts().items():
                g.add_metric([state], n)
            waiting.add_metric([], self.state.deferred_job_count())
        finally:
            self.state.close()  # scrape threads are short-lived
        yield g
        yield waiting


class NodeMetrics:
    def __init__(self, state: State | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances_received = Counter("dicom_node_instances_received", "Instances acknowledged and spooled", registry=r)
        self.bytes_received = Counter("dicom_node_bytes_received", "Bytes of instances spooled", registry=r)
        self.stores_refused = Counter("dicom_node_stores_refused", "C-STORE requests refused or associations rejected",
                                      ["reason"], registry=r)
        self.time_to_result = Histogram("dicom_node_time_to_result_seconds", "Last instance received to results delivered",
                                        buckets=(5, 10, 20, 30, 45, 60, 90, 120, 300, 600, 1800), registry=r)
        self.inference_seconds = Histogram("dicom_node_inference_seconds", "Model inference time per job",
                                           buckets=(0.5, 1, 2, 5, 10, 20, 45, 90, 180), registry=r)
        self.send_failures = Counter("dicom_node_send_failures", "Failed delivery attempts", ["destination"], registry=r)
        self.deliveries = Counter("dicom_node_jobs_finished", "Jobs finished", ["state"], registry=r)
        self.tls_certificate_expiry = Gauge(
            "dicom_node_tls_certificate_expiry_timestamp_seconds",
            "notAfter of the node's own TLS certificate as loaded at start (unix time): alert well before it", ["file"],
            registry=r)
        if state is not None:
            r.register(_JobsCollector(state))

    def stored(self, nbytes: int) -> None:
        self.instances_received.inc()
        self.bytes_received.inc(nbytes)

    def refused(self, reason: str) -> None:
        self.stores_refused.labels(reason=reason).inc()

    def send_failed(self, destination: str) -> None:
        self.send_failures.labels(destination=destination).inc()

    def job_finished(self, job: JobRow, time_to_result_s: float | None) -> None:
        self.deliveries.labels(state=job.state.value).inc()
        if time_to_result_s is not None:
            self.time_to_result.observe(time_to_result_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
