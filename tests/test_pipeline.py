"""The product pipeline end to end: spooled CT series -> preprocess -> ONNX -> SR/SC/KOS -> Orthanc.

Uses a tiny random-weight bundle (tests/bundle_factory.py): the model's calls mean nothing, but
every step between receiving and delivering is the real one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pydicom
import pytest

from bundle_factory import build_tiny_bundle
from dicom_node.config import load_config
from dicom_node.durability.state import JobState
from dicom_node.engine.node import Node
from dicom_node.labels import ALL_LABELS, STUDY_LABELS, WINDOW_LABEL
from dicom_node.log import configure_logging
from dicom_node.pipeline import analyse_series, get_predictor
from dicom_node.results.result_set import ResultOptions
from dicom_node.tools.demo import read_findings
from nodekit import phantom_series, storescu, wait_until

SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    build_tiny_bundle(out, thresholds={k: 0.5 for k in (WINDOW_LABEL, *STUDY_LABELS)})
    return out


def test_analyse_series_builds_results_with_deterministic_uids(tiny_bundle, tmp_path):
    files = phantom_series(tmp_path / "in", n_slices=40, rows=64)
    predictor = get_predictor(str(tiny_bundle), ("CPUExecutionProvider",))
    a = analyse_series(files, predictor, ResultOptions(key_slices=2))
    b = analyse_series(list(reversed(files)), predictor, ResultOptions(key_slices=2))
    assert a.sop_instance_uids == b.sop_instance_uids  # same input + bundle -> same UIDs
    assert a.sr.SOPClassUID == SR and len(a.heatmap_scs) == 2
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    for ds in a.datasets():
        assert ds.StudyInstanceUID == src.StudyInstanceUID and ds.PatientID == src.PatientID
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    findings = read_findings(a.sr)
    assert set(findings) == set(ALL_LABELS)
    assert all(0.0 <= f.probability <= 1.0 and f.threshold == 0.5 for f in findings.values())
    rev = analyse_series(files, predictor, ResultOptions(key_slices=2, revision=2),
                         predecessor_sr_uid=a.sr.SOPInstanceUID)
    assert rev.sr.SOPInstanceUID != a.sr.SOPInstanceUID
    assert rev.sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == a.sr.SOPInstanceUID


def test_node_with_real_pipeline_delivers_sr_and_heatmaps_to_orthanc(tiny_bundle, orthanc, tmp_path):
    files = phantom_series(tmp_path / "in", n_slices=40, rows=64, variant="jpeg-ls")
    log = open(tmp_path / "node.log", "w")
    configure_logging(json=True, level="INFO", stream=log)
    config = load_config(None, environ={}, overrides={
        "port": 0, "host": "127.0.0.1", "data_dir": str(tmp_path / "data"), "quiet_period_s": 0.5,
        "min_free_disk_mb": 0, "destinations": [f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"],
        "inference.bundle": str(tiny_bundle), "inference.providers": ["CPUExecutionProvider"],
        "results.send_kos": True, "results.top_k_heatmaps": 2})
    node = Node(config).start()
    try:
        r = storescu(node.port, files, extra=("-xt",))
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
        tags = orthanc.wait_for_instances(
            lambda t: {"SR", "KO"} <= {x.get("Modality") for x in t} and sum(x.get("Modality") == "OT" for x in t) == 3,
            timeout=120)
        wait_until(lambda: node.state.jobs(JobState.DONE), 60, "job done")
        (job,) = node.state.jobs()
        assert len(job.result_uids) == 5  # SR, 2 heatmap SCs, summary SC, KOS
        assert {t["SOPInstanceUID"] for t in tags} == set(job.result_uids)
        assert {"preprocessed", "inferred", "built", "finished"} <= set(job.times)
    finally:
        node.stop()
        configure_logging(json=True, level="INFO", stream=sys.__stderr__)
        log.close()


def test_node_refuses_to_start_with_a_broken_bundle(tiny_bundle, tmp_path):
    import shutil

    from dicom_node.engine.node import NodeError

    broken = tmp_path / "broken"
    shutil.copytree(tiny_bundle, broken)
    data = bytearray((broken / "stage2.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / "stage2.onnx").write_bytes(bytes(data))
    config = load_config(None, environ={}, overrides={
        "port": 0, "host": "127.0.0.1", "data_dir": str(tmp_path / "data"), "min_free_disk_mb": 0,
        "inference.bundle": str(broken)})
    with pytest.raises(NodeError, match=r"cannot start: .*stage2\.onnx"):
        Node(config).start()


def test_node_refuses_to_start_when_gpu_required_but_absent(tiny_bundle, tmp_path):
    from dicom_node.engine.node import NodeError
    from dicom_node.model.inference import available_providers

    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("this host has CUDA")
    config = load_config(None, environ={}, overrides={
        "port": 0, "host": "127.0.0.1", "data_dir": str(tmp_path / "data"), "min_free_disk_mb": 0,
        "inference.bundle": str(tiny_bundle), "inference.require_gpu": True})
    with pytest.raises(NodeError, match="require_gpu is set but CUDAExecutionProvider is not available"):
        Node(config).start()
