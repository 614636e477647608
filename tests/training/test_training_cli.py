"""`dicom-node-train` command line: input checks of fit before anything is written, the flags each
subcommand accepts, and the help text (issue 16 item 3). Real phantom data, real run folders."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from dicom_node_phantoms import PhantomConfig, generate_dataset
from dicom_node_training.cli import build_parser, main

FIT = ["--preset", "tiny", "--device", "cpu", "--workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("cli") / "data", 2, 3,
                            PhantomConfig(rows=64, cols=64, n_slices=40, slice_thickness_mm=2.5), workers=1,
                            progress=False)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite_csv(path: Path, edit: Callable[[list[str], list[list[str]]], tuple[list[str], list[list[str]]]]) -> None:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    header, body = edit(rows[0], rows[1:])
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows([header, *body])


def _fit(data: Path, run: Path, capsys) -> tuple[int, list[str]]:
    rc = main(["fit", "--data", str(data), "--out", str(run), *FIT])
    return rc, capsys.readouterr().err.splitlines()


def test_fit_without_train_csv_says_so_in_one_line_and_leaves_no_run_behind(phantom_data, tmp_path, capsys):
    data = _copy(phantom_data, tmp_path / "data")
    (data / "train.csv").unlink()
    run = tmp_path / "run"
    rc, err = _fit(data, run, capsys)
    assert rc == 2
    assert err == [f"dicom-node-train fit: {data / 'train.csv'}: no train.csv; expected the RSNA layout "
                   "DATA/train.csv + DATA/train/<study>/<series>/<sop>.dcm"]
    assert not run.exists()  # no config.json, so the rerun is not "already holds a run ... pass --resume"
    assert _fit(data, run, capsys) == (rc, err)


def _no_folder(data: Path) -> None:
    shutil.rmtree(data)


def _column_missing(data: Path) -> None:
    _rewrite_csv(data / "train.csv", lambda h, b: ([c for c in h if c != "pe_present_on_image"],
                                                    [[v for c, v in zip(h, r) if c != "pe_present_on_image"] for r in b]))


def _header_only(data: Path) -> None:
    _rewrite_csv(data / "train.csv", lambda h, b: (h, []))


def _label_not_a_number(data: Path) -> None:
    def edit(h: list[str], b: list[list[str]]) -> tuple[list[str], list[list[str]]]:
        b[4][h.index("pe_present_on_image")] = "yes"
        return h, b
    _rewrite_csv(data / "train.csv", edit)


def _no_dicom_folder(data: Path) -> None:
    shutil.rmtree(data / "train")


@pytest.mark.parametrize(("spoil", "message"), [
    (_no_folder, r"data: no such data folder; expected the RSNA layout .*`dicom-node-train phantom --out DIR` writes one"),
    (_column_missing, r"train\.csv: missing columns \['pe_present_on_image'\]; expected the RSNA-STR train\.csv columns"),
    (_header_only, r"train\.csv: no rows, so no study; expected one row per slice"),
    (_label_not_a_number, r"train\.csv line 6: pe_present_on_image = 'yes' is not a number; expected 0 or 1"),
    (_no_dicom_folder, r"data/train: no such folder, so no DICOM for the 2 studies of train\.csv; expected the RSNA"),
], ids=["no folder", "a column missing", "header only", "a label not a number", "no DICOM folder"])
def test_fit_refuses_bad_data_in_one_line_before_writing_anything(phantom_data, tmp_path, capsys, spoil, message):
    data = _copy(phantom_data, tmp_path / "data")
    spoil(data)
    run = tmp_path / "run"
    rc, err = _fit(data, run, capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("dicom-node-train fit: ") and re.search(message, err[0]), err[0]
    assert not run.exists()


def test_the_real_command_prints_the_input_error_as_one_line_without_a_traceback(tmp_path):
    run = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "dicom_node_training.cli", "fit", "--data", str(tmp_path / "nowhere"),
                        "--out", str(run), *FIT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.splitlines() == [f"dicom-node-train fit: {tmp_path / 'nowhere'}: no such data folder; expected the "
                                     "RSNA layout DATA/train.csv + DATA/train/<study>/<series>/<sop>.dcm "
                                     "(`dicom-node-train phantom --out DIR` writes one)"]
    assert not run.exists()


def test_the_cache_step_checks_its_data_before_writing_too(phantom_data, tmp_path, capsys):
    data = _copy(phantom_data, tmp_path / "data")
    (data / "train.csv").unlink()
    run = tmp_path / "run"
    assert main(["cache", "--data", str(data), "--out", str(run), *FIT]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"dicom-node-train cache: {data / 'train.csv'}: no train.csv; expected the RSNA layout "
        "DATA/train.csv + DATA/train/<study>/<series>/<sop>.dcm"]
    assert not run.exists()


@pytest.mark.parametrize(("argv", "users"), [
    (["evaluate", "--pretrained", "r3d18.pth"], "fit, phase1"),
    (["features", "--pretrained=r3d18.pth"], "fit, phase1"),
    (["phase2", "--data", "D"], "fit, cache"),
    (["evaluate", "--no-progress"], "fit, cache, phase1, features, phase2"),
])
def test_a_subcommand_refuses_a_flag_it_would_ignore(tmp_path, capsys, monkeypatch, argv, users):
    monkeypatch.chdir(tmp_path)
    Path("r3d18.pth").write_bytes(b"a weights file that exists: today evaluate accepts it and ignores it")
    run = tmp_path / "run"
    assert main([*argv, "--out", str(run)]) == 2
    flag = argv[1].split("=")[0]
    assert capsys.readouterr().err.splitlines() == [
        f"dicom-node-train {argv[0]}: {flag} is not used by {argv[0]} (only by {users}); drop it "
        f"(`dicom-node-train {argv[0]} --help` lists its options)"]
    assert not run.exists()


def _subcommands() -> dict[str, object]:
    import argparse

    (action,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_each_subcommand_lists_only_the_run_flags_it_uses():
    options = {name: {o for a in p._actions for o in a.option_strings} for name, p in _subcommands().items()}
    assert "--pretrained" in options["fit"] and "--pretrained" in options["phase1"]
    assert all("--pretrained" not in options[c] for c in ("cache", "features", "phase2", "evaluate"))
    assert [c for c in options if "--data" in options[c]] == ["fit", "cache"]
    assert "--no-progress" not in options["evaluate"]


def test_help_shows_each_default_once():
    for name, parser in _subcommands().items():
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: False)" not in text, name
        entries = ("\n" + text.split("options:", 1)[1]).split("\n  -")[1:]
        for entry in entries:
            assert entry.lower().count("default") <= 1, f"{name}: {' '.join(entry.split())}"
    phantom = " ".join(_subcommands()["phantom"].format_help().split())
    assert "--workers WORKERS parallel processes (default: min(2, CPU count)) --no-progress" in phantom
    assert "(default: 0)" in phantom and "(default: 512)" in phantom  # real defaults are still shown


def test_a_phantom_data_set_passes_the_input_checks(phantom_data):
    from dicom_node_training.data import check_rsna_data

    records = check_rsna_data(phantom_data)
    assert len(records) == 2 and all(r.slice_labels for r in records.values())
