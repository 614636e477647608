"""Honest heatmap and summary Secondary Captures (issue 17 items 3 and 4).

Captions name the source CT instance by its own InstanceNumber and position (read back from the SC
and compared with the CT file), use the same 1-based window numbers as DerivationDescription, cover
at most 12 % of the rows of 128 and 512 px images, say "below threshold: not a finding" where the
window is not a finding; a study called PE absent gets no heatmaps unless asked for; the summary
chart is red only for a called PE finding; weak labels are marked. Every SC passes dciodvfy and is
stored by Orthanc.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from test_results import hand_made_prediction, store_in_orthanc

from dicom_node.config import ResultsConfig
from dicom_node.imaging.preprocess import PreprocessConfig, preprocess
from dicom_node.imaging.series import load_series
from dicom_node.labels import DISPLAY_NAMES, WINDOW_LABEL
from dicom_node.model.bundle import LabelValidation
from dicom_node.model.inference import Prediction
from dicom_node.results import ResultOptions, build_results
from dicom_node.results.key_slices import KeySlice
from dicom_node.results.sc import (
    CAPTION_MAX_FRACTION,
    HEATMAP_WARNING,
    NOT_A_FINDING,
    NOT_VALIDATED,
    SUMMARY_COLOURS,
    build_heatmap_sc,
    draw_caption_lines,
    render_overlay,
)
from dicom_node.results.sr import BundleInfo
from dicom_node_phantoms import PhantomConfig, generate_study, study_datasets, write_study

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
needs_dicom3tools = pytest.mark.skipif(not Path(DCIODVFY).exists(), reason="dicom3tools not installed")

CONFIG = PreprocessConfig(resize=64, crop=48)
BUNDLE = BundleInfo(name="pe-demo", version="0.3.1", model_uid="2.25.1234567890")
#: the same model as a manifest dict that marks the window label and chronic PE weak
WEAK_BUNDLE = {"name": BUNDLE.name, "version": BUNDLE.version, "model_uid": BUNDLE.model_uid,
               "weak_labels": [WINDOW_LABEL, "chronic_pe"], "weak_auroc_floor": 0.7}
_CAPTION = re.compile(r"Burned-in caption \((\d+) px font, (\d+) lines\): (.*?)(?: \(left out of the pixels|\. Research)")


def _prediction(series, windows, *, positive: bool, hot_window: int | None = None) -> Prediction:
    """test_results' hand-made prediction with a uniform random heatmap on every window."""
    heatmaps = np.random.default_rng(5).uniform(0, 1, (len(windows.slice_uids), 2, 6, 6)).astype(np.float32)
    return hand_made_prediction(series, windows, positive=positive, heatmaps=heatmaps,
                                hot_windows=() if hot_window is None else (hot_window,))


def _case(kind: str, seed: int, tmp: Path):
    study = generate_study(seed, PhantomConfig(rows=128, cols=128, n_slices=64, slice_thickness_mm=2.5), kind=kind)
    files = write_study(study, tmp / kind)
    series = load_series(files)
    windows = preprocess(series, CONFIG)
    pred = _prediction(series, windows, positive=kind == "positive", hot_window=5 if kind == "positive" else None)
    ct = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)}
    return series, windows, pred, ct


@pytest.fixture(scope="module")
def positive(tmp_path_factory):
    return _case("positive", 11, tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def negative(tmp_path_factory):
    return _case("negative", 12, tmp_path_factory.mktemp("ct"))


def _burned(sc) -> tuple[int, list[str]]:
    """(font size, lines) of the burned-in caption as the SC's ImageComments records it."""
    m = _CAPTION.search(str(sc.ImageComments))
    assert m, sc.ImageComments
    lines = m.group(3).split(" / ")
    assert len(lines) == int(m.group(2))
    return int(m.group(1)), lines


def _caption_rows(sc, series, ks: KeySlice) -> np.ndarray:
    """Row indices where the SC differs from the plain CT + heatmap overlay (the burned caption)."""
    rgb, _ = render_overlay(series.hu[ks.z], ks.heatmap)
    return np.flatnonzero((sc.pixel_array != rgb).any(axis=-1).any(axis=1))


def _normal_position(ct: pydicom.Dataset) -> float:
    o = np.array([float(v) for v in ct.ImageOrientationPatient])
    return float(np.dot(np.array([float(v) for v in ct.ImagePositionPatient]), np.cross(o[:3], o[3:])))


def test_captions_name_the_referenced_ct_instance(positive):
    series, windows, pred, ct = positive
    result = build_results(series, windows, pred, BUNDLE, ResultOptions())
    assert len(result.heatmap_scs) == 3
    numbers_differ = False
    for ks, sc in zip(result.key_slices, result.heatmap_scs):
        src = ct[sc.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert src.SOPInstanceUID == ks.sop_instance_uid == sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID
        number, pos = int(src.InstanceNumber), _normal_position(src)
        numbers_differ |= number != ks.z + 1
        assert series.instance_numbers[ks.z] == number
        # DerivationDescription and ImageComments: CT image <InstanceNumber> at <position> mm, same 1-based window
        w = ks.window_index + 1
        assert f"CT image {number} at {pos:.1f} mm" in sc.DerivationDescription
        assert f"AI heatmap of window {w} (1-based)" in sc.DerivationDescription
        assert f"CT image {number} at {pos:.1f} mm" in sc.ImageComments
        assert f"PE in window {w}: p {ks.window_probability:.2f}" in sc.ImageComments
        assert "threshold 0.45" in sc.ImageComments and HEATMAP_WARNING in sc.ImageComments
        # the burned-in lines name the same instance, and the pixels are exactly those lines
        size, lines = _burned(sc)
        text = " | ".join(lines)
        assert HEATMAP_WARNING in text and re.search(rf"(#|image ){number}\b", text) and f"{pos:.1f}" in text
        rgb, _ = render_overlay(series.hu[ks.z], ks.heatmap)
        redrawn, _, _ = draw_caption_lines(rgb, lines, size)
        assert np.array_equal(redrawn, sc.pixel_array), "the burned pixels are the caption ImageComments records"
        if ks.window_probability < pred.thresholds[WINDOW_LABEL]:
            assert NOT_A_FINDING in text
    assert numbers_differ, "the phantom numbers its instances against the slice order: the test must see that"


@pytest.mark.parametrize("size", [128, 512])
def test_caption_band_is_at_most_12_percent_of_the_rows(size):
    study = generate_study(3, PhantomConfig(rows=size, cols=size, n_slices=24, slice_thickness_mm=2.5), kind="positive")
    series = load_series(study_datasets(study))
    z = 12
    hm = np.zeros(series.hu.shape[1:], np.float32)
    hm[size // 2 - size // 16: size // 2 + size // 16, size // 2 - size // 16: size // 2 + size // 16] = 1.0
    for positive_call, p in ((True, 0.93), (False, 0.2)):
        ks = KeySlice(rank=0, window_index=3, z=z, sop_instance_uid=series.sop_instance_uids[z],
                      window_probability=p, score=p, peak=1.0, heatmap=hm)
        sc = build_heatmap_sc(series, ks, probability=p, threshold=0.45, study_positive=positive_call,
                              series_instance_uid="2.25.1", sop_instance_uid="2.25.2", series_number=9902,
                              instance_number=1, manufacturer="test", series_description="test",
                              validation=LabelValidation((WINDOW_LABEL,), 0.7, "manifest"))
        assert (sc.Rows, sc.Columns) == (size, size)
        rows = _caption_rows(sc, series, ks)
        assert rows.size and rows.min() >= size - int(CAPTION_MAX_FRACTION * size), (size, rows.min())
        assert size - rows.min() <= CAPTION_MAX_FRACTION * size
        _, lines = _burned(sc)
        text = " | ".join(lines)
        assert HEATMAP_WARNING in text and str(series.instance_numbers[z]) in text
        if not positive_call:
            assert NOT_A_FINDING in text
        if size == 512:  # room for everything, in full
            assert "left out of the pixels" not in sc.ImageComments
            assert f"CT image {series.instance_numbers[z]} at" in text and NOT_VALIDATED in text
            assert "PE in window 4: p" in text


def test_negative_study_gets_no_heatmaps_by_default(negative):
    series, windows, pred, _ = negative
    assert not pred.labels[WINDOW_LABEL]
    assert ResultOptions().heatmaps_for_negative is False
    result = build_results(series, windows, pred, BUNDLE, ResultOptions.from_config(ResultsConfig()))
    assert result.heatmap_scs == () and result.summary_sc is not None
    assert result.key_slices  # the SR still references the key slices
    assert result.summary_sc.InstanceNumber == 1


def test_negative_heatmaps_when_enabled_say_below_threshold(negative):
    series, windows, pred, ct = negative
    options = ResultOptions.from_config(ResultsConfig(heatmaps_for_negative=True))
    assert options.heatmaps_for_negative
    result = build_results(series, windows, pred, BUNDLE, options)
    assert len(result.heatmap_scs) == 3
    for ks, sc in zip(result.key_slices, result.heatmap_scs):
        _, lines = _burned(sc)
        assert NOT_A_FINDING in " | ".join(lines) and NOT_A_FINDING in sc.ImageComments
        number = int(ct[ks.sop_instance_uid].InstanceNumber)
        assert f"CT image {number} at" in sc.DerivationDescription


def _red(px: np.ndarray) -> np.ndarray:
    return (px[..., 0] > 150) & (px[..., 1] < 80) & (px[..., 2] < 80)


def test_summary_is_neutral_for_a_negative_call_and_red_for_pe(positive, negative):
    neg = build_results(*negative[:3], BUNDLE, ResultOptions()).summary_sc
    assert not _red(neg.pixel_array).any(), "a study called no PE has no red in its summary"
    assert "no PE suggested" in neg.ImageComments
    grey = np.all(neg.pixel_array == SUMMARY_COLOURS["called_no_pe"], axis=-1)
    assert grey.sum() > 1000, "the negative-exam call is drawn as a neutral bar"
    pos = build_results(*positive[:3], BUNDLE, ResultOptions()).summary_sc
    assert _red(pos.pixel_array).any() and "PE suggested" in pos.ImageComments
    for sc in (neg, pos):  # clinical names, not label ids
        assert all(name in sc.ImageComments for name in DISPLAY_NAMES.values())
        assert "negative_exam_for_pe" not in sc.ImageComments
        assert "label validation unknown" in sc.ImageComments  # BundleInfo: no validation figures


def test_weak_labels_are_marked_on_the_scs(positive):
    series, windows, pred, _ = positive
    result = build_results(series, windows, pred, WEAK_BUNDLE, ResultOptions())
    assert result.weak_labels == (WINDOW_LABEL, "chronic_pe")
    comments = str(result.summary_sc.ImageComments)
    assert f"Chronic PE p 0.10 threshold 0.50 not called ({NOT_VALIDATED})" in comments
    assert "Central PE p 0.30 threshold 0.50 not called;" in comments
    for sc in result.heatmap_scs:
        _, lines = _burned(sc)
        text = " | ".join(lines)
        assert NOT_VALIDATED in sc.ImageComments
        # on a 128 px image a window that is not a finding has room for the warning, "not a finding" and the
        # slice only: the weak mark is then in ImageComments alone (and listed as left out of the pixels)
        assert "not validated" in text or (NOT_A_FINDING in text and "left out of the pixels" in sc.ImageComments)
    assert any("not validated" in " | ".join(_burned(sc)[1]) for sc in result.heatmap_scs)
    plain = build_results(series, windows, pred, BUNDLE, ResultOptions())
    assert not np.array_equal(plain.summary_sc.pixel_array, result.summary_sc.pixel_array)


@needs_dicom3tools
def test_scs_pass_dciodvfy(positive, negative, tmp_path):
    datasets = build_results(*positive[:3], WEAK_BUNDLE, ResultOptions(summary=True)).datasets()[1:]
    datasets += build_results(*negative[:3], BUNDLE, ResultOptions(heatmaps_for_negative=True)).datasets()[1:]
    assert len(datasets) == 8
    for i, ds in enumerate(datasets):
        path = tmp_path / f"sc_{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]
        assert errors == [], errors


@pytest.mark.orthanc
def test_orthanc_stores_the_scs(orthanc, positive, negative):
    datasets = build_results(*positive[:3], WEAK_BUNDLE, ResultOptions()).datasets()[1:]
    datasets += build_results(*negative[:3], BUNDLE, ResultOptions(heatmaps_for_negative=True)).datasets()[1:]
    statuses = store_in_orthanc(orthanc, datasets)
    assert statuses == [0] * len(datasets)
    stored = {t["SOPInstanceUID"]: t for t in (orthanc.instance_tags(i) for i in orthanc.instances())}
    for ds in datasets:
        assert str(ds.SOPInstanceUID) in stored
        assert stored[str(ds.SOPInstanceUID)]["Modality"] == "OT"
