"""CamGrid: a coarse heatmap's cells land where the network's receptive fields are centred, through
the real preprocessing of a phantom; mask pooling puts a voxel into the cell that stands for it."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_node.imaging.cam_grid import CamGrid
from dicom_node.imaging.preprocess import PreprocessConfig, heatmap_to_slices, mask_to_windows, prepare, preprocess
from dicom_node.imaging.series import load_series
from dicom_node.model.bundle import R3D18_HEATMAP_GRID
from dicom_node.tools.demo import DEMO_PHANTOM
from dicom_node_phantoms import PhantomConfig, generate_study, study_datasets

#: the demo bundle's preprocessing: 2.5 mm, 96 px box, 80 px crop, 10-slice windows -> a 2 x 5 x 5 CAM
DEMO_PREPROCESS = PreprocessConfig(spacing_mm=2.5, resize=96, crop=80)
CELLS = (2, 5, 5)


@pytest.fixture(scope="module")
def demo_case():
    study = generate_study(20261125, PhantomConfig(**DEMO_PHANTOM), kind="positive")
    series = load_series(study_datasets(study))
    return study, series, preprocess(series, DEMO_PREPROCESS)


def _hottest(mapped: list[tuple[int, np.ndarray]]) -> tuple[int, int, int]:
    z, plane = max(mapped, key=lambda zm: float(zm[1].max()))
    y, x = np.unravel_index(int(np.argmax(plane)), plane.shape)
    return int(z), int(y), int(x)


@pytest.mark.parametrize("cell", [(1, 2, 3), (0, 1, 1), (1, 3, 2)])
def test_a_cam_hot_in_one_cell_maps_back_onto_the_source_voxel_under_that_cells_receptive_field_centre(demo_case, cell):
    _, series, windows = demo_case
    w = windows.geometry.n_windows // 2
    cam = np.zeros(CELLS, np.float32)
    cam[cell] = 1.0
    # the receptive-field centre of the cell in model space (window slice, crop row, crop col) ...
    s, r, c = (R3D18_HEATMAP_GRID.centres(a, n)[j] for a, (n, j) in enumerate(zip(CELLS, cell)))
    # ... and in the original series, through the real geometry of this phantom
    z0, y0, x0 = (float(v) for v in windows.geometry.model_to_original(w, s, r, c))
    z, y, x = _hottest(heatmap_to_slices(windows, w, cam, R3D18_HEATMAP_GRID))
    assert abs(z - z0) <= 1 and abs(y - y0) <= 1 and abs(x - x0) <= 1, (
        f"cell {cell}: hottest point {(z, y, x)}, receptive-field centre at {(round(z0, 1), round(y0, 1), round(x0, 1))}")
    # the image-resize (half-pixel) convention puts the same cell half a cell off: 7.5 crop px in-plane
    zh, yh, xh = _hottest(heatmap_to_slices(windows, w, cam))
    assert max(abs(yh - y0), abs(xh - x0)) > 4


def test_the_grid_of_a_bundle_without_one_is_r3d18s_and_half_pixel_reproduces_the_resize_rule():
    assert R3D18_HEATMAP_GRID.centres(1, 5).tolist() == [0.0, 16.0, 32.0, 48.0, 64.0]
    assert R3D18_HEATMAP_GRID.centres(0, 2).tolist() == [0.0, 8.0]
    hp = CamGrid.half_pixel((10, 80, 80), CELLS)
    assert hp.centres(1, 5).tolist() == [7.5, 23.5, 39.5, 55.5, 71.5]
    # linear between centres, constant beyond the ends
    up = R3D18_HEATMAP_GRID.upsample(np.arange(50, dtype=np.float32).reshape(CELLS), (10, 80, 80))
    assert up[0, 0, 0] == 0.0 and up[0, 0, 8] == pytest.approx(0.5) and up[0, 0, 79] == 4.0
    assert up[9, 0, 0] == 25.0 and up[4, 0, 0] == pytest.approx(12.5)


def test_pooling_a_mask_marks_the_cell_whose_centre_is_nearest_each_voxel():
    grid = R3D18_HEATMAP_GRID
    mask = np.zeros((10, 80, 80), bool)
    mask[5, 40, 9] = True  # slice 5 in [4, 12) -> t cell 1; row 40 in [40, 56) -> h cell 3; col 9 in [8, 24) -> w cell 1
    pooled = grid.pool_mask(mask, CELLS)
    assert pooled.shape == CELLS and pooled.sum() == 1 and pooled[1, 3, 1]
    with pytest.raises(ValueError, match="stride"):
        CamGrid(stride=(0.0, 16.0, 16.0))


def test_an_embolus_mask_goes_through_the_image_preprocessing_onto_the_positive_windows(demo_case):
    study, series, _ = demo_case
    full = prepare(series, DEMO_PREPROCESS)
    model_mask = mask_to_windows(series, study.embolus_mask, full.geometry, DEMO_PREPROCESS)
    assert model_mask.shape == (full.geometry.n_windows, 10, 96, 96)
    hot_windows = set(np.flatnonzero(model_mask.reshape(len(model_mask), -1).any(axis=1)).tolist())
    covering = {w for w, idx in enumerate(full.slice_indices) if study.embolus_mask[list(idx)].any()}
    assert hot_windows == covering
    # the mask's centre of mass maps back to the embolus' (within one original voxel)
    w = max(hot_windows, key=lambda i: int(model_mask[i].sum()))
    s, r, c = (float(v.mean()) for v in np.nonzero(model_mask[w]))
    z, y, x = (float(v) for v in full.geometry.model_to_original(w, s, r, c))
    zz, yy, xx = np.nonzero(study.embolus_mask[list(full.slice_indices[w])])
    assert abs(y - yy.mean()) <= 1.5 and abs(x - xx.mean()) <= 1.5
