"""`Spool.adopt`: a received data set moved durably into the spool, by rename on the spool's
filesystem and by copy from another one (a real tmpfs, /dev/shm); `sweep_temp_files` empties
`incoming/` after a crash."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from dicom_node.durability.spool import Spool

UIDS = ("1.2.3", "1.2.3.4", "1.2.3.4.5")


def test_a_received_file_is_renamed_into_the_spool_and_its_folders_made(tmp_path):
    spool = Spool(tmp_path / "data")
    received = spool.incoming_dir / "tmp123.dcm"
    received.write_bytes(b"x" * 1000)
    inode = received.stat().st_ino
    path = spool.adopt(spool.instance_path(*UIDS), received)
    assert path == tmp_path / "data" / "spool" / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert path.read_bytes() == b"x" * 1000 and path.stat().st_ino == inode  # moved, not copied
    assert not received.exists()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no tmpfs at /dev/shm")
def test_a_file_on_another_filesystem_is_copied_durably_and_removed(tmp_path):
    spool = Spool(tmp_path / "data")
    if os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same filesystem here")
    fd, name = tempfile.mkstemp(dir="/dev/shm", suffix=".dcm")
    os.write(fd, b"y" * 5000)
    os.close(fd)
    path = spool.adopt(spool.instance_path(*UIDS), Path(name))
    assert path.read_bytes() == b"y" * 5000
    assert not Path(name).exists()
    assert not list(path.parent.glob(".tmp-*"))


def test_data_sets_left_in_incoming_by_a_crash_are_swept_at_start(tmp_path):
    spool = Spool(tmp_path / "data")
    (spool.incoming_dir / "tmpabc.dcm").write_bytes(b"partial")
    (spool.incoming_dir / "tmpabc.dcm.inflated").write_bytes(b"scratch")
    assert Spool(tmp_path / "data").sweep_temp_files() == 2
    assert not list(spool.incoming_dir.iterdir())
