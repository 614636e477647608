"""Training presets and config files."""

from __future__ import annotations

import json

import pytest

from dicom_node_training.config import PRESETS, ConfigError, config_from_dict, config_to_dict, load_config


def test_paper_preset_holds_the_published_settings():
    c = load_config("paper")
    assert (c.phase1.width, c.phase1.lr, c.phase1.batch_size, c.phase1.epochs, c.phase1.rotation_deg) == (64, 4e-4, 16, 20, 15.0)
    assert c.phase1.feature_dim == 512
    assert (c.preprocess.resize, c.preprocess.crop, c.preprocess.window_slices) == (224, 192, 10)
    p2 = c.phase2
    assert (p2.kind, p2.seq_len, p2.levels, p2.kernel_size, p2.hidden, p2.dropout) == ("tcn", 40, 2, 3, 128, 0.2)
    assert (p2.lr, p2.lr_decay, p2.lr_decay_every, p2.batch_size, p2.epochs) == (5e-4, 0.9, 20, 64, 200)
    assert c.split == pytest.approx((5292 / 7292, 1000 / 7292, 1000 / 7292))
    assert c.phase1.study_label_weight == 0.0  # phase 1 learns the window label only, as in the paper
    assert c.phase1.keep == "best"  # and keeps the epoch with the best validation AUROC


def test_tiny_preset_is_small():
    c = load_config("tiny")
    assert c.phase1.width == 16 and c.phase1.feature_dim == 128
    assert (c.preprocess.resize, c.preprocess.crop) == (96, 80)
    # one phase-1 epoch draws 4000 windows whatever the data size; phase 2 runs half the paper's epochs
    assert c.phase1.windows_per_epoch == 4000 and c.phase2.epochs < 200 and c.device == "cpu"
    assert c.preprocess.spacing_mm == 2.5  # 10-slice windows of 25 mm: no interpolated slices from 2.5 mm phantoms


def test_toml_and_json_overrides(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('seed = 7\nsplit = [8, 1, 1]\n[phase1]\nepochs = 2\n[phase2]\nkind = "gru"\n'
                    '[preprocess]\nhu_windows = [[-600, 1500], [100, 700]]\n')
    c = load_config("tiny", toml)
    assert (c.seed, c.phase1.epochs, c.phase2.kind, c.phase1.width) == (7, 2, "gru", 16)
    assert c.split == pytest.approx((0.8, 0.1, 0.1))
    assert c.preprocess.hu_windows == ((-600.0, 1500.0), (100.0, 700.0))
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"phase2": {"hidden": 32}}))
    assert load_config("paper", js).phase2.hidden == 32
    # round trip through the checkpoint dict
    assert config_from_dict(config_to_dict(c)) == c


@pytest.mark.parametrize(("overrides", "message"), [
    ({"phase1": {"lr": "fast"}}, r"config phase1\.lr: expected a number, got 'fast'"),
    ({"phase2": {"kind": "lstm"}}, r"config phase2\.kind: 'lstm' is not one of 'tcn', 'gru'"),
    ({"phase1": {"epoch": 3}}, r"config phase1: unknown setting 'epoch'; valid settings: .*epochs"),
    ({"preprocess": {"crop": 300}}, r"config preprocess.*crop.?300.*resize.{1,2}96"),
    ({"phase2": {"dropout": 1.5}}, r"config phase2\.dropout: must be in \[0, 1\), got 1\.5"),
    ({"phase1": {"batch_size": 0}}, r"config phase1\.batch_size: must be > 0, got 0"),
    ({"phase1": {"windows_per_epoch": 4}}, r"config phase1\.windows_per_epoch: 4 is fewer than one batch \(8\)"),
    ({"device": "tpu"}, r"config device: 'tpu' is not 'auto', 'cpu', 'cuda' or 'cuda:N'"),
    ({"phase1": {"keep": "first"}}, r"config phase1\.keep: 'first' is not one of 'best', 'last'"),
    ({"phase1": {"study_label_weight": -1}}, r"config phase1\.study_label_weight: must be >= 0 \(0 = window label only\), got -1"),
])
def test_invalid_settings_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides=overrides)


def test_unknown_preset_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="preset 'huge': unknown; choose one of paper, tiny"):
        load_config("huge")
    bad = tmp_path / "bad.toml"
    bad.write_text("[phase1\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: cannot parse"):
        load_config("paper", bad)
    with pytest.raises(ConfigError, match="unknown format '.yaml'"):
        (tmp_path / "x.yaml").write_text("a: 1")
        load_config("paper", tmp_path / "x.yaml")
    assert set(PRESETS) == {"paper", "tiny", "shi-paper", "shi-tiny"}


def test_pretrained_flag_sets_phase1_weights_and_refuses_missing_file(tmp_path):
    import torch

    from dicom_node_training.config import ConfigError
    from dicom_node_training.fit import resolve_config
    from dicom_node_training.models import r3d_18

    weights = tmp_path / "r3d_18_k400.pth"
    torch.save(r3d_18(width=16, pretrained=None).state_dict(), weights)
    config = resolve_config(tmp_path / "run", "tiny", pretrained=str(weights))
    assert config.phase1.pretrained == str(weights)
    model = r3d_18(width=config.phase1.width, pretrained=config.phase1.pretrained)  # loads without error
    assert torch.equal(model.stem[0].weight, torch.load(weights)["stem.0.weight"])
    with pytest.raises(ConfigError, match=r"--pretrained .*missing\.pth: no such file"):
        resolve_config(tmp_path / "run2", "tiny", pretrained=str(tmp_path / "missing.pth"))


def test_balanced_sampler_draws_the_asked_positive_share_and_shards_by_rank():
    import numpy as np

    from dicom_node_training.phase1 import BalancedSampler

    labels = np.zeros(1000)
    labels[:50] = 1
    s = BalancedSampler(labels, 0.3, seed=3)
    s.set_epoch(2)
    idx = list(s)
    assert len(idx) == len(s) == 1000
    assert abs(np.mean(labels[idx]) - 0.3) < 0.01
    again = BalancedSampler(labels, 0.3, seed=3)
    again.set_epoch(2)
    assert list(again) == idx  # deterministic for (seed, epoch)
    s.set_epoch(3)
    assert list(s) != idx  # a new draw each epoch
    shards = [BalancedSampler(labels, 0.3, rank=r, world_size=2, seed=3) for r in (0, 1)]
    for sh in shards:
        sh.set_epoch(2)
    a, b = list(shards[0]), list(shards[1])
    assert len(a) == len(b) == 500
    with pytest.raises(ValueError, match="positive_fraction=1.5"):
        BalancedSampler(labels, 1.5)
    with pytest.raises(ValueError, match="have 0 positive"):
        BalancedSampler(np.zeros(10), 0.3)
    # windows_per_epoch: a fixed number of draws per epoch, balanced or uniform without replacement
    fixed = BalancedSampler(labels, 0.3, num_samples=200, seed=3)
    fixed.set_epoch(1)
    drawn = list(fixed)
    assert len(drawn) == len(fixed) == 200 and abs(np.mean(labels[drawn]) - 0.3) < 0.02
    uniform = BalancedSampler(labels, None, num_samples=300, seed=3)
    uniform.set_epoch(0)
    first = list(uniform)
    assert len(first) == 300 and len(set(first)) == 300  # no window twice within an epoch
    uniform.set_epoch(1)
    assert set(uniform) != set(first)
    with pytest.raises(ValueError, match="windows_per_epoch=0"):
        BalancedSampler(labels, None, num_samples=0)


def test_study_max_auroc_scores_each_study_by_its_highest_window():
    from types import SimpleNamespace

    import numpy as np

    from dicom_node_training.phase1 import study_max_auroc

    # study a (positive window 1), b (positive window 0), c and d (no positive window)
    ds = SimpleNamespace(index=[("a", 0), ("a", 1), ("b", 0), ("c", 0), ("c", 1), ("d", 0)],
                         labels=np.array([0, 1, 1, 0, 0, 0], dtype=np.float32))
    # the positives' maxima (0.9, 0.6) beat both negatives' maxima (0.5, 0.2): 1.0, although at window
    # level a's negative window (0.7) outranks b's positive one (0.6)
    assert study_max_auroc(ds, np.array([0.7, 0.9, 0.6, 0.5, 0.1, 0.2])) == 1.0
    # a negative study with one hot window (0.95) now outranks both positives
    assert study_max_auroc(ds, np.array([0.7, 0.9, 0.6, 0.95, 0.1, 0.2])) == 0.5
    assert np.isnan(study_max_auroc(SimpleNamespace(index=[("a", 0)], labels=np.array([1.0])), np.array([0.3])))


def test_level_matched_negatives_follow_the_positive_windows_heights():
    import numpy as np

    from dicom_node_training.phase1 import BalancedSampler

    # 100 studies of 10 windows; positives only at heights 0.3-0.5 (like emboli at the pulmonary arteries)
    levels = np.tile((np.arange(10) + 0.5) / 10, 100)
    labels = np.zeros(1000)
    labels[np.flatnonzero((levels > 0.3) & (levels < 0.5))[:80]] = 1
    bins = (levels * 10).astype(int)
    uniform = np.isin(bins[labels == 0], [3, 4]).mean()  # 120 of the 920 negative windows sit at those heights
    for share, expect_at_pos_levels in ((1.0, 1.0), (0.5, 0.5 + 0.5 * uniform), (0.0, uniform)):
        s = BalancedSampler(labels, 0.3, num_samples=20000, seed=1, levels=levels, level_matched=share)
        idx = np.array(list(s))
        neg = idx[labels[idx] == 0]
        at_pos_levels = np.isin(bins[neg], [3, 4]).mean()
        assert abs(at_pos_levels - expect_at_pos_levels) < 0.02, (share, at_pos_levels)
        assert abs(labels[idx].mean() - 0.3) < 0.01
    # no negative window at the positives' heights: nothing to match, the negatives are drawn uniformly
    apart = BalancedSampler(levels < 0.5, 0.3, num_samples=2000, seed=1, levels=levels, level_matched=1.0)
    drawn = np.array(list(apart))
    assert apart.neg_p is None
    assert set(bins[drawn[levels[drawn] >= 0.5]]) == {5, 6, 7, 8, 9}  # every negative height is drawn
    with pytest.raises(ValueError, match="level_matched_negatives=1.5"):
        BalancedSampler(labels, 0.3, levels=levels, level_matched=1.5)
    with pytest.raises(ValueError, match="needs phase1.positive_fraction"):
        BalancedSampler(labels, None, num_samples=100, levels=levels, level_matched=0.5)
    with pytest.raises(ConfigError, match=r"level_matched_negatives: needs phase1\.positive_fraction"):
        load_config("tiny", overrides={"phase1": {"positive_fraction": None}})
    with pytest.raises(ConfigError, match=r"level_matched_negatives: must be a share in \[0, 1\], got 2\.0"):
        load_config("tiny", overrides={"phase1": {"level_matched_negatives": 2}})


def test_learning_rate_schedules():
    from dicom_node_training.phase1 import lr_at

    tiny = load_config("tiny").phase1
    assert tiny.lr_schedule == "cosine"
    steps = 500
    total = tiny.epochs * steps
    assert lr_at(tiny, 0, steps) == tiny.lr
    assert lr_at(tiny, total // 2, steps) == pytest.approx(tiny.lr / 2)
    assert lr_at(tiny, total, steps) == pytest.approx(0.0, abs=1e-12)
    lrs = [lr_at(tiny, k, steps) for k in range(0, total + 1, 250)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # never rises
    paper = load_config("paper").phase1
    assert paper.lr_schedule == "constant" and {lr_at(paper, k, 100) for k in (0, 999, 10**6)} == {4e-4}
    with pytest.raises(ConfigError, match=r"phase1\.lr_schedule: 'step' is not one of 'constant', 'cosine'"):
        load_config("tiny", overrides={"phase1": {"lr_schedule": "step"}})



def test_the_revision_a_run_records_names_its_code_in_git_and_outside_it(monkeypatch):
    import re
    import shutil
    from pathlib import Path

    from dicom_node_training.checkpoint import git_revision, source_digest

    # in a git checkout: the commit, marked -dirty when tracked files differ from it
    if shutil.which("git") and (Path(__file__).resolve().parents[2] / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?", git_revision())
    # no git (a copied tree, an installed package): a digest of the sources instead of a bare "unknown"
    monkeypatch.setenv("PATH", "/nonexistent")
    assert git_revision() == f"unknown (source sha256 {source_digest()})"
    assert re.fullmatch(r"[0-9a-f]{16}", source_digest()) and source_digest() == source_digest()
