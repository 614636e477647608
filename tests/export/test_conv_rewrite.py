"""Export-time Conv3d -> Conv2d rewrite: same numbers in torch and in the exported ONNX graph."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from dicom_node_export.conv_rewrite import Conv3dAs2d, fold_batchnorm, rewrite_conv3d
from dicom_node_export.onnx_export import check_parity_stage1, export_stage1
from dicom_node_training.models import r3d_18

CONVS = {
    # name: (in, out, kernel, stride, padding, dilation, bias)
    "stem": (3, 8, (3, 7, 7), (1, 2, 2), (1, 3, 3), 1, False),
    "3x3x3": (4, 6, 3, 1, 1, 1, False),
    "3x3x3-stride2": (4, 6, 3, 2, 1, 1, True),
    "1x1x1-stride2 (kt=1)": (4, 6, 1, 2, 0, 1, False),
    "1x1x1 (kt=1)": (4, 6, 1, 1, 0, 1, True),
    "temporal-dilation": (4, 5, (3, 3, 3), (2, 1, 1), (2, 1, 1), (2, 1, 1), True),
}


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm3d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


@pytest.mark.parametrize("mode", ["gather", "concat", "sum"])
@pytest.mark.parametrize("name", list(CONVS))
def test_conv3d_as_2d_equals_conv3d(name, mode):
    cin, cout, k, s, p, d, bias = CONVS[name]
    torch.manual_seed(0)
    conv = nn.Conv3d(cin, cout, k, stride=s, padding=p, dilation=d, bias=bias).eval()
    x = torch.randn(2, cin, 10, 13, 12)  # odd sizes: stride-2 rounding in every axis
    with torch.no_grad():
        ref, got = conv(x), Conv3dAs2d(conv, mode)(x)
    assert got.shape == ref.shape
    assert torch.max(torch.abs(got - ref)).item() <= 1e-5


def test_conv3d_as_2d_refuses_grouped_conv():
    with pytest.raises(ValueError, match="groups=2 is not supported"):
        Conv3dAs2d(nn.Conv3d(4, 4, 3, groups=2))


def test_rewrite_r3d_same_outputs_and_original_untouched():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = r3d_18(width=8).eval()
    _randomise_bn(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rewritten = rewrite_conv3d(model)
    assert not any(isinstance(m, (nn.Conv3d, nn.BatchNorm3d)) for m in rewritten.modules())
    assert sum(isinstance(m, Conv3dAs2d) for m in rewritten.modules()) == 20  # stem + 16 block convs + 3 shortcuts
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert any(isinstance(m, nn.Conv3d) for m in model.modules())
    x = torch.rand(3, 3, 10, 40, 40)
    with torch.no_grad():
        ref, got = model(x), rewritten(x)
    assert torch.max(torch.abs(ref.logit - got.logit)).item() <= 1e-5
    for r, g in zip(ref, got):  # features / activations reach ~3 after 20 layers: 1e-5 relative to their scale
        assert torch.max(torch.abs(r - g)).item() <= 1e-5 * max(1.0, torch.max(torch.abs(r)).item())


def test_fold_batchnorm_keeps_outputs():
    torch.manual_seed(1)
    seq = nn.Sequential(nn.Conv3d(3, 5, 3, padding=1, bias=False), nn.BatchNorm3d(5), nn.ReLU()).eval()
    _randomise_bn(seq, seed=3)
    x = torch.randn(2, 3, 4, 6, 6)
    with torch.no_grad():
        ref = seq(x)
        folded = fold_batchnorm(seq)
        got = folded(x)
    assert isinstance(folded[1], nn.Identity) and folded[0].bias is not None
    assert torch.max(torch.abs(got - ref)).item() <= 1e-5


@pytest.mark.parametrize("rewrite", ["gather", "concat", None])
def test_exported_graph_matches_original_torch(tmp_path, rewrite):
    import onnx
    import onnxruntime as ort

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = r3d_18(width=8).eval()
    _randomise_bn(model, seed=5)
    nn.init.normal_(model.fc.weight, 0.0, 1.0)  # heatmap values of order 1, so 1e-4 is a real bound
    path = tmp_path / "s1.onnx"
    graph = export_stage1(model, path, window_slices=10, crop=24, conv_rewrite=rewrite)
    assert graph.model is model  # parity is checked against the original, not the rewritten copy
    g = onnx.load(str(path)).graph
    weights = {t.name: len(t.dims) for t in g.initializer}
    ranks = {weights[n.input[1]] for n in g.node if n.op_type == "Conv"}
    assert ranks == ({4} if rewrite else {5})
    result = check_parity_stage1(graph, path, window_slices=10, crop=24, batch_sizes=(1, 8))
    assert result.worst_logit_diff <= 1e-4
    x = np.random.default_rng(1).random((8, 3, 10, 24, 24), dtype=np.float32)
    feats, logit, heat = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"windows": x})
    with torch.no_grad():
        rf, rl, rh = (t.numpy() for t in graph(torch.from_numpy(x)))
    assert np.abs(rh).max() > 0.1
    assert np.max(np.abs(heat - rh)) <= 1e-4 * max(1.0, float(np.abs(rh).max()))
    assert np.max(np.abs(logit - rl)) <= 1e-4 and np.max(np.abs(feats - rf)) <= 1e-4
