"""A series is one study of one patient; a re-send repairs what failed (issue 22, corpus cases 3, 4 and 8).

Real associations: dcmtk storescu as the scanner, an in-process node, dcmtk storescp as the PACS, and the
`dicom-node resend` command as a real process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicom_node.config import load_config
from dicom_node.durability.state import JobState
from dicom_node.engine.node import Node
from dicom_node.log import configure_logging
from nodekit import PATIENT_ID, PATIENT_NAME, REPO, phantom_series, sc_job, storescu, wait_until

pytestmark = [pytest.mark.dcmtk]


@pytest.fixture
def flaky_node(tmp_path, storescp):
    """Start an in-process node whose job body fails its first `fail_first` runs (a model crash), then runs
    the `nodekit.sc_job` stand-in; results go to the real storescp."""
    nodes = []
    log = open(tmp_path / "node.log", "w")
    configure_logging(json=True, level="INFO", stream=log)

    def make(fail_first: int = 0, quiet: float = 0.5) -> Node:
        runs = {"n": 0}

        def job(ctx):
            runs["n"] += 1
            if runs["n"] <= fail_first:
                raise RuntimeError("model runtime crashed (test)")
            return sc_job(ctx)

        config = load_config(None, environ={}, overrides={
            "port": 0, "host": "127.0.0.1", "data_dir": str(tmp_path / "data"), "quiet_period_s": quiet,
            "min_free_disk_mb": 0, "destinations": [f"STORESCP@127.0.0.1:{storescp.port}"],
            "retry.base_delay_s": 0.2, "retry.max_delay_s": 0.5})
        node = Node(config, run_job=job).start()
        nodes.append(node)
        return node

    yield make
    for n in nodes:
        n.stop()
    configure_logging(json=True, level="INFO", stream=sys.__stderr__)
    log.close()


def _events(tmp_path: Path, name: str) -> list[dict]:
    out = []
    for line in (tmp_path / "node.log").read_text().splitlines():
        if f'"{name}"' in line:
            out.append(json.loads(line))
    return out


def _received(storescp) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(storescp.outdir.iterdir()) if p.is_file()]


def test_a_series_uid_shared_by_two_studies_is_refused_for_the_second_with_0xA900(flaky_node, storescp, tmp_path):
    node = flaky_node()
    first = phantom_series(tmp_path / "a", seed=1, n_slices=20)
    other = phantom_series(tmp_path / "b", seed=2, n_slices=20, patient=False)  # another study and patient
    series_uid = pydicom.dcmread(first[0], stop_before_pixels=True).SeriesInstanceUID
    for f in other:  # the corpus case: a second study re-using the first study's Series Instance UID
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = series_uid
        ds.save_as(f)
    assert storescu(node.port, first).returncode == 0
    r = storescu(node.port, other, extra=("-v",))
    assert r.returncode != 0 and "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in r.stderr, r.stderr
    s = node.state.series(series_uid)
    assert s.n_instances == 20 and s.study_uid == pydicom.dcmread(first[0], stop_before_pixels=True).StudyInstanceUID
    assert len(node.state.instances(series_uid)) == 20
    other_study = pydicom.dcmread(other[0], stop_before_pixels=True).StudyInstanceUID
    assert not (tmp_path / "data" / "spool" / other_study).exists()  # nothing of the second study written
    refused = _events(tmp_path, "store_refused")
    assert refused and all(e["status"] == "0xA900" and "belongs to study" in e["reason"] for e in refused)
    (result,) = wait_until(lambda: _received(storescp), 60, "the first study's result")
    assert result.PatientID == PATIENT_ID  # filed under the first study's patient only
    assert json.loads(result.ImageComments)["instances"] == 20


def test_an_instance_of_another_patient_in_the_same_series_is_refused_without_logging_patient_data(
        flaky_node, tmp_path):
    node = flaky_node(quiet=30.0)
    files = phantom_series(tmp_path / "a", seed=3, n_slices=20)
    assert storescu(node.port, files[:10]).returncode == 0
    for f in files[10:]:
        ds = pydicom.dcmread(f)
        ds.PatientID = "PID-OTHER-5551"
        ds.save_as(f)
    r = storescu(node.port, files[10:], extra=("-v",))
    assert r.returncode != 0 and "Received Store Response (Error: DataSetDoesNotMatchSOPClass)" in r.stderr, r.stderr
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert node.state.series(series_uid).n_instances == 10
    log = (tmp_path / "node.log").read_text()
    assert "is of another patient than the series' first instance (their patient identifier or its issuer differ; values not logged)" in log
    assert "PID-OTHER" not in log and PATIENT_ID not in log and PATIENT_NAME.split("^")[0] not in log


def test_a_deleted_spool_file_is_stored_again_by_the_resend_and_the_series_analysed(flaky_node, storescp, tmp_path):
    node = flaky_node(quiet=2.0)
    files = phantom_series(tmp_path / "a", seed=4, n_slices=20)
    assert storescu(node.port, files).returncode == 0
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    victim = Path(node.state.instances(series_uid)[5].path)
    victim.unlink()  # an operator's rm, a disk error: the row says stored, the file is gone
    wait_until(lambda: node.state.jobs(JobState.FAILED), 60, "the job fails on the missing file")
    (failed,) = node.state.jobs()
    assert failed.error.startswith("FileNotFoundError")
    r = storescu(node.port, files)  # the scanner re-sends the series
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
    assert victim.is_file()
    sop = pydicom.dcmread(victim).SOPInstanceUID
    original = next(f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID == sop)
    assert pydicom.dcmread(victim).PixelData == pydicom.dcmread(original).PixelData
    wait_until(lambda: node.state.jobs(JobState.DONE), 60, "the re-run delivers")
    done = node.state.jobs(JobState.DONE)[0]
    assert (done.revision, done.predecessor_result_uids) == (1, ())
    assert len(_events(tmp_path, "instance_restored")) == 1
    assert len(_received(storescp)) == 1


def test_a_full_resend_after_a_failed_job_gives_a_first_result(flaky_node, storescp, tmp_path):
    node = flaky_node(fail_first=2)
    files = phantom_series(tmp_path / "a", seed=5, n_slices=20)
    series_uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    for n in (1, 2):  # two failed runs: the second after a re-send of the whole series
        if n == 2:
            assert storescu(node.port, files).returncode == 0
        else:
            assert storescu(node.port, files).returncode == 0
        wait_until(lambda n=n: len(node.state.jobs(JobState.FAILED)) == n, 60, f"failed run {n}")
    assert [j.revision for j in node.state.jobs()] == [1, 1]  # attempts of one revision
    assert storescu(node.port, files).returncode == 0  # the scanner retries once more
    wait_until(lambda: node.state.jobs(JobState.DONE), 60, "first result delivered")
    done = node.state.jobs(JobState.DONE)[0]
    assert (done.revision, done.predecessor_result_uids) == (1, ())
    (result,) = _received(storescp)
    assert json.loads(result.ImageComments) == {"revision": 1, "predecessors": [], "instances": 20}
    assert node.state.series(series_uid).n_instances == 20


def test_dicom_node_resend_repairs_a_job_that_failed_before_building_results(flaky_node, storescp, tmp_path):
    node = flaky_node(fail_first=1)
    files = phantom_series(tmp_path / "a", seed=6, n_slices=20)
    assert storescu(node.port, files).returncode == 0
    (failed,) = wait_until(lambda: node.state.jobs(JobState.FAILED), 60, "failed run")
    r = subprocess.run([sys.executable, "-m", "dicom_node.cli", "resend", str(failed.id),
                        "--data-dir", str(tmp_path / "data")], capture_output=True, text=True, timeout=120,
                       cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == f"job {failed.id}: queued to run again", r.stdout + r.stderr
    wait_until(lambda: node.state.jobs(JobState.DONE), 60, "the resent job delivers")
    (done,) = node.state.jobs()
    assert (done.id, done.revision, done.predecessor_result_uids, done.attempts) == (failed.id, 1, (), 2)
    (result,) = _received(storescp)
    assert json.loads(result.ImageComments)["revision"] == 1
