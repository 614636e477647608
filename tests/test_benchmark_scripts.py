"""The benchmark scripts' own logic: phantom reuse in train_phantom.py, the phase-1 throughput run, families.py's report reading."""

from __future__ import annotations

import argparse
import json
import re

import pytest

from benchmarks import phase1_throughput, train_phantom


def _args(*argv: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    train_phantom.add_phantom_arguments(ap)
    return ap.parse_args(list(argv))


def test_train_phantom_reuses_only_phantoms_made_with_the_same_options(tmp_path):
    data = tmp_path / "data"
    args = _args("--studies", "40")
    assert train_phantom.reuse_phantoms(data, args) is False  # nothing there yet: generate
    data.mkdir()
    (data / "train.csv").write_text("StudyInstanceUID\n")
    with pytest.raises(ValueError, match=r"without phantom_options\.json .*use a new --out"):
        train_phantom.reuse_phantoms(data, args)  # made before the stamp: options unknown
    (data / train_phantom.STAMP).write_text(json.dumps(train_phantom.phantom_stamp(args)))
    assert train_phantom.reuse_phantoms(data, args) is True
    with pytest.raises(ValueError, match=r"phantom\.mediastinal_fat_mm: 4\.0 there, 0\.0 asked"):
        train_phantom.reuse_phantoms(data, _args("--studies", "40", "--mediastinal-fat", "0"))
    with pytest.raises(ValueError, match=r"studies: 40 there, 600 asked"):
        train_phantom.reuse_phantoms(data, _args())


def test_phase1_throughput_runs_the_real_training_loop(tmp_path, capsys):
    rc = phase1_throughput.main(["--out", str(tmp_path), "--preset", "tiny", "--steps", "2", "--epochs", "2",
                                 "--studies", "4", "--windows", "4", "--workers", "0", "--device", "cpu"])
    assert rc == 0
    out = capsys.readouterr().out
    rates = [float(v) for v in re.search(r"windows/s per epoch \[([^\]]+)\]", out).group(1).split(",")]
    assert len(rates) == 2 and all(r > 0 for r in rates)
    history = json.loads((tmp_path / "phase1" / "history.json").read_text())
    assert [h["train_windows_per_s"] for h in history] == rates
    assert sum(h["train_windows"] for h in history[:1]) == 2 * 4  # two training studies of 4 windows


def test_triton_benchmark_times_both_engines_and_prints_the_remote_overhead(tmp_path, capsys):
    from dicom_node.tools.triton_server import TritonUnavailable, triton_venv

    try:
        triton_venv()
    except TritonUnavailable as e:
        pytest.skip(str(e))
    from benchmarks import triton_inference as bench

    assert bench.main(["--studies", "2", "--processes", "1", "--json", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "out.json").read_text())
    assert [(r["engine"], r["processes"], r["concurrency"], r["studies"]) for r in rows] == [
        ("onnxruntime", 1, 1, 2), ("onnxruntime", 1, 2, 2), ("triton-grpc", 1, 1, 2), ("triton-grpc", 1, 2, 2)]
    assert all(r["median_s"] > 0 and r["studies_per_min"] > 0 for r in rows)
    assert re.search(r"remote path overhead \(triton-grpc, 1 process, sequential\): [+-]\d+ ms per study", out)


def test_families_reads_the_study_level_figures_of_either_familys_report(tmp_path):
    from benchmarks import families

    ma, shi = tmp_path / "ma", tmp_path / "shi"
    ma.mkdir()
    shi.mkdir()
    (ma / "report.json").write_text(json.dumps({"test": {"n_studies": 82, "study_flag": {
        "auroc": 0.97, "auroc_ci": [0.94, 1.0], "sensitivity": 0.9, "specificity": 0.95}}}))
    w = "pe_present_on_window"
    (shi / "report.json").write_text(json.dumps({"family": "shi2020", "test": {
        "n_studies": 82, "auroc": {w: 0.91}, "auroc_ci": {w: [0.85, 0.96]}, "sensitivity": {w: 0.8},
        "specificity": {w: 0.85}, "slab_auroc": 0.88}}))
    assert families.study_figures(ma) == {"auroc": 0.97, "auroc_ci": [0.94, 1.0], "sensitivity": 0.9,
                                          "specificity": 0.95, "n": 82}
    assert families.study_figures(shi)["auroc"] == 0.91 and families.study_figures(shi)["slab_auroc"] == 0.88
    assert families.MODELS["shi-noattention"][1] == {"shi1": {"attention_loss_weight": 0.0}}
