"""`dicom-node demo` end to end: real Orthanc (or the built-in SCP), real node, bundled demo model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dicom_node.bundle import default_bundle_path
from peers import ORTHANC_BIN


@pytest.mark.parametrize("pacs", ["orthanc", "builtin"])
def test_demo_flags_the_positive_study_and_clears_the_negative(tmp_path, pacs):
    if pacs == "orthanc" and ORTHANC_BIN is None:
        pytest.skip("Orthanc not installed (apt-get install orthanc)")
    assert (default_bundle_path() / "manifest.json").is_file(), "the demo bundle must ship with the package"
    exe = Path(sys.executable).parent / "dicom-node"
    args = [str(exe), "demo", "--out", str(tmp_path / "out")] + (["--no-orthanc"] if pacs == "builtin" else [])
    r = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert ("Orthanc" if pacs == "orthanc" else "built-in storage SCP") in out
    assert "positive study" in out and "PE FLAGGED (truth: PE)" in out
    assert "no PE flagged (truth: no PE)" in out
    assert "Research use only" in out
    for label in ("pe_present_on_window", "negative_exam_for_pe", "rv_lv_ratio_lt_1"):
        assert label in out
    pngs = list((tmp_path / "out" / "rendered").glob("*.png"))
    srs = list((tmp_path / "out" / "results").glob("SR_*.dcm"))
    assert len(srs) == 2 and len(pngs) >= 4, (srs, pngs)
