"""Synthetic CTPA phantoms: determinism, RSNA label rules, HU ranges, valid DICOM, variants, CLI."""

from __future__ import annotations

import csv
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

from dicom_node.labels import CSV_COLUMNS, QA_COLUMNS, STUDY_LABELS, consistency_violations
from dicom_node_phantoms import (
    COMPRESSED,
    VARIANTS,
    PhantomConfig,
    Tissue,
    csv_rows,
    dataset_plan,
    generate_study,
    phantom_study_uid,
    write_study,
    write_variant,
)
from dicom_node_training.cli import main as train_main

SMALL = PhantomConfig(rows=96, cols=96, n_slices=48, slice_thickness_mm=2.5)
PE_PROPERTIES = ("chronic_pe", "acute_and_chronic_pe", "central_pe", "leftsided_pe", "rightsided_pe",
                 "rv_lv_ratio_gte_1", "rv_lv_ratio_lt_1")


@pytest.fixture(scope="module")
def positive():
    return generate_study(11, SMALL, kind="positive")


def _hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return np.rint(ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).astype(np.int16)


def test_same_seed_gives_the_same_study_and_another_seed_does_not():
    a, b, c = generate_study(5, SMALL), generate_study(5, SMALL), generate_study(6, SMALL)
    assert np.array_equal(a.hu, b.hu) and np.array_equal(a.embolus_mask, b.embolus_mask)
    assert (a.study_uid, a.series_uid, a.sop_uids, a.study_labels) == (b.study_uid, b.series_uid, b.sop_uids, b.study_labels)
    assert a.study_uid != c.study_uid and not np.array_equal(a.hu, c.hu)
    assert len(set(a.sop_uids)) == SMALL.n_slices and a.study_uid.startswith("2.25.")
    assert a.hu.dtype == np.int16 and a.hu.shape == (48, 96, 96)


@pytest.mark.parametrize("kind", ["positive", "negative", "indeterminate"])
def test_rsna_label_rules_hold_for_many_seeds(kind):
    for seed in range(12):
        s = generate_study(seed, SMALL, kind=kind)
        assert set(s.study_labels) == set(STUDY_LABELS) | set(QA_COLUMNS)
        assert consistency_violations(s.slice_labels.astype(bool), s.study_labels) == [], (seed, s.study_labels)
        assert np.array_equal(s.slice_labels, s.embolus_mask.any(axis=(1, 2)).astype(int))
        if kind == "positive":
            assert s.slice_labels.sum() >= 1 and s.n_emboli >= 1
            assert s.study_labels["rv_lv_ratio_gte_1"] == int(s.rv_lv_ratio >= 1.0)
        else:
            assert not s.embolus_mask.any() and not any(s.study_labels[k] for k in PE_PROPERTIES)
        if kind == "indeterminate":
            assert s.study_labels["indeterminate"] == 1 and s.study_labels["qa_motion"] + s.study_labels["qa_contrast"] == 1


def test_label_sites_follow_where_emboli_sit():
    for seed in range(20):
        s = generate_study(seed, SMALL, kind="positive")
        sites = {v for v, _ in s.extra["emboli"]}
        assert s.study_labels["central_pe"] == int(bool(sites & {"main", "lpa", "rpa"}))
        assert s.study_labels["leftsided_pe"] == int(any(v == "lpa" or v.startswith("left") for v in sites))
        assert s.study_labels["rightsided_pe"] == int(any(v == "rpa" or v.startswith("right") for v in sites))
        kinds = {k for _, k in s.extra["emboli"]}
        assert s.study_labels["chronic_pe"] == int(kinds == {"chronic"})
        assert s.study_labels["acute_and_chronic_pe"] == int(kinds == {"acute", "chronic"})


def test_hu_of_lungs_arteries_emboli_and_bone_are_as_specified():
    seen = {t: [] for t in (Tissue.LUNG, Tissue.PULMONARY_ARTERY, Tissue.EMBOLUS, Tissue.BONE, Tissue.FAT, Tissue.AIR)}
    config = PhantomConfig(rows=160, cols=160, n_slices=64, slice_thickness_mm=2.0)
    for seed in range(6):
        s = generate_study(seed, config, kind="positive")
        core = np.isin(s.tissue, [Tissue.EMBOLUS, Tissue.CALCIFICATION])
        assert s.embolus_mask.any() and not (core & ~s.embolus_mask).any()  # the embolus core lies inside the label mask
        for t in seen:
            if np.count_nonzero(s.tissue == t) >= 10:
                seen[t].append(float(np.median(s.hu[s.tissue == t])))
    assert all(len(v) >= 2 for v in seen.values()), {t.name: len(v) for t, v in seen.items()}
    assert all(-900 <= v <= -800 for v in seen[Tissue.LUNG])
    assert all(200 <= v <= 450 for v in seen[Tissue.PULMONARY_ARTERY])
    assert all(20 <= v <= 80 for v in seen[Tissue.EMBOLUS])
    assert all(v >= 400 for v in seen[Tissue.BONE])
    assert all(-130 <= v <= -70 for v in seen[Tissue.FAT])
    assert all(v <= -980 for v in seen[Tissue.AIR])
    poor = [generate_study(seed, SMALL, kind="indeterminate") for seed in range(8)]
    contrast = [s for s in poor if s.study_labels["qa_contrast"]]
    assert contrast, "expected at least one poorly opacified study among 8 indeterminate seeds"
    assert all(np.median(s.hu[s.tissue == Tissue.PULMONARY_ARTERY]) < 160 for s in contrast)


def test_emboli_include_small_ones():
    sizes = []
    for seed in range(16):
        s = generate_study(seed, SMALL, kind="positive")
        sizes.append(int(s.slice_labels.sum()))
    assert min(sizes) <= 4, sizes  # some emboli cover only a few slices at 2.5 mm
    assert max(sizes) > min(sizes)


def test_default_config_is_512_by_300_with_realistic_sampling():
    s = generate_study(1)
    assert s.shape == (300, 512, 512)
    assert 0.6 <= s.pixel_spacing_mm[0] <= 0.8 and s.slice_thickness_mm == 1.25
    small = generate_study(1, PhantomConfig(rows=128, cols=128, n_slices=60, slice_thickness_mm=2.0))
    assert 330 <= small.pixel_spacing_mm[0] * 128 <= 380


def test_plain_files_decode_to_the_generated_hu(tmp_path, positive):
    paths = write_study(positive, tmp_path)
    assert all(p.parent.parent.parent == tmp_path for p in paths)
    assert {p.parent.name for p in paths} == {positive.series_uid}
    index = {uid: k for k, uid in enumerate(positive.sop_uids)}
    for p in paths[::7]:
        ds = pydicom.dcmread(p)
        k = index[ds.SOPInstanceUID]
        assert ds.SOPClassUID == CTImageStorage and ds.StudyDescription == "CT PULMONARY ANGIOGRAM"
        assert ds.PatientID == positive.patient_id and ds.ContrastBolusAgent
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], positive.positions[k])
        assert np.array_equal(_hu(p), positive.hu[k])


@pytest.mark.parametrize("variant", list(COMPRESSED))
def test_compressed_variants_decode_losslessly(tmp_path, positive, variant):
    paths = write_variant(positive, tmp_path, variant)
    assert len(paths) == positive.shape[0]
    index = {uid: k for k, uid in enumerate(positive.sop_uids)}
    for p in paths[::11]:
        ds = pydicom.dcmread(p)
        assert ds.file_meta.TransferSyntaxUID == COMPRESSED[variant]
        assert np.array_equal(_hu(p), positive.hu[index[ds.SOPInstanceUID]])


def test_enhanced_multiframe_holds_every_frame(tmp_path, positive):
    (path,) = write_variant(positive, tmp_path, "enhanced-multiframe")
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == EnhancedCTImageStorage and int(ds.NumberOfFrames) == positive.shape[0]
    assert np.array_equal(ds.pixel_array.astype(np.int32) - 1024, positive.hu)
    pos = [[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in ds.PerFrameFunctionalGroupsSequence]
    assert np.allclose(pos, positive.positions)


def test_geometry_and_file_order_variants(tmp_path, positive):
    Z = positive.shape[0]
    missing = write_variant(positive, tmp_path / "m", "missing-slice")
    assert len(missing) == Z - 1
    assert positive.sop_uids[Z // 2] not in {pydicom.dcmread(p).SOPInstanceUID for p in missing}
    dup = write_variant(positive, tmp_path / "d", "duplicate-instance")
    uids = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in dup]
    assert len(dup) == Z + 1 and len(set(uids)) == Z and len({p.name for p in dup}) == Z + 1
    for variant in ("shuffled", "reversed"):
        files = sorted(write_variant(positive, tmp_path / variant, variant))
        z = [float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]) for p in files]
        assert sorted(z) != z and sorted(z) == list(positive.positions[:, 2])
    oblique = [pydicom.dcmread(p, stop_before_pixels=True) for p in write_variant(positive, tmp_path / "o", "oblique")]
    iop = np.array([float(v) for v in oblique[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    assert abs(normal[2]) < 0.995  # tilted
    along = sorted(float(np.dot([float(v) for v in ds.ImagePositionPatient], normal)) for ds in oblique)
    assert np.allclose(np.diff(along), positive.spacing_between_slices_mm, atol=1e-3)
    extra = [pydicom.dcmread(p, stop_before_pixels=True) for p in write_variant(positive, tmp_path / "l", "localizer-and-second-series")]
    series = {ds.SeriesInstanceUID for ds in extra}
    assert len(series) == 3 and {ds.StudyInstanceUID for ds in extra} == {positive.study_uid}
    assert sum("LOCALIZER" in ds.ImageType for ds in extra) == 1
    assert {float(ds.SliceThickness) for ds in extra if "LOCALIZER" not in ds.ImageType} == {2.5, 5.0}


def test_errors_name_the_value_and_the_fix(positive, tmp_path):
    with pytest.raises(ValueError, match=r"slice_thickness_mm=3.0; expected 1-2.5 mm"):
        PhantomConfig(slice_thickness_mm=3.0)
    with pytest.raises(ValueError, match=r"prevalence=0.95, indeterminate_share=0.08"):
        PhantomConfig(prevalence=0.95)
    with pytest.raises(ValueError, match=r"unknown variant 'jpeg-xl'; expected one of jpeg-ls"):
        write_variant(positive, tmp_path, "jpeg-xl")
    with pytest.raises(ValueError, match=r"kind='maybe'"):
        generate_study(1, SMALL, kind="maybe")
    with pytest.raises(ValueError, match=r"smallest_embolus_vessel='tiny'; expected one of 'subsegmental', 'segmental', 'lobar', 'central'"):
        PhantomConfig(smallest_embolus_vessel="tiny")


def test_smallest_embolus_vessel_keeps_emboli_in_large_arteries():
    from dataclasses import replace

    lobar = replace(SMALL, smallest_embolus_vessel="lobar")
    every = [generate_study(seed, SMALL, kind="positive").extra["emboli"] for seed in range(12)]
    large = [generate_study(seed, lobar, kind="positive").extra["emboli"] for seed in range(12)]
    small_kinds = ("_seg", "_sub")
    assert any(name.split("_", 1)[-1].startswith(("seg", "sub")) for e in every for name, _ in e)  # the default has them
    assert all(not any(k in name for k in small_kinds) for e in large for name, _ in e), large
    assert all(e for e in large)  # every positive study still has an embolus
    central = replace(SMALL, smallest_embolus_vessel="central")
    studies = [generate_study(seed, central, kind="positive") for seed in range(12)]
    assert all(s.extra["emboli"] and {v for v, _ in s.extra["emboli"]} <= {"main", "lpa", "rpa"} for s in studies)
    assert all(s.study_labels["central_pe"] == 1 for s in studies)
    assert {s.study_labels["leftsided_pe"] for s in studies} == {0, 1}  # sides still vary


def test_mediastinal_fat_wraps_the_central_arteries_and_changes_nothing_else():
    from dataclasses import replace

    from scipy.ndimage import binary_dilation

    fatty = replace(SMALL, mediastinal_fat_mm=4.0)
    for seed in range(3):
        plain, fat = generate_study(seed, SMALL, kind="positive"), generate_study(seed, fatty, kind="positive")
        assert plain.study_labels == fat.study_labels and np.array_equal(plain.embolus_mask, fat.embolus_mask)
        changed = plain.tissue != fat.tissue
        assert changed.any()
        # only mediastinal soft tissue became fat, and the new fat touches a pulmonary artery
        assert set(np.unique(plain.tissue[changed])) == {Tissue.SOFT}
        assert set(np.unique(fat.tissue[changed])) == {Tissue.FAT}
        near_artery = binary_dilation(np.isin(fat.tissue, [Tissue.PULMONARY_ARTERY, Tissue.EMBOLUS]), iterations=3)
        assert (changed & near_artery).sum() > 0.5 * changed.sum()
        assert np.median(fat.hu[changed]) < -60
    with pytest.raises(ValueError, match=r"mediastinal_fat_mm=20; expected 0-10 mm"):
        PhantomConfig(mediastinal_fat_mm=20)


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy (dicom3tools) is not installed")
def test_dciodvfy_reports_no_error_on_plain_compressed_and_enhanced_files(tmp_path, positive):
    sample = write_study(positive, tmp_path / "plain")[:2]
    for variant in (*COMPRESSED, "enhanced-multiframe", "oblique"):
        sample.append(write_variant(positive, tmp_path / variant, variant)[0])
    extra = write_variant(positive, tmp_path / "loc", "localizer-and-second-series")
    sample += [p for p in extra if pydicom.dcmread(p, stop_before_pixels=True).SeriesNumber in (1, 3)][:2]
    for p in sample:
        res = subprocess.run(["dciodvfy", str(p)], capture_output=True, text=True)
        errors = [line for line in (res.stdout + res.stderr).splitlines() if "Error" in line]
        assert errors == [], f"{p}: {errors}"


def test_cli_writes_the_rsna_layout_csv_and_masks(tmp_path, capsys):
    out = tmp_path / "ds"
    rc = train_main(["phantom", "--out", str(out), "--studies", "4", "--seed", "3", "--rows", "64", "--cols", "64",
                     "--slices", "30", "--slice-thickness", "2.5", "--workers", "1", "--no-progress"])
    assert rc == 0
    summary = capsys.readouterr().out
    assert "phantom: 4 studies, 2 positive, 120 files" in summary
    with open(out / "train.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == CSV_COLUMNS
        rows = list(reader)
    files = sorted((out / "train").glob("*/*/*.dcm"))
    assert len(rows) == len(files) == 120
    assert {(r["StudyInstanceUID"], r["SeriesInstanceUID"], r["SOPInstanceUID"]) for r in rows} == {
        (p.parent.parent.name, p.parent.name, p.stem) for p in files}
    for study in {r["StudyInstanceUID"] for r in rows}:
        srows = [r for r in rows if r["StudyInstanceUID"] == study]
        labels = {k: int(srows[0][k]) for k in (*STUDY_LABELS, *QA_COLUMNS)}
        assert all({k: int(r[k]) for k in labels} == labels for r in srows)
        npz = np.load(out / "masks" / f"{study}.npz")
        assert [r["SOPInstanceUID"] for r in srows] == list(npz["sop_uids"])
        image = np.array([int(r["pe_present_on_image"]) for r in srows])
        assert np.array_equal(image, npz["mask"].any(axis=(1, 2)))
        assert consistency_violations(image.astype(bool), labels) == []
    # the plan names each written study: its seed gives the same UID and the same positive/negative call
    plan = dataset_plan(4, 3, PhantomConfig(rows=64, cols=64, n_slices=30, slice_thickness_mm=2.5))
    assert list(dict.fromkeys(r["StudyInstanceUID"] for r in rows)) == [phantom_study_uid(s) for s, _ in plan]
    for seed, kind in plan:
        uid = phantom_study_uid(seed)
        assert kind in ("positive", "negative", "indeterminate")
        assert (kind == "positive") == any(r["pe_present_on_image"] == "1" for r in rows if r["StudyInstanceUID"] == uid)
    again = tmp_path / "again"
    assert train_main(["phantom", "--out", str(again), "--studies", "4", "--seed", "3", "--rows", "64", "--cols", "64",
                       "--slices", "30", "--slice-thickness", "2.5", "--workers", "2", "--no-progress"]) == 0
    assert (again / "train.csv").read_text() == (out / "train.csv").read_text()


def test_csv_rows_have_exactly_the_rsna_columns(positive):
    rows = csv_rows(positive)
    assert len(rows) == positive.shape[0] and all(tuple(r) == CSV_COLUMNS for r in rows)
    assert [r["pe_present_on_image"] for r in rows] == list(positive.slice_labels)
    assert VARIANTS[:4] == tuple(COMPRESSED)
