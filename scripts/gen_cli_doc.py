"""Regenerate the option reference of docs/cli.md from the argparse parsers of the three CLIs.

    .venv/bin/python scripts/gen_cli_doc.py           # rewrite the generated block
    .venv/bin/python scripts/gen_cli_doc.py --check   # exit 1 when docs/cli.md is out of date

The block between `<!-- BEGIN GENERATED: options ... -->` and `<!-- END GENERATED: options -->`
lists every subcommand with its arguments, defaults and help, read from each module's
`build_parser()` (`dicom_node.cli`, `dicom_node_training.cli`, `dicom_node_export.cli`); the explanations and examples
above it are written by hand. `iter_commands()` is also what tests/test_docs.py walks, so a
subcommand added later is found without editing the test.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "cli.md"
CLIS = (("dicom-node", "dicom_node.cli"), ("dicom-node-train", "dicom_node_training.cli"), ("dicom-node-export", "dicom_node_export.cli"))


def parsers() -> list[tuple[str, argparse.ArgumentParser]]:
    sys.path.insert(0, str(ROOT))
    return [(prog, importlib.import_module(module).build_parser()) for prog, module in CLIS]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    out: dict[str, argparse.ArgumentParser] = {}
    seen: set[int] = set()
    for action in parser._actions:  # argparse keeps subcommands here; there is no public accessor
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # aliases share one parser
                    seen.add(id(sub))
                    out[name] = sub
    return out


def iter_commands() -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """('dicom-node serve', parser) for every subcommand of every CLI, nested ones included."""
    def walk(prefix: str, parser: argparse.ArgumentParser):
        for name, sub in _subparsers(parser).items():
            yield f"{prefix} {name}", sub
            yield from walk(f"{prefix} {name}", sub)

    for prog, parser in parsers():
        yield from walk(prog, parser)


def _help_text(parser: argparse.ArgumentParser) -> dict[int, str]:
    """Help of each subcommand as given to add_parser(help=...), keyed by id(subparser)."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                out[id(sub)] = helps.get(name) or ""
    return out


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _argument_rows(parser: argparse.ArgumentParser) -> list[str]:
    rows = []
    for a in parser._actions:
        if isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if a.option_strings:
            name = ", ".join(a.option_strings)
            if a.nargs != 0:
                name += " " + (a.metavar or a.dest.upper()) if not isinstance(a.metavar, tuple) else " " + " ".join(a.metavar)
        else:
            name = a.metavar or a.dest
            if a.nargs in ("+", "*"):
                name += " ..."
        help_text = (a.help or "") % {"default": a.default, "prog": parser.prog} if a.help and "%(" in a.help else (a.help or "")
        notes = []
        if a.required:
            notes.append("required")
        if a.choices:
            notes.append("one of " + ", ".join(map(str, a.choices)))
        if a.option_strings and a.nargs != 0 and a.default not in (None, argparse.SUPPRESS, ""):
            notes.append(f"default {a.default}")
        if isinstance(a, argparse._AppendAction):
            notes.append("repeatable")
        rows.append(f"| `{_cell(name)}` | {_cell(help_text)} | {_cell('; '.join(notes))} |")
    return rows


def options_markdown() -> str:
    out = []
    for prog, parser in parsers():
        helps: dict[int, str] = {}

        def collect(p, into: dict[int, str] = helps) -> None:
            into.update(_help_text(p))
            for sub in _subparsers(p).values():
                collect(sub, into)

        collect(parser)
        out.append(f"### `{prog}`\n")
        commands = [(name, sub) for name, sub in iter_commands() if name.split(" ")[0] == prog]
        for name, sub in commands:
            out.append(f"#### `{name}`\n")
            if helps.get(id(sub)):
                out.append(_cell(helps[id(sub)]) + "\n")
            rows = _argument_rows(sub)
            if rows:
                out.append("| argument | meaning | notes |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    return "\n".join(out)


def render(text: str, body: str) -> str:
    pattern = re.compile(r"(<!-- BEGIN GENERATED: options [^>]*-->\n).*?(<!-- END GENERATED: options -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC}: no '<!-- BEGIN GENERATED: options ... -->' / '<!-- END GENERATED: options -->' markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generated_doc import run

    return run(DOC, lambda text: render(text, options_markdown()), "gen_cli_doc.py", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
