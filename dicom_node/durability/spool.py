"""Durable instance storage: UIDs validated, temp file + fsync + rename + directory fsync.

Layout under the data folder::

    spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm   received instances
    outbox/<job id>/<SOPInstanceUID>.dcm                                   results waiting for delivery

Folders are created 0700 (spool/ and outbox/ made so at start) and files 0600 (`tempfile.mkstemp`):
they hold patient data.

A file is visible under its final name only once its bytes are on disk (`durable_write`), so a
crash at any moment leaves either the complete file or nothing (plus a stray `.tmp-*` file that
`sweep_temp_files` removes at start).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = ["Spool", "InvalidUid", "validate_uid", "durable_write", "fsync_dir", "DiskFull"]

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


def durable_write(dest: Path, data: bytes) -> None:
    """Write `data` to `dest` atomically and durably (temp file in the same folder, fsync, rename, fsync folder)."""
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
        self.min_free_disk_mb = min_free_disk_mb
        for d in (self.root, self.spool_dir, self.outbox_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        for d in (self.spool_dir, self.outbox_dir):  # folders of an older node were 0755: patient data, owner only
            if d.stat().st_mode & 0o077 and d.stat().st_uid == os.geteuid():
                d.chmod(0o700)

    # --- instances --------------------------------------------------------------------------------
    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        study = validate_uid(study_uid, "StudyInstanceUID")
        series = validate_uid(series_uid, "SeriesInstanceUID")
        sop = validate_uid(sop_uid, "SOPInstanceUID")
        return self.spool_dir / study / series / f"{sop}.dcm"

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

    def delete_series(self, study_uid: str, series_uid: str) -> int:
        d = self.spool_dir / validate_uid(study_uid) / validate_uid(series_uid)
        n = len(list(d.glob("*.dcm"))) if d.is_dir() else 0
        shutil.rmtree(d, ignore_errors=True)
        try:
            d.parent.rmdir()
        except OSError:
            pass
        return n

    # --- results ----------------------------------------------------------------------------------
    def job_outbox(self, job_id: int) -> Path:
        return self.outbox_dir / str(int(job_id))

    def store_result(self, job_id: int, sop_uid: str, data: bytes) -> Path:
        path = self.job_outbox(job_id) / f"{validate_uid(sop_uid, 'result SOPInstanceUID')}.dcm"
        durable_write(path, data)
        return path

    def sweep_temp_files(self) -> int:
        """Remove temp files left by a crash mid-write (never acknowledged, never referenced)."""
        n = 0
        for base in (self.spool_dir, self.outbox_dir):
            for p in base.rglob(".tmp-*"):
                p.unlink(missing_ok=True)
                n += 1
        return n
