"""preprocess: lung box, HU windows, 10-slice windows, window-to-slice map, labels, heatmap mapping."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from ct_factory import make_series, phantom_datasets, small_study
from dicom_node.imaging.preprocess import (
    PREPROCESSING_VERSION,
    PreprocessConfig,
    PreprocessError,
    Windows,
    center_crop,
    find_lung_box,
    heatmap_to_slices,
    prepare,
    preprocess,
)
from dicom_node.imaging.series import load_series
from dicom_node_phantoms.anatomy import Tissue
from dicom_node_phantoms.variants import write_variant

TINY = PreprocessConfig(resize=64, crop=56)


def _window(hu, level, width):
    return np.clip((hu - (level - width / 2)) / width, 0, 1)


@pytest.fixture(scope="module")
def chest():
    """A 40-slice 64 x 64 phantom (2.5 mm slices, ~5.5 mm pixels) and its loaded series."""
    study = small_study(seed=4, n_slices=40)
    return study, load_series(phantom_datasets(seed=4, n_slices=40))


def test_shapes_dtype_range_and_window_count(chest):
    _, series = chest
    windows = preprocess(series, TINY)
    g = windows.geometry
    n = math.ceil(g.box_slices / 10)
    assert windows.array.shape == (n, 3, 10, 56, 56)
    assert windows.array.dtype == np.float32
    assert windows.array.min() >= 0.0 and windows.array.max() <= 1.0
    assert windows.array.flags.c_contiguous
    assert g.n_windows == n and (g.crop, g.resize, g.crop_offset) == (56, 64, (4, 4))
    assert windows.config.version == PREPROCESSING_VERSION == "1"
    expected = tuple(int(np.floor((n - 1) * sp + 1e-6)) + 1 for n, sp in zip(series.shape, series.spacing_mm))
    assert g.resampled_shape == expected
    assert windows.labels is None


def test_default_sizes_are_224_then_192(chest):
    _, series = chest
    windows = preprocess(series)
    assert windows.array.shape[1:] == (3, 10, 192, 192)
    assert prepare(series).array.shape[1:] == (3, 10, 224, 224)


def test_lung_box_holds_the_lungs_and_little_else(chest):
    study, series = chest
    box, volume_ml = find_lung_box(series, TINY)
    lung_mask = study.tissue == Tissue.LUNG
    lungs = np.argwhere(lung_mask)
    spacing = series.spacing_mm
    true_ml = lung_mask.sum() * np.prod(spacing) / 1000
    assert volume_ml == pytest.approx(true_ml, rel=0.2)
    for axis in range(3):
        lo_mm, hi_mm = box[2 * axis], box[2 * axis + 1] - 1  # resampled voxels are 1 mm
        lung_lo, lung_hi = lungs[:, axis].min() * spacing[axis], lungs[:, axis].max() * spacing[axis]
        assert lo_mm <= lung_lo and hi_mm >= lung_hi
        assert lung_lo - lo_mm < 5 + 2 * 4 + spacing[axis] and hi_mm - lung_hi < 5 + 2 * 4 + spacing[axis]


def test_every_voxel_is_the_windowed_trilinear_sample_of_the_original(chest):
    """Model voxel (w, s, r, c) = HU windows of the original volume sampled trilinearly at
    Geometry.model_to_original(w, s, r, c): checks values and geometry together."""
    study, series = chest
    windows = preprocess(series, TINY)
    g = windows.geometry
    rng = np.random.default_rng(0)
    n = 2000
    w = rng.integers(0, g.n_windows - 1, n)  # the last window may hold padding
    s, r, c = rng.integers(0, 10, n), rng.integers(0, 56, n), rng.integers(0, 56, n)
    z, y, x = g.model_to_original(w, s, r, c)
    hu = ndimage.map_coordinates(study.hu.astype(np.float64), [z, y, x], order=1, mode="nearest")
    actual = windows.array[w, :, s, r, c]  # (n, 3)
    for ch, (level, width) in enumerate(TINY.hu_windows):
        np.testing.assert_allclose(actual[:, ch], _window(hu, level, width), atol=1e-4)
    # and the known tissues have their textbook window values (lung dark in the PE window, etc.)
    tissue = ndimage.map_coordinates(study.tissue, [z, y, x], order=0)
    lung = actual[tissue == Tissue.LUNG]
    assert lung[:, 1].mean() < 0.1 and 0.2 < lung[:, 0].mean() < 0.5


def test_window_to_slice_map_is_an_ordered_partition_of_the_box(chest):
    _, series = chest
    windows = preprocess(series, TINY)
    g = windows.geometry
    flat = [i for idx in windows.slice_indices for i in idx]
    assert flat == list(range(flat[0], flat[-1] + 1))  # every box slice once, in order
    z_res = np.arange(series.shape[0]) * series.slice_spacing_mm / g.spacing_mm
    in_box = np.flatnonzero((z_res >= g.lung_box[0] - 0.5) & (z_res < g.lung_box[1] - 0.5))
    assert flat == in_box.tolist()
    for w, idx in enumerate(windows.slice_indices):
        assert windows.slice_uids[w] == tuple(series.sop_instance_uids[i] for i in idx)
        assert len(idx) in (3, 4, 5) or w == len(windows.slice_indices) - 1  # 10 mm window / 2.5 mm slices
        for i in idx:  # the slice centre lies within the window's 10 resampled slices
            s = z_res[i] - g.lung_box[0] - w * 10
            assert -0.5 <= s < 9.5


def test_window_labels_from_slice_labels(chest):
    _, series = chest
    labels = np.zeros(series.shape[0], dtype=int)
    windows = preprocess(series, TINY)
    target = windows.slice_indices[2][1]
    labels[target] = 1
    labelled = preprocess(series, TINY, slice_labels=labels)
    expected = np.zeros(windows.geometry.n_windows, dtype=int)
    expected[2] = 1
    np.testing.assert_array_equal(labelled.labels, expected)
    as_dict = {uid: int(v) for uid, v in zip(series.sop_instance_uids, labels)}
    np.testing.assert_array_equal(preprocess(series, TINY, slice_labels=as_dict).labels, expected)
    with pytest.raises(PreprocessError, match=r"3 slice labels; expected 40"):
        preprocess(series, TINY, slice_labels=[0, 1, 0])


def test_last_window_padding(chest):
    _, series = chest
    for pad in ("edge", "zero"):
        windows = prepare(series, PreprocessConfig(resize=32, crop=32, pad=pad))
        real = windows.geometry.box_slices - 10 * (windows.geometry.n_windows - 1)
        last = windows.array[-1]
        assert real < 10, "choose a series whose box is not a multiple of 10 slices"
        if pad == "edge":
            for k in range(real, 10):
                np.testing.assert_array_equal(last[:, k], last[:, real - 1])
        else:
            assert not last[:, real:].any()


def test_preprocess_is_prepare_then_centre_crop(chest):
    _, series = chest
    full = prepare(series, TINY)
    assert isinstance(full, Windows) and full.array.shape[-1] == 64 and full.geometry.crop_offset == (0, 0)
    cropped = center_crop(full, 56)
    np.testing.assert_array_equal(cropped.array, preprocess(series, TINY).array)
    np.testing.assert_array_equal(cropped.array, full.array[..., 4:60, 4:60])
    assert cropped.geometry.crop_offset == (4, 4) and cropped.slice_uids == full.slice_uids


def test_no_lungs_is_refused():
    study = small_study()
    soft = np.where(study.tissue == Tissue.AIR, -1000, 40).astype(np.int16)  # the body, all soft tissue
    series = load_series(make_series(soft, pixel_spacing=study.pixel_spacing_mm[0], slice_spacing=2.5))
    with pytest.raises(PreprocessError, match=rf"Series {series.series_instance_uid}: lung volume 0.0 mL .*expected at least 50 mL"):
        preprocess(series, TINY)


def test_config_round_trip_and_validation():
    cfg = PreprocessConfig(resize=64, crop=56)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"crop=300; expected 0 < crop <= resize"):
        PreprocessConfig(crop=300)
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        PreprocessConfig.from_dict({"colour": 1})


def _blob(shape, centre, sigma):
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    d2 = sum(((g - c) / s) ** 2 for g, c, s in zip(grids, centre, sigma))
    return np.exp(-0.5 * d2).astype(np.float32)


@pytest.mark.parametrize("s, r, c", [(4, 20, 30), (7, 40, 10)])
def test_heatmap_blob_lands_on_the_forward_mapped_voxel(chest, s, r, c):
    _, series = chest
    windows = preprocess(series, TINY)
    g = windows.geometry
    w = 3
    heat = _blob((10, 56, 56), (s, r, c), (1.0, 2.0, 2.0))
    maps = heatmap_to_slices(windows, w, heat)
    assert [z for z, _ in maps] == list(windows.slice_indices[w])
    stack = np.stack([m for _, m in maps])
    k, y, x = np.unravel_index(np.argmax(stack), stack.shape)
    z = maps[k][0]
    ez, ey, ex = g.model_to_original(w, s, r, c)
    assert abs(z - ez) <= 1.0 and abs(y - ey) <= 1.0 and abs(x - ex) <= 1.0
    assert all(m.shape == series.shape[1:] and m.dtype == np.float32 for _, m in maps)
    # forward and inverse maps agree
    bw, bs, br, bc = g.original_to_model(ez, ey, ex)
    assert (bw, float(bs), float(br), float(bc)) == pytest.approx((w, s, r, c))


def test_coarse_heatmap_is_upsampled_and_zero_outside_the_crop(chest):
    _, series = chest
    windows = preprocess(series, TINY)
    g = windows.geometry
    coarse = np.zeros((2, 6, 6), dtype=np.float32)
    coarse[1, 3, 2] = 1.0  # model-space centre: s = 1.5*5 - 0.5, r = 3.5*56/6 - 0.5, c = 2.5*56/6 - 0.5
    maps = heatmap_to_slices(windows, 1, coarse)
    stack = np.stack([m for _, m in maps])
    k, y, x = np.unravel_index(np.argmax(stack), stack.shape)
    ez, ey, ex = g.model_to_original(1, 7.0, 3.5 * 56 / 6 - 0.5, 2.5 * 56 / 6 - 0.5)
    assert abs(maps[k][0] - ez) <= 1.5 and abs(y - ey) <= 1.5 and abs(x - ex) <= 1.5
    ones = heatmap_to_slices(g, 1, np.ones((2, 6, 6)))
    m = ones[0][1]
    ys, xs = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
    _, y_lo, x_lo = g.model_to_original(1, 0, -0.5, -0.5)
    _, y_hi, x_hi = g.model_to_original(1, 0, 55.5, 55.5)
    assert ys[0] >= y_lo - 1e-6 and ys[-1] < y_hi and xs[0] >= x_lo - 1e-6 and xs[-1] < x_hi
    assert ys[0] - y_lo < 1 and y_hi - ys[-1] <= 1 and xs[0] - x_lo < 1 and x_hi - xs[-1] <= 1
    np.testing.assert_allclose(m[ys[0] : ys[-1] + 1, xs[0] : xs[-1] + 1], 1.0, atol=1e-6)
    with pytest.raises(ValueError, match=r"window 99; expected 0 <= window <"):
        heatmap_to_slices(g, 99, coarse)


def test_oblique_phantom_preprocesses(tmp_path):
    write_variant(small_study(seed=4, n_slices=40), tmp_path, "oblique")
    windows = preprocess(load_series(tmp_path), TINY)
    assert windows.array.shape[1:] == (3, 10, 56, 56) and windows.geometry.n_windows >= 5


def test_phantom_emboli_inside_the_box_and_labelled():
    study = small_study(seed=0, size=128, n_slices=80)
    assert study.slice_labels.any(), "seed 0 is a positive phantom"
    series = load_series(phantom_datasets(seed=0, size=128, n_slices=80))
    windows = preprocess(series, TINY, slice_labels=study.slice_labels)
    covered = {i for idx in windows.slice_indices for i in idx}
    assert set(np.flatnonzero(study.slice_labels)) <= covered
    for w, idx in enumerate(windows.slice_indices):
        assert windows.labels[w] == int(study.slice_labels[list(idx)].any())
    assert 0 < windows.labels.sum() < len(windows.labels)
