"""End-to-end training on a few tiny phantom studies: fit, checkpoints, report, resume, learning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dicom_node.labels import ALL_LABELS, STUDY_LABELS
from dicom_node_phantoms import PhantomConfig, generate_dataset
from dicom_node_training.cli import main

FAST = "[phase1]\nepochs = 1\nwindows_per_epoch = 32\n[phase2]\nepochs = 2\n"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    data = generate_dataset(root / "data", 8, 5, PhantomConfig(rows=64, cols=64, n_slices=40, slice_thickness_mm=2.5),
                            workers=1, progress=False)
    (root / "fast.toml").write_text(FAST)
    run = root / "run"
    rc = main(["fit", "--data", str(data), "--out", str(run), "--preset", "tiny", "--config", str(root / "fast.toml"),
               "--workers", "0", "--device", "cpu", "--no-progress"])
    assert rc == 0
    return data, run


def test_fit_writes_checkpoints_and_report(fitted):
    _, run = fitted
    split = json.loads((run / "split.json").read_text())
    studies = [u for k in ("train", "validation", "test") for u in split[k]]
    assert len(studies) == len(set(studies)) == 8 and all(split[k] for k in ("train", "validation", "test"))
    for phase in ("phase1", "phase2"):
        for name in ("best.pt", "last.pt"):
            ck = torch.load(run / phase / name, weights_only=False)
            assert ck["config"]["phase1"]["width"] == 16  # the tiny preset, carried by the checkpoint
            assert ck["git_revision"] and "optimizer" in ck and "val_loss" in ck["metrics"]
    assert (run / "cache" / f"{studies[0]}.npy").is_file()
    assert np.load(run / "cache" / f"{studies[0]}.npy", mmap_mode="r").dtype == np.uint8
    feats = np.load(run / "features" / f"{studies[0]}.npy")
    assert feats.shape[1] == 128 and feats.shape[0] == len(np.load(run / "features" / f"{studies[0]}.probs.npy"))
    report = json.loads((run / "report.json").read_text())
    assert set(report["test"]["auroc"]) == set(ALL_LABELS)  # values may be null with 8 studies
    assert set(report["thresholds"]) == set(ALL_LABELS)
    assert (run / "report.md").is_file()
    # the tiny preset's study-label head trains with phase 1 and stays out of the window model
    ck = torch.load(run / "phase1" / "best.pt", weights_only=False)
    assert ck["study_head"]["weight"].shape == (len(STUDY_LABELS), 128)
    assert not any(k.startswith("head") for k in ck["model"])
    assert ck["metrics"]["train_study_loss"] > 0
    # ... and the attention loss (phase1.attention_loss_weight = 1) against the phantoms' embolus masks
    assert ck["config"]["phase1"]["attention_loss_weight"] == 1.0 and ck["metrics"]["train_attention_loss"] > 0
    assert 0.0 <= ck["metrics"]["train_dead_cam_share"] <= 1.0
    assert any(p.name.endswith(".mask.npz") for p in (run / "cache").iterdir())
    # the tiny preset keeps the last phase-1 epoch (keep = "last"), whatever its validation AUROC
    last = torch.load(run / "phase1" / "last.pt", weights_only=False)
    assert ck["best"]["epoch"] == last["best"]["epoch"] == last["epoch"] and ck["best"]["criterion"] == "last"
    auroc = last["metrics"]["val_auroc"]  # recorded for the model card; NaN when validation holds one class
    assert ck["best"]["value"] == auroc or (np.isnan(auroc) and np.isnan(ck["best"]["value"]))
    assert all(torch.equal(ck["model"][k], last["model"][k]) for k in ck["model"])


def test_study_label_head_changes_what_the_backbone_learns(fitted, tmp_path):
    """Same seed and data, two optimiser steps: with study_label_weight > 0 the study labels' loss
    reaches the window model's weights; with 0 (the paper) no head is made or saved."""
    from dicom_node_training.config import load_config
    from dicom_node_training.phase1 import train_phase1

    _, run = fitted
    models = {}
    for weight in (0.0, 1.0):
        out = tmp_path / f"w{weight}"
        out.mkdir()
        (out / "cache").symlink_to(run / "cache")
        (out / "split.json").write_text((run / "split.json").read_text())
        cfg = load_config("tiny", overrides={"phase1": {"epochs": 1, "windows_per_epoch": 16, "study_label_weight": weight}})
        train_phase1(cfg, out, resume=False, progress=False, max_steps=2)
        ck = torch.load(out / "phase1" / "last.pt", weights_only=False)
        assert ("study_head" in ck) == (weight > 0)
        assert ("train_study_loss" in ck["metrics"]) == (weight > 0)
        models[weight] = ck["model"]
    assert models[0.0].keys() == models[1.0].keys()
    w0, w1 = models[0.0]["stem.0.weight"], models[1.0]["stem.0.weight"]
    assert not torch.allclose(w0, w1)


def test_window_dataset_can_carry_the_study_labels(fitted):
    from dicom_node_training.data import WindowDataset, load_cache_index

    _, run = fitted
    entries = load_cache_index(run)
    ds = WindowDataset(entries, 56, augment=False, study_labels=True)
    uid, _ = ds.index[0]
    x, y, s = ds[0]
    assert s.dtype == torch.float32 and s.tolist() == entries[uid].study_labels.tolist()
    assert len(WindowDataset(entries, 56, augment=False)[0]) == 2


def test_resume_skips_finished_work(fitted):
    data, run = fitted
    p1_last = (run / "phase1" / "last.pt").stat().st_mtime_ns
    features = (run / "features" / "done.json").stat().st_mtime_ns
    assert main(["fit", "--data", str(data), "--out", str(run), "--no-progress"]) == 2  # a run is there: --resume needed
    # simulate an interruption after phase 2's last epoch but before its done marker and the report
    (run / "phase2" / "done.json").unlink()
    (run / "report.json").unlink()
    assert main(["fit", "--data", str(data), "--out", str(run), "--resume", "--no-progress"]) == 0
    assert (run / "phase1" / "last.pt").stat().st_mtime_ns == p1_last
    assert (run / "features" / "done.json").stat().st_mtime_ns == features
    assert len(json.loads((run / "phase2" / "history.json").read_text())) == 2  # no epoch redone
    assert (run / "report.json").is_file()


def test_phase1_and_phase2_losses_fall_on_a_fixed_batch(fitted):
    """Overfit check: a few optimiser steps on one fixed batch lower the training loss."""
    from dicom_node_training.data import SequenceDataset, WindowDataset, load_cache_index
    from dicom_node_training.loss import phase1_loss, sequence_loss
    from dicom_node_training.models import r3d_18, sequence_model

    _, run = fitted
    torch.manual_seed(0)
    entries = load_cache_index(run)
    ds = WindowDataset(entries, 56, augment=False)
    pos, neg = np.flatnonzero(ds.labels == 1), np.flatnonzero(ds.labels == 0)
    assert len(pos) and len(neg), "the phantom seed must give positive and negative windows"
    idx = [*pos[:4], *neg[:4]]
    x = torch.stack([ds[i][0] for i in idx])
    y = torch.tensor(ds.labels[idx])
    model = r3d_18(num_outputs=1, width=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(6):
        loss = phase1_loss(model(x).logit, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses

    seq = SequenceDataset(run / "features", entries)
    b = torch.utils.data.default_collate([seq[i] for i in range(len(seq))])
    m2 = sequence_model(in_features=128, hidden=32, dropout=0.0)
    opt2 = torch.optim.Adam(m2.parameters(), lr=5e-3)
    losses2 = []
    for _ in range(30):
        out = m2(b["features"], b["mask"])
        loss = sequence_loss(out.window_logits, out.study_logits, b["window_labels"], b["study_labels"], b["mask"], q=b["q"])
        opt2.zero_grad()
        loss.backward()
        opt2.step()
        losses2.append(loss.item())
    assert losses2[-1] < 0.8 * losses2[0], losses2


def test_step_subcommand_needs_a_cache(tmp_path):
    (tmp_path / "split.json").write_text(json.dumps({"train": [], "validation": [], "test": [], "seed": 0}))
    assert main(["phase1", "--out", str(tmp_path), "--preset", "tiny", "--no-progress"]) == 1
