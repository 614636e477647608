"""Attention-supervised phase 1 (Shi et al. 2020, eq. 3): the continuous Dice loss by hand, windows
without a mask left out, the cell grid against measured receptive fields, masks moved with the window."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicom_node.imaging.cam_grid import CamGrid
from dicom_node_training.data import WindowDataset, load_cache_index, write_cache_entry
from dicom_node_training.loss import attention_dice_loss
from dicom_node_training.models.r3d import r3d_18


def test_continuous_dice_loss_against_a_hand_computed_case():
    cam = torch.tensor([[[[0.0, 2.0], [1.0, 1.0]]]])  # (1, 1, 2, 2); normalised by its max 2 -> 0, 1, .5, .5
    mask = torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]])
    # dice = (2 * (1 + .5) + 1) / ((0 + 1 + .5 + .5) + 2 + 1) = 4 / 5
    loss = attention_dice_loss(cam, mask, torch.ones(1))
    assert loss.item() == pytest.approx(0.2)


def test_negative_windows_want_an_empty_map_and_windows_without_a_mask_count_for_nothing():
    empty = torch.zeros(1, 1, 2, 2)
    hot = torch.tensor([[[[0.0, 2.0], [0.0, 0.0]]]])
    assert attention_dice_loss(empty, empty, torch.ones(1)).item() == pytest.approx(0.0)
    assert attention_dice_loss(hot, empty, torch.ones(1)).item() == pytest.approx(1 - 1 / 2)  # (0 + 1) / (1 + 0 + 1)
    # a batch of a hand case (known mask) and a window whose mask is unknown: only the first counts
    cam = torch.cat([torch.tensor([[[[0.0, 2.0], [1.0, 1.0]]]]), hot]).requires_grad_(True)
    mask = torch.cat([torch.tensor([[[[0.0, 1.0], [1.0, 0.0]]]]), torch.ones(1, 1, 2, 2)])
    loss = attention_dice_loss(cam, mask, torch.tensor([1.0, 0.0]))
    assert loss.item() == pytest.approx(0.2)
    loss.backward()
    assert cam.grad is not None and cam.grad[1].abs().sum() == 0 and cam.grad[0].abs().sum() > 0
    # no window with a mask: zero, still differentiable
    assert attention_dice_loss(cam, mask, torch.zeros(2)).item() == 0.0
    with pytest.raises(ValueError, match="pool the mask"):
        attention_dice_loss(cam, mask[:, :, :1], torch.ones(2))


def test_a_cam_below_zero_everywhere_gets_no_gradient_which_is_why_negatives_are_left_out_by_default():
    """The failure that `phase1.attention_on_negatives = false` avoids: negative windows (empty masks) push the
    ReLU CAM below zero everywhere, and from there the loss cannot bring it back, even on an embolus window."""
    from dicom_node_training.config import load_config
    from dicom_node_training.models.r3d import cam

    torch.manual_seed(0)
    activations = torch.rand(1, 4, 1, 2, 2)
    weight = (-torch.ones(4)).requires_grad_(True)  # every cell's sum below zero: the ReLU map is all zero
    mask = torch.tensor([[[[0.0, 1.0], [0.0, 0.0]]]])
    loss = attention_dice_loss(cam(activations, weight), mask, torch.ones(1))
    loss.backward()
    assert loss.item() > 0.3 and weight.grad is not None and weight.grad.abs().sum() == 0
    # a weight with one positive channel: the map lives and the loss moves it
    alive = torch.tensor([1.0, 0.0, 0.0, 0.0]).requires_grad_(True)
    attention_dice_loss(cam(activations, alive), mask, torch.ones(1)).backward()
    assert alive.grad is not None and alive.grad.abs().sum() > 0
    assert load_config("tiny").phase1.attention_on_negatives is False


def _gradient_centre(model: torch.nn.Module, shape: tuple[int, ...], axis: int, cell: int) -> float:
    """Centroid along `axis` of |d layer4[cell] / d input|, the cell taken in the middle of the other axes."""
    torch.manual_seed(0)
    x = torch.rand(shape, requires_grad=True)
    a = model(x).activations
    idx = [n // 2 for n in a.shape[2:]]
    idx[axis] = cell
    a[0, :, idx[0], idx[1], idx[2]].sum().backward()
    g = x.grad.abs().sum(dim=(0, 1)).sum(dim=tuple(i for i in range(3) if i != axis)).numpy()
    return float((g * np.arange(g.size)).sum() / g.sum())


def test_r3d18_cell_grid_agrees_with_the_measured_receptive_field_centres_of_interior_cells():
    from dicom_node_training.models.r3d import cam_grid

    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="no pretrained weights"):
        model = r3d_18(width=4).eval()
    grid = cam_grid(model)
    assert grid == CamGrid(stride=(8.0, 16.0, 16.0), offset=(0.0, 0.0, 0.0))
    # interior cells only: border cells' receptive fields are cut by the padding, which pulls their centroid
    # inwards (12 cells along t, 10 in-plane: the middle two of each are far enough from both borders). A
    # random network's gradient centroid scatters by a pixel or two around the centre, so the offset is
    # averaged over both cells and must be within 2 voxels: the half-pixel rule's error is 3.5 slices / 7.5 px.
    for axis, shape, cells in ((0, (1, 3, 96, 16, 16), (5, 6)), (1, (1, 3, 8, 160, 160), (4, 5)),
                               (2, (1, 3, 8, 160, 160), (4, 5))):
        measured = [_gradient_centre(model, shape, axis, cell) for cell in cells]
        offsets = [m - grid.stride[axis] * c for m, c in zip(measured, cells)]
        assert abs(float(np.mean(offsets)) - grid.offset[axis]) <= 2.0, (axis, measured)
        assert abs((measured[1] - measured[0]) - grid.stride[axis]) <= 3.0, (axis, measured)


def test_a_window_mask_is_rotated_and_cropped_with_its_window_and_a_study_without_one_is_unknown(tmp_path):
    rng = np.random.default_rng(3)
    mask = np.zeros((2, 10, 32, 32), bool)
    mask[1, 2:6, 10:14, 18:24] = True
    windows = np.zeros((2, 3, 10, 32, 32), np.uint8)
    windows[:, 0] = mask * 255  # channel 0 carries the mask, so the window and its mask must move together
    windows[:, 1] = rng.integers(0, 255, (2, 10, 32, 32))
    (tmp_path / "cache").mkdir()
    stamp = {"test": True}
    write_cache_entry(tmp_path / "cache", "1.2.3", "1.2.3.4", windows, [0, 1], [0.0] * 9, stamp,
                      masks=(mask, np.array([True, True])))
    write_cache_entry(tmp_path / "cache", "1.2.5", "1.2.5.4", windows, [0, 1], [0.0] * 9, stamp)
    entries = load_cache_index(tmp_path)
    ds = WindowDataset(entries, 24, augment=True, seed=1, max_rotation_deg=15.0, masks=True)
    assert ds.studies_with_masks == 1
    for i, (uid, w) in enumerate(ds.index):
        x, _y, m, known = ds[i]
        assert m.shape == (10, 24, 24)
        if uid == "1.2.5":
            assert known.item() == 0.0 and m.sum() == 0
            continue
        assert known.item() == 1.0
        assert torch.equal(m > 0, x[0] > 0.25)  # the same rotation and crop, the same threshold
        assert (m.sum() > 0) == (w == 1)
