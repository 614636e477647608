"""Spool and outbox clean-up after delivery: `[spool] keep_days` and `delete_after_delivery`."""

from __future__ import annotations

import sys
import time

import pytest

from dicom_node.config import load_config
from dicom_node.log import configure_logging
from dicom_node.node import Node
from dicom_node.state import JobState
from nodekit import phantom_series, sc_job, storescu, wait_until

pytestmark = [pytest.mark.dcmtk]


@pytest.fixture
def run_node(tmp_path, storescp):
    log = open(tmp_path / "node.log", "w")
    configure_logging(json=True, level="INFO", stream=log)
    nodes = []

    def run(**overrides) -> Node:
        base = {"port": 0, "host": "127.0.0.1", "data_dir": str(tmp_path / "data"), "quiet_period_s": 0.4,
                "min_free_disk_mb": 0, "destinations": [f"STORESCP@127.0.0.1:{storescp.port}"]}
        node = Node(load_config(None, overrides={**base, **overrides}, environ={}), run_job=sc_job).start()
        nodes.append(node)
        files = phantom_series(tmp_path / "in", n_slices=20)
        r = storescu(node.port, files)
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
        wait_until(lambda: node.state.jobs(JobState.DONE), 60, "job delivered")
        return node

    yield run
    for n in nodes:
        n.stop()
    configure_logging(json=True, level="INFO", stream=sys.__stderr__)
    log.close()


def test_keep_days_purges_spool_and_outbox_of_delivered_series_only_when_old(run_node):
    node = run_node(**{"spool.keep_days": 7})
    (job,) = node.state.jobs(JobState.DONE)
    series_dirs = [p for p in node.spool.spool_dir.rglob("*") if p.is_dir() and p.parent != node.spool.spool_dir]
    outbox = node.spool.job_outbox(job.id)
    assert series_dirs and any(series_dirs[0].glob("*.dcm")) and any(outbox.glob("*.dcm"))
    assert node.completion.cleanup(time.time()) == 0  # delivered, but younger than 7 days: kept
    assert any(series_dirs[0].glob("*.dcm"))
    assert node.completion.cleanup(time.time() + 8 * 86400) == 20
    assert not series_dirs[0].exists() and not outbox.exists()
    assert node.state.jobs(JobState.DONE)  # the job record (result UIDs) stays


def test_delete_after_delivery_removes_the_series_at_once(run_node):
    node = run_node(**{"spool.delete_after_delivery": True, "spool.keep_days": 0})
    wait_until(lambda: not list(node.spool.spool_dir.rglob("*.dcm")), 30, "spool emptied")
