"""Spool and outbox clean-up after delivery: `[spool] keep_days` and `delete_after_delivery`."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.durability.state import JobState, SeriesState
from dicom_node.engine.node import Node
from nodekit import phantom_series, storescu, wait_until

pytestmark = [pytest.mark.dcmtk]


@pytest.fixture
def run_node(tmp_path, storescp, make_node):
    """A node delivering to dcmtk storescp that has received and delivered one 20-slice series."""

    def run(**overrides) -> Node:
        node = make_node([f"STORESCP@127.0.0.1:{storescp.port}"], quiet_period_s=1.5, **overrides)
        files = phantom_series(tmp_path / "in", n_slices=20)
        r = storescu(node.port, files)
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
        wait_until(lambda: node.state.jobs(JobState.DONE), 60, "job delivered")
        return node

    return run


def test_keep_days_purges_spool_and_outbox_of_delivered_series_only_when_old(run_node):
    node = run_node(**{"spool.keep_days": 7})
    (job,) = node.state.jobs(JobState.DONE)
    series_dirs = [p for p in node.spool.spool_dir.rglob("*") if p.is_dir() and p.parent != node.spool.spool_dir]
    outbox = node.spool.job_outbox(job.id)
    assert series_dirs and any(series_dirs[0].glob("*.dcm")) and any(outbox.glob("*.dcm"))
    assert node.retention.cleanup(time.time()) == 0  # delivered, but younger than 7 days: kept
    assert any(series_dirs[0].glob("*.dcm"))
    assert node.retention.cleanup(time.time() + 8 * 86400) == 20
    assert not series_dirs[0].exists() and not outbox.exists()
    assert node.state.jobs(JobState.DONE)  # the job record (result UIDs) stays


def _spool_empty(node: Node) -> bool:
    try:
        return not any(node.spool.spool_dir.rglob("*.dcm"))
    except FileNotFoundError:  # a folder went away while we walked it: the purge is under way
        return False


def test_delete_after_delivery_removes_the_series_at_once(run_node):
    node = run_node(**{"spool.delete_after_delivery": True, "spool.keep_days": 0})
    wait_until(lambda: _spool_empty(node), 30, "spool emptied")


def test_an_instance_acknowledged_while_its_series_is_purged_is_kept_with_its_row(run_node, tmp_path):
    """The worst moment for a late slice: after the purge listed the series' instances, before it deletes
    them. The slice is received over a real association right there; it must survive the purge."""
    node = run_node(**{"spool.keep_days": 7})
    (job,) = node.state.jobs(JobState.DONE)
    late = pydicom.dcmread(sorted((tmp_path / "in").rglob("*.dcm"))[0])
    late.SOPInstanceUID = late.SOPInstanceUID + ".7"
    late.InstanceNumber = 999
    late.save_as(tmp_path / "late.dcm")
    delete = node.spool.delete_instances

    def late_slice_first(*args, **kwargs):
        r = storescu(node.port, [tmp_path / "late.dcm"])
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr  # acknowledged 0x0000
        return delete(*args, **kwargs)

    node.spool.delete_instances = late_slice_first
    assert node.retention.cleanup(time.time() + 8 * 86400) == 20
    kept = node.state.instance(str(late.SOPInstanceUID))
    assert kept is not None and Path(kept.path).is_file()
    assert [r.sop_uid for r in node.state.instances(job.series_uid)] == [str(late.SOPInstanceUID)]
    s = node.state.series(job.series_uid)
    assert s.n_instances == 1 and s.state is SeriesState.RECEIVING
    assert list(node.spool.spool_dir.rglob("*.dcm")) == [Path(kept.path)]
