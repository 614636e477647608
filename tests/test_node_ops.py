"""Operations: no PHI in the JSON log (worklist pages and API viewed too), /metrics and /healthz, CLI serve/complete/echo/send/status,
selection of the right series in a study with a localizer and a thick series."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import urllib.request
from contextlib import redirect_stderr, redirect_stdout

import pydicom
import pytest

from dicom_node.cli import main as cli_main
from dicom_node.durability.state import JobState, SeriesState, State
from nodekit import PATIENT_BIRTH, PATIENT_ID, PATIENT_NAME, NodeProcess, phantom_series, storescu, wait_until
from peers import free_port
from webkit import WebClient, web_config

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk]


def _get(port: int, path: str):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_json_log_never_contains_patient_identity_and_metrics_count(tmp_path, orthanc):
    files = phantom_series(tmp_path / "in", n_slices=20)
    assert pydicom.dcmread(files[0]).PatientName == PATIENT_NAME
    mport = free_port()
    node = NodeProcess(tmp_path, destinations=[f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"],
                       **{"log.level": "DEBUG", **web_config(mport)}).start()  # the worklist on, too
    try:
        r = storescu(node.port, files)
        assert r.returncode == 0 and "E:" not in r.stderr
        nopix = pydicom.dcmread(files[0])
        del nopix.PixelData
        nopix.SOPInstanceUID = nopix.SOPInstanceUID + ".1"
        nopix.save_as(tmp_path / "nopix.dcm")
        storescu(node.port, [tmp_path / "nopix.dcm"])
        orthanc.wait_for_instances(lambda t: any(x.get("Modality") == "OT" for x in t), timeout=60)
        wait_until(lambda: '"job_finished"' in node.log_path.read_text(), 30, "job_finished logged")
        status, text = _get(mport, "/metrics")
        assert status == 200
        metrics = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                   if line and not line.startswith("#")}
        assert metrics["dicom_node_instances_received_total"] == 20
        assert metrics["dicom_node_bytes_received_total"] > 20 * 64 * 64 * 2
        assert metrics['dicom_node_stores_refused_total{reason="dataset_mismatch"}'] == 1
        assert metrics['dicom_node_jobs{state="done"}'] == 1
        assert metrics["dicom_node_jobs_waiting_for_backend"] == 0
        assert metrics["dicom_node_time_to_result_seconds_count"] == 1
        assert metrics["dicom_node_inference_seconds_count"] == 1
        status, health = _get(mport, "/healthz")
        assert status == 200 and json.loads(health)["ok"] is True and json.loads(health)["jobs"]["done"] == 1
        web = WebClient(mport)  # the web app shows identity to a logged-in user, and logs none of it
        web.login("alice", "wrong password")
        web.login("alice")
        page = web.get("/worklist")
        assert page.status == 200 and PATIENT_ID in page.text
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assert PATIENT_ID in web.get(f"/studies/{study}").text
        assert PATIENT_ID in web.get("/api/v1/studies").text
    finally:
        node.stop()
    log = node.log_path.read_text()
    events = {e["event"] for e in node.events()}
    assert {"association_accepted", "series_completed", "job_built", "results_sent", "job_finished", "store_refused"} <= events
    for phi in (PATIENT_NAME, PATIENT_ID, PATIENT_BIRTH, "Testperson", "Phantomina", "93817264"):
        assert phi not in log, f"{phi!r} leaked into the log"


def test_selection_skips_localizer_and_thick_series(tmp_path):
    files = phantom_series(tmp_path / "in", n_slices=24, variant="localizer-and-second-series")
    node = NodeProcess(tmp_path).start()
    try:
        assert storescu(node.port, files).returncode == 0
        st = State(tmp_path / "data" / "state.sqlite")
        wait_until(lambda: st.jobs(JobState.DONE) and len(st.series_in(SeriesState.SKIPPED)) == 2, 60, "selection")
        reasons = sorted(s.skip_reason for s in st.series_in(SeriesState.SKIPPED))
        assert any("localizer" in r for r in reasons) and any("SliceThickness 5 mm" in r for r in reasons)
        skipped = [e for e in node.events() if e["event"] == "series_skipped"]
        assert sorted(e["reason"] for e in skipped) == reasons
    finally:
        node.stop()


def test_complete_command_forces_completion(tmp_path):
    files = phantom_series(tmp_path / "in", n_slices=20)
    node = NodeProcess(tmp_path, quiet=3600).start()
    try:
        assert storescu(node.port, files).returncode == 0
        series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        data = str(tmp_path / "data")
        with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()) as err:
            assert cli_main(["complete", "1.2.3.4", "--data-dir", data]) == 1
            assert cli_main(["complete", "../x", "--data-dir", data]) == 2
        assert "unknown to this node" in err.getvalue() and "is not a DICOM UID" in err.getvalue()
        with redirect_stdout(io.StringIO()):
            assert cli_main(["complete", series_uid, "--data-dir", data]) == 0
        st = State(tmp_path / "data" / "state.sqlite")
        wait_until(lambda: st.jobs(JobState.DONE), 30, "forced series analysed")
        out = io.StringIO()
        with redirect_stdout(out):
            assert cli_main(["status", "--data-dir", data]) == 0
        assert "done=1" in out.getvalue() and f"..{series_uid[-8:]}" in out.getvalue()
    finally:
        node.stop()


def test_cli_echo_send_and_config_errors(tmp_path, storescp):
    with redirect_stdout(io.StringIO()) as out:
        assert cli_main(["echo", f"STORESCP@127.0.0.1:{storescp.port}"]) == 0
        files = phantom_series(tmp_path / "in", n_slices=8)
        assert cli_main(["send", str(tmp_path / "in"), "--to", f"STORESCP@127.0.0.1:{storescp.port}"]) == 0
    assert "status 0x0000" in out.getvalue() and "sent 8 instance(s)" in out.getvalue()
    assert len(list(storescp.outdir.iterdir())) == len(files)
    with redirect_stderr(io.StringIO()) as err:
        assert cli_main(["echo", f"NOBODY@127.0.0.1:{free_port()}"]) == 1
    assert "connection refused" in err.getvalue()
    bad = tmp_path / "bad.toml"
    bad.write_text('port = 99999\n')
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(bad)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "port: 99999 is not allowed; 0-65535" in r.stderr
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--port", "0", "--data-dir", str(tmp_path / "d"),
                        "--job", "no_such_module:run"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no_such_module" in r.stderr
