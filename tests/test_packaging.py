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


@pytest.mark.parametrize("script,module", [("dicom-node", "dicom_node.cli"), ("dicom-node-train", "training.cli"),
                                           ("dicom-node-export", "export.cli")])
def test_every_console_script_and_subcommand_has_help(script, module):
    import importlib

    exe = Path(sys.executable).parent / script
    assert exe.exists(), f"console script {script} is not installed; pip install -e ."
    subs = _subcommands(importlib.import_module(module).build_parser())
    assert subs, f"{script} has no subcommands"
    for args in ([], *([s] for s in subs)):
        r = subprocess.run([str(exe), *args, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "usage:" in r.stdout, (args, r.stderr)
