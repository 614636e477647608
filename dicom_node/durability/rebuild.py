"""Rebuild the state database from the spool (`dicom-node serve --rebuild-state`).

For a state database that is damaged (`StateDamaged`), deleted, truncated or replaced by an empty
one while the spool still holds received instances: the node refuses to start on that
(`Node`: "no instance records but the spool holds ..."), since it would otherwise run with its
history gone and the spooled instances orphaned.

`rebuild_state(data_dir)` moves the old files aside (`state.sqlite`, `-wal`, `-shm` ->
`state.sqlite.damaged-<unix time>`, `...-wal`, `...-shm`: kept for inspection, never deleted),
creates a new database and writes one instance row per readable spooled file (UIDs, SOP class,
transfer syntax, patient key and size read from the file; the calling AE is unknown, ""). Every
series starts `receiving`, so it completes after its quiet period and is analysed again; its results
carry the same deterministic UIDs, so a PACS that has them replaces rather than duplicates them.

What cannot be rebuilt: job history, delivery and notification states, revision numbers (the new
results are revision 1 again) and skipped series' reasons (selection decides again). Spool files
that cannot be read are counted, named in the `state_rebuilt` log event and left in place.

A readable database that already holds instance records is not touched (`RebuildRefused`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from dicom_node.durability.state import InstanceRow, SeriesConflict, State, StateDamaged, patient_key
from dicom_node.log import get_logger

__all__ = ["RebuildReport", "RebuildRefused", "rebuild_state", "spooled_files", "spool_has_instances"]

STATE_NAME = "state.sqlite"


class RebuildRefused(RuntimeError):
    """The state database is readable and not empty: rebuilding would throw its history away."""


@dataclass(frozen=True)
class RebuildReport:
    moved_aside: tuple[str, ...]  # the old database files, renamed
    instances: int  # instance rows written
    series: int
    unreadable: tuple[str, ...]  # spool files that could not be read (left in place)


def spooled_files(spool_dir: Path) -> Iterator[Path]:
    """Every spooled instance file (spool/<study>/<series>/<sop>.dcm), temp files excluded."""
    for p in sorted(spool_dir.glob("*/*/*.dcm")):
        if not p.name.startswith(".tmp-"):
            yield p


def spool_has_instances(spool_dir: Path) -> bool:
    return next(spooled_files(spool_dir), None) is not None


def _move_aside(path: Path) -> tuple[str, ...]:
    stamp = int(time.time())
    moved = []
    for suffix in ("", "-wal", "-shm"):
        src = path.with_name(path.name + suffix)
        if src.exists():
            dst = path.with_name(f"{path.name}.damaged-{stamp}{suffix}")
            os.replace(src, dst)
            moved.append(str(dst))
    return tuple(moved)


def _row(path: Path) -> tuple[InstanceRow, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    study, series, sop = path.parent.parent.name, path.parent.name, path.stem  # validated UIDs when stored
    if str(ds.SOPInstanceUID) != sop or str(ds.SeriesInstanceUID) != series or str(ds.StudyInstanceUID) != study:
        raise ValueError("its UIDs differ from its place in the spool")
    row = InstanceRow(sop, series, study, str(path), str(ds.SOPClassUID), ts, path.stat().st_mtime, path.stat().st_size, "")
    return row, patient_key(ds.get("PatientID"), ds.get("IssuerOfPatientID"))


def rebuild_state(data_dir: str | os.PathLike[str]) -> RebuildReport:
    """Move a damaged, empty or missing state database aside and rebuild its instance rows from the spool."""
    root = Path(data_dir)
    path = root / STATE_NAME
    log = get_logger("dicom_node.durability.rebuild")
    moved: tuple[str, ...] = ()
    try:
        old = State(path)
    except StateDamaged:
        moved = _move_aside(path)
    else:
        n = old.instance_count()
        old.close()
        if n:
            raise RebuildRefused(f"state database {path} is readable and holds {n} instance records; --rebuild-state is "
                                 "for a damaged, missing or empty one: start without it")
        moved = _move_aside(path)
    state = State(path)
    written, series, unreadable = 0, set(), []
    try:
        for f in spooled_files(root / "spool"):
            try:
                row, key = _row(f)
                if state.add_instance(row, patient_key=key):
                    written += 1
                    series.add(row.series_uid)
            except (OSError, ValueError, AttributeError, SeriesConflict, InvalidDicomError) as e:
                unreadable.append(f"{f.relative_to(root)} ({type(e).__name__})")
    finally:
        state.close()
    report = RebuildReport(moved, written, len(series), tuple(unreadable))
    log.warning("state_rebuilt", path=str(path), moved_aside=list(moved), instances=written, series=len(series),
                unreadable=list(unreadable)[:20], unreadable_count=len(unreadable),
                note="every series is analysed again after its quiet period; job history and revisions start anew")
    return report
