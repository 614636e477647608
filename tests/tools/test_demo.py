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
    # named for the person opening the folder, and listed in the output
    for name in ("positive_SR.txt", "positive_SC_heatmap_1.png", "positive_SC_summary.png", "positive_KO.txt",
                 "negative_SR.txt", "negative_SC_summary.png"):
        assert (out / "rendered" / name).is_file() and f"rendered/{name}" in r.stdout, name
    assert "Pulmonary embolism (59282003, SCT) = " in (out / "rendered" / "positive_SR.txt").read_text()
    assert (out / ".dicom-node-demo").is_file()  # marks the folder as the demo's own for a later run


def test_demo_with_orthanc_returns_sr_and_heatmaps_for_both_studies(orthanc_demo):
    r, out = orthanc_demo
    _check_end_to_end(r, out, "Orthanc")


def test_demo_without_orthanc_uses_the_builtin_storage_scp(tmp_path):
    r = _run_demo(tmp_path / "out", "--no-orthanc")
    _check_end_to_end(r, tmp_path / "out", "built-in storage SCP")


def test_demo_flags_the_positive_study_and_clears_the_negative(orthanc_demo):
    r, _ = orthanc_demo
    assert "PE FLAGGED (truth: PE)" in r.stdout and "no PE flagged (truth: no PE)" in r.stdout


def test_demo_refuses_an_output_folder_it_did_not_write_and_deletes_nothing(tmp_path):
    (tmp_path / "keep.txt").write_text("a user's file")
    (tmp_path / "sub").mkdir()
    exe = Path(sys.executable).parent / "dicom-node"
    r = subprocess.run([str(exe), "demo", "--out", "."], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--out ." in lines[0] and "not empty" in lines[0] and "nothing was deleted" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "sub"]
    assert (tmp_path / "keep.txt").read_text() == "a user's file"


def test_demo_refuses_a_file_as_output_folder(tmp_path):
    target = tmp_path / "report.pdf"
    target.write_bytes(b"%PDF")
    r = _run_demo(target)
    assert r.returncode == 2 and "is a file, not a folder" in r.stderr and "Traceback" not in r.stderr
    assert target.read_bytes() == b"%PDF"


def test_a_later_demo_replaces_only_what_an_earlier_demo_wrote(tmp_path):
    from dicom_node.tools.demo import DEMO_MARKER, prepare_output_dir

    out = tmp_path / "out"
    assert prepare_output_dir(out) is None and (out / DEMO_MARKER).is_file()  # new folder: made and marked
    for name in ("results", "rendered"):
        (out / name).mkdir()
        (out / name / "old.dcm").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    assert prepare_output_dir(out) is None
    assert sorted(p.name for p in out.iterdir()) == [DEMO_MARKER, "notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_output_dir(empty) is None and (empty / DEMO_MARKER).is_file()


def test_demo_with_the_shipped_shi_bundle_reports_the_pe_finding_alone(tmp_path):
    """`--bundle builtin:shi2020`: the second shipped model (Shi et al. 2020 family) runs the same demo; its
    SRs carry the PE finding only, no RV/LV or location groups."""
    out = tmp_path / "out"
    r = _run_demo(out, "--no-orthanc", "--bundle", "builtin:shi2020")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "results for both studies came back" in r.stdout and "pe-demo-shi-tiny" in r.stdout
    assert "pe_present_on_window" in r.stdout
    for label in ("negative_exam_for_pe", "central_pe", "rv_lv_ratio_lt_1"):
        assert label not in r.stdout
    assert len(list((out / "results").glob("SR_*.dcm"))) == 2
