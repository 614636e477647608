"""Result objects (SR, heatmap/summary SC, KOS) over phantom studies with hand-made predictions.

Every object is validated with dicom3tools `dciodvfy`, read back with highdicom and dcmtk
`dsrdump`, round-tripped through bytes and stored in a real Orthanc.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node import RESEARCH_USE_STATEMENT
from dicom_node.imaging.preprocess import PreprocessConfig, preprocess
from dicom_node.imaging.series import load_series
from dicom_node.labels import ALL_LABELS, STUDY_LABELS, WINDOW_LABEL, consistency_violations, make_consistent
from dicom_node.model.inference import Prediction
from dicom_node.results import ResultOptions, build_results
from dicom_node.results.codes import FINDING_GROUPS, LABEL_CODING
from dicom_node.results.key_slices import select_key_slices
from dicom_node.results.sc import pe_window_grey, render_overlay
from dicom_node.results.sr import BundleInfo, ReportError, build_sr
from dicom_node_phantoms import PhantomConfig, generate_study, heatmap_hits_embolus, study_datasets

DCIODVFY = shutil.which("dciodvfy") or "/usr/bin/dciodvfy"
DSRDUMP = shutil.which("dsrdump") or "/usr/bin/dsrdump"
needs_dicom3tools = pytest.mark.skipif(not Path(DCIODVFY).exists(), reason="dicom3tools not installed")
needs_dsrdump = pytest.mark.skipif(not Path(DSRDUMP).exists(), reason="dcmtk not installed")

CONFIG = PreprocessConfig(resize=64, crop=48)
#: the node sends a KOS only with [results] send_kos, and heatmaps for a study called PE absent only with
#: [results] heatmaps_for_negative; these tests build and check every kind of object for both cases
#: (the defaults themselves: tests/results/test_sc_captions.py)
WITH_KOS = ResultOptions(kos=True, heatmaps_for_negative=True)
SR_SERIES = {"series_number": ResultOptions().sr_series_number,
             "series_description": ResultOptions().sr_series_description}
BUNDLE = BundleInfo(name="pe-demo", version="0.3.1", model_uid="2.25.1234567890",
                    parameters=("preprocessing_version=1",))


def phantom_case(kind: str, seed: int):
    study = generate_study(seed, PhantomConfig(rows=128, cols=128, n_slices=64, slice_thickness_mm=2.5), kind=kind)
    series = load_series(study_datasets(study))
    windows = preprocess(series, CONFIG)
    return study, series, windows


def heatmaps_at(windows, points, shape=(2, 6, 6)) -> np.ndarray:
    """(N, t, h, w) heatmaps, zero except one hot cell per original voxel point (z, y, x)."""
    g = windows.geometry
    t, h, w = shape
    hm = np.zeros((len(windows.slice_uids), t, h, w), np.float32) + 0.01
    for z, y, x in points:
        win, s, r, c = g.original_to_model(z, y, x)
        ti = int(np.clip(s * t / g.window_slices, 0, t - 1))
        hi = int(np.clip((r + 0.5) * h / g.crop, 0, h - 1))
        wi = int(np.clip((c + 0.5) * w / g.crop, 0, w - 1))
        hm[int(win), ti, hi, wi] = 1.0
    return hm


def hand_made_prediction(series, windows, *, positive: bool, heatmaps: np.ndarray, hot_windows=(), model_uid=BUNDLE.model_uid):
    n = len(windows.slice_uids)
    rng = np.random.default_rng(5)
    wp = rng.uniform(0.02, 0.2, n)
    for w in hot_windows:
        wp[w] = 0.93
    sp = {k: 0.1 for k in STUDY_LABELS}
    if positive:
        sp.update(rightsided_pe=0.8, central_pe=0.3, rv_lv_ratio_lt_1=0.7, rv_lv_ratio_gte_1=0.3)
    else:
        sp.update(negative_exam_for_pe=0.9)
    thresholds = {k: 0.5 for k in ALL_LABELS}
    thresholds[WINDOW_LABEL] = 0.45
    c = make_consistent(wp, sp, thresholds)
    att = rng.uniform(0.5, 1.0, (9, n))
    for w in hot_windows:
        att[:, w] += 3.0
    att /= att.sum(axis=1, keepdims=True)
    return Prediction(
        series_instance_uid=series.series_instance_uid, window_probs=wp, study_probs=sp, attention=att,
        heatmaps=heatmaps, thresholds=thresholds, window_positive=c.window_positive,
        labels={WINDOW_LABEL: bool(c.window_positive.any()), **c.study},
        model_name=BUNDLE.name, model_version=BUNDLE.version, model_uid=model_uid,
        execution_provider="CPUExecutionProvider",
    )


def embolus_point(mask: np.ndarray) -> tuple[int, int, int]:
    """An embolus voxel near the centroid of the slice with the largest embolus area."""
    z = int(np.argmax(mask.sum(axis=(1, 2))))
    ys, xs = np.nonzero(mask[z])
    i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return z, int(ys[i]), int(xs[i])


@pytest.fixture(scope="module")
def positive():
    study, series, windows = phantom_case("positive", 11)
    point = embolus_point(study.embolus_mask)
    win = int(windows.geometry.original_to_model(*point)[0])
    pred = hand_made_prediction(series, windows, positive=True, heatmaps=heatmaps_at(windows, [point]), hot_windows=(win,))
    return study, series, windows, pred, point


@pytest.fixture(scope="module")
def negative():
    study, series, windows = phantom_case("negative", 12)
    hm = np.random.default_rng(3).uniform(0, 1, (len(windows.slice_uids), 2, 6, 6)).astype(np.float32)
    pred = hand_made_prediction(series, windows, positive=False, heatmaps=hm)
    return study, series, windows, pred, None


@pytest.fixture(scope="module", params=["positive", "negative"])
def case(request, positive, negative):
    data = positive if request.param == "positive" else negative
    study, series, windows, pred, _ = data
    return request.param, series, windows, pred, build_results(series, windows, pred, BUNDLE, WITH_KOS)


def round_trip(ds) -> pydicom.Dataset:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def _items(ds):
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _items(item)


def _name(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""


def test_prediction_labels_are_consistent(case):
    _, _, _, pred, _ = case
    assert consistency_violations(pred.window_positive, pred.labels) == []


@needs_dicom3tools
@needs_dsrdump
def test_every_object_passes_dciodvfy_and_sr_dsrdump(case, tmp_path):
    kind, _, _, _, result = case
    assert len(result.heatmap_scs) == 3 and result.summary_sc is not None and result.kos is not None
    for i, ds in enumerate(result.datasets()):
        path = tmp_path / f"{kind}_{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (out.stdout + out.stderr).splitlines() if "Error" in line]
        assert errors == [], f"{ds.SOPClassUID.name}: {errors}"
        if ds.Modality in ("SR", "KO"):
            dump = subprocess.run([DSRDUMP, str(path)], capture_output=True, text=True, timeout=60)
            assert dump.returncode == 0, dump.stderr
            assert "Measurement Group" in dump.stdout or ds.Modality == "KO"


def test_round_trip_and_highdicom_read_back(case):
    _, series, _, _, result = case
    sr = round_trip(result.sr)
    parsed = hd.sr.Comprehensive3DSR.from_dataset(sr)
    assert parsed.SOPInstanceUID == result.sr.SOPInstanceUID
    groups = parsed.content.get_image_measurement_groups()
    finding_groups = [tracking for tracking, _ in FINDING_GROUPS.values()]
    assert [g.tracking_identifier for g in groups if g.tracking_identifier in finding_groups] == finding_groups
    pe = parsed.content.get_image_measurement_groups(tracking_uid=groups[0].tracking_uid)[0]
    pe_labels = [k for k in ALL_LABELS if LABEL_CODING[k].finding == LABEL_CODING[WINDOW_LABEL].finding]
    assert [m.name.meaning for m in pe.get_measurements()] == ["Probability", "Threshold Value"] * len(pe_labels)
    assert [s.referenced_sop_instance_uid for s in pe.source_images] == [k.sop_instance_uid for k in result.key_slices]
    kos = hd.ko.KeyObjectSelectionDocument.from_dataset(round_trip(result.kos))
    refs = {r.ReferencedSOPInstanceUID for s in kos.CurrentRequestedProcedureEvidenceSequence
            for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    assert refs == {k.sop_instance_uid for k in result.key_slices}
    for sc in result.heatmap_scs:
        back = round_trip(sc)
        assert np.array_equal(back.pixel_array, sc.pixel_array)
        assert back.StudyInstanceUID == series.study_instance_uid
        assert back.PatientID == series.ref_dataset.PatientID
        assert back.BurnedInAnnotation == "YES" and back.PhotometricInterpretation == "RGB"


def test_sr_content_tree(case):
    kind, series, _, pred, result = case
    sr = round_trip(result.sr)
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.StudyInstanceUID == series.study_instance_uid and sr.PatientID == series.ref_dataset.PatientID
    assert sr.SeriesInstanceUID != series.series_instance_uid and sr.SeriesNumber == 9901
    items = list(_items(sr))
    texts = {_name(i): i.TextValue for i in items if i.ValueType == "TEXT" and _name(i) != "Tracking Identifier"}
    assert texts["Algorithm Name"] == BUNDLE.name and texts["Algorithm Version"] == BUNDLE.version
    comments = [i.TextValue for i in items if i.ValueType == "TEXT" and _name(i) == "Comment"]
    assert comments[0] == RESEARCH_USE_STATEMENT  # the first Comment; then what is known of label validation
    assert comments[1:] == ["label validation unknown: the bundle records no validation AUROC"]
    assert texts["Device Observer Model Name"] == BUNDLE.name
    params = {i.TextValue for i in items if _name(i) == "Algorithm Parameters"}
    assert f"model_uid={BUNDLE.model_uid}" in params

    # one group per finding (tracking identifier = FINDING_GROUPS), every label inside the group of its finding
    groups = [i for i in items if _name(i) == "Measurement Group"]
    by_tracking = {next(c.TextValue for c in g.ContentSequence if _name(c) == "Tracking Identifier"): g for g in groups}
    assert [t for t in by_tracking if "region" not in t] == [t for t, _ in FINDING_GROUPS.values()]
    seen = {}
    for finding, (tracking, _main) in FINDING_GROUPS.items():
        children = list(by_tracking[tracking].ContentSequence)
        found = next(c for c in children if _name(c) == "Finding").ConceptCodeSequence[0]
        assert (found.CodeValue, found.CodingSchemeDesignator) == (finding.value, finding.scheme_designator)
        codes = {(c.ConceptNameCodeSequence[0].CodeValue, c.ConceptCodeSequence[0].CodeValue)
                 for c in children if c.ValueType == "CODE"}
        for label, coding in LABEL_CODING.items():
            if coding.finding != finding:
                continue
            nums = {}
            for c in children:
                if c.ValueType != "NUM":
                    continue
                mods = [(m.ConceptNameCodeSequence[0].CodeValue, m.ConceptCodeSequence[0].CodeValue)
                        for m in c.get("ContentSequence", []) if m.RelationshipType == "HAS CONCEPT MOD"]
                want = [] if coding.modifier is None else [(coding.modifier[0].value, coding.modifier[1].value)]
                if mods == want:
                    assert c.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue == "{probability}"
                    nums[_name(c)] = float(c.MeasuredValueSequence[0].NumericValue)
            present = (coding.present[0].value, coding.present[1].value) in codes
            seen[label] = (nums["Probability"], nums["Threshold Value"], present)
    assert set(seen) == set(ALL_LABELS)
    expected_p = {WINDOW_LABEL: float(np.max(pred.window_probs)), **pred.study_probs}
    for label, (p, t, present) in seen.items():
        assert p == pytest.approx(expected_p[label], abs=1e-6)
        assert t == pytest.approx(pred.thresholds[label])
        assert present == pred.labels[label], label
    pe_call = {c.ConceptCodeSequence[0].CodeValue for c in by_tracking["pulmonary_embolism"].ContentSequence
               if c.ValueType == "CODE" and _name(c) == "Pulmonary embolism"}
    assert pe_call == ({"52101004"} if kind == "positive" else {"272519000"})

    sources = [i for i in items if i.ValueType == "IMAGE" and _name(i) == "Source of Measurement"]
    ref_uids = [s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for s in sources]
    assert ref_uids == [k.sop_instance_uid for k in result.key_slices]
    assert set(ref_uids) <= set(series.sop_instance_uids)
    # the Image Library lists the images the content references (the key slices), the evidence every slice
    library_item = next(i for i in sr.ContentSequence if _name(i) == "Image Library")
    library = [e for g in library_item.ContentSequence for e in g.ContentSequence if e.ValueType == "IMAGE"]
    assert {s.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for s in library} == set(ref_uids)
    evidence = {r.ReferencedSOPInstanceUID for e in sr.CurrentRequestedProcedureEvidenceSequence
                for se in e.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    assert evidence == set(series.sop_instance_uids)


def test_uids_are_deterministic_and_depend_on_model(positive):
    _, series, windows, pred, _ = positive
    a = build_results(series, windows, pred, BUNDLE, WITH_KOS)
    b = build_results(series, windows, pred, BUNDLE, WITH_KOS)
    assert a.sop_instance_uids == b.sop_instance_uids and a.series_instance_uids == b.series_instance_uids
    assert len(set(a.sop_instance_uids)) == len(a.sop_instance_uids) == 6
    other = replace(pred, model_uid="2.25.999")
    c = build_results(series, windows, other, replace(BUNDLE, model_uid="2.25.999"), WITH_KOS)
    assert not set(c.sop_instance_uids) & set(a.sop_instance_uids)


def test_revision_references_predecessor(positive):
    _, series, windows, pred, _ = positive
    first = build_sr(series, windows, pred, bundle_manifest_info=BUNDLE, **SR_SERIES)
    with pytest.raises(ReportError, match="revision 1 needs predecessor"):
        build_sr(series, windows, pred, bundle_manifest_info=BUNDLE, **SR_SERIES, revision=1)
    second = round_trip(build_sr(series, windows, pred, bundle_manifest_info=BUNDLE, **SR_SERIES, revision=1, predecessor=first))
    assert second.SOPInstanceUID != first.SOPInstanceUID
    ref = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_inconsistent_or_foreign_prediction_is_rejected(positive):
    _, series, windows, pred, _ = positive
    broken = replace(pred, labels={**pred.labels, "rv_lv_ratio_gte_1": True, "rv_lv_ratio_lt_1": True})
    with pytest.raises(ReportError, match="RSNA consistency rules"):
        build_sr(series, windows, broken, bundle_manifest_info=BUNDLE, **SR_SERIES)
    with pytest.raises(ReportError, match="prediction came from model"):
        build_sr(series, windows, pred, bundle_manifest_info=replace(BUNDLE, model_uid="2.25.1"), **SR_SERIES)


def test_heatmap_sc_pixels(positive):
    _, series, windows, pred, _ = positive
    result = build_results(series, windows, pred, BUNDLE, ResultOptions(kos=False, summary=False))
    assert result.kos is None and result.summary_sc is None
    for ks, sc in zip(result.key_slices, result.heatmap_scs):
        px = sc.pixel_array
        assert px.shape == (*series.hu.shape[1:], 3)
        assert (sc.Rows, sc.Columns) == tuple(series.hu.shape[1:])
        assert [float(v) for v in sc.PixelSpacing] == pytest.approx(list(series.pixel_spacing_mm))
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == ks.sop_instance_uid
        rgb, hot = render_overlay(series.hu[ks.z], ks.heatmap)
        grey = pe_window_grey(series.hu[ks.z])
        coloured = (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])
        assert np.array_equal(hot, ks.heatmap > 0.5 * ks.heatmap.max()) and hot.any()
        assert coloured[hot].all(), "hot heatmap pixels must be coloured"
        assert np.array_equal(rgb[~hot], np.repeat(grey[~hot][:, None], 3, axis=1)), "cold pixels stay grey CT"
        caption = (px != rgb).any(axis=-1)
        rows = np.flatnonzero(caption.any(axis=1))
        assert rows.size and rows.min() >= px.shape[0] // 2, "caption only in the lower part"
        assert ((px >= 180).all(axis=-1) & caption).sum() > 20, "burned-in light caption text expected"
    # the hottest key slice's heatmap is located where the hand-made heatmap put it
    assert result.key_slices[0].peak > 0.5


def test_summary_sc_is_a_chart(positive):
    _, series, windows, pred, _ = positive
    sc = build_results(series, windows, pred, BUNDLE, WITH_KOS).summary_sc
    px = sc.pixel_array
    assert px.ndim == 3 and px.shape[2] == 3 and px.shape[0] >= 400
    assert sc.BurnedInAnnotation == "YES" and RESEARCH_USE_STATEMENT in sc.ImageComments
    red = (px[..., 0] > 150) & (px[..., 1] < 80) & (px[..., 2] < 80)
    assert red.any(), "positive labels are drawn as red bars"


def test_heatmap_hits_embolus_hit_and_miss(positive):
    study, series, windows, pred, point = positive
    g = windows.geometry
    full = (g.window_slices, g.crop, g.crop)  # model-space resolution: the peak maps back onto the voxel
    hit = replace(pred, heatmaps=heatmaps_at(windows, [point], shape=full))
    assert heatmap_hits_embolus(select_key_slices(series, windows, hit), study.embolus_mask)
    z, y, x = point
    far = (z, y, x + 30 if x + 30 < series.hu.shape[2] - 10 else x - 30)  # 30 px (~8 cm) to the side
    assert not study.embolus_mask[far[0], max(far[1] - 8, 0):far[1] + 8, max(far[2] - 8, 0):far[2] + 8].any()
    miss = replace(pred, heatmaps=heatmaps_at(windows, [far], shape=full))
    assert not heatmap_hits_embolus(select_key_slices(series, windows, miss), study.embolus_mask)


def store_in_orthanc(orthanc, datasets) -> list[int]:
    """C-STORE status of each dataset, sent to the Orthanc peer by the node's own SCU in one association."""
    from dicom_node.config import Destination
    from dicom_node.network.send import send_datasets

    return list(send_datasets(datasets, Destination(orthanc.aet, "127.0.0.1", orthanc.dicom_port)).statuses)


@pytest.mark.orthanc
def test_orthanc_stores_all_results(orthanc, positive, negative):
    datasets = []
    for _, series, windows, pred, _ in (positive, negative):
        datasets += build_results(series, windows, pred, BUNDLE, WITH_KOS).datasets()
    statuses = store_in_orthanc(orthanc, datasets)
    assert statuses == [0] * len(datasets)
    tags = [orthanc.instance_tags(i) for i in orthanc.instances()]
    assert len(tags) == 12
    modalities = sorted(t["Modality"] for t in tags)
    assert modalities == sorted(["SR"] * 2 + ["KO"] * 2 + ["OT"] * 8)


def test_render_cli_writes_png_and_text(positive, tmp_path):
    from PIL import Image

    from dicom_node.cli import main

    _, series, windows, pred, _ = positive
    result = build_results(series, windows, pred, BUNDLE, WITH_KOS)
    files = []
    for i, ds in enumerate(result.datasets()):
        files.append(tmp_path / f"obj{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    out = tmp_path / "rendered"
    assert main(["render", *map(str, files), "--out", str(out)]) == 0
    pngs, txts = sorted(out.glob("*.png")), sorted(out.glob("*.txt"))
    assert len(pngs) == 4 and len(txts) == 2
    sr_text = (out / f"{result.sr.SOPInstanceUID}.txt").read_text()
    for needle in ("Verification UNVERIFIED", "Tracking Identifier (112039, DCM) = \"pulmonary_embolism\"",
                   "Probability (122157, DCM) = ", "[{probability}]", "Pulmonary embolism (59282003, SCT) = Present",
                   "Algorithm Version (111003, DCM) = \"0.3.1\"", RESEARCH_USE_STATEMENT[:20]):
        assert needle in sr_text, needle
    kos_text = (out / f"{result.kos.SOPInstanceUID}.txt").read_text()
    assert "Of Interest (113000, DCM)" in kos_text and result.key_slices[0].sop_instance_uid in kos_text
    img = np.asarray(Image.open(out / f"{result.heatmap_scs[0].SOPInstanceUID}.png"))
    assert np.array_equal(img, result.heatmap_scs[0].pixel_array)
    assert main(["render", str(tmp_path / "missing.dcm"), "--out", str(out)]) == 1
