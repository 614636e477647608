"""Export: CAM-in-graph = autograd Grad-CAM, ONNX vs torch parity, `dicom-node-export bundle|verify`."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from bundle_factory import TINY_HIDDEN, TINY_PREPROCESS, TINY_WIDTH, tiny_models
from dicom_node.labels import STUDY_LABELS, WINDOW_LABEL
from dicom_node.model.bundle import BundleError, load_bundle
from dicom_node_export.cli import main
from dicom_node_export.onnx_export import (
    ExportError,
    Stage1Graph,
    check_parity_stage1,
    check_parity_stage2,
    export_stage1,
    export_stage2,
)

ALL = (WINDOW_LABEL, *STUDY_LABELS)


def autograd_gradcam(model, x: torch.Tensor) -> torch.Tensor:
    """Grad-CAM by the book: d logit / d A (last conv block), channel weights = spatial mean, ReLU(sum)."""
    acts = {}

    def hook(_module, _inp, out):
        out.retain_grad()
        acts["a"] = out

    handle = model.layer4.register_forward_hook(hook)
    try:
        x = x.clone().requires_grad_(True)
        out = model(x)
        out.logit.sum().backward()  # samples are independent in eval mode
    finally:
        handle.remove()
    a, g = acts["a"], acts["a"].grad
    weights = g.mean(dim=(2, 3, 4), keepdim=True)
    return torch.relu((weights * a).sum(dim=1)).detach()


def _minmax(v: np.ndarray) -> np.ndarray:
    v = v.astype(np.float64).ravel()
    return (v - v.min()) / (v.max() - v.min())


def test_onnx_heatmap_equals_autograd_gradcam(tmp_path):
    import onnxruntime as ort

    m1, _ = tiny_models(seed=1)
    path = tmp_path / "stage1.onnx"
    export_stage1(m1, path, window_slices=10, crop=64)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    x = rng.random((6, 3, 10, 64, 64), dtype=np.float32)
    heat = sess.run(["heatmap"], {"windows": x})[0]
    ref = autograd_gradcam(m1, torch.from_numpy(x)).numpy()
    assert heat.shape == ref.shape == (6, 2, 4, 4)
    compared = 0
    for i in range(len(x)):
        if ref[i].max() <= 0:  # Grad-CAM all zero (every weighted sum negative): CAM must be zero too
            assert heat[i].max() == pytest.approx(0.0, abs=1e-6)
            continue
        r = np.corrcoef(_minmax(heat[i]), _minmax(ref[i]))[0, 1]
        assert r >= 0.999, f"sample {i}: correlation {r}"
        compared += 1
    assert compared >= 4


def test_parity_batch_1_and_8_within_1e4(tmp_path):
    m1, m2 = tiny_models(seed=2)
    g1 = export_stage1(m1, tmp_path / "s1.onnx", window_slices=10, crop=24)
    g2 = export_stage2(m2, tmp_path / "s2.onnx", sequence_length=40, feature_dim=8 * TINY_WIDTH)
    p1 = check_parity_stage1(g1, tmp_path / "s1.onnx", window_slices=10, crop=24)
    p2 = check_parity_stage2(g2, tmp_path / "s2.onnx", sequence_length=40, feature_dim=8 * TINY_WIDTH)
    for p in (p1, p2):
        assert set(p.max_abs_diff) == {1, 8}
        assert p.worst_logit_diff <= 1e-4
    assert p1.max_abs_diff[8]["heatmap"] <= 1e-4 and p2.max_abs_diff[8]["attention"] <= 1e-5


def test_parity_check_fails_on_a_different_model(tmp_path):
    m1, _ = tiny_models(seed=3)
    export_stage1(m1, tmp_path / "s1.onnx", window_slices=10, crop=24)
    other, _ = tiny_models(seed=4)
    with pytest.raises(ExportError, match=r"s1\.onnx: onnxruntime differs from torch by .* on logits"):
        check_parity_stage1(Stage1Graph(other), tmp_path / "s1.onnx", window_slices=10, crop=24)


# ------------------------------------------------------------------------------ CLI on a run directory


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory laid out like dicom_node_training.fit makes it, with random-weight checkpoints."""
    from dicom_node_training.checkpoint import save_checkpoint
    from dicom_node_training.config import PRESETS, config_to_dict

    run = tmp_path_factory.mktemp("run")
    cfg = PRESETS["tiny"]
    cfg = replace(cfg, phase1=replace(cfg.phase1, width=TINY_WIDTH), phase2=replace(cfg.phase2, hidden=TINY_HIDDEN),
                  preprocess=TINY_PREPROCESS)
    m1, m2 = tiny_models(seed=5)
    for phase, model in (("phase1", m1), ("phase2", m2)):
        save_checkpoint(run / phase / "best.pt", {"phase": int(phase[-1]), "model": model.state_dict(),
                                                   "config": config_to_dict(cfg), "best": {"epoch": 0}})
    thresholds = {k: round(0.3 + 0.04 * i, 2) for i, k in enumerate(ALL)}
    (run / "report.json").write_text(json.dumps({
        "thresholds": thresholds,
        "test": {"auroc": {k: 0.5 + 0.01 * i for i, k in enumerate(ALL)} | {"indeterminate": None}, "n_studies": 4},
    }))
    (run / "split.json").write_text(json.dumps({"train": ["a"] * 12, "validation": ["b"] * 4, "test": ["c"] * 4, "seed": 0}))
    return run


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "b1"
    rc = main(["bundle", "--run", str(tiny_run), "--out", str(out), "--name", "pe-tiny", "--version", "1.2.3",
               "--data-description", "synthetic phantoms (dicom_node_phantoms.study)"])
    assert rc == 0
    return out


def test_bundle_from_run_then_verify(exported, tiny_run, capsys):
    m = load_bundle(exported).manifest
    report = json.loads((tiny_run / "report.json").read_text())
    assert m.name == "pe-tiny" and m.version == "1.2.3"
    assert m.thresholds == pytest.approx(report["thresholds"])
    assert m.metrics["test_auroc"][WINDOW_LABEL] == pytest.approx(0.5)
    assert "indeterminate" not in m.metrics["test_auroc"]  # null in the report: no figure rather than a fake one
    assert m.metrics["data"] == "synthetic phantoms (dicom_node_phantoms.study); 20 studies: 12 train / 4 validation / 4 test"
    assert m.preprocessing == TINY_PREPROCESS and m.sequence_length == 40 and m.feature_dim == 8 * TINY_WIDTH
    assert m.stage1.inputs[0].shape == ("batch", 3, 10, 24, 24)
    assert m.export_checks["stage1"]["worst_logit_diff"] <= 1e-4
    assert m.versions["torch"] == torch.__version__
    card = (exported / "MODEL_CARD.md").read_text()
    assert "not for diagnosis" in card and "must never be used on patients" in card
    assert "dicom-node-export bundle --run" in card
    capsys.readouterr()
    assert main(["verify", str(exported)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "stage2 ran on random input" in out


def test_every_export_gets_a_new_model_uid(exported, tiny_run, tmp_path):
    out = tmp_path / "b2"
    with pytest.warns(UserWarning, match="thresholds default to 0.5"):
        rc = main(["bundle", "--stage1", str(tiny_run / "phase1/best.pt"), "--stage2", str(tiny_run / "phase2/best.pt"),
                   "--out", str(out), "--name", "pe-tiny", "--version", "1.2.3"])
    assert rc == 0
    a, b = load_bundle(exported).manifest, load_bundle(out).manifest
    assert a.model_uid != b.model_uid
    assert b.thresholds == {k: 0.5 for k in ALL}  # no --report: defaults
    assert any("using 0.5" in w for w in b.export_checks["warnings"])


def test_bundle_refuses_a_non_empty_out(exported, tiny_run, capsys):
    rc = main(["bundle", "--run", str(tiny_run), "--out", str(exported), "--name", "x", "--version", "1"])
    assert rc == 1
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.fixture()
def broken(exported, tmp_path) -> Path:
    dst = tmp_path / "broken"
    shutil.copytree(exported, dst)
    return dst


def test_verify_fails_on_one_changed_byte(broken, capsys):
    f = broken / "stage1.onnx"
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    assert main(["verify", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "stage1.onnx sha256 mismatch" in err
    with pytest.raises(BundleError, match=r"stage1\.onnx sha256 mismatch"):
        load_bundle(broken)  # the node refuses the same bundle with the same check


def test_verify_fails_on_a_missing_file(broken, capsys):
    (broken / "MODEL_CARD.md").unlink()
    assert main(["verify", str(broken)]) == 1
    assert "MODEL_CARD.md is missing" in capsys.readouterr().err


def test_verify_fails_on_unknown_preprocessing_version(broken, capsys):
    mpath = broken / "manifest.json"
    data = json.loads(mpath.read_text())
    data["preprocessing_version"] = "0"
    mpath.write_text(json.dumps(data))
    assert main(["verify", str(broken)]) == 1
    assert "preprocessing_version '0' is unknown to this node" in capsys.readouterr().err


def test_verify_fails_when_graph_outputs_disagree_with_manifest(broken, capsys):
    mpath = broken / "manifest.json"
    data = json.loads(mpath.read_text())
    data["graphs"]["stage1"]["outputs"][2]["shape"] = ["batch", 2, 9, 9]
    mpath.write_text(json.dumps(data))
    assert main(["verify", str(broken)]) == 1
    assert "stage1.onnx output 'heatmap' has shape (2, 2, 2, 2)" in capsys.readouterr().err
