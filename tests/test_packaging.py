"""Packaging: the node never imports torch; every command and subcommand answers --help."""

from __future__ import annotations

import argparse
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import dicom_node

ROOT = Path(__file__).resolve().parents[1]


def test_no_dicom_node_module_imports_torch():
    modules = sorted(m.name for m in pkgutil.walk_packages(dicom_node.__path__, "dicom_node."))
    assert {"dicom_node.imaging.preprocess", "dicom_node.imaging.series", "dicom_node.pipeline", "dicom_node.tools.demo"} <= set(modules)
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "assert 'torch' not in sys.modules, sorted(k for k in sys.modules if k.startswith('torch'))\n"
            "print(len(sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr


def _subcommands(parser: argparse.ArgumentParser) -> list[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return sorted(action.choices)
    return []


@pytest.mark.parametrize("script,module", [("dicom-node", "dicom_node.cli"), ("dicom-node-train", "dicom_node_training.cli"),
                                           ("dicom-node-export", "dicom_node_export.cli")])
def test_every_console_script_and_subcommand_has_help(script, module):
    import importlib

    exe = Path(sys.executable).parent / script
    assert exe.exists(), f"console script {script} is not installed; pip install -e ."
    subs = _subcommands(importlib.import_module(module).build_parser())
    assert subs, f"{script} has no subcommands"
    for args in ([], *([s] for s in subs)):
        r = subprocess.run([str(exe), *args, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage:" in r.stdout, (args, r.stderr)


# ------------------------------------------------------------------------------ the wheel, installed as a hospital would

#: the importable packages the distribution may install: all of them named for the product, so none
#: can collide with another distribution's `training` or `export`
OUR_PACKAGES = {"dicom_node", "dicom_node_phantoms", "dicom_node_training", "dicom_node_export"}


def _metadata(wheel: Path) -> tuple[set[str], str]:
    import zipfile

    with zipfile.ZipFile(wheel) as z:
        tops = {n.split("/")[0] for n in z.namelist() if "/" in n and not n.split("/")[0].endswith(".dist-info")}
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        return tops, z.read(meta).decode()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    import shutil

    # build from a copy of the sources: a build/ folder left in the checkout by an earlier build would
    # put packages into the wheel that the sources no longer have
    src = tmp_path_factory.mktemp("src") / "dicom-node"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "node_modules", "__pycache__", ".*_cache", "dist"))
    dist = tmp_path_factory.mktemp("dist")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(src)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (whl,) = dist.glob("*.whl")
    return whl


def test_the_wheel_installs_only_product_named_packages_and_declares_its_license(wheel):
    tops, meta = _metadata(wheel)
    assert tops == OUR_PACKAGES, f"the wheel installs {sorted(tops)}; expected only {sorted(OUR_PACKAGES)}"
    assert "License-Expression: Apache-2.0" in meta
    core = [line.split(":", 1)[1].strip() for line in meta.splitlines()
            if line.startswith("Requires-Dist:") and "extra ==" not in line]
    names = {c.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for c in core}
    assert not names & {"torch", "tqdm", "python-gdcm", "onnxruntime", "onnxruntime-gpu"}, names
    gpu = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and 'extra == "gpu"' in line]
    assert gpu and all("onnxruntime-gpu" in line for line in gpu)  # [gpu] never pulls the CPU onnxruntime


@pytest.mark.slow
def test_the_wheel_with_the_cpu_extra_runs_the_demo_in_a_fresh_virtualenv(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt")]
    r = subprocess.run([*pip, f"{wheel}[cpu]"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    py = str(venv / "bin" / "python")
    r = subprocess.run([py, "-c", "import importlib.util as u; print([m for m in ('torch', 'tqdm', 'gdcm') if u.find_spec(m)])"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr
    out = tmp_path / "demo"
    r = subprocess.run([str(venv / "bin" / "dicom-node"), "demo", "--no-orthanc", "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "results for both studies came back" in r.stdout
    assert len(list((out / "results").glob("SR_*.dcm"))) == 2


@pytest.mark.parametrize(("script", "expected"), [
    ("dicom-node", "model bundle: pe-demo-tiny"), ("dicom-node-train", "(torch "), ("dicom-node-export", ", onnx "),
])
def test_every_console_script_answers_version(script, expected):
    exe = Path(sys.executable).parent / script
    r = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"{script} {dicom_node.__version__}") and expected in r.stdout, r.stdout
