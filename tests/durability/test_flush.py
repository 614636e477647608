"""`dicom_node.durability.flush`: an fsync beside the caller, in the C library's POSIX AIO on Linux and in
a Python pool elsewhere; real files, real descriptors, real failures (fsync of a pipe is EINVAL)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from dicom_node.durability.flush import NativeFlush, PoolFlush, native_available, start_fsync
from dicom_node.durability.spool import Spool

linux = pytest.mark.skipif(sys.platform != "linux", reason="POSIX AIO through the C library: Linux only")
KINDS = [PoolFlush, pytest.param(NativeFlush, marks=linux)]


def open_fds() -> int:
    return len(os.listdir(f"/proc/{os.getpid()}/fd"))


def written(path: Path, size: int = 300_000) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, os.urandom(size))
    return fd


@linux
def test_on_linux_the_flush_runs_in_the_c_library_not_in_a_python_thread(tmp_path):
    assert native_available()
    fd = written(tmp_path / "a.dcm")
    flush = start_fsync(fd)
    os.close(fd)  # the flush has its own duplicate
    assert isinstance(flush, NativeFlush)
    flush.result()


@linux
@pytest.mark.parametrize("kind", KINDS)
def test_a_flush_closes_its_duplicate_of_the_descriptor_when_done(tmp_path, kind):
    before = open_fds()
    for i in range(20):
        fd = written(tmp_path / f"{i}.dcm", 4096)
        flush = kind(fd)
        os.close(fd)
        flush.result()
    assert open_fds() == before


@linux
@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_fsync_raises_its_error_from_result(kind):
    r, w = os.pipe()  # fsync of a pipe: EINVAL
    try:
        flush = kind(w)
        with pytest.raises(OSError) as e:
            flush.result()
        assert e.value.errno == 22
    finally:
        os.close(r)
        os.close(w)


@linux
def test_flushes_nobody_waited_for_are_finished_by_the_next_one(tmp_path):
    before = open_fds()
    fd = written(tmp_path / "refused.dcm")
    for _ in range(5):  # instances refused after their flush began: nobody asks for the result
        start_fsync(fd)
    os.close(fd)
    time.sleep(0.2)  # the C library finishes them meanwhile
    last = written(tmp_path / "next.dcm")
    start_fsync(last).result()
    os.close(last)
    assert open_fds() == before


def test_a_closed_descriptor_is_refused_at_once(tmp_path):
    fd = written(tmp_path / "a.dcm", 10)
    os.close(fd)
    with pytest.raises(OSError) as e:
        start_fsync(fd)
    assert e.value.errno == 9


@linux
def test_the_spool_flushes_received_files_and_its_folders_outside_python(tmp_path):
    spool = Spool(tmp_path / "data")
    received = spool.incoming_dir / "r.dcm"
    fd = written(received)
    flushed = spool.start_flush(fd)
    os.close(fd)
    assert isinstance(flushed, NativeFlush)
    rows: list[str] = []
    path = spool.adopt(spool.instance_path("1.2.3", "1.2.3.4", "1.2.3.4.5"), received, during=lambda: rows.append("row"),
                       flushed=flushed)
    assert rows == ["row"] and path.stat().st_size == 300_000 and not received.exists()
