"""The Shi et al. 2020 family end to end on tiny phantoms: `fit --preset shi-tiny` writes slab caches,
checkpoints and report.json in the Ma family's shape, the stage-II loss falls, and an interrupted run resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dicom_node.labels import WINDOW_LABEL
from dicom_node_phantoms import PhantomConfig, generate_dataset
from dicom_node_training.cli import main

FAST = "[shi1]\nepochs = 2\nbatch_size = 8\n[shi2]\nepochs = 6\nbatch_size = 4\nlr = 0.003\n"
ARGS = ["--preset", "shi-tiny", "--workers", "0", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("shi")
    data = generate_dataset(root / "data", 10, 5, PhantomConfig(rows=64, cols=64, n_slices=40, slice_thickness_mm=2.5),
                            workers=1, progress=False)
    (root / "fast.toml").write_text(FAST)
    run = root / "run"
    assert main(["fit", "--data", str(data), "--out", str(run), "--config", str(root / "fast.toml"), *ARGS]) == 0
    return root, data, run


def test_fit_shi_tiny_caches_fifty_slabs_a_study_and_writes_checkpoints_and_report(fitted):
    _, _, run = fitted
    split = json.loads((run / "split.json").read_text())
    uid = split["test"][0]
    cache = np.load(run / "cache" / f"{uid}.npy", mmap_mode="r")
    assert cache.shape == (50, 1, 5, 96, 96) and cache.dtype == np.uint8
    assert np.load(run / "features" / f"{uid}.npy").shape == (50, 128, 10, 10)  # 8 px cells (layer3 at stride 1)
    for phase in ("phase1", "phase2"):
        ck = torch.load(run / phase / "best.pt", weights_only=False)
        assert ck["family"] == "shi2020" and ck["config"]["family"] == "shi2020" and "optimizer" in ck
    ck1 = torch.load(run / "phase1" / "best.pt", weights_only=False)
    assert ck1["metrics"]["train_attention"] > 0  # the attention loss ran against the phantoms' masks
    assert "conv1.weight" in ck1["model"] and ck1["model"]["conv1.weight"].shape[1] == 5
    report = json.loads((run / "report.json").read_text())
    assert report["family"] == "shi2020" and set(report["thresholds"]) == {WINDOW_LABEL}
    for key in ("auroc", "auroc_ci", "auroc_ci_delong", "sensitivity", "specificity"):
        assert set(report["test"][key]) == {WINDOW_LABEL}
    assert "slab_auroc" in report["test"] and (run / "report.md").is_file() and (run / "roc_test.png").is_file()


def test_stage_two_training_loss_falls(fitted):
    _, _, run = fitted
    history = json.loads((run / "phase2" / "history.json").read_text())
    assert len(history) == 6 and history[-1]["train_loss"] < history[0]["train_loss"]


def test_an_interrupted_shi_run_resumes_from_its_last_epoch(fitted):
    root, data, run = fitted
    # a finished run is refused without --resume; with it, only the unfinished steps run
    assert main(["fit", "--data", str(data), "--out", str(run), *ARGS]) == 2
    (run / "phase2" / "done.json").unlink()
    (run / "report.json").unlink()
    before = json.loads((run / "phase2" / "history.json").read_text())
    assert main(["fit", "--data", str(data), "--out", str(run), "--resume", "--device", "cpu", "--no-progress"]) == 0
    after = json.loads((run / "phase2" / "history.json").read_text())
    assert after == before  # last.pt holds every epoch: nothing to redo, report written again
    assert (run / "report.json").is_file()


def test_the_shi_run_exports_to_a_bundle_that_verifies_and_runs_a_phantom(fitted, tmp_path):
    from dicom_node.imaging.preprocess import preprocess
    from dicom_node.imaging.series import load_series
    from dicom_node.model.inference import Predictor
    from dicom_node_export.cli import main as export_main
    from nodekit import phantom_series

    _, _, run = fitted
    out = tmp_path / "bundle"
    assert export_main(["bundle", "--run", str(run), "--out", str(out), "--name", "shi-tiny-test", "--version", "0.1.0",
                        "--data-description", "synthetic phantoms"]) == 0
    assert export_main(["verify", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((run / "report.json").read_text())
    assert manifest["family"] == "shi2020" and manifest["thresholds"] == report["thresholds"]
    assert manifest["metrics"]["training"]["attention_loss_weight"] == 1.0
    predictor = Predictor(out, providers=("CPUExecutionProvider",))
    series = load_series(phantom_series(tmp_path / "in", n_slices=40, rows=64))
    prediction = predictor.predict(preprocess(series, predictor.manifest.preprocessing))
    assert 0.0 <= prediction.label_probabilities()[WINDOW_LABEL] <= 1.0 and prediction.heatmaps.shape == (50, 1, 10, 10)


def test_family_flag_picks_the_shi_preset_and_a_contradiction_is_one_clear_line(tmp_path, capsys):
    from dicom_node_training.config import load_config
    from dicom_node_training.fit import resolve_config

    assert resolve_config(tmp_path / "r", "shi-paper").family == load_config("shi-paper").family == "shi2020"
    rc = main(["fit", "--data", str(tmp_path), "--out", str(tmp_path / "r"), "--family", "shi2020", "--preset", "tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and "--family shi2020 with --preset tiny (family ma2022)" in err and "Traceback" not in err
