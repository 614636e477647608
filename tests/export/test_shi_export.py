"""Export of the Shi et al. 2020 family: a shi2020 bundle (family, one label, slab preprocessing, feature maps,
Conv-LSTM unrolled for 50 slabs) whose graphs match torch within 1e-4 at two batch sizes, whose attention map
is autograd Grad-CAM, that `dicom-node-export verify` and the node's loader accept; old manifests stay ma2022."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from bundle_factory import TINY_SHI_PREPROCESS, build_tiny_shi_bundle, tiny_shi_models
from dicom_node.labels import WINDOW_LABEL
from dicom_node.model.bundle import BundleError, default_bundle_path, load_bundle
from dicom_node_export.cli import main as export_main
from dicom_node_training.models.resnet2d import grad_cam


@pytest.fixture(scope="module")
def shi_bundle(tmp_path_factory):
    return build_tiny_shi_bundle(tmp_path_factory.mktemp("shi") / "bundle")


def test_a_shi_bundle_says_its_family_its_one_label_and_its_slab_preprocessing(shi_bundle):
    m = load_bundle(shi_bundle.path).manifest
    assert m.family == "shi2020" and m.labels == (WINDOW_LABEL,) and set(m.thresholds) == {WINDOW_LABEL}
    assert m.preprocessing == TINY_SHI_PREPROCESS and m.sequence_length == 50
    assert m.stage1.inputs[0].shape == ("batch", 1, 5, 32, 32)
    assert [t.shape for t in m.stage1.outputs] == [("batch", 64, 2, 2), ("batch",), ("batch", 1, 2, 2)]
    assert m.stage2.inputs[0].shape == ("batch", 50, 64, 2, 2) and m.stage2.outputs[0].name == "study_logit"
    assert (m.heatmap_grid.stride, m.heatmap_grid.offset) == ((5.0, 16.0, 16.0), (2.0, 0.0, 0.0))
    card = (shi_bundle.path / "MODEL_CARD.md").read_text()
    assert "Shi et al. 2020" in card and "negative_exam_for_pe" not in card and "no label-consistency rules" in card


def test_both_graphs_match_torch_within_1e_4_at_batch_sizes_1_and_8(shi_bundle):
    checks = load_bundle(shi_bundle.path).manifest.export_checks
    for stage in ("stage1", "stage2"):
        assert set(checks[stage]["max_abs_diff"]) == {"1", "8"}
        assert checks[stage]["worst_logit_diff"] <= 1e-4
    # and independently of the export's own check: stage 2 on a fresh batch of 3 studies
    _, m2 = tiny_shi_models()
    x = np.random.default_rng(5).random((3, 50, 64, 2, 2), dtype=np.float32)
    sess = ort.InferenceSession(str(shi_bundle.path / "stage2.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = m2(torch.from_numpy(x)).numpy()
    assert np.abs(sess.run(None, {"features": x})[0] - ref).max() <= 1e-4


def test_the_onnx_attention_map_is_autograd_grad_cam_of_the_slab_logit(shi_bundle):
    m1, _ = tiny_shi_models()
    x = np.random.default_rng(6).random((4, 1, 5, 32, 32), dtype=np.float32)
    sess = ort.InferenceSession(str(shi_bundle.path / "stage1.onnx"), providers=["CPUExecutionProvider"])
    heat = sess.run(["heatmap"], {"windows": x})[0]
    out = m1(torch.from_numpy(x))
    by_autograd = grad_cam(out, create_graph=False).detach().numpy() * (2 * 2)  # closed form drops 1/(h w)
    assert heat.max() > 0 and np.abs(heat - by_autograd).max() <= 1e-4


def test_verify_accepts_the_shi_bundle_and_runs_its_graphs(shi_bundle, capsys):
    assert export_main(["verify", str(shi_bundle.path)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "stage2 ran on random input: study_logit" in out


def test_a_manifest_without_family_is_ma2022_and_a_wrong_family_is_refused(shi_bundle, tmp_path):
    assert load_bundle(default_bundle_path()).manifest.family == "ma2022"
    data = json.loads((shi_bundle.path / "manifest.json").read_text())
    data["family"] = "shi2021"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="family 'shi2021' is unknown to this node"):
        load_bundle(tmp_path)
    data["family"] = "ma2022"  # a shi bundle relabelled: its labels and graphs do not fit
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="differ from what a ma2022 bundle predicts"):
        load_bundle(tmp_path)
