"""Export side of issue 17 item 4: `--weak-auroc-floor` writes `weak_labels` into manifest.json from the
report's validation AUROC, the node reads them back, and MODEL_CARD.md records the export command
shell-quoted without machine-specific absolute paths."""

from __future__ import annotations

import json
import shlex
from dataclasses import replace
from pathlib import Path

import pytest

from bundle_factory import TINY_HIDDEN, TINY_PREPROCESS, TINY_WIDTH, tiny_models
from dicom_node.labels import ALL_LABELS, WINDOW_LABEL
from dicom_node.model.bundle import load_bundle
from dicom_node_export.bundle import portable_command, portable_path, read_report
from dicom_node_export.cli import main


def test_portable_command_quotes_and_hides_absolute_paths(tmp_path):
    cwd = tmp_path / "work"
    cmd = portable_command(["bundle", "--run", "/data/runs/p600", "--report", "/data/runs/p600/report.json",
                            f"--out={cwd}/bundles/demo", "--stage1", "/elsewhere/best.pt", "--name", "pe demo",
                            "--data-description", "synthetic phantoms; 600 studies (it's /not a path)",
                            "--weak-auroc-floor", "0.7"], cwd=cwd)
    assert shlex.split(cmd) == [
        "dicom-node-export", "bundle", "--run", "<RUN_DIR>", "--report", "<RUN_DIR>/report.json",
        "--out=bundles/demo", "--stage1", "<STAGE1_CKPT>", "--name", "pe demo",
        "--data-description", "synthetic phantoms; 600 studies (it's /not a path)", "--weak-auroc-floor", "0.7"]
    assert "/data" not in cmd and str(tmp_path) not in cmd
    assert portable_path("runs/x", cwd=cwd) == "runs/x"
    assert portable_path(cwd, cwd=cwd) == "."


def test_read_report_keeps_validation_auroc(tmp_path):
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"thresholds": {}, "test": {"auroc": {WINDOW_LABEL: 0.9}},
                                  "validation": {"auroc": {WINDOW_LABEL: 0.8, "chronic_pe": None}}}))
    _, metrics, _ = read_report(report)
    assert metrics["validation_auroc"] == {WINDOW_LABEL: 0.8}  # null = undefined = not validated


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from dicom_node_training.checkpoint import save_checkpoint
    from dicom_node_training.config import PRESETS, config_to_dict

    run = tmp_path_factory.mktemp("run with space")
    cfg = PRESETS["tiny"]
    cfg = replace(cfg, phase1=replace(cfg.phase1, width=TINY_WIDTH), phase2=replace(cfg.phase2, hidden=TINY_HIDDEN),
                  preprocess=TINY_PREPROCESS)
    m1, m2 = tiny_models(seed=7)
    for phase, model in (("phase1", m1), ("phase2", m2)):
        save_checkpoint(run / phase / "best.pt", {"phase": int(phase[-1]), "model": model.state_dict(),
                                                   "config": config_to_dict(cfg), "best": {"epoch": 0}})
    val = {k: 0.9 for k in ALL_LABELS} | {"chronic_pe": 0.425, "acute_and_chronic_pe": 0.75, "indeterminate": None}
    (run / "report.json").write_text(json.dumps({
        "thresholds": {k: 0.5 for k in ALL_LABELS},
        "test": {"auroc": {k: 0.8 for k in ALL_LABELS}, "n_studies": 4},
        "validation": {"auroc": val, "n_studies": 4},
    }))
    return run


def test_export_writes_weak_labels_and_a_portable_model_card(run_dir, tmp_path, capsys):
    out = tmp_path / "bundle"
    rc = main(["bundle", "--run", str(run_dir), "--out", str(out), "--name", "pe-tiny", "--version", "1.0.0",
               "--data-description", "synthetic phantoms (dicom_node_phantoms.study)", "--weak-auroc-floor", "0.8"])
    assert rc == 0
    assert "weak labels (validation AUROC < 0.80): indeterminate, chronic_pe, acute_and_chronic_pe" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weak_labels"] == ["indeterminate", "chronic_pe", "acute_and_chronic_pe"]
    assert manifest["weak_auroc_floor"] == 0.8
    assert manifest["metrics"]["validation_auroc"]["chronic_pe"] == pytest.approx(0.425)
    m = load_bundle(out).manifest  # the node reads it back (sha256s verified)
    assert m.weak_labels == ("indeterminate", "chronic_pe", "acute_and_chronic_pe") and m.weak_labels_source == "manifest"
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Weak labels" in card and "indeterminate, chronic_pe, acute_and_chronic_pe" in card
    assert "| chronic_pe | 0.425 | 0.800 | 0.500 | weak |" in card
    # the command: shell-quoted, the run directory (outside the working directory) as <RUN_DIR>, nothing absolute
    command = card.split("Commands:\n\n```\n", 1)[1].split("\n```", 1)[0]
    argv = shlex.split(command)
    assert argv[:4] == ["dicom-node-export", "bundle", "--run", "<RUN_DIR>"]
    assert argv[argv.index("--data-description") + 1] == "synthetic phantoms (dicom_node_phantoms.study)"
    assert argv[argv.index("--out") + 1] in ("<OUT_DIR>", str(out.relative_to(Path.cwd())) if out.is_relative_to(Path.cwd()) else "<OUT_DIR>")
    assert str(tmp_path) not in card and str(run_dir) not in card
    assert '"run": "<RUN_DIR>"' in card and '"stage1": "<RUN_DIR>/phase1/best.pt"' in card


def test_export_without_validation_figures_writes_unknown(run_dir, tmp_path, capsys):
    report = json.loads((run_dir / "report.json").read_text())
    del report["validation"]
    (tmp_path / "report.json").write_text(json.dumps(report))
    out = tmp_path / "b"
    rc = main(["bundle", "--stage1", str(run_dir / "phase1/best.pt"), "--stage2", str(run_dir / "phase2/best.pt"),
               "--report", str(tmp_path / "report.json"), "--out", str(out), "--name", "pe", "--version", "1"])
    assert rc == 0
    assert "weak labels (validation AUROC < 0.70): unknown" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["weak_labels"] is None and manifest["weak_auroc_floor"] == 0.7
    assert load_bundle(out).manifest.weak_labels is None
    assert "Unknown: the evaluation report has no validation AUROC" in (out / "MODEL_CARD.md").read_text()


def test_weak_auroc_floor_out_of_range_is_refused(run_dir, tmp_path, capsys):
    rc = main(["bundle", "--run", str(run_dir), "--out", str(tmp_path / "x"), "--name", "x", "--version", "1",
               "--weak-auroc-floor", "1.5"])
    assert rc == 2 and "--weak-auroc-floor 1.5" in capsys.readouterr().err
