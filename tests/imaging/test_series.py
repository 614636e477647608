"""load_series: sorting, HU, every refusal, compressed and multi-frame inputs."""

from __future__ import annotations

import copy
import random
import subprocess
import sys

import numpy as np
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid

from ct_factory import make_enhanced, make_series, phantom_datasets, small_study
from dicom_node.imaging.series import CtSeries, SeriesError, group_series, load_series
from dicom_node_phantoms.variants import COMPRESSED, VARIANTS, write_variant

HU = small_study().hu  # (24, 64, 64) int16 phantom, 2.5 mm slices


def _write(datasets, root, names=None):
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(datasets):
        p = root / (names[i] if names else f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def test_sorted_by_normal_not_file_name_or_instance_number(tmp_path):
    study = small_study()
    datasets = phantom_datasets()
    rng = random.Random(3)
    shuffled = datasets[:]
    rng.shuffle(shuffled)
    for i, ds in enumerate(shuffled):  # instance numbers and file names deliberately misleading
        ds.InstanceNumber = i + 1
    names = [f"{i:03d}.dcm" for i in range(len(shuffled))]
    _write(shuffled, tmp_path / "s", names)
    (tmp_path / "s" / "README.txt").write_text("not dicom")
    series = load_series(tmp_path / "s")
    assert isinstance(series, CtSeries)
    assert series.sop_instance_uids == study.sop_uids
    assert np.all(np.diff(series.positions_mm) > 0)
    np.testing.assert_array_equal(series.hu, study.hu.astype(np.float32))
    assert series.hu.dtype == np.float32
    assert series.slice_spacing_mm == pytest.approx(2.5)
    assert series.pixel_spacing_mm == pytest.approx(study.pixel_spacing_mm)
    assert "PixelData" not in series.ref_dataset
    assert series.ref_dataset.PatientID == study.patient_id


def test_reversed_positions_sort_ascending():
    hu = HU
    datasets = make_series(hu, slice_spacing=-2.5)  # scanner moving feet-first: positions decrease
    series = load_series(datasets)
    np.testing.assert_array_equal(series.hu, hu[::-1].astype(np.float32))
    assert series.slice_spacing_mm == pytest.approx(2.5)


def test_hu_from_slope_and_intercept_per_slice():
    hu = (HU // 2) * 2
    datasets = make_series(hu, slope=2.0, intercept=-2048.0)
    datasets[3].RescaleSlope, datasets[3].RescaleIntercept = 1.0, -1024.0  # one slice stored differently
    datasets[3].PixelData = (hu[3].astype(np.int32) + 1024).astype(np.uint16).tobytes()
    series = load_series(datasets)
    np.testing.assert_array_equal(series.hu, hu.astype(np.float32))


def test_oblique_series_positions_along_true_normal():
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    orientation = (1.0, 0.0, 0.0, 0.0, c, s)  # gantry tilt of 20 degrees about the x axis
    datasets = make_series(HU, orientation=orientation, slice_spacing=1.5)
    random.Random(1).shuffle(datasets)
    series = load_series(datasets)
    assert series.slice_spacing_mm == pytest.approx(1.5)
    np.testing.assert_allclose(np.diff(series.positions_mm), 1.5, atol=1e-6)
    np.testing.assert_allclose(series.normal, [0.0, -s, c], atol=1e-9)


def test_two_instances_at_one_position_refused():
    datasets = phantom_datasets()
    other = copy.deepcopy(datasets[5])
    other.SOPInstanceUID = generate_uid()
    with pytest.raises(SeriesError, match=r"two different instances at position .* expected one slice per position"):
        load_series(datasets + [other])


def test_too_few_slices():
    datasets = phantom_datasets()[:5]
    with pytest.raises(SeriesError, match=r"5 slices; expected at least 20"):
        load_series(datasets)
    assert load_series(datasets, min_slices=5).shape == (5, 64, 64)


def test_non_ct_modality_refused():
    datasets = phantom_datasets()
    datasets[3].Modality = "MR"
    with pytest.raises(SeriesError, match=r"Modality 'MR'; expected 'CT'"):
        load_series(datasets)


def test_non_ct_sop_class_refused():
    datasets = phantom_datasets()
    datasets[0].SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
    with pytest.raises(SeriesError, match=r"SOP Class 1.2.840.10008.5.1.4.1.1.7; expected CT Image Storage"):
        load_series(datasets)


def test_missing_pixel_data_refused():
    datasets = phantom_datasets()
    del datasets[7].PixelData
    with pytest.raises(SeriesError, match=rf"{datasets[7].SOPInstanceUID} has no PixelData"):
        load_series(datasets)


def test_two_frames_of_reference_refused():
    datasets = phantom_datasets()
    datasets[4].FrameOfReferenceUID = generate_uid()
    with pytest.raises(SeriesError, match=r"2 frames of reference .* expected exactly one FrameOfReferenceUID"):
        load_series(datasets)


def test_mixed_orientation_refused():
    datasets = phantom_datasets()
    datasets[6].ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    with pytest.raises(SeriesError, match=r"mixed orientation.*expected one orientation"):
        load_series(datasets)


def test_mixed_pixel_spacing_and_size_refused():
    datasets = phantom_datasets()
    datasets[2].PixelSpacing = [0.7, 0.7]
    with pytest.raises(SeriesError, match=r"mixed pixel spacing.*\[0.7, 0.7\] mm.*expected one PixelSpacing"):
        load_series(datasets)
    datasets = phantom_datasets()
    datasets[2].Rows = 8
    with pytest.raises(SeriesError, match=r"mixed image size.*8x64.*expected one Rows x Columns"):
        load_series(datasets)


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_phantom_variant_loads_or_is_refused(tmp_path, variant):
    study = small_study()
    write_variant(study, tmp_path, variant)
    if variant == "missing-slice":
        with pytest.raises(SeriesError, match=rf"Series {study.series_uid}: slice spacing varies \(2.50-5.00 mm.*"
                                              r"gap of 5.00 mm between .*expected regular spacing"):
            load_series(tmp_path)
        return
    if variant == "localizer-and-second-series":
        with pytest.raises(SeriesError, match=r"3 series found .*TOPOGRAM.*pass series_uid= to choose") as err:
            load_series(tmp_path)
        assert study.series_uid in str(err.value)
        groups = group_series(tmp_path)
        assert sorted(len(v) for v in groups.values()) == [1, 12, 24]
        with pytest.raises(SeriesError, match=r"Series 9.9.9: not among the series found"):
            load_series(tmp_path, series_uid="9.9.9")
        series = load_series(tmp_path, series_uid=study.series_uid)
    else:
        series = load_series(tmp_path)
    np.testing.assert_array_equal(series.hu, study.hu.astype(np.float32))  # lossless variants, same voxels
    assert series.duplicates_removed == (1 if variant == "duplicate-instance" else 0)
    np.testing.assert_allclose(np.diff(series.positions_mm), study.spacing_between_slices_mm, atol=1e-3)
    if variant == "enhanced-multiframe":
        assert sorted(series.frame_numbers) == list(range(1, 25))
    elif variant not in COMPRESSED:  # pydicom's compress() gives the compressed copies new UIDs
        assert series.series_instance_uid == study.series_uid
        assert series.sop_instance_uids == study.sop_uids
    if variant == "oblique":
        assert abs(series.normal[2]) < 0.999  # tilted: the normal is not the patient z axis


@pytest.mark.parametrize("per_frame_orientation", [False, True])
def test_enhanced_ct_multiframe_loads(tmp_path, per_frame_orientation):
    hu = HU
    datasets = make_series(hu, slice_spacing=1.25)
    order = list(range(24))
    random.Random(5).shuffle(order)
    enhanced = make_enhanced(datasets, frame_order=order, per_frame_orientation=per_frame_orientation)
    _write([enhanced], tmp_path)
    series = load_series(tmp_path)
    np.testing.assert_array_equal(series.hu, hu.astype(np.float32))
    assert set(series.sop_instance_uids) == {enhanced.SOPInstanceUID}
    assert sorted(series.frame_numbers) == list(range(1, 25))
    assert series.frame_numbers[0] == order.index(0) + 1
    assert series.slice_spacing_mm == pytest.approx(1.25)


def test_compressed_rle_decodes(tmp_path):
    datasets = phantom_datasets()
    for ds in datasets:
        ds.compress(RLELossless)  # pydicom's own encoder (the phantom variant goes through dcmtk when needed)
    _write(datasets, tmp_path)
    series = load_series(tmp_path)
    np.testing.assert_array_equal(series.hu, HU.astype(np.float32))


def test_undecodable_pixel_data_names_transfer_syntax():
    datasets = phantom_datasets()
    bad = datasets[0]
    bad.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no plugin decodes it
    bad.PixelData = encapsulate([b"\x00" * 64])
    with pytest.raises(SeriesError, match=r"cannot decode pixel data .*1.2.840.10008.1.2.4.100.*install"):
        load_series(datasets)


def test_no_dicom_at_all(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SeriesError, match=r"no DICOM instances found"):
        load_series(tmp_path)


def test_node_modules_never_import_torch():
    code = "import dicom_node.imaging.preprocess, dicom_node.imaging.series, sys; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
