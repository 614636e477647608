"""Intake that never goes silent (issue 22), end to end with the real pipeline (tiny random-weight bundle),
dcmtk storescu as the scanner and a real Orthanc as the PACS:

* held-back slices: the first SR names the missing slices, the late ones give a revised SR with predecessor;
* a 40 % gap: a "not analysed" SR that says why; the rest of the series then gives the revised, analysed SR;
* a kill -9 loop: 8 SIGKILLs at random points while three studies are sent, then full re-sends and a
  ninth kill around completion/analysis/delivery: exactly one delivered SR revision per study and every
  acknowledged instance in the spool.
"""

from __future__ import annotations

import io
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from bundle_factory import build_tiny_bundle
from dicom_node import RESEARCH_USE_STATEMENT
from dicom_node.config import load_config
from dicom_node.durability.state import DeliveryState, JobState, State
from dicom_node.engine.node import Node
from dicom_node.labels import STUDY_LABELS, WINDOW_LABEL
from dicom_node.log import configure_logging
from dicom_node.results.incomplete import NOT_ANALYSED
from nodekit import STORESCU, NodeProcess, phantom_series, storescu, wait_until

pytestmark = [pytest.mark.orthanc, pytest.mark.dcmtk]

SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    build_tiny_bundle(out, thresholds={k: 0.5 for k in (WINDOW_LABEL, *STUDY_LABELS)})
    return out


@pytest.fixture
def pipeline_node(tiny_bundle, orthanc, tmp_path):
    """An in-process node running the product pipeline, sending to the real Orthanc."""
    log = open(tmp_path / "node.log", "w")
    configure_logging(json=True, level="INFO", stream=log)
    config = load_config(None, environ={}, overrides={
        "port": 0, "host": "127.0.0.1", "data_dir": str(tmp_path / "data"), "quiet_period_s": 1.0,
        "min_free_disk_mb": 0, "destinations": [f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"],
        "inference.bundle": str(tiny_bundle), "inference.providers": ["CPUExecutionProvider"],
        "results.top_k_heatmaps": 1, "retry.base_delay_s": 0.2, "retry.max_delay_s": 1.0})
    node = Node(config).start()
    yield node
    node.stop()
    configure_logging(json=True, level="INFO", stream=sys.__stderr__)
    log.close()


def _by_position(files: list[Path]) -> list[Path]:
    return sorted(files, key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]))


def _srs(orthanc) -> list[pydicom.Dataset]:
    out = []
    for oid in orthanc.instances():
        if orthanc.instance_tags(oid).get("SOPClassUID") == SR:
            out.append(pydicom.dcmread(io.BytesIO(orthanc.instance_file(oid))))
    return out


def _wait_srs(orthanc, n: int, timeout: float = 120) -> list[pydicom.Dataset]:
    orthanc.wait_for_instances(lambda tags: sum(t.get("SOPClassUID") == SR for t in tags) >= n, timeout=timeout)
    return _srs(orthanc)


def _statement(sr: pydicom.Dataset) -> list[tuple[str, str]]:
    """(concept, text) of the Qualitative Evaluations: the impression and the comments."""
    (container,) = [i for i in sr.ContentSequence if i.ValueType == "CONTAINER"
                    and i.ConceptNameCodeSequence[0].CodeMeaning == "Qualitative Evaluations"]
    return [(i.ConceptNameCodeSequence[0].CodeMeaning, i.TextValue) for i in container.ContentSequence]


def _predecessor(sr: pydicom.Dataset) -> str | None:
    if "PredecessorDocumentsSequence" not in sr:
        return None
    return str(sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
               .ReferencedSOPInstanceUID)


def _send(port: int, files: list[Path]) -> None:
    r = storescu(port, files, aet="SCANNER")
    assert r.returncode == 0 and "E:" not in r.stderr, r.stderr


def test_held_back_slices_give_an_sr_naming_them_then_a_revised_sr_with_its_predecessor(pipeline_node, orthanc, tmp_path):
    files = _by_position(phantom_series(tmp_path / "in", n_slices=40, rows=64))
    held = [files[i] for i in (9, 19, 29)]
    _send(pipeline_node.port, [f for f in files if f not in held])
    (first,) = _wait_srs(orthanc, 1)
    comments = [text for concept, text in _statement(first) if concept == "Comment"]
    assert comments[0] == RESEARCH_USE_STATEMENT
    assert re.fullmatch(r"Analysed with 3 missing slices between -?[\d.]+ and -?[\d.]+ mm along the slice normal "
                        r"\(3 gaps\), filled by interpolation from the neighbouring slices \(spacing 1\.25 mm\); "
                        r"findings there rest on interpolated images\.", comments[1]), comments
    evidence = {str(r.ReferencedSOPInstanceUID) for r in first.CurrentRequestedProcedureEvidenceSequence[0]
                .ReferencedSeriesSequence[0].ReferencedSOPSequence}
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    held_uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in held}
    assert evidence == sent - held_uids  # the SR references only instances that exist
    assert _predecessor(first) is None

    _send(pipeline_node.port, held)  # the late slices fill the gaps: the job runs again
    srs = _wait_srs(orthanc, 2)
    (revised,) = [s for s in srs if s.SOPInstanceUID != first.SOPInstanceUID]
    assert _predecessor(revised) == first.SOPInstanceUID
    assert not any("missing slice" in text for _, text in _statement(revised))
    wait_until(lambda: len(pipeline_node.state.jobs(JobState.DONE)) == 2, 60, "two jobs done")
    one, two = pipeline_node.state.jobs()
    assert (one.revision, two.revision, two.predecessor_result_uids[0]) == (1, 2, first.SOPInstanceUID)


def test_a_forty_percent_gap_gives_a_not_analysed_sr_then_the_full_series_a_revised_one(pipeline_node, orthanc, tmp_path):
    files = _by_position(phantom_series(tmp_path / "in", n_slices=40, rows=64, seed=11))
    missing = files[12:28]  # 16 of 40 slices in one gap
    _send(pipeline_node.port, [f for f in files if f not in missing])
    (answer,) = _wait_srs(orthanc, 1)
    impression, research, what_to_do = _statement(answer)
    assert impression[0] == "Impression" and impression[1].startswith(f"{NOT_ANALYSED}: slices are missing between ")
    assert "17.0 times the slice spacing of 1.25 mm; the analysis bridges gaps up to 2.5 times the spacing" in impression[1]
    assert research == ("Comment", RESEARCH_USE_STATEMENT) and "sending the complete series again" in what_to_do[1]
    assert answer.PatientID == pydicom.dcmread(files[0], stop_before_pixels=True).PatientID
    assert not [t for t in orthanc.find_by_modality("OT")]  # no heatmaps for a series that was not analysed
    wait_until(lambda: pipeline_node.state.jobs(JobState.DONE), 60, "job done")
    events = [line for line in (tmp_path / "node.log").read_text().splitlines() if "series_not_analysed" in line]
    assert len(events) == 1 and "PID-" not in events[0] and "Testperson" not in events[0]

    _send(pipeline_node.port, missing)
    srs = _wait_srs(orthanc, 2)
    (revised,) = [s for s in srs if s.SOPInstanceUID != answer.SOPInstanceUID]
    assert _predecessor(revised) == answer.SOPInstanceUID
    assert not _statement(revised)[0][1].startswith(NOT_ANALYSED)


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


def test_a_kill9_loop_across_three_studies_then_full_resends_gives_one_sr_revision_each(tiny_bundle, orthanc, tmp_path):
    rng = random.Random(22)
    studies = [_by_position(phantom_series(tmp_path / f"in{i}", n_slices=40, rows=128, seed=30 + i)) for i in range(3)]
    everything = [f for s in studies for f in s]
    quiet = 8.0  # longer than any node lifetime below: a partial series waits for the re-send
    node = NodeProcess(tmp_path, destinations=[f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"], quiet=quiet, job=None,
                       **{"inference.bundle": str(tiny_bundle), "inference.providers": ["CPUExecutionProvider"],
                          "results.top_k_heatmaps": 1})
    acked: set[str] = set()
    kills = 0
    start = rng.randrange(len(everything))
    while kills < 8:
        node.start()
        began = time.monotonic()
        todo = everything[start:] + everything[:start]  # the scanner goes on where it was cut off
        sender = subprocess.Popen([STORESCU, "-v", "-aet", "SCANNER", "-aec", "PENODE", "127.0.0.1", str(node.port),
                                   *map(str, todo)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(rng.uniform(0.3, 3.0))
        node.kill9()
        kills += 1
        assert time.monotonic() - began < quiet
        out, _ = sender.communicate(timeout=60)
        got = _acknowledged(out)
        acked |= set(got)
        start = (everything.index(Path(got[-1])) + 1) % len(everything) if got else start

    st = State(tmp_path / "data" / "state.sqlite")
    spooled = {r["sop_uid"]: r["path"] for r in st._conn().execute("SELECT sop_uid, path FROM instances")}
    assert acked, "the kills should leave acknowledged instances"
    for f in acked:
        ds = pydicom.dcmread(f)
        assert ds.SOPInstanceUID in spooled, f"acknowledged {ds.SOPInstanceUID} missing after {kills} kills"
        assert pydicom.dcmread(spooled[ds.SOPInstanceUID]).PixelData == ds.PixelData
    assert not st.jobs(), "no partial series may have been analysed during the kill loop"
    st.close()

    node.start()
    try:
        for s in studies:  # the scanners re-send every study in full
            _send(node.port, s)
        time.sleep(rng.uniform(quiet - 1.0, quiet + 2.0))  # one more kill, around completion, analysis or delivery
        node.kill9()
        kills += 1
        node.start()
        srs = _wait_srs(orthanc, 3, timeout=180)
        st = State(tmp_path / "data" / "state.sqlite")
        wait_until(lambda: len(st.jobs(JobState.DONE)) == 3, 60, "three jobs done")
        time.sleep(quiet / 2)  # nothing more may follow
        srs = _srs(orthanc)
        study_uids = {str(pydicom.dcmread(s[0], stop_before_pixels=True).StudyInstanceUID) for s in studies}
        assert sorted(str(s.StudyInstanceUID) for s in srs) == sorted(study_uids)  # exactly one SR per study
        assert all(_predecessor(s) is None for s in srs)
        jobs = st.jobs()
        assert [(j.state, j.revision, j.predecessor_result_uids) for j in jobs] == [(JobState.DONE, 1, ())] * 3
        assert all(d.state is DeliveryState.DONE for d in st.deliveries())
        assert st._conn().execute("SELECT COUNT(*) FROM instances").fetchone()[0] == len(everything)
        st.close()
    finally:
        node.stop()
