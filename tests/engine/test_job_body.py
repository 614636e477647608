"""The job body protocol (`JobBody`: `run` per job, `prepare` once at start) and `Node.request_stop`."""

from __future__ import annotations

import threading

import pytest

from dicom_node.config import Config, load_config
from dicom_node.engine.node import Node, NodeError
from dicom_node.engine.worker import JobBody, JobContext, JobResult
from nodekit import SC_JOB, sc_job


def _config(tmp_path) -> Config:
    return load_config(None, environ={}, overrides={"port": 0, "host": "127.0.0.1", "data_dir": str(tmp_path / "data"),
                                                    "min_free_disk_mb": 0, "quiet_period_s": 0.5})


def _nothing(ctx: JobContext) -> JobResult:
    return JobResult()


def test_a_plain_callable_is_a_body_with_nothing_to_prepare(tmp_path):
    node = Node(_config(tmp_path), run_job=sc_job)
    assert node.job_body.run is sc_job
    node.job_body.prepare(node.config)  # a no-op
    assert Node(_config(tmp_path), run_job=SC_JOB).job_body is SC_JOB
    assert JobBody.of(SC_JOB) is SC_JOB


def test_prepare_runs_once_before_the_node_accepts_studies(tmp_path):
    seen = []

    def prepare(config: Config) -> None:
        seen.append((config.ae_title, node.receiver.server))

    node = Node(_config(tmp_path), run_job=JobBody(run=_nothing, prepare=prepare))
    node.start()
    try:
        assert seen == [(node.config.ae_title, None)]  # called with the config, the SCP not yet listening
    finally:
        node.stop()


def test_a_failing_prepare_stops_the_start_with_node_error(tmp_path):
    def prepare(config: Config) -> None:
        raise RuntimeError("bundle stage2.onnx: sha256 mismatch")

    node = Node(_config(tmp_path), run_job=JobBody(run=_nothing, prepare=prepare))
    with pytest.raises(NodeError, match=r"cannot start: bundle stage2\.onnx: sha256 mismatch"):
        node.start()
    assert node.receiver.server is None


def test_request_stop_ends_a_blocking_start(tmp_path):
    node = Node(_config(tmp_path), run_job=sc_job)
    t = threading.Thread(target=node.start, kwargs={"block": True})
    t.start()
    try:
        for _ in range(200):
            if node.receiver.server is not None:
                break
            t.join(0.05)
        assert node.receiver.server is not None and not node.stopping
        node.request_stop()
        t.join(30)
        assert not t.is_alive() and node.stopping and node.receiver.server is None
    finally:
        node.stop()
