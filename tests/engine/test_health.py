"""/healthz and /readyz of a real node: unhealthy (503, with the reason) while deliveries to a
destination keep failing or the spool disk is short, ready only once the job body is prepared."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from dicom_node.config import load_config
from dicom_node.engine.node import Node
from dicom_node.engine.worker import JobBody
from nodekit import phantom_series, sc_job, storescu, wait_until
from peers import free_port

pytestmark = [pytest.mark.dcmtk]


def _get(port: int, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_healthz_turns_503_naming_the_destination_when_its_deliveries_fail_longer_than_the_limit(make_node, tmp_path):
    dead, mport = free_port(), free_port()
    node = make_node([f"ORTHANC@127.0.0.1:{dead}"], metrics_port=mport, **{"retry.max_attempts": 100,
                                                                           "health.delivery_failure_s": 1.0})
    code, body = _get(mport, "/healthz")
    assert code == 200 and body["ok"] is True and body["reasons"] == []
    assert storescu(node.port, phantom_series(tmp_path / "in", n_slices=20)).returncode == 0
    wait_until(lambda: _get(mport, "/healthz")[0] == 503, 30, "unhealthy")
    code, body = _get(mport, "/healthz")
    assert body["ok"] is False
    (reason,) = body["reasons"]
    assert f"deliveries to ORTHANC@127.0.0.1:{dead} have failed for" in reason
    assert "health.delivery_failure_s 1" in reason and "connection refused" in reason
    assert body["failing_destinations"][f"ORTHANC@127.0.0.1:{dead}"]["failing_s"] >= 1


def test_healthz_is_503_naming_the_disk_when_the_spool_is_below_min_free_disk_mb(make_node):
    mport = free_port()
    make_node([], metrics_port=mport, min_free_disk_mb=10**9)
    code, body = _get(mport, "/healthz")
    assert code == 503 and body["ok"] is False
    assert any("below min_free_disk_mb 1000000000" in r for r in body["reasons"])


def test_readyz_is_503_until_the_job_body_is_prepared_then_200(tmp_path):
    mport = free_port()
    release = threading.Event()
    cfg = load_config(None, environ={}, overrides={"port": 0, "host": "127.0.0.1", "data_dir": str(tmp_path / "data"),
                                                    "min_free_disk_mb": 0, "metrics_port": mport})
    node = Node(cfg, run_job=JobBody(run=sc_job, prepare=lambda _cfg: release.wait(30)))
    starter = threading.Thread(target=node.start)
    starter.start()
    try:
        code, body = wait_until(lambda: _try(mport, "/readyz"), 30, "metrics port open while preparing")
        assert code == 503 and body["ready"] is False and "prepared" in body["reason"]
        assert _get(mport, "/healthz")[0] == 200  # alive while the model loads
        release.set()
        starter.join(30)
        code, body = _get(mport, "/readyz")
        assert code == 200 and body == {"ready": True}
    finally:
        release.set()
        starter.join(30)
        node.stop()


def _try(port: int, path: str) -> tuple[int, dict] | None:
    try:
        return _get(port, path)
    except (urllib.error.URLError, ConnectionError):
        return None
