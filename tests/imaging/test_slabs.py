"""Shi et al. 2020 slabs: a fixed number of 5-slice slabs over the lung box, one HU channel, slab labels and
masks from each slab's central slice, and the slab <-> original slice maps the results use."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from ct_factory import phantom_datasets, small_study
from dicom_node.imaging.preprocess import (
    SHI2020_PREPROCESSING,
    PreprocessConfig,
    heatmap_to_slices,
    mask_to_windows,
    prepare,
    preprocess,
    slab_centre_slices,
)
from dicom_node.imaging.series import load_series

SLABS = PreprocessConfig(spacing_mm=2.5, hu_windows=((-262.0, 1524.0),), resize=48, crop=40, window_slices=5,
                         slabs=12, slab_stride=4)


@pytest.fixture(scope="module")
def chest():
    study = small_study(seed=5, n_slices=40)
    return study, load_series(phantom_datasets(seed=5, n_slices=40))


def test_every_study_gives_the_configured_number_of_one_channel_five_slice_slabs(chest):
    _, series = chest
    slabs = preprocess(series, SLABS)
    assert slabs.array.shape == (12, 1, 5, 40, 40)
    assert slabs.geometry.n_windows == 12 and slabs.geometry.z_resize == 48
    assert 0.0 <= slabs.array.min() and slabs.array.max() <= 1.0


def test_the_shi_hu_window_maps_minus_1024_to_0_and_500_to_1():
    level, width = SHI2020_PREPROCESSING.hu_windows[0]
    assert (level - width / 2, level + width / 2) == (-1024.0, 500.0)
    assert SHI2020_PREPROCESSING.slabs * SHI2020_PREPROCESSING.slab_stride == 200
    assert SHI2020_PREPROCESSING.channels == 1


def test_slab_k_is_the_five_resized_slices_around_resized_slice_4k_plus_2(chest):
    _, series = chest
    slabs = preprocess(series, SLABS)
    g = slabs.geometry
    z0, z1 = g.lung_box[:2]
    # resized slice u sits at resampled z0 + (u + 0.5) * (z1 - z0) / 48 - 0.5; original z = that * 2.5 / thickness
    k = 3
    for s in range(5):
        u = 4 * k + 2 + s - 2
        z_orig = (z0 + (u + 0.5) * (z1 - z0) / 48 - 0.5) * 2.5 / series.spacing_mm[0]
        assert g.model_to_original(k, s, 0, 0)[0] == pytest.approx(z_orig)
    # every pixel is the trilinear interpolation of the original HU at model_to_original, windowed
    rng = np.random.default_rng(0)
    for s, r, c in rng.integers(0, [5, 40, 40], size=(20, 3)):
        z, y, x = (float(v) for v in g.model_to_original(k, s, r, c))
        hu = ndimage.map_coordinates(series.hu.astype(np.float64), [[z], [y], [x]], order=1, mode="nearest")[0]
        assert slabs.array[k, 0, s, r, c] == pytest.approx(np.clip((hu + 1024) / 1524, 0, 1), abs=1e-4)


def test_slab_labels_and_masks_come_from_the_central_slice(chest):
    study, series = chest
    slabs = prepare(series, SLABS, slice_labels=study.slice_labels)
    centre = slab_centre_slices(slabs.geometry)
    assert np.array_equal(slabs.labels, study.slice_labels[centre])
    mask = mask_to_windows(series, study.embolus_mask, slabs.geometry, SLABS)
    assert mask.shape == (12, 5, 48, 48)
    if study.slice_labels.any():
        assert mask[slabs.labels.astype(bool), 2].any()


def test_each_original_slice_in_the_box_belongs_to_the_slab_with_the_nearest_centre(chest):
    _, series = chest
    g = prepare(series, SLABS).geometry
    idx = g.window_slice_indices()
    flat = [z for slab in idx for z in slab]
    assert flat == sorted(flat) and len(flat) == len(set(flat))
    for k, zs in enumerate(idx):
        for z in zs:
            slab, s = g.original_to_model(z, 0, 0)[:2]
            assert slab == k and -0.5 - 1e-9 <= s < 4


def test_a_slab_heatmap_lands_on_the_slices_of_that_slab(chest):
    _, series = chest
    slabs = preprocess(series, SLABS)
    k = 6
    planes = heatmap_to_slices(slabs, k, np.ones((1, 3, 3), np.float32))
    assert [z for z, _ in planes] == list(slabs.geometry.window_slice_indices()[k])
    assert all(p.max() == pytest.approx(1.0) for _, p in planes)


def test_tiling_windows_keep_their_old_dict_form():
    assert "slabs" not in PreprocessConfig().to_dict()
    assert PreprocessConfig.from_dict(SHI2020_PREPROCESSING.to_dict()) == SHI2020_PREPROCESSING
