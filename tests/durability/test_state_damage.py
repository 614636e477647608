"""A lost or damaged state database is refused, never silently replaced, and rebuilt from the spool on request
(issue 22, corpus case 9). Real `dicom-node serve` processes, dcmtk storescu as the scanner, storescp as the PACS."""

from __future__ import annotations

import os
import subprocess

import pytest

from nodekit import NodeProcess, phantom_series, storescu, wait_until

pytestmark = [pytest.mark.dcmtk]


def _serve(node: NodeProcess, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(node.command(*extra), capture_output=True, text=True, timeout=60, env=node.env)


def test_a_deleted_then_emptied_state_database_over_a_spool_is_refused_and_rebuilt_on_request(tmp_path, storescp):
    node = NodeProcess(tmp_path, destinations=[f"STORESCP@127.0.0.1:{storescp.port}"]).start()
    try:
        assert storescu(node.port, phantom_series(tmp_path / "in", n_slices=20)).returncode == 0
        wait_until(lambda: any(e["event"] == "job_finished" and e["state"] == "done" for e in node.events()), 60,
                   "the first result delivered")
    finally:
        node.stop()
    db = tmp_path / "data" / "state.sqlite"
    for what in ("deleted", "emptied"):
        if what == "deleted":
            db.unlink()
        else:
            db.write_bytes(b"")  # truncated to nothing, as a bad restore or a full disk leaves it
        r = _serve(node)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        (line,) = r.stderr.strip().splitlines()
        assert line.startswith(f"dicom-node serve: state database {db} has no instance records but the spool "
                               f"{tmp_path / 'data' / 'spool'} holds received instances"), line
        assert "dicom-node serve --rebuild-state" in line
    node.start("--rebuild-state")
    try:
        (rebuilt,) = [e for e in node.events() if e["event"] == "state_rebuilt"]
        assert rebuilt["instances"] == 20 and rebuilt["series"] == 1 and rebuilt["unreadable_count"] == 0
        assert len(rebuilt["moved_aside"]) == 1 and os.path.exists(rebuilt["moved_aside"][0])  # the empty file, kept
        wait_until(lambda: sum(e["event"] == "job_finished" and e["state"] == "done" for e in node.events()) == 2, 60,
                   "the spooled series analysed and delivered again")
    finally:
        node.stop()
    assert oct(db.stat().st_mode & 0o777) == "0o600"
    r = _serve(node, "--rebuild-state")  # a readable database with records is never thrown away
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line == (f"dicom-node serve: state database {db} is readable and holds 20 instance records; "
                    "--rebuild-state is for a damaged, missing or empty one: start without it")


def test_a_garbage_header_is_moved_aside_by_rebuild_state(tmp_path, storescp):
    node = NodeProcess(tmp_path, destinations=[f"STORESCP@127.0.0.1:{storescp.port}"]).start()
    try:
        assert storescu(node.port, phantom_series(tmp_path / "in", n_slices=20)).returncode == 0
        wait_until(lambda: any(e["event"] == "job_finished" for e in node.events()), 60, "the first result")
    finally:
        node.stop()
    db = tmp_path / "data" / "state.sqlite"
    with open(db, "r+b") as f:
        f.write(b"\xff" * 100)
    r = _serve(node)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith(f"dicom-node serve: state database {db} is damaged (file is not a database); "), line
    node.start("--rebuild-state")
    try:
        (rebuilt,) = [e for e in node.events() if e["event"] == "state_rebuilt"]
        assert rebuilt["instances"] == 20
        assert open(rebuilt["moved_aside"][0], "rb").read(100) == b"\xff" * 100
    finally:
        node.stop()
