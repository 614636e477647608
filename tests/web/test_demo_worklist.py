"""`dicom-node demo --worklist` (the acceptance path of issue 20): the demo's node keeps running with
its worklist, prints the URL and a one-time login; with them a user sees the positive study ranked
above the negative one, with its heatmap preview. Checked over real HTTP against the real process."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nodekit import wait_until
from webkit import WebClient


@pytest.mark.slow
def test_demo_worklist_prints_a_url_and_login_that_show_the_positive_study_first_with_its_heatmap(tmp_path):
    exe = Path(sys.executable).parent / "dicom-node"
    proc = subprocess.Popen([str(exe), "demo", "--out", str(tmp_path / "out"), "--no-orthanc", "--worklist",
                             "--worklist-for", "120"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    try:
        deadline = time.monotonic() + 400
        while not any(line.startswith("log in as:") for line in lines):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "".join(lines)[-3000:]
            lines.append(line)
            assert time.monotonic() < deadline, "".join(lines)[-3000:]
        text = "".join(lines)
        port = int(re.search(r"worklist: http://127\.0\.0\.1:(\d+)/worklist", text).group(1))
        password = re.search(r"log in as: demo / (\S+)", text).group(1)
        c = WebClient(port)
        assert c.login("demo", password).status == 303
        def settled() -> list[dict] | None:  # a loaded machine may pause a send: a late slice means one re-run
            rows = c.get("/api/v1/studies").json()["studies"]
            return rows if rows and all(r["state"] == "delivered" for r in rows) else None

        studies = wait_until(settled, 180, "both studies delivered")
        assert [s["priority"] for s in studies] == ["critical", "routine"]  # positive ranked first
        page = c.get(f"/studies/{studies[0]['study_uid']}")
        assert page.status == 200 and "not for diagnostic use" in page.text
        img = re.search(r'<img src="([^"]+\.png)" alt="heatmap', page.text).group(1)
        png = c.get(img)
        assert png.status == 200 and png.body[:4] == b"\x89PNG"
        assert WebClient(port).login("demo", "not-the-password").status == 401
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the demo stops its node and PACS and exits 0
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
