"""Phase-1 R3D-18 and phase-2 sequence models, and the numpy fixed-length sequence mapping."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from dicom_node.model.sequence import SEQUENCE_LENGTH, from_fixed_length, to_fixed_length
from dicom_node_training.models import (
    PretrainedWeightsError,
    cam,
    fold_weight_norm,
    neighbour_differences,
    r3d_18,
    sequence_model,
    window_heatmap,
)

BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_r3d_18_spec(num_classes: int = 400) -> dict[str, tuple[int, ...]]:
    """state_dict keys and shapes of torchvision.models.video.r3d_18, written from the architecture spec.

    Stem Conv3d(3,64,(3,7,7)) + BN; layers [2,2,2,2] of BasicBlock with conv1 = (Conv3DSimple, BN, ReLU),
    conv2 = (Conv3DSimple, BN); downsample = (1x1x1 conv, BN) in the first block of layers 2-4; fc.
    """
    spec: dict[str, tuple[int, ...]] = {"stem.0.weight": (64, 3, 3, 7, 7)}
    spec.update({f"stem.1.{p}": (64,) for p in BN})
    inplanes = 64
    for layer, planes in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            pre = f"layer{layer}.{block}"
            cin = inplanes if block == 0 else planes
            spec[f"{pre}.conv1.0.weight"] = (planes, cin, 3, 3, 3)
            spec.update({f"{pre}.conv1.1.{p}": (planes,) for p in BN})
            spec[f"{pre}.conv2.0.weight"] = (planes, planes, 3, 3, 3)
            spec.update({f"{pre}.conv2.1.{p}": (planes,) for p in BN})
            if block == 0 and layer > 1:
                spec[f"{pre}.downsample.0.weight"] = (planes, inplanes, 1, 1, 1)
                spec.update({f"{pre}.downsample.1.{p}": (planes,) for p in BN})
        inplanes = planes
    spec["fc.weight"] = (num_classes, 512)
    spec["fc.bias"] = (num_classes,)
    for k in spec:
        if k.endswith("num_batches_tracked"):
            spec[k] = ()
    return spec


def quiet_r3d(**kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return r3d_18(**kwargs)


def test_parameter_names_and_shapes_equal_torchvision_r3d_18():
    model = quiet_r3d(width=64)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = torchvision_r3d_18_spec(num_classes=1)
    assert list(got) == list(expected)
    assert got == expected
    # torchvision's r3d_18 has 33,371,472 parameters with its 400-class head
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params - (1 * 512 + 1) + (400 * 512 + 400) == 33_371_472


def test_random_init_warns():
    with pytest.warns(UserWarning, match="no pretrained weights given, using random initialisation"):
        r3d_18(width=8)


def test_stage1_shapes_at_paper_size():
    model = quiet_r3d(width=64).eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, 10, 192, 192))
    assert out.logit.shape == (1,)
    assert out.features.shape == (1, 512)
    assert out.activations.shape == (1, 512, 2, 12, 12)


@pytest.mark.parametrize("size", [56, 64])
def test_stage1_shapes_tiny(size):
    model = quiet_r3d(width=16).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 10, size, size))
    assert out.logit.shape == (3,)
    assert out.features.shape == (3, 128)
    side = -(-size // 16)  # stem stride 2 then three stride-2 layers, each ceil
    assert out.activations.shape == (3, 128, 2, side, side)
    torch.testing.assert_close(out.features, out.activations.mean(dim=(2, 3, 4)))
    torch.testing.assert_close(out.logit, out.features @ model.fc.weight[0] + model.fc.bias[0])


def test_cam_equals_autograd_grad_cam():
    torch.manual_seed(0)
    model = quiet_r3d(width=8).eval()
    with torch.no_grad():
        model.fc.weight.normal_()
    x = torch.rand(2, 3, 10, 32, 32)
    out = model(x)
    out.activations.retain_grad()
    out.logit.sum().backward()
    a, g = out.activations.detach(), out.activations.grad
    grad_cam = torch.relu((g.mean(dim=(2, 3, 4), keepdim=True) * a).sum(dim=1))
    heat = window_heatmap(model, x).detach()
    assert heat.shape == (2, *a.shape[2:])
    assert heat.max() > 0
    torch.testing.assert_close(heat / a[0, 0].numel(), grad_cam, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(cam(a, model.fc.weight), heat)


def test_pretrained_loads_all_but_fc(tmp_path):
    torch.manual_seed(1)
    source = quiet_r3d(width=16, num_outputs=400)  # a "Kinetics" checkpoint with a 400-class head
    path = tmp_path / "k400.pth"
    torch.save({"module." + k: v for k, v in source.state_dict().items()}, path)  # DDP-style prefix too
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no random-init warning when pretrained is given
        model = r3d_18(width=16, pretrained=path)
    for k, v in model.state_dict().items():
        if k.startswith("fc."):
            assert v.shape[0] == 1
        else:
            torch.testing.assert_close(v, source.state_dict()[k], msg=k)


def test_pretrained_mismatch_names_the_keys(tmp_path):
    path = tmp_path / "narrow.pth"
    torch.save(quiet_r3d(width=8).state_dict(), path)
    with pytest.raises(PretrainedWeightsError, match=r"shape mismatch \[layer1\.0\.conv1\.0\.weight: file \(8, 8, 3, 3, 3\) vs model \(16, 16, 3, 3, 3\)"):
        r3d_18(width=16, pretrained=path)
    state = quiet_r3d(width=16).state_dict()
    del state["layer4.1.conv2.1.running_var"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(PretrainedWeightsError, match=r"missing \[layer4\.1\.conv2\.1\.running_var\]; unexpected \[extra\.weight\]"):
        r3d_18(width=16, pretrained=path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        r3d_18(width=16, pretrained=tmp_path / "absent.pth")


# ---------------------------------------------------------------- phase 2


def test_neighbour_differences_by_hand():
    x = torch.tensor([[[1.0], [2.0], [4.0], [9.0]]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    out = neighbour_differences(x, mask)[0]
    expected = torch.tensor([[1.0, 0.0, 1.0], [2.0, -1.0, 2.0], [4.0, -2.0, 0.0], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(out, expected)


def _sequence_batch(in_features=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, SEQUENCE_LENGTH, in_features, generator=g)
    mask = torch.ones(3, SEQUENCE_LENGTH)
    mask[1, 25:] = 0
    mask[2, 3:] = 0
    x = x * mask.unsqueeze(-1)
    return x, mask


@pytest.mark.parametrize("kind", ["tcn", "gru"])
def test_stage2_shapes_attention_and_mask(kind):
    torch.manual_seed(0)
    model = sequence_model(kind=kind, in_features=24, hidden=16).eval()
    x, mask = _sequence_batch()
    out = model(x, mask)
    assert out.window_logits.shape == (3, SEQUENCE_LENGTH)
    assert out.study_logits.shape == (3, 9)
    assert out.attention.shape == (3, 9, SEQUENCE_LENGTH)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(3, 9))
    assert torch.all(out.attention[1, :, 25:] == 0) and torch.all(out.attention[2, :, 3:] == 0)
    assert torch.all(out.attention[1, :, :25] > 0)
    # whatever sits in the padded steps does not change any output on valid steps
    garbage = x + 100.0 * (1 - mask).unsqueeze(-1) * torch.randn_like(x)
    out2 = model(garbage, mask)
    torch.testing.assert_close(out2.window_logits * mask, out.window_logits * mask)
    torch.testing.assert_close(out2.study_logits, out.study_logits)


def test_stage2_paper_size_and_bool_mask():
    model = sequence_model().eval()
    assert model.encoder.blocks[0].conv1.weight.shape == (128, 1536, 3)
    x, mask = _sequence_batch(in_features=512)
    out_f = model(x, mask)
    out_b = model(x, mask.bool())
    torch.testing.assert_close(out_f.study_logits, out_b.study_logits)
    assert out_f.study_logits.shape == (3, 9)


def test_tcn_causal_option_ignores_the_future_and_same_padding_does_not():
    torch.manual_seed(0)
    x, mask = _sequence_batch()
    x2 = x.clone()
    x2[0, 30:] += 5.0
    causal = sequence_model(in_features=24, hidden=16, causal=True).eval()
    same = sequence_model(in_features=24, hidden=16, causal=False).eval()
    torch.testing.assert_close(causal(x2, mask).window_logits[0, :29], causal(x, mask).window_logits[0, :29])
    # non-causal receptive field of 2 levels (dilation 1, 2; kernel 3) reaches 6 steps back
    assert not torch.allclose(same(x2, mask).window_logits[0, 24:30], same(x, mask).window_logits[0, 24:30])


def test_fold_weight_norm_keeps_outputs():
    torch.manual_seed(0)
    model = sequence_model(in_features=24, hidden=16).eval()
    x, mask = _sequence_batch()
    before = model(x, mask)
    fold_weight_norm(model)
    assert not any("parametrizations" in k for k in model.state_dict())
    after = model(x, mask)
    torch.testing.assert_close(after.window_logits, before.window_logits)
    torch.testing.assert_close(after.study_logits, before.study_logits)


def test_stage2_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be 'tcn' or 'gru', got 'lstm'"):
        sequence_model(kind="lstm")


# ---------------------------------------------------------------- fixed-length mapping (numpy)


@pytest.mark.parametrize("n", [1, 7, 40])
def test_short_sequences_are_zero_padded_and_round_trip(n):
    rng = np.random.default_rng(n)
    f = rng.normal(size=(n, 5)).astype(np.float32)
    x, mask, positions = to_fixed_length(f)
    assert x.shape == (40, 5) and x.dtype == np.float32 and mask.shape == (40,)
    np.testing.assert_array_equal(x[:n], f)
    assert not x[n:].any()
    np.testing.assert_array_equal(mask, (np.arange(40) < n).astype(np.float32))
    np.testing.assert_array_equal(positions[:n], np.arange(n))
    assert np.isnan(positions[n:]).all()
    v = rng.normal(size=n)
    np.testing.assert_array_equal(from_fixed_length(to_fixed_length(v).x, n), v.astype(np.float32))


@pytest.mark.parametrize("n", [41, 97, 300])
def test_long_sequences_are_resized_and_invert_linear_data_exactly(n):
    idx = np.arange(n, dtype=np.float64)
    f = np.stack([idx, 3.0 - 0.5 * idx], axis=1)
    x, mask, positions = to_fixed_length(f)
    assert mask.sum() == 40
    np.testing.assert_allclose(positions, np.linspace(0, n - 1, 40))
    np.testing.assert_allclose(x[:, 0], positions, rtol=1e-5)
    np.testing.assert_allclose(x[[0, -1]], f[[0, -1]], rtol=1e-6)
    np.testing.assert_allclose(from_fixed_length(x[:, 1], n), f[:, 1], rtol=1e-5, atol=1e-4)
    # a smooth non-linear signal comes back closely
    s = np.sin(idx / n * 3.0)
    back = from_fixed_length(to_fixed_length(s).x, n)
    assert np.abs(back - s).max() < 0.01


def test_binary_labels_become_soft_when_resized():
    y = np.zeros(80)
    y[10:20] = 1
    x, _, _ = to_fixed_length(y)
    assert x.shape == (40,) and 0 <= x.min() and x.max() <= 1
    assert abs(x.mean() - y.mean()) < 0.05


def test_fixed_length_rejects_empty_and_bad_shapes():
    with pytest.raises(ValueError, match=r"no windows \(N=0\)"):
        to_fixed_length(np.zeros((0, 4)))
    with pytest.raises(ValueError, match=r"expected \(N, F\) features or \(N,\) values, got shape \(2, 2, 2\)"):
        to_fixed_length(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="n must be >= 1"):
        from_fixed_length(np.zeros(40), 0)
