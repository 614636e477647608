"""The import rules of the layout, checked on the source (every import, lazy ones inside functions too).

1. `dicom_node` never imports `training`, `export` or `torch`; only `dicom_node.tools` (the demo)
   may import `phantoms`.
2. `phantoms` never imports `torch`, `training` or `export`; the stages below the engine
   (`network`, `durability`, `imaging`) never import the engine (and imaging nothing but numpy code).
3. No module takes a private name from another module (`from x import _y`).

`import_violations` is the checker; the last tests feed it small trees that break each rule, so a
checker that stopped seeing a rule would fail here too. That importing every `dicom_node` module
at run time loads no torch is `tests/test_packaging.py`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dicom_node", "dicom_node_phantoms", "dicom_node_training", "dicom_node_export")
#: where the private-name rule holds too: everything that imports the packages
SCRIPTS = ("benchmarks", "scripts", "tests")

#: package (or sub-package) -> top-level packages it must never import, and why
FORBIDDEN: dict[str, dict[str, str]] = {
    "dicom_node": {"dicom_node_training": "the node never imports the training package",
                   "dicom_node_export": "the node never imports the export package",
                   "torch": "the node runs on onnxruntime only",
                   "dicom_node_phantoms": "only dicom_node.tools (the demo) uses phantoms"},
    # the stages below the engine know nothing of it: the engine drives them, not the reverse
    "dicom_node.network": {"dicom_node.engine": "network is driven by the engine, never the reverse"},
    "dicom_node.durability": {"dicom_node.engine": "durability is driven by the engine, never the reverse",
                              "dicom_node.network": "durability knows nothing of the network"},
    "dicom_node.imaging": {"dicom_node.engine": "imaging is numpy only, shared with training",
                           "dicom_node.network": "imaging is numpy only, shared with training",
                           "dicom_node.model": "imaging is numpy only, shared with training"},
    "dicom_node_phantoms": {"torch": "phantoms are numpy + pydicom only",
                            "dicom_node_training": "training imports phantoms, not the reverse",
                            "dicom_node_export": "phantoms know nothing of export"},
}
#: sub-packages allowed what their package is not
ALLOWED: dict[str, set[str]] = {"dicom_node.tools": {"dicom_node_phantoms"}}


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(root: Path, path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, names taken) for every import statement in the file."""
    module = _module_name(root, path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            out.append((node.lineno, base, [alias.name for alias in node.names]))
    return out


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def import_violations(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """One line per broken rule: file:line, what it imports, and which rule that breaks."""
    found = []
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            if "data" in path.relative_to(root).parts:  # fixtures, not code
                continue
            module = _module_name(root, path)
            for line, target, names in _imports(root, path):
                where = f"{path.relative_to(root)}:{line}"
                for scope, rules in FORBIDDEN.items():
                    if not _within(module, scope):
                        continue
                    allowed = set().union(*(v for k, v in ALLOWED.items() if _within(module, k)))
                    for banned, why in rules.items():
                        if _within(target, banned) and banned not in allowed:
                            found.append(f"{where}: {module} imports {target} ({why})")
                for name in names:
                    if name.startswith("_") and not name.startswith("__") and target != module:
                        found.append(f"{where}: {module} takes private name {name} from {target}")
    return found


def test_the_code_keeps_every_import_rule():
    assert import_violations(ROOT, PACKAGES + SCRIPTS) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "expected"), [
    ({"dicom_node/__init__.py": "", "dicom_node/engine/__init__.py": "",
      "dicom_node/engine/node.py": "def f():\n    from dicom_node_training.phase1 import train_phase1\n"},
     "dicom_node/engine/node.py:2: dicom_node.engine.node imports dicom_node_training.phase1 (the node never imports the training package)"),
    ({"dicom_node/__init__.py": "", "dicom_node/model/__init__.py": "", "dicom_node/model/inference.py": "import torch\n"},
     "dicom_node/model/inference.py:1: dicom_node.model.inference imports torch (the node runs on onnxruntime only)"),
    ({"dicom_node/__init__.py": "", "dicom_node/results/__init__.py": "",
      "dicom_node/results/sr.py": "from dicom_node_phantoms import generate_study\n"},
     "dicom_node/results/sr.py:1: dicom_node.results.sr imports dicom_node_phantoms (only dicom_node.tools (the demo) uses phantoms)"),
    ({"dicom_node/__init__.py": "", "dicom_node/network/__init__.py": "",
      "dicom_node/network/send.py": "from dicom_node.engine.background import BackgroundLoop\n"},
     "dicom_node/network/send.py:1: dicom_node.network.send imports dicom_node.engine.background (network is driven by the engine, never the reverse)"),
    ({"dicom_node_phantoms/__init__.py": "", "dicom_node_phantoms/study.py": "import torch.nn\n"},
     "dicom_node_phantoms/study.py:1: dicom_node_phantoms.study imports torch.nn (phantoms are numpy + pydicom only)"),
    ({"dicom_node_phantoms/__init__.py": "", "dicom_node_phantoms/variants.py": "from .dicom import _file_meta\n"},
     "dicom_node_phantoms/variants.py:1: dicom_node_phantoms.variants takes private name _file_meta from dicom_node_phantoms.dicom"),
])
def test_the_checker_sees_each_broken_rule(tmp_path, files, expected):
    assert import_violations(_tree(tmp_path, files)) == [expected]


def test_the_demo_may_use_phantoms(tmp_path):
    root = _tree(tmp_path, {"dicom_node/__init__.py": "", "dicom_node/tools/__init__.py": "",
                            "dicom_node/tools/demo.py": "from dicom_node_phantoms import generate_study\n"})
    assert import_violations(root) == []
