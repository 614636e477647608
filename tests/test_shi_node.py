"""The node runs a Shi et al. 2020 bundle from the bundle alone: slab preprocessing from the manifest, both
graphs, key slices on the slabs with the most attention evidence, heatmap SCs, and an SR that carries only the
PE-present finding (no RV/LV, acuity or exam-quality groups); over real C-STORE into a real Orthanc."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bundle_factory import build_tiny_shi_bundle
from dicom_node.config import load_config
from dicom_node.durability.state import JobState
from dicom_node.engine.node import Node
from dicom_node.imaging.preprocess import preprocess
from dicom_node.imaging.series import load_series
from dicom_node.labels import WINDOW_LABEL
from dicom_node.log import configure_logging
from dicom_node.pipeline import analyse_series, get_predictor
from dicom_node.results.key_slices import window_scores
from dicom_node.results.result_set import ResultOptions
from dicom_node.tools.demo import read_findings
from nodekit import phantom_series, storescu, wait_until

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"


@pytest.fixture(scope="module")
def shi_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shi") / "bundle"
    # threshold 0: the random model calls every study positive, so the PE group, regions and heatmaps all appear
    build_tiny_shi_bundle(out, thresholds={WINDOW_LABEL: 0.0})
    return out


def test_a_shi_bundle_reports_only_pe_present_with_key_slices_on_the_most_attended_slabs(shi_bundle, tmp_path):
    files = phantom_series(tmp_path / "in", n_slices=40, rows=64)
    predictor = get_predictor(str(shi_bundle), ("CPUExecutionProvider",))
    result = analyse_series(files, predictor, ResultOptions(key_slices=2, kos=True))
    findings = read_findings(result.sr)  # the labels the SR reports, not every label coded under the PE finding
    assert set(findings) == {WINDOW_LABEL} and not math.isnan(findings[WINDOW_LABEL].probability)
    assert findings[WINDOW_LABEL].present and findings[WINDOW_LABEL].threshold == 0.0
    texts, meanings = [], []
    result.sr.walk(lambda ds, el: (texts.append(str(el.value)) if el.keyword == "TextValue" else None,
                                   meanings.append(str(el.value)) if el.keyword == "CodeMeaning" else None))
    assert "AI suggests pulmonary embolism: present" in texts
    assert not [m for m in meanings if "RV" in m or "chronic" in m.lower() or "Acute" in m or "quality" in m.lower()]
    prediction = predictor.predict(preprocess(load_series(files), predictor.manifest.preprocessing))
    scores = window_scores(prediction)  # slab probability x its share of the attention-map peaks
    assert [k.window_index for k in result.key_slices] == list(np.argsort(-scores, kind="stable")[:2])
    assert len(result.heatmap_scs) == 2 and result.summary_sc is not None
    if Path(DCIODVFY).exists():
        for i, ds in enumerate(result.datasets()):
            path = tmp_path / f"out{i}.dcm"
            ds.save_as(path, enforce_file_format=True)
            out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
            errors = [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]
            assert errors == [], f"{ds.SOPClassUID.name}: {errors}"


def test_node_with_a_shi_bundle_delivers_sr_and_heatmaps_to_orthanc(shi_bundle, orthanc, tmp_path):
    files = phantom_series(tmp_path / "in", n_slices=40, rows=64)
    log = open(tmp_path / "node.log", "w")
    configure_logging(json=True, level="INFO", stream=log)
    config = load_config(None, environ={}, overrides={
        "port": 0, "host": "127.0.0.1", "data_dir": str(tmp_path / "data"), "quiet_period_s": 0.5,
        "min_free_disk_mb": 0, "destinations": [f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"],
        "inference.bundle": str(shi_bundle), "inference.providers": ["CPUExecutionProvider"],
        "results.top_k_heatmaps": 2})
    node = Node(config).start()
    try:
        r = storescu(node.port, files)
        assert r.returncode == 0 and "E:" not in r.stderr, r.stderr
        tags = orthanc.wait_for_instances(
            lambda t: "SR" in {x.get("Modality") for x in t} and sum(x.get("Modality") == "OT" for x in t) == 3,
            timeout=120)
        wait_until(lambda: node.state.jobs(JobState.DONE), 60, "job done")
        (job,) = node.state.jobs()
        assert {t["SOPInstanceUID"] for t in tags} == set(job.result_uids)
        assert "shi2020" in (tmp_path / "node.log").read_text()
    finally:
        node.stop()
        configure_logging(json=True, level="INFO", stream=sys.__stderr__)
        log.close()
