"""dcmtk `dsr2html` rendering of the SR, and a headless-Chromium screenshot of it.

The impression and the research-use statement come before any image reference in the rendered
page; Chromium (`chromium --headless --screenshot`) renders that page to a PNG. The PNG shown in
docs/results.md (`docs/sr_dsr2html.png`) is written by

    .venv/bin/python tests/results/test_dsr2html.py docs/sr_dsr2html.png

Skips only where dcmtk or chromium is not installed (scripts/setup.sh installs both when root).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sr_cases import positive_case

DSR2HTML = shutil.which("dsr2html") or "/usr/bin/dsr2html"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_dsr2html = pytest.mark.skipif(not Path(DSR2HTML).exists(), reason="dcmtk not installed")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")


def render_html(sr_path: Path, html_path: Path) -> str:
    r = subprocess.run([DSR2HTML, str(sr_path), str(html_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return html_path.read_text(errors="replace")


def screenshot(html_path: Path, png_path: Path, size: tuple[int, int] = (900, 760)) -> None:
    assert CHROMIUM is not None
    r = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={size[0]},{size[1]}", f"--screenshot={png_path}", html_path.as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and png_path.exists(), r.stderr[-2000:]


@needs_dsr2html
def test_impression_and_statement_come_before_any_image_reference(pe_case, no_pe_case, tmp_path):
    from dicom_node import RESEARCH_USE_STATEMENT
    from dicom_node.results.sr import impression

    for name, (_, _, pred, result) in (("positive", pe_case), ("negative", no_pe_case)):
        sr = tmp_path / f"{name}.dcm"
        result.sr.save_as(sr, enforce_file_format=True)
        html = render_html(sr, tmp_path / f"{name}.html")
        lines = html.splitlines()
        at = {key: next(i for i, line in enumerate(lines) if key in line)
              for key in ("<b>Impression:</b>", impression(pred.labels).replace("<", "&lt;").replace(">", "&gt;"),
                          RESEARCH_USE_STATEMENT, "CT image", "Measurement Group")}
        first_image = at["CT image"]
        assert at["<b>Impression:</b>"] < at[RESEARCH_USE_STATEMENT] < first_image < at["Measurement Group"]
        assert first_image < 100, f"the first image reference is on line {first_image} of {len(lines)}"


@needs_dsr2html
@needs_chromium
def test_chromium_renders_the_page(pe_case, tmp_path):
    from PIL import Image

    sr = tmp_path / "sr.dcm"
    pe_case[3].sr.save_as(sr, enforce_file_format=True)
    html = tmp_path / "sr.html"
    render_html(sr, html)
    png = tmp_path / "sr.png"
    screenshot(html, png)
    img = np.asarray(Image.open(png).convert("L"))
    assert img.shape == (760, 900)
    assert (img < 128).sum() > 2000, "rendered page is blank"


def _docs_png(out: Path) -> None:
    """Write the docs screenshot: the positive test case's SR rendered by dsr2html in Chromium."""
    import tempfile

    from PIL import Image

    case = positive_case()
    with tempfile.TemporaryDirectory() as tmp:
        sr, html, png = Path(tmp) / "sr.dcm", Path(tmp) / "sr.html", Path(tmp) / "sr.png"
        case[3].sr.save_as(sr, enforce_file_format=True)
        render_html(sr, html)
        screenshot(html, png)
        Image.open(png).convert("L").quantize(16).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size} bytes)")

if __name__ == "__main__":
    _docs_png(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/sr_dsr2html.png"))
