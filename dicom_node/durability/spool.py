"""Durable instance storage: UIDs validated, temp file + fsync + rename + directory fsync.

Layout under the data folder::

    spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   received instances
    outbox/<job id>/<SOPInstanceUID>.dcm                                   results waiting for delivery
    incoming/                                                              data sets being received

Folders are created 0700 (spool/, outbox/ and incoming/ made so at start) and files 0600
(`tempfile.mkstemp`, pynetdicom's `NamedTemporaryFile`): they hold patient data.

A file is visible under its final name only once its bytes are on disk (`durable_write`, or
`adopt` for a data set the SCP streamed into `incoming/`: rename, then fsync of file and folder), so
a crash at any moment leaves either the complete file or nothing (plus a stray `.tmp-*` file or a
file in `incoming/` that `sweep_temp_files` removes at start). Folders created for a new study or
series are made durable in their parent before the first file in them counts.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from dicom_node.durability.flush import Flushing, start_fsync

__all__ = ["Spool", "InvalidUid", "validate_uid", "durable_write", "fsync_dir", "make_dirs", "DiskFull"]

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_UID_RE_LENIENT = re.compile(r"^[0-9]+(\.[0-9]+)*$")  # leading zeros occur in the wild; still path-safe


class InvalidUid(ValueError):
    """A UID that is not a DICOM UID (digits and dots, <= 64 characters) and must not become a path."""


class DiskFull(OSError):
    """Free space on the spool disk is below `min_free_disk_mb`."""


def validate_uid(uid: object, what: str = "UID") -> str:
    """Return `uid` stripped of trailing NUL/space padding, or raise InvalidUid naming it."""
    if not isinstance(uid, str):
        raise InvalidUid(f"{what}: {uid!r} is missing or not text; expected a DICOM UID such as 1.2.840.10008.1.1")
    u = uid.rstrip("\x00 ")
    if not u or len(u) > 64 or not _UID_RE_LENIENT.match(u):
        raise InvalidUid(f"{what}: {uid[:80]!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return u


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """`mkdir -p path`, each folder it creates fsync'd into its parent (a power cut must not lose the
    folder of a file that was fsync'd inside it)."""
    if path.is_dir():
        return
    make_dirs(path.parent)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        return
    fsync_dir(path.parent)


def durable_write(dest: Path, data: bytes) -> None:
    """Write `data` to `dest` atomically and durably (temp file in the same folder, fsync, rename, fsync folder)."""
    make_dirs(dest.parent)
    _durable_replace(dest, lambda f: f.write(data))


def _durable_replace(dest: Path, fill: Callable[[BinaryIO], object]) -> None:
    """`fill` a temp file in `dest`'s folder, fsync it, rename it to `dest`, fsync the folder; on any error the temp
    file is removed and `dest` is untouched."""
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fill(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(dest.parent)


class Spool:
    """The node's instance spool and result outbox under one data folder."""

    def __init__(self, data_dir: str | os.PathLike, *, min_free_disk_mb: int = 0) -> None:
        self.root = Path(data_dir)
        self.spool_dir = self.root / "spool"
        self.outbox_dir = self.root / "outbox"
        self.incoming_dir = self.root / "incoming"
        self.min_free_disk_mb = min_free_disk_mb
        for d in (self.root, self.spool_dir, self.outbox_dir, self.incoming_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (self.spool_dir, self.outbox_dir):  # folders of an older node were 0755: patient data, owner only
            if d.stat().st_mode & 0o077 and d.stat().st_uid == os.geteuid():
                d.chmod(0o700)

    # --- instances --------------------------------------------------------------------------------
    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        study = validate_uid(study_uid, "StudyInstanceUID")
        series = validate_uid(series_uid, "SeriesInstanceUID")
        sop = validate_uid(sop_uid, "SOPInstanceUID")
        return Path(f"{self.spool_dir}/{study}/{series}/{sop}.dcm")  # one path parse, not three joins

    def free_mb(self) -> float:
        return shutil.disk_usage(self.spool_dir).free / 2**20

    def check_space(self, incoming_bytes: int = 0) -> None:
        """Raise DiskFull when writing `incoming_bytes` would leave less than `min_free_disk_mb`."""
        if self.min_free_disk_mb <= 0:
            return
        free = self.free_mb() - incoming_bytes / 2**20
        if free < self.min_free_disk_mb:
            raise DiskFull(f"spool {self.spool_dir}: {free:.0f} MiB free, below min_free_disk_mb={self.min_free_disk_mb}; "
                           "free disk space or lower min_free_disk_mb")

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Durably store one encoded instance (Part 10 bytes); return its path."""
        path = self.instance_path(study_uid, series_uid, sop_uid)
        self.check_space(len(data))
        durable_write(path, data)
        return path

    def start_flush(self, fd: int) -> Flushing:
        """Start flushing the received file open as `fd` now, while the SCP still checks it; give the
        result to `adopt` as `flushed`. The flush works on its own duplicate of `fd` (the caller may close
        `fd` at once; a rename meanwhile does not matter: the data belongs to the inode), outside Python
        where the C library can (`dicom_node.durability.flush`)."""
        return start_fsync(fd)

    def adopt(self, path: Path, received: Path, during: Callable[[], None] | None = None,
              flushed: Flushing | None = None) -> Path:
        """Durably move the received Part 10 file `received` into the spool as `path` (the instance's
        `instance_path`, which validated its UIDs); return `path`.

        On the spool's filesystem (the SCP streams into `incoming/` under `dicom-node serve`): rename,
        then the file's fsync and the folder's fsync at the same time (each waits for the disk's cache
        flush; issued together they take less than one after another: 0.82-0.93 ms against 1.22-1.34 ms an
        instance with the row on this project's test machine, docs/benchmarks.md). `during` (the SCP's
        state row commit, itself flushed) runs while those flushes are under way; this returns, or
        raises what `during` raised, only when all of them are done. So a crash before the caller
        acknowledges can leave an unlisted file, or a row whose file is missing or short; both are
        repaired by the sender's re-send (nothing was acknowledged), which the SCP detects by the
        size recorded in the row. Elsewhere: a durable copy, then `during`. `received` is gone afterwards.
        `flushed` (`start_flush` of `received`, begun before the checks) stands for the file's fsync."""
        if self.min_free_disk_mb > 0:
            self.check_space(received.stat().st_size)
        try:
            try:
                os.replace(received, path)
            except FileNotFoundError:  # the series' first instance: its folders are made (durably) first
                make_dirs(path.parent)
                os.replace(received, path)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            make_dirs(path.parent)
            _durable_copy(received, path)
            received.unlink(missing_ok=True)
            if during is not None:
                during()
            return path
        file_synced = flushed if flushed is not None else _start_fsync_of(path, os.O_RDONLY)
        dir_synced = _start_fsync_of(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if during is not None:
                during()
        finally:
            file_synced.result()
            dir_synced.result()
        return path

    def delete_instances(self, study_uid: str, series_uid: str, paths: Iterable[str | os.PathLike]) -> int:
        """Delete these spooled files of a series (the ones its rows listed), then its folders if empty;
        returns how many were deleted. Only the listed files: an instance that arrived meanwhile (a late
        slice of the series, acknowledged after the list was taken) stays, with its folder."""
        n = 0
        for p in paths:
            try:
                os.unlink(p)
                n += 1
            except FileNotFoundError:
                pass
        d = self.spool_dir / validate_uid(study_uid) / validate_uid(series_uid)
        for folder in (d, d.parent):
            try:
                folder.rmdir()
            except OSError:  # not empty (a late instance), or gone: either way nothing to do
                break
        return n

    # --- results ----------------------------------------------------------------------------------
    def job_outbox(self, job_id: int) -> Path:
        return self.outbox_dir / str(int(job_id))

    def store_result(self, job_id: int, sop_uid: str, data: bytes) -> Path:
        path = self.job_outbox(job_id) / f"{validate_uid(sop_uid, 'result SOPInstanceUID')}.dcm"
        durable_write(path, data)
        return path

    def sweep_temp_files(self) -> int:
        """Remove temp files and data sets left in `incoming/` by a crash mid-write (never acknowledged,
        never referenced)."""
        n = 0
        for base in (self.spool_dir, self.outbox_dir):
            for p in base.rglob(".tmp-*"):
                p.unlink(missing_ok=True)
                n += 1
        for p in self.incoming_dir.iterdir():
            if p.is_file():
                p.unlink(missing_ok=True)
                n += 1
        return n


def _start_fsync_of(path: Path, flags: int) -> Flushing:
    fd = os.open(path, flags)
    try:
        return start_fsync(fd)  # on a duplicate of fd
    finally:
        os.close(fd)


def _durable_copy(src: Path, dest: Path) -> None:
    """Copy `src` to `dest` atomically and durably, streaming (a data set may be hundreds of MiB)."""
    with open(src, "rb") as inp:
        _durable_replace(dest, lambda out: shutil.copyfileobj(inp, out, 1 << 20))
