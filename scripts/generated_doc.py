"""Shared `main` of the doc generators (scripts/gen_cli_doc.py, scripts/gen_config_doc.py)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def run(doc: Path, regenerate: Callable[[str], str], script: str, description: str, argv: list[str] | None = None) -> int:
    """Rewrite `doc` with `regenerate(old_text)`, or with --check exit 1 when it is stale."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help=f"do not write; exit 1 when {doc.relative_to(doc.parents[1])} is stale")
    args = parser.parse_args(argv)
    old = doc.read_text()
    new = regenerate(old)
    if args.check:
        if new != old:
            print(f"{doc} is out of date: run .venv/bin/python scripts/{script}", file=sys.stderr)
            return 1
        return 0
    if new != old:
        doc.write_text(new)
        print(f"updated {doc}")
    return 0
