"""DICOM files recognised by their content, never by their name: the one reader for `dicom-node send`
and `dicom-node analyse`.

`read_dicom_files` reads each file with `pydicom.dcmread(force=False)` (a DICM preamble is required)
and yields either `(path, dataset)` or a `SkippedFile` with the reason in plain words: not DICOM,
unreadable, a DICOMDIR, or no SOP Class / Instance UID (not a storable instance). Folders are
walked recursively in sorted order.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import MediaStorageDirectoryStorage

__all__ = ["SkippedFile", "files_under", "read_dicom_files"]


@dataclass(frozen=True)
class SkippedFile:
    """A file (or folder) that is not a storable DICOM instance, and why."""

    path: Path
    reason: str


def files_under(paths: Iterable[Path], *, prune: Callable[[Path], bool] = lambda d: False
                ) -> Iterator[Path | SkippedFile]:
    """Every file of `paths` (folders walked recursively, sorted; `prune(dir)` True skips a folder)."""
    for p in paths:
        if p.is_dir():
            found = False
            for dirpath, dirnames, filenames in os.walk(p):
                here = Path(dirpath)
                dirnames[:] = sorted(d for d in dirnames if not prune(here / d))
                for name in sorted(filenames):
                    found = True
                    yield here / name
            if not found:
                yield SkippedFile(p, "empty folder")
        elif p.exists():
            yield p
        else:
            yield SkippedFile(p, "no such file or folder")


def read_dicom_files(paths: Iterable[Path], *, stop_before_pixels: bool = False,
                     prune: Callable[[Path], bool] = lambda d: False) -> Iterator[tuple[Path, Dataset] | SkippedFile]:
    """`(path, dataset)` for every storable DICOM instance under `paths`, a `SkippedFile` for anything else."""
    for f in files_under(paths, prune=prune):
        if isinstance(f, SkippedFile):
            yield f
            continue
        try:
            ds = pydicom.dcmread(f, force=False, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError:
            yield SkippedFile(f, "not a DICOM file (no DICM prefix)")
            continue
        except Exception as e:  # truncated or corrupt data elements, permissions
            yield SkippedFile(f, f"unreadable DICOM ({type(e).__name__}: {str(e)[:160]})")
            continue
        meta = getattr(ds, "file_meta", None)
        if "DirectoryRecordSequence" in ds or (
                meta is not None and meta.get("MediaStorageSOPClassUID", "") == MediaStorageDirectoryStorage):
            yield SkippedFile(f, "a DICOMDIR (media directory), not an instance")
        elif "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            yield SkippedFile(f, "no SOPClassUID/SOPInstanceUID (not a storable instance)")
        else:
            yield f, ds
