"""kill -9 of a real `dicom-node serve` process mid-receive, mid-job and mid-delivery, then restart:
no acknowledged instance is lost and the results arrive in Orthanc exactly once."""

from __future__ import annotations

import re
import subprocess

import pydicom
import pytest

from dicom_node.durability.state import JobState, State
from nodekit import STORESCU, NodeProcess, phantom_series, storescu, wait_until
from peers import OrthancPeer, free_port

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk]


def _ot(tags):
    return [t for t in tags if t.get("Modality") == "OT"]


def _state(node: NodeProcess) -> State:
    return State(node.workdir / "data" / "state.sqlite")


def _acknowledged(storescu_output: str) -> list[str]:
    """Files for which dcmtk storescu (-v) received a success response."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        m = re.search(r"Sending file: (\S+)", line)
        if m:
            current = m.group(1)
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def test_kill9_mid_receive_loses_no_acknowledged_instance(tmp_path, orthanc):
    files = phantom_series(tmp_path / "in", n_slices=120, rows=256)
    node = NodeProcess(tmp_path, destinations=[f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"]).start()
    sender = subprocess.Popen([STORESCU, "-v", "-aet", "SCANNER", "-aec", "PENODE", "127.0.0.1", str(node.port),
                               *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    st = _state(node)
    wait_until(lambda: st._conn().execute("SELECT COUNT(*) FROM instances").fetchone()[0] >= 10, 60, "10 instances")
    node.kill9()
    out, _ = sender.communicate(timeout=60)
    acked = _acknowledged(out)
    assert 10 <= len(acked) < len(files), "the kill should land mid-series"
    spooled = {r["sop_uid"]: r["path"] for r in st._conn().execute("SELECT sop_uid, path FROM instances")}
    for f in acked:
        sop = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert sop in spooled, f"acknowledged {sop} missing after kill -9"
        assert pydicom.dcmread(spooled[sop]).PixelData == pydicom.dcmread(f).PixelData
    st.close()
    node.start()  # restart: the sender re-sends the whole series (duplicates are idempotent)
    r = storescu(node.port, files, aet="SCANNER")
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
    orthanc.wait_for_instances(lambda t: len(_ot(t)) == 1, timeout=90)
    st = _state(node)
    wait_until(lambda: st.jobs(JobState.DONE), 30, "job done")
    assert len(st.instances(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)) == len(files)
    assert len(st.jobs()) == 1
    node.stop()
    assert not list((tmp_path / "data" / "spool").rglob(".tmp-*"))


def test_kill9_mid_job_reruns_with_same_result_uids(tmp_path, orthanc):
    marker = tmp_path / "marker"
    files = phantom_series(tmp_path / "in", n_slices=20)
    node = NodeProcess(tmp_path, destinations=[f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"],
                       env={"NODE_TEST_JOB_DELAY_S": "60", "NODE_TEST_JOB_MARKER": str(marker)}).start()
    assert storescu(node.port, files).returncode == 0
    wait_until(lambda: list(marker.glob("started-*")), 60, "job started")
    node.kill9()
    st = _state(node)
    (job,) = st.jobs()
    assert job.state is JobState.RUNNING
    st.close()
    node.env["NODE_TEST_JOB_DELAY_S"] = "0"
    node.start()
    tags = orthanc.wait_for_instances(lambda t: len(_ot(t)) == 1, timeout=90)
    st = _state(node)
    wait_until(lambda: st.jobs(JobState.DONE), 30, "job done")
    (job,) = st.jobs()
    assert job.attempts == 2 and job.result_uids == (_ot(tags)[0]["SOPInstanceUID"],)
    assert any(e.get("event") == "job_resumed" and e.get("job_id") == job.id for e in node.events())
    node.stop()


def test_kill9_mid_delivery_resends_from_outbox_without_rerunning(tmp_path):
    marker = tmp_path / "marker"
    port = free_port()
    files = phantom_series(tmp_path / "in", n_slices=20)
    node = NodeProcess(tmp_path, destinations=[f"ORTHANC@127.0.0.1:{port}"],
                       env={"NODE_TEST_JOB_MARKER": str(marker)}, **{"retry.max_attempts": 1000}).start()
    assert storescu(node.port, files).returncode == 0
    st = _state(node)
    wait_until(lambda: any(d.attempts >= 1 for d in st.deliveries()), 60, "a failed delivery attempt")
    node.kill9()
    (job,) = st.jobs()
    assert job.state is JobState.SENDING
    st.close()
    orthanc = OrthancPeer(tmp_path / "orthanc", dicom_port=port).start()
    try:
        node.start()
        tags = orthanc.wait_for_instances(lambda t: len(_ot(t)) == 1, timeout=90)
        st = _state(node)
        wait_until(lambda: st.jobs(JobState.DONE), 30, "job done")
        assert st.jobs()[0].result_uids == (_ot(tags)[0]["SOPInstanceUID"],)
        assert len(list(marker.glob("started-*"))) == 1  # built once; the restart only re-sent the outbox
    finally:
        node.stop()
        orthanc.stop()
