"""What the worklist pages and the REST API show, read from the state database, the spool and the outbox.

One set of queries for the HTML pages and `/api/v1` (both render these frozen dataclasses):

* `worklist_entries(...)`: each series with its newest job, in reading order (`State.worklist` with
  `dicom_node.engine.priority.READING_ORDER`), with the study and patient fields of its first
  spooled instance. Those fields are not kept in the state database (it holds a digest of the
  patient key, never the values), so they are read from the DICOM header once per series and kept
  in a bounded in-memory cache (`IdentityCache`); after retention has deleted the spool they show
  as unknown. Text filtering (name, ID, accession) therefore happens here, never in SQL.
* `study_detail(...)`: a study's series with their jobs: timeline (the job's stage times and the
  durations between them), deliveries, notifications, findings read back from the SR in the job's
  outbox (`dicom_node.tools.demo.read_findings`, the one reader of our SR), and the Secondary
  Captures (heatmaps with their key slice, and the summary chart), whose PNG `heatmap_png` renders.
* `display_state(...)`: one word a reader understands: receiving, queued, analysing, delivering,
  delivered, delivery failed, analysis failed, refused (skipped by the selection rules).
"""

from __future__ import annotations

import io
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage

from dicom_node.durability.state import JobState, SeriesState, stage_durations
from dicom_node.engine.priority import READING_ORDER
from dicom_node.labels import ALL_LABELS

if TYPE_CHECKING:
    from dicom_node.durability.spool import Spool
    from dicom_node.durability.state import DeliveryRow, JobRow, NotificationRow, State, WorklistRow

__all__ = ["Identity", "IdentityCache", "WorklistEntry", "JobDetail", "SeriesDetail", "StudyDetail", "ResultImage",
           "FindingRow", "DISPLAY_STATES", "display_state", "worklist_entries", "study_detail", "heatmap_png",
           "READING_ORDER_VALUES"]

READING_ORDER_VALUES = tuple(p.value for p in READING_ORDER)
DISPLAY_STATES = ("receiving", "queued", "waiting for the model server", "analysing", "delivering", "delivered",
                  "delivery failed", "analysis failed", "refused")
#: the first words of the ImageComments our heatmap SCs carry (dicom_node.results.sc.HEATMAP_WARNING)
_HEATMAP_PREFIX = "AI heatmap"
_KEY_SLICE_RE = re.compile(r"CT image (?P<image>\S+)(?: frame (?P<frame>\d+))? at (?P<pos>-?[\d.]+) mm with the AI "
                           r"heatmap of window (?P<window>\d+)")


@dataclass(frozen=True)
class Identity:
    """Study and patient fields of a series' first spooled instance (empty when unknown)."""

    patient_name: str = ""
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""
    study_time: str = ""
    study_description: str = ""
    known: bool = False

    @property
    def study_datetime(self) -> str:
        d, t = self.study_date, self.study_time
        if len(d) != 8:
            return ""
        when = f"{d[:4]}-{d[4:6]}-{d[6:]}"
        return when + (f" {t[:2]}:{t[2:4]}" if len(t) >= 4 else "")


class IdentityCache:
    """series UID -> `Identity`, read once from a spooled file's header; at most `size` entries."""

    def __init__(self, size: int = 20000) -> None:
        self.size = size
        self._cache: OrderedDict[str, Identity] = OrderedDict()
        self._lock = threading.Lock()

    def get_many(self, st: State, series_uids: Sequence[str]) -> dict[str, Identity]:
        with self._lock:
            out = {u: self._cache[u] for u in series_uids if u in self._cache}
        missing = [u for u in series_uids if u not in out]
        if missing:
            paths = st.first_instance_paths(missing)
            read = {u: _read_identity(Path(paths[u])) if u in paths else Identity() for u in missing}
            with self._lock:
                for u, ident in read.items():
                    if ident.known:  # unknown ones are read again: the first instance may arrive later
                        self._cache[u] = ident
                while len(self._cache) > self.size:
                    self._cache.popitem(last=False)
            out.update(read)
        return out


def _read_identity(path: Path) -> Identity:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=[
            "PatientName", "PatientID", "AccessionNumber", "StudyDate", "StudyTime", "StudyDescription"])
    except (OSError, ValueError, pydicom.errors.InvalidDicomError):
        return Identity()

    def text(kw: str) -> str:
        return str(ds.get(kw, "") or "")

    return Identity(text("PatientName").replace("^", ", ", 1).replace("^", " "), text("PatientID"),
                    text("AccessionNumber"), text("StudyDate"), text("StudyTime"), text("StudyDescription"), True)


def display_state(series_state: SeriesState, job: JobRow | None) -> str:
    if series_state is SeriesState.RECEIVING:
        return "receiving"
    if series_state is SeriesState.SKIPPED:
        return "refused"
    if job is not None and job.deferred:
        return "waiting for the model server"  # deferred: its Triton server did not answer (`job_deferred`)
    if job is None or job.state is JobState.QUEUED:
        return "queued"
    if job.state is JobState.RUNNING:
        return "analysing"
    if job.state in (JobState.BUILT, JobState.SENDING):
        return "delivering"
    if job.state is JobState.DONE:
        return "delivered"
    return "delivery failed" if job.result_uids else "analysis failed"


@dataclass(frozen=True)
class WorklistEntry:
    study_uid: str
    series_uid: str
    identity: Identity
    received_at: float  # first instance
    last_instance_at: float
    n_instances: int
    state: str  # one of DISPLAY_STATES
    priority: str | None
    reason: str | None
    score: float | None  # the highest window PE probability (0 for a failed analysis)
    job_id: int | None
    skip_reason: str | None

    def since_last_s(self, now: float) -> float:
        return max(0.0, now - self.last_instance_at)


def _entry(r: WorklistRow, ident: Identity) -> WorklistEntry:
    j = r.job
    return WorklistEntry(r.study_uid, r.series_uid, ident, r.first_instance_at, r.last_instance_at, r.n_instances,
                         display_state(r.series_state, j), j.priority_class if j else None,
                         j.priority_reason if j else None, j.priority_score if j else None, j.id if j else None,
                         r.skip_reason)


def worklist_entries(st: State, identities: IdentityCache, *, priorities: Sequence[str] | None = None,
                     states: Sequence[str] | None = None, text: str = "", limit: int = 100, offset: int = 0,
                     study_uid: str | None = None) -> list[WorklistEntry]:
    """The worklist in reading order, filtered. `priorities` as in `State.worklist` ("" = not analysed
    yet); `states` display states; `text` a case-insensitive part of patient name, ID or accession."""
    needle = text.strip().lower()
    if not needle and not states:  # the database pages for us
        rows = st.worklist(READING_ORDER_VALUES, priorities=priorities, limit=limit, offset=offset, study_uid=study_uid)
        ids = identities.get_many(st, [r.series_uid for r in rows])
        return [_entry(r, ids[r.series_uid]) for r in rows]
    rows = st.worklist(READING_ORDER_VALUES, priorities=priorities, limit=1_000_000, study_uid=study_uid)
    ids = identities.get_many(st, [r.series_uid for r in rows])
    out = []
    for r in rows:
        e = _entry(r, ids[r.series_uid])
        if states and e.state not in states:
            continue
        if needle and not any(needle in v.lower() for v in (e.identity.patient_name, e.identity.patient_id,
                                                           e.identity.accession_number)):
            continue
        out.append(e)
    return out[offset:offset + limit]


@dataclass(frozen=True)
class FindingRow:
    label: str
    probability: float
    threshold: float
    present: bool
    validated: bool = True  # False: the SR marks it "low confidence, not validated"


@dataclass(frozen=True)
class ResultImage:
    """A Secondary Capture of a job: a heatmap over a key slice, or the summary chart."""

    sop_uid: str
    kind: str  # "heatmap" or "summary"
    description: str
    window: int | None = None  # 1-based window of the heatmap
    source_image: str | None = None  # InstanceNumber of the key slice in the CT series
    position_mm: float | None = None


@dataclass(frozen=True)
class JobDetail:
    job: JobRow
    state: str
    timeline: tuple[tuple[str, float], ...]  # (stage, unix time) in the order they happened
    durations: dict[str, float]
    deliveries: tuple[DeliveryRow, ...]
    notifications: tuple[NotificationRow, ...]
    findings: tuple[FindingRow, ...]
    images: tuple[ResultImage, ...]
    results_available: bool  # False once retention deleted the outbox


@dataclass(frozen=True)
class SeriesDetail:
    entry: WorklistEntry
    jobs: tuple[JobDetail, ...] = field(default=())


@dataclass(frozen=True)
class StudyDetail:
    study_uid: str
    identity: Identity
    series: tuple[SeriesDetail, ...]


def _job_detail(st: State, spool: Spool, series_state: SeriesState, job: JobRow) -> JobDetail:
    box = spool.job_outbox(job.id)
    findings: list[FindingRow] = []
    images: list[ResultImage] = []
    files = sorted(box.glob("*.dcm")) if box.is_dir() else []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (OSError, ValueError, pydicom.errors.InvalidDicomError):
            continue
        if ds.SOPClassUID == Comprehensive3DSRStorage:
            from dicom_node.tools.demo import read_findings

            found = read_findings(ds)
            findings = [FindingRow(k, found[k].probability, found[k].threshold, found[k].present, found[k].validated)
                        for k in ALL_LABELS if k in found]
        elif ds.SOPClassUID == SecondaryCaptureImageStorage:
            comments, derivation = str(ds.get("ImageComments", "")), str(ds.get("DerivationDescription", ""))
            m = _KEY_SLICE_RE.search(derivation)
            if comments.startswith(_HEATMAP_PREFIX) and m:
                images.append(ResultImage(str(ds.SOPInstanceUID), "heatmap", derivation, int(m["window"]), m["image"],
                                          float(m["pos"])))
            else:
                images.append(ResultImage(str(ds.SOPInstanceUID), "summary", comments.split(".")[0] or derivation))
    images.sort(key=lambda i: (i.kind != "heatmap", i.window or 0))
    timeline = tuple(sorted(((k, float(v)) for k, v in job.times.items() if v), key=lambda kv: kv[1]))
    return JobDetail(job, display_state(series_state, job), timeline, stage_durations(job.times),
                     tuple(st.deliveries(job.id)), tuple(st.notifications(job.id)), tuple(findings), tuple(images),
                     bool(files))


def study_detail(st: State, spool: Spool, identities: IdentityCache, study_uid: str) -> StudyDetail | None:
    """The study's series (each with every job, newest first), or None when the node has no such study."""
    entries = worklist_entries(st, identities, study_uid=study_uid, limit=1000)
    if not entries:
        return None
    series = []
    for e in entries:
        s = st.series(e.series_uid)
        jobs = sorted(st.jobs(series_uid=e.series_uid), key=lambda j: (j.revision, j.id), reverse=True)
        series.append(SeriesDetail(e, tuple(_job_detail(st, spool, s.state if s else SeriesState.DONE, j)
                                            for j in jobs)))
    ident = next((e.identity for e in entries if e.identity.known), entries[0].identity)
    return StudyDetail(study_uid, ident, tuple(series))


def heatmap_png(spool: Spool, job_id: int, sop_uid: str) -> bytes | None:
    """The PNG of a Secondary Capture in job `job_id`'s outbox (None when it is not there). `sop_uid`
    must be validated by the caller (it becomes part of a path)."""
    from PIL import Image

    from dicom_node.tools.render import render_image

    path = spool.job_outbox(job_id) / f"{sop_uid}.dcm"
    if not path.is_file():
        return None
    ds = pydicom.dcmread(path)
    if ds.SOPClassUID != SecondaryCaptureImageStorage:
        return None
    buf = io.BytesIO()
    Image.fromarray(render_image(ds)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def age_text(seconds: float) -> str:
    """'42 s', '7 min', '3 h 05 min', '2 d 4 h'."""
    s = int(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"
