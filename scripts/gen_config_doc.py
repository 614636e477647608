"""Regenerate the generated parts of docs/configuration.md from dicom_node/config.py.

    .venv/bin/python scripts/gen_config_doc.py           # rewrite the generated blocks
    .venv/bin/python scripts/gen_config_doc.py --check   # exit 1 when the file is out of date

The key table (`configuration_markdown()`) and the annotated default file (`default_config_toml()`)
sit between `<!-- BEGIN GENERATED: name -->` / `<!-- END GENERATED: name -->` markers; the prose
around them is written by hand and left alone. tests/test_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "configuration.md"


def blocks() -> dict[str, str]:
    sys.path.insert(0, str(ROOT))
    from dicom_node.config import configuration_markdown, default_config_toml

    return {"keys": configuration_markdown(), "defaults": "```toml\n" + default_config_toml() + "```\n"}


def render(text: str, generated: dict[str, str]) -> str:
    """`text` with every generated block replaced; a missing marker pair is an error."""
    for name, body in generated.items():
        pattern = re.compile(rf"(<!-- BEGIN GENERATED: {name} [^>]*-->\n).*?(<!-- END GENERATED: {name} -->)", re.S)
        if not pattern.search(text):
            raise SystemExit(f"{DOC}: no '<!-- BEGIN GENERATED: {name} ... -->' / '<!-- END GENERATED: {name} -->' "
                             "markers; add them where the block belongs")
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 when docs/configuration.md is stale")
    args = parser.parse_args(argv)
    old = DOC.read_text()
    new = render(old, blocks())
    if args.check:
        if new != old:
            print(f"{DOC} is out of date: run .venv/bin/python scripts/gen_config_doc.py", file=sys.stderr)
            return 1
        return 0
    if new != old:
        DOC.write_text(new)
        print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
