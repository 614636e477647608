"""`dicom-node demo` end to end: real Orthanc (or the built-in SCP), real node, bundled demo model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.model.bundle import default_bundle_path
from peers import ORTHANC_BIN


def _run_demo(out: Path, *extra: str) -> subprocess.CompletedProcess:
    assert (default_bundle_path() / "manifest.json").is_file(), "the demo bundle must ship with the package"
    exe = Path(sys.executable).parent / "dicom-node"
    return subprocess.run([str(exe), "demo", "--out", str(out), *extra], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def orthanc_demo(tmp_path_factory):
    if ORTHANC_BIN is None:
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    out = tmp_path_factory.mktemp("demo") / "out"
    return _run_demo(out), out


def _check_end_to_end(r: subprocess.CompletedProcess, out: Path, pacs: str) -> None:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert pacs in r.stdout and "Research use only" in r.stdout
    assert "results for both studies came back" in r.stdout
    for label in ("pe_present_on_window", "negative_exam_for_pe", "central_pe", "rv_lv_ratio_lt_1"):
        assert r.stdout.count(label) >= 1
    assert "positive study" in r.stdout and "negative study" in r.stdout
    srs = list((out / "results").glob("SR_*.dcm"))
    pngs = list((out / "rendered").glob("*.png"))
    assert len(srs) == 2 and len(pngs) >= 4, (srs, pngs)


def test_demo_with_orthanc_returns_sr_and_heatmaps_for_both_studies(orthanc_demo):
    r, out = orthanc_demo
    _check_end_to_end(r, out, "Orthanc")


def test_demo_without_orthanc_uses_the_builtin_storage_scp(tmp_path):
    r = _run_demo(tmp_path / "out", "--no-orthanc")
    _check_end_to_end(r, tmp_path / "out", "built-in storage SCP")


def test_demo_flags_the_positive_study_and_clears_the_negative(orthanc_demo):
    r, _ = orthanc_demo
    assert "PE FLAGGED (truth: PE)" in r.stdout and "no PE flagged (truth: no PE)" in r.stdout
