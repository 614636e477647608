"""Node side of the model bundle: load_bundle refusals, Predictor, the key-slice rule, and no torch in dicom_node."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bundle_factory import TINY_PREPROCESS, build_tiny_bundle, tiny_models
from dicom_node.imaging.preprocess import Geometry, PreprocessConfig, Windows, heatmap_to_slices
from dicom_node.labels import STUDY_LABELS, WINDOW_LABEL, consistency_violations
from dicom_node.log import configure_logging
from dicom_node.model.bundle import BundleError, load_bundle
from dicom_node.model.inference import InferenceError, Predictor
from dicom_node.results.key_slices import key_slice_of_window

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundle") / "tiny"
    build_tiny_bundle(out, fp16=True, thresholds={k: 0.5 for k in (WINDOW_LABEL, *STUDY_LABELS)})
    return out


@pytest.fixture()
def bundle_copy(tiny_bundle, tmp_path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(tiny_bundle, dst)
    return dst


def make_windows(n: int, config: PreprocessConfig = TINY_PREPROCESS, seed: int = 0, uid: str = "1.2.3.4") -> Windows:
    ws, size, crop = config.window_slices, config.resize, config.crop
    off = (size - crop) // 2
    geometry = Geometry(original_shape=(n * ws, size, size), original_spacing_mm=(1.0, 1.0, 1.0),
                        resampled_shape=(n * ws, size, size), lung_box=(0, n * ws, 0, size, 0, size),
                        resize=size, crop=crop, crop_offset=(off, off), window_slices=ws, spacing_mm=1.0, n_windows=n)
    indices = geometry.window_slice_indices()
    uids = tuple(tuple(f"{uid}.{z + 1}" for z in idx) for idx in indices)
    arr = np.random.default_rng(seed).random((n, 3, ws, crop, crop), dtype=np.float32)
    return Windows(array=arr, series_instance_uid=uid, slice_uids=uids, geometry=geometry, config=config,
                   slice_indices=indices)


# ------------------------------------------------------------------------------ load_bundle refusals


def test_load_bundle_accepts_the_export(tiny_bundle):
    b = load_bundle(tiny_bundle)
    assert b.manifest.name == "tiny-test"
    assert b.manifest.preprocessing == TINY_PREPROCESS
    assert b.manifest.heatmap_shape == (2, 2, 2)
    assert set(b.manifest.files) == {"stage1.onnx", "stage2.onnx", "stage1.fp16.onnx", "stage2.fp16.onnx", "MODEL_CARD.md"}


def test_load_bundle_refuses_a_changed_byte(bundle_copy):
    f = bundle_copy / "stage1.onnx"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"stage1\.onnx sha256 mismatch"):
        load_bundle(bundle_copy)


def test_load_bundle_refuses_a_missing_file(bundle_copy):
    (bundle_copy / "stage2.onnx").unlink()
    with pytest.raises(BundleError, match=r"stage2\.onnx is missing"):
        load_bundle(bundle_copy)


def _edit_manifest(path: Path, edit) -> None:
    m = path / "manifest.json"
    data = json.loads(m.read_text())
    edit(data)
    m.write_text(json.dumps(data))


def test_load_bundle_refuses_unknown_preprocessing_version(bundle_copy):
    _edit_manifest(bundle_copy, lambda d: d.update(preprocessing_version="99"))
    with pytest.raises(BundleError, match=r"manifest\.json: preprocessing_version '99' is unknown to this node"):
        load_bundle(bundle_copy)


def test_load_bundle_refuses_bad_schema(bundle_copy):
    _edit_manifest(bundle_copy, lambda d: d.pop("thresholds"))
    with pytest.raises(BundleError, match=r"manifest\.json: required key 'thresholds' is missing"):
        load_bundle(bundle_copy)
    _edit_manifest(bundle_copy, lambda d: d.update(thresholds={k: 0.5 for k in (WINDOW_LABEL, *STUDY_LABELS)},
                                                   sequence_length="40"))
    with pytest.raises(BundleError, match=r"key 'sequence_length' must be int, got str"):
        load_bundle(bundle_copy)


def test_load_bundle_refuses_opset_mismatch(bundle_copy):
    _edit_manifest(bundle_copy, lambda d: d.update(opset=18))
    with pytest.raises(BundleError, match=r"stage1\.onnx has opset 17 but manifest\.json says 18"):
        load_bundle(bundle_copy)


def test_load_bundle_refuses_a_directory_without_manifest(tmp_path):
    with pytest.raises(BundleError, match=r"manifest\.json is missing"):
        load_bundle(tmp_path)


# ------------------------------------------------------------------------------ Predictor


@pytest.mark.parametrize("n", [7, 53])
def test_predictor_returns_a_consistent_prediction(tiny_bundle, n):
    pred = Predictor(tiny_bundle, batch_size=4).predict(make_windows(n, seed=n))
    assert pred.execution_provider == "CPUExecutionProvider"
    assert pred.window_probs.shape == (n,) and np.all((pred.window_probs >= 0) & (pred.window_probs <= 1))
    assert set(pred.study_probs) == set(STUDY_LABELS)
    assert pred.attention.shape == (9, n)
    np.testing.assert_allclose(pred.attention.sum(axis=1), 1.0, atol=1e-5)
    assert pred.heatmaps.shape == (n, 2, 2, 2) and pred.heatmaps.min() >= 0
    assert pred.window_positive.shape == (n,) and pred.window_positive.dtype == bool
    assert consistency_violations(pred.window_positive, pred.labels) == []
    assert pred.thresholds[WINDOW_LABEL] == 0.5
    assert pred.model_uid == load_bundle(tiny_bundle).manifest.model_uid


def test_predictor_stage1_matches_torch(tiny_bundle):
    """Batched stage 1 in the Predictor gives the torch model's window logits and CAM maps."""
    import torch

    from dicom_node_training.models import cam

    m1, _ = tiny_models(0)
    w = make_windows(11, seed=3)
    pred = Predictor(tiny_bundle, batch_size=4).predict(w)
    with torch.no_grad():
        out = m1(torch.from_numpy(w.array))
        heat = cam(out.activations, m1.fc.weight[0]).numpy()
    np.testing.assert_allclose(pred.stage1_probs, torch.sigmoid(out.logit).numpy(), atol=1e-5)
    np.testing.assert_allclose(pred.heatmaps, heat, rtol=1e-4, atol=1e-4)


def test_predictor_batch_size_does_not_change_results(tiny_bundle):
    w = make_windows(9, seed=1)
    a = Predictor(tiny_bundle, batch_size=1).predict(w)
    b = Predictor(tiny_bundle, batch_size=8).predict(w)
    np.testing.assert_allclose(a.window_probs, b.window_probs, atol=1e-6)
    np.testing.assert_allclose(a.heatmaps, b.heatmaps, rtol=1e-5, atol=1e-6)


def test_predictor_fp16_graphs_run_close_to_fp32(tiny_bundle):
    w = make_windows(12, seed=2)
    a = Predictor(tiny_bundle, precision="fp32").predict(w)
    b = Predictor(tiny_bundle, precision="fp16").predict(w)
    np.testing.assert_allclose(a.window_probs, b.window_probs, atol=1e-2)
    np.testing.assert_allclose([a.study_probs[k] for k in STUDY_LABELS], [b.study_probs[k] for k in STUDY_LABELS], atol=1e-2)


def test_require_gpu_refuses_without_cuda(tiny_bundle):
    with pytest.raises(InferenceError, match=r"require_gpu is set but CUDAExecutionProvider is not available"):
        Predictor(tiny_bundle, require_gpu=True)


def test_no_available_provider_is_a_clear_error(tiny_bundle):
    with pytest.raises(InferenceError, match=r"none of the configured providers \['CUDAExecutionProvider'\] is available"):
        Predictor(tiny_bundle, providers=("CUDAExecutionProvider",))


def test_model_loaded_log_names_the_provider_that_runs(tiny_bundle):
    stream = io.StringIO()
    configure_logging(json=True, stream=stream)
    try:
        Predictor(tiny_bundle)
    finally:
        configure_logging()
    events = [json.loads(line) for line in stream.getvalue().splitlines() if line.startswith("{")]
    loaded = [e for e in events if e.get("event") == "model_loaded"]
    assert loaded and loaded[0]["provider"] == "CPUExecutionProvider"
    assert loaded[0]["model_name"] == "tiny-test"


def test_predictor_refuses_windows_with_other_preprocessing(tiny_bundle):
    w = make_windows(3, config=replace(TINY_PREPROCESS, resize=32, crop=28))
    with pytest.raises(InferenceError, match=r"preprocessing does not match bundle tiny-test 0\.0\.1: crop 28 \(windows\) vs 24 \(bundle\)"):
        Predictor(tiny_bundle).predict(w)


# ------------------------------------------------------------------------------ explain


def test_key_slice_rule_picks_a_source_slice_of_each_window_at_the_heatmaps_centre_of_mass(tiny_bundle):
    w = make_windows(5, seed=4)
    pred = Predictor(tiny_bundle).predict(w)
    for i in range(5):
        mapped = heatmap_to_slices(w, i, pred.heatmaps[i], pred.heatmap_grid)
        z, hm = key_slice_of_window(mapped)
        assert z in w.slice_indices[i]
        assert hm.shape == (28, 28) and hm.min() >= 0.0
    plane = np.ones((2, 2), np.float32)
    # one hot slice: that slice, wherever it is (not the first of the window)
    assert key_slice_of_window([(z, plane * (z == 17)) for z in range(10, 20)])[0] == 17
    # a flat profile (both temporal cells equally hot): the middle, not the first slice of a tie
    assert key_slice_of_window([(z, plane) for z in range(10, 20)])[0] == 14
    # the profile of one hot cell centred on the window's slice 8 (linear from slice 0, flat after 8)
    ramp = [(10 + s, plane * min(s, 8) / 8) for s in range(10)]
    assert key_slice_of_window(ramp)[0] == 10 + 6  # centre of mass 34.5 / 5.5 = 6.27
    # an empty heatmap: the middle slice
    assert key_slice_of_window([(z, plane * 0) for z in range(10, 20)])[0] == 14


# ------------------------------------------------------------------------------ no torch in the node


def test_node_modules_do_not_import_torch(tiny_bundle):
    code = (
        "import sys, numpy as np\n"
        "import dicom_node.model.bundle, dicom_node.model.inference, dicom_node.results.key_slices\n"
        f"p = dicom_node.model.inference.Predictor({str(tiny_bundle)!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok', p.execution_provider)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "ok CPUExecutionProvider" in r.stdout
