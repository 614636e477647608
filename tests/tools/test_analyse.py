"""`dicom-node analyse INPUT_DIR --out OUT_DIR`: a folder of phantom studies in, DICOM results and findings.json out.

The input folder holds two phantom studies at the bundled demo model's geometry: one written
uncompressed with file names WITHOUT an extension, together with a localizer and a 5 mm series
(both must be refused by the selection rules), one written JPEG-LS compressed; plus a text file that
must be skipped. The CLI runs as a subprocess (with `--kos`), once for the module; every written
DICOM object is checked with dicom3tools `dciodvfy`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicom_node.labels import ALL_LABELS
from dicom_node.tools.analyse import ANALYSE_MARKER, FINDINGS_NAME, analyse_folder
from dicom_node.tools.demo import DEMO_PHANTOM

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


def _cli(*args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "dicom-node"
    return subprocess.run([str(exe), "analyse", *args], capture_output=True, text=True, timeout=600)


def _headers(folder: Path) -> dict[str, pydicom.Dataset]:
    """SOP Instance UID -> header of every DICOM file under `folder`."""
    out = {}
    for p in folder.rglob("*"):
        if p.is_file() and p.suffix != ".txt":
            ds = pydicom.dcmread(p, stop_before_pixels=True)
            out[str(ds.SOPInstanceUID)] = ds
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from dicom_node_phantoms import PhantomConfig, generate_study, write_variant

    root = tmp_path_factory.mktemp("analyse")
    inp = root / "in"
    cfg = PhantomConfig(**DEMO_PHANTOM)
    positive = generate_study(20261125, cfg, kind="positive")
    # the main series plus a localizer (ImageType LOCALIZER) and a 5 mm series, all without ".dcm"
    for f in write_variant(positive, inp / "plain", "localizer-and-second-series"):
        f.rename(f.with_suffix(""))
    negative = generate_study(20261126, cfg, kind="negative")
    write_variant(negative, inp / "compressed", "jpeg-ls")
    (inp / "notes.txt").write_text("scanner export notes, not DICOM\n")
    out = root / "out"
    r = _cli(str(inp), "-o", str(out), "--kos")
    return {"in": inp, "out": out, "run": r, "studies": (positive, negative), "headers": _headers(inp)}


def _findings(folder: dict) -> dict:
    return json.loads((folder["out"] / FINDINGS_NAME).read_text())


def _analysed(folder: dict) -> list[dict]:
    return [s for s in _findings(folder)["series"] if s["status"] == "analysed"]


def test_the_input_is_what_the_test_claims(folder):
    plain = [p for p in (folder["in"] / "plain").rglob("*") if p.is_file()]
    assert plain and not any(p.name.endswith(".dcm") for p in plain)
    comp = [p for p in (folder["in"] / "compressed").rglob("*") if p.is_file()]
    assert comp and all(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG_LS_LOSSLESS
                        for p in comp[:5])


def test_exit_0_and_progress(folder):
    r = folder["run"]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Research use only" in r.stdout
    assert "2 series analysed, 2 refused by the selection rules, 0 failed" in r.stdout
    assert "[4/4] series" in r.stdout and "skipped file notes.txt: not a DICOM file" in r.stdout
    assert r.stderr.strip() == ""


def test_both_series_analysed_with_labels_probabilities_and_calls(folder):
    found = _findings(folder)
    assert found["research_use"].startswith("Research use only") and found["kos"] is True
    assert found["bundle"]["name"] and found["bundle"]["version"] and found["bundle"]["model_uid"].count(".") > 3
    analysed = {s["series_instance_uid"]: s for s in _analysed(folder)}
    want = {str(st.series_uid): str(st.study_uid) for st in folder["studies"]}
    assert set(analysed) == set(want)
    for uid, s in analysed.items():
        assert s["study_instance_uid"] == want[uid] and s["instances"] == 140 and s["reason"] == "selected"
        assert [c["label"] for c in s["labels"]] == list(ALL_LABELS)
        for c in s["labels"]:
            assert 0.0 <= c["probability"] <= 1.0 and 0.0 < c["threshold"] < 1.0
            assert c["call"] in ("present", "absent")
        assert set(s["timings_s"]) >= {"load_and_preprocess", "inference", "results", "total"}
        assert s["timings_s"]["total"] > 0


def test_key_slices_point_at_input_instances(folder):
    headers = folder["headers"]
    for s in _analysed(folder):
        assert s["key_slices"], s
        for k in s["key_slices"]:
            ds = headers[k["sop_instance_uid"]]  # KeyError: a key slice that is not in the input
            assert str(ds.SeriesInstanceUID) == s["series_instance_uid"]
            assert k["instance_number"] == int(ds.InstanceNumber) and 0 <= k["z"] < 140


def test_refused_series_and_skipped_files_are_listed_with_reasons(folder):
    found = _findings(folder)
    refused = {s["series_description"]: s["reason"] for s in found["series"] if s["status"] == "refused"}
    assert refused == {"TOPOGRAM": "localizer (ImageType LOCALIZER)",
                       "CHEST 5mm": "SliceThickness 5 mm outside 0-3 mm"}
    assert found["skipped_files"] == [{"path": "notes.txt", "reason": "not a DICOM file (no DICM prefix)"}]
    assert found["summary"] == {**found["summary"], "series": 4, "analysed": 2, "refused": 2, "failed": 0}


def test_outputs_exist_pass_dciodvfy_and_pngs_are_written(folder):
    out = folder["out"]
    for s in _analysed(folder):
        files = [out / f for f in s["outputs"]]
        assert all(f.is_file() for f in files), s["outputs"]
        names = {f.name for f in files}
        assert {"SR.dcm", "SR.txt", "SC_summary.dcm", "SC_summary.png", "KO.dcm", "KO.txt"} <= names
        pe = next(c for c in s["labels"] if c["label"] == "pe_present_on_window")["call"] == "present"
        if pe:
            assert {"SC_heatmap_1.dcm", "SC_heatmap_1.png"} <= names
        else:  # a study called PE absent gets no heatmaps ([results] heatmaps_for_negative = false)
            assert not any(n.startswith("SC_heatmap") for n in names), names
        assert all(f.parent.name == s["series_instance_uid"] for f in files)
        sr = pydicom.dcmread(out / s["series_instance_uid"] / "SR.dcm")
        assert str(sr.StudyInstanceUID) == s["study_instance_uid"] and sr.Modality == "SR"
    dcms = sorted(out.rglob("*.dcm"))
    # SR, summary, KOS (--kos) per series, and 3 heatmaps for the series called PE present only
    assert len(dcms) == 6 + 3
    for p in dcms:
        assert pydicom.dcmread(p).preamble is not None  # Part 10 file
        res = subprocess.run([DCIODVFY, str(p)], capture_output=True, text=True)
        errors = [ln for ln in (res.stdout + res.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, f"{p.relative_to(out)}: {errors}"
    assert len(list(out.rglob("*.png"))) == 2 + 3  # a summary per series, the positive series's 3 heatmaps
    assert (out / ANALYSE_MARKER).is_file()


def test_missing_input_dir_exits_2_with_one_line(tmp_path):
    r = _cli(str(tmp_path / "nope"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "INPUT_DIR" in lines[0] and "does not exist" in lines[0], r.stderr
    assert r.stdout == ""
    assert not (tmp_path / "out").exists()


def test_folder_without_dicom_exits_2(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.dcm").write_text("not really DICOM")
    r = _cli(str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no DICOM found" in lines[0], r.stderr


def test_non_empty_unmarked_out_dir_exits_2_and_is_left_alone(tmp_path, folder):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    r = _cli(str(folder["in"]), "--out", str(out))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not empty" in lines[0] and "nothing was deleted" in lines[0], r.stderr
    assert r.stdout == ""
    assert [p.name for p in out.iterdir()] == ["thesis.docx"]


def test_rerun_into_marked_out_dir_replaces_only_its_own_files(tmp_path, folder):
    # a folder with the localizer and the 5 mm series only: nothing selected, so no inference
    inp = tmp_path / "in"
    for ds in folder["headers"].values():
        if str(ds.SeriesDescription) in ("TOPOGRAM", "CHEST 5mm"):
            src = next(folder["in"].rglob(str(ds.SOPInstanceUID)))
            (inp / src.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copy(src, inp / src.parent.name / src.name)
    out = tmp_path / "out"
    first = analyse_folder(inp, out)
    assert first.exit_code == 0 and first.count("refused") == 2 and first.count("analysed") == 0
    (out / "my-notes.txt").write_text("keep me")
    second = analyse_folder(inp, out)
    assert second.exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([ANALYSE_MARKER, FINDINGS_NAME, "my-notes.txt"])
    assert (out / "my-notes.txt").read_text() == "keep me"


def test_a_failing_series_is_listed_and_exits_1(tmp_path):
    from dicom_node_phantoms import PhantomConfig, generate_study, write_variant

    study = generate_study(7, PhantomConfig(**DEMO_PHANTOM), kind="negative")
    write_variant(study, tmp_path / "in", "missing-slice")  # a gap in the slices: the loader refuses it
    r = _cli(str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    (s,) = json.loads((tmp_path / "out" / FINDINGS_NAME).read_text())["series"]
    assert s["status"] == "failed" and s["series_instance_uid"] == str(study.series_uid)
    assert s["reason"].startswith("SeriesError") and str(study.series_uid) in s["reason"]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "failed" in lines[0] and str(study.series_uid) in lines[0], r.stderr


def test_missing_bundle_exits_2_before_touching_out_dir(tmp_path, folder):
    r = _cli(str(folder["in"]), "--out", str(tmp_path / "out"), "--bundle", str(tmp_path / "no-bundle"))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"dicom-node analyse: --bundle {tmp_path / 'no-bundle'}:"), r.stderr
    assert not (tmp_path / "out").exists()
