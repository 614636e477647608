"""OHIF's own SR parsing on our SR: @cornerstonejs/adapters turns the PE regions into annotations.

`ohif/parse_sr.mjs` runs the adapters' Cornerstone3D `MeasurementReport.generateToolState` (what
OHIF v3 uses to load a TID 1500 SR's measurements) over our SR and the CT instances it references.
Set-up installs the pinned packages of `ohif/package-lock.json` with `npm ci` into the ignored
`ohif/node_modules`; the test skips only when node or npm is not installed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_results import phantom_case

from dicom_node_phantoms import write_study

OHIF = Path(__file__).parent / "ohif"
NODE, NPM = shutil.which("node"), shutil.which("npm")


@pytest.fixture(scope="module")
def adapters() -> Path:
    if NODE is None or NPM is None:
        pytest.skip("node/npm not installed (scripts/setup.sh installs nodejs when root)")
    stamp = OHIF / "node_modules" / ".package-lock.json"
    lock = OHIF / "package-lock.json"
    if not stamp.exists() or stamp.stat().st_mtime < lock.stat().st_mtime:
        r = subprocess.run([NPM, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=OHIF,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"npm ci failed in {OHIF}: {r.stderr[-2000:]}"
    return OHIF / "parse_sr.mjs"


def _parse(script: Path, sr: Path, cts: list[Path]) -> dict:
    r = subprocess.run([NODE, str(script), str(sr), *map(str, cts)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def test_adapters_turn_pe_regions_into_annotations_on_the_key_slices(adapters, pe_case, tmp_path):
    series, _, pred, result = pe_case
    study, _, _ = phantom_case("positive", 11)  # the same phantom as the `pe_case` fixture
    cts = write_study(study, tmp_path / "ct")
    sr = tmp_path / "sr.dcm"
    result.sr.save_as(sr, enforce_file_format=True)

    out = _parse(adapters, sr, cts)
    probes = out["toolState"].get("Probe", [])
    expected = [ks for ks in result.key_slices if pred.window_positive[ks.window_index]]
    assert len(probes) == len(expected) >= 2, out
    tracking = {p["trackingUniqueIdentifier"] for p in probes}
    assert len(tracking) == len(probes) and None not in tracking
    by_sop = {p["sopInstanceUID"]: p for p in probes}
    row_dir = np.array(series.image_orientation[:3], float)
    col_dir = np.array(series.image_orientation[3:], float)
    dy, dx = series.pixel_spacing_mm
    for ks in expected:
        probe = by_sop[ks.sop_instance_uid]  # on the right image
        assert probe["referencedImageId"] == f"ct:{ks.sop_instance_uid}"
        assert probe["label"] == "Pulmonary embolism"
        assert probe["value"] == pytest.approx(ks.window_probability, abs=1e-6)
        # the annotation sits on the hottest heatmap pixel's centre, in patient coordinates
        ipp = np.array([float(v) for v in next(d for d in map(_header, cts)
                                               if d.SOPInstanceUID == ks.sop_instance_uid).ImagePositionPatient])
        row, col = ks.hottest_point
        assert np.allclose(probe["points"][0], ipp + row_dir * dx * col + col_dir * dy * row, atol=1e-3)
    # the non-geometric finding groups are not drawn (the adapters skip them)
    assert len(out["warnings"]) == out["groups"] - len(probes)


def _header(path: Path):
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)
