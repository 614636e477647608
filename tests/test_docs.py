"""The docs cover the code: every CLI subcommand and config key, generated parts current, links valid.

The subcommands are found by walking the argparse parsers of `dicom-node`, `dicom-node-train` and
`dicom-node-export` (`build_parser()` of each cli module) and the keys by walking the `Config`
dataclass, so a subcommand or key added later fails here until it is documented.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import typing
from pathlib import Path

import pytest

from dicom_node.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_cli = _script("gen_cli_doc")
gen_config = _script("gen_config_doc")
COMMANDS = [name for name, _ in gen_cli.iter_commands()]


def _config_keys(cls=Config, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _config_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _hand_written(text: str) -> str:
    """The doc without its generated blocks."""
    return re.sub(r"<!-- BEGIN GENERATED: .*?<!-- END GENERATED: [a-z]+ -->", "", text, flags=re.S)


def test_the_walk_finds_the_known_commands():
    # guards the walker itself: if it found nothing, the per-command tests below would be vacuous
    for expected in ("dicom-node serve", "dicom-node status", "dicom-node resend", "dicom-node complete",
                     "dicom-node-train fit", "dicom-node-export bundle", "dicom-node-export verify"):
        assert expected in COMMANDS
    assert len(_config_keys()) >= 40 and "retry.max_attempts" in _config_keys()


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_a_hand_written_section_with_an_example(command):
    text = _hand_written((DOCS / "cli.md").read_text())
    m = re.search(rf"^### `{re.escape(command)}`\n(.*?)(?=^#{{2,3}} |\Z)", text, flags=re.S | re.M)
    assert m, f"docs/cli.md: no '### `{command}`' section explaining the subcommand"
    body = m.group(1)
    prose = body.split("```")[0].strip()
    assert len(prose) > 80, f"docs/cli.md: section {command} needs a paragraph saying what it does"
    examples = re.findall(r"```bash\n(.*?)```", body, flags=re.S)
    assert any(command.split(" ", 1)[1] in e for e in examples), f"docs/cli.md: section {command} has no example"


def test_every_option_is_in_the_cli_reference():
    text = (DOCS / "cli.md").read_text()
    for command, parser in gen_cli.iter_commands():
        for action in parser._actions:
            for option in action.option_strings:
                if option.startswith("--") and option != "--help":
                    assert f"`{option}" in text, f"docs/cli.md: {command} {option} missing (run scripts/gen_cli_doc.py)"


def test_cli_reference_is_current():
    text = (DOCS / "cli.md").read_text()
    assert gen_cli.render(text, gen_cli.options_markdown()) == text, \
        "docs/cli.md option reference is out of date: run .venv/bin/python scripts/gen_cli_doc.py"


@pytest.mark.parametrize("key", _config_keys())
def test_every_config_key_is_documented(key):
    text = (DOCS / "configuration.md").read_text()
    assert f"| `{key}` |" in text, f"docs/configuration.md: key {key} missing (run scripts/gen_config_doc.py)"


def test_configuration_doc_is_current():
    text = (DOCS / "configuration.md").read_text()
    assert gen_config.render(text, gen_config.blocks()) == text, \
        "docs/configuration.md is out of date: run .venv/bin/python scripts/gen_config_doc.py"


def test_metric_names_and_events_in_operations_guide_exist_in_code():
    """Names the operations guide promises (metrics, log events) are the ones the code emits."""
    ops = (DOCS / "operations.md").read_text()
    code = "\n".join(p.read_text() for p in (ROOT / "dicom_node").rglob("*.py"))
    packages = {p.name for p in ROOT.glob("dicom_node_*") if (p / "__init__.py").is_file()}  # share the prefix
    for metric in sorted(set(re.findall(r"`(dicom_node_[a-z_]+)`", ops)) - packages):
        base = re.sub(r"_(total|bucket|sum|count|created)$", "", metric)
        assert f'"{base}"' in code or f'"{metric}"' in code, f"operations.md names metric {metric}; the code has none"
    events = set(re.findall(r"\.(?:info|warning|error|debug)\(\s*\"([a-z_]+)\"", code))
    events_section = ops.split("## Logs", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", events_section, flags=re.M))
    assert events <= documented, f"operations.md: log events not documented: {sorted(events - documented)}"
    assert documented <= events, f"operations.md documents events the node does not emit: {sorted(documented - events)}"


def test_relative_links_in_docs_resolve():
    for doc in [*DOCS.glob("*.md"), ROOT / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
            assert (doc.parent / target).exists(), f"{doc.relative_to(ROOT)}: link to {target} does not resolve"


def test_readme_links_every_doc():
    readme = (ROOT / "README.md").read_text()
    for name in ("configuration.md", "conformance.md", "operations.md", "training-to-deployment.md", "cli.md"):
        assert f"docs/{name}" in readme, f"README.md does not link docs/{name}"
