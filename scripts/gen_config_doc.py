"""Regenerate the generated parts of docs/configuration.md from dicom_node/config.py.

    .venv/bin/python scripts/gen_config_doc.py           # rewrite the generated blocks
    .venv/bin/python scripts/gen_config_doc.py --check   # exit 1 when the file is out of date

The key table (`configuration_markdown()`) and the annotated default file (`default_config_toml()`)
sit between `<!-- BEGIN GENERATED: name -->` / `<!-- END GENERATED: name -->` markers; the prose
around them is written by hand and left alone. tests/test_docs.py runs the check.
"""

from __future__ import annotations

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
        text = pattern.sub(lambda m, body=body: m.group(1) + body + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from generated_doc import run

    return run(DOC, lambda text: render(text, blocks()), "gen_config_doc.py", __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    sys.exit(main())
