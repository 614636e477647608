"""Helpers for the node tests: a stand-in job body, phantom series, dcmtk storescu, node processes.

`sc_job` is a test double for the *model only*: it decodes the middle slice of the received series
(exercising the worker-side decoding of compressed syntaxes) and returns one real Secondary Capture
with UIDs derived from the series, its instances and the bundle, so a re-run gives the same UIDs.
`SC_JOB` is it as a `JobBody` (nothing to prepare); `NodeProcess` runs it by `--job nodekit:SC_JOB`,
the in-process fixtures pass the plain `sc_job` callable (both are accepted).
Environment knobs (for node subprocesses): NODE_TEST_JOB_DELAY_S sleeps inside the job,
NODE_TEST_JOB_MARKER=DIR writes `started-<job>-<revision>` there when a job starts.
"""

from __future__ import annotations

import dataclasses
import datetime
import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicom_node.engine.worker import JobBody, JobContext, JobResult
from peers import free_port, terminate, wait_for_port

REPO = Path(__file__).resolve().parents[1]
STORESCU = "/usr/bin/storescu"
PATIENT_NAME = "Testperson^Phantomina"
PATIENT_ID = "PID-93817264"
PATIENT_BIRTH = "19470213"


def sc_job(ctx: JobContext) -> JobResult:
    marker = os.environ.get("NODE_TEST_JOB_MARKER")
    if marker:
        Path(marker).mkdir(parents=True, exist_ok=True)
        (Path(marker) / f"started-{ctx.job_id}-{ctx.revision}").write_text(str(time.time()))
    delay = float(os.environ.get("NODE_TEST_JOB_DELAY_S", "0"))
    if delay:
        time.sleep(delay)
    headers = sorted((pydicom.dcmread(p, stop_before_pixels=True) for p in ctx.instance_paths),
                     key=lambda d: float(d.ImagePositionPatient[2]))
    mid = pydicom.dcmread(next(p for p in ctx.instance_paths if pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID
                               == headers[len(headers) // 2].SOPInstanceUID))
    t0 = time.perf_counter()
    img = mid.pixel_array.astype(np.float32)  # decodes JPEG-LS / JPEG 2000 / RLE here, in the worker
    ctx.mark("preprocessed")
    img8 = np.clip((img - img.min()) / max(1.0, float(img.max() - img.min())) * 255, 0, 255).astype(np.uint8)
    ctx.mark("inferred")
    digest = hashlib.sha256("\n".join(sorted(str(h.SOPInstanceUID) for h in headers)).encode()).hexdigest()
    src = [ctx.series_uid, ctx.bundle or "demo", digest]
    ref = headers[0]
    ds = Dataset()
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate",
               "StudyTime", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        if kw in ref:
            setattr(ds, kw, getattr(ref, kw))
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=src + ["sc"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=src + ["series"])
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.SeriesNumber = ctx.results.series_number
    ds.SeriesDescription = ctx.results.series_description
    ds.InstanceNumber = 1
    ds.ContentDate = datetime.date.today().strftime("%Y%m%d")
    ds.ImageComments = json.dumps({"revision": ctx.revision, "predecessors": list(ctx.predecessor_result_uids),
                                   "instances": len(headers)})[:10240]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = img8.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = img8.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return JobResult(datasets=(ds,), inference_s=time.perf_counter() - t0, summary={"instances": len(headers)})


SC_JOB = JobBody(run=sc_job)


def phantom_series(root: Path, *, seed: int = 7, n_slices: int = 24, rows: int = 64, variant: str | None = None,
                   patient: bool = True) -> list[Path]:
    """A small phantom CTPA series (PatientName/ID/BirthDate set to the known test values)."""
    import dicom_node_phantoms as phantom

    study = phantom.generate_study(seed, phantom.PhantomConfig(rows=rows, cols=rows, n_slices=n_slices))
    if patient:
        import dataclasses

        study = dataclasses.replace(study, patient_name=PATIENT_NAME, patient_id=PATIENT_ID,
                                    patient_birth_date=PATIENT_BIRTH)
    if variant:
        from dicom_node_phantoms.variants import write_variant

        return write_variant(study, root, variant)
    return phantom.write_study(study, root)


def demo_like_studies(root: Path) -> dict[str, list[Path]]:
    """The demo's two studies (dicom_node.tools.demo: same phantom geometry and seeds), with the test patient."""
    from dicom_node.tools.demo import DEMO_PHANTOM
    from dicom_node_phantoms import PhantomConfig, generate_study, write_study

    cfg = PhantomConfig(**DEMO_PHANTOM)
    out = {}
    for name, seed, kind in (("positive", 20261125, "positive"), ("negative", 20261126, "negative")):
        st = generate_study(seed, cfg, kind=kind)
        while kind == "positive" and not st.study_labels["central_pe"]:
            seed += 2
            st = generate_study(seed, cfg, kind=kind)
        st = dataclasses.replace(st, patient_name=PATIENT_NAME, patient_id=PATIENT_ID, patient_birth_date=PATIENT_BIRTH)
        out[name] = write_study(st, root / name)
    return out


def storescu(port: int, files, *, aet: str = "STORESCU", called: str = "PENODE", extra: tuple[str, ...] = (),
             timeout: float = 120) -> subprocess.CompletedProcess:
    """dcmtk storescu; returns the completed process (read `E:` lines in stderr for failures)."""
    cmd = [STORESCU, "-aet", aet, "-aec", called, *extra, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def write_config(path: Path, **kw) -> Path:
    """Write a TOML config: plain keys and `section.key` keys; destinations as AE@HOST:PORT strings."""
    top, sections = [], {}
    for k, v in kw.items():
        if "." in k:
            sec, key = k.split(".", 1)
            sections.setdefault(sec, []).append((key, v))
        else:
            top.append((k, v))
    lines = [f"{k} = {json.dumps(v)}" for k, v in top]
    for sec, items in sections.items():
        lines += [f"[{sec}]"] + [f"{k} = {json.dumps(v)}" for k, v in items]
    path.write_text("\n".join(lines) + "\n")
    return path


class NodeProcess:
    """`dicom-node serve` as a real subprocess running `nodekit:SC_JOB` (JSON log to a file); `job=None` runs
    the product pipeline (give `inference.bundle` in `cfg`).

    `log_pipe=True`: stdout and stderr go through a one-page pipe to a `cat` process that appends to the log file
    (`self.cat`: stop it with SIGSTOP to make a reader that hangs, kill it for EPIPE). `wrapper`: a command
    the node runs under (e.g. `strace -f -o FILE`); `pid` is the node's own process then."""

    def __init__(self, workdir: Path, *, destinations=(), quiet: float = 0.6, env: dict | None = None,
                 job: str | None = "nodekit:SC_JOB", log_pipe: bool = False, wrapper: tuple[str, ...] = (),
                 cwd: Path | None = None, **cfg) -> None:
        self.workdir = workdir
        self.job = job
        self.port = free_port()
        self.log_path = workdir / f"node-{self.port}.log"
        self.config = write_config(workdir / "node.toml", ae_title="PENODE", host="127.0.0.1", port=self.port,
                                   data_dir=str(workdir / "data"), quiet_period_s=quiet, min_free_disk_mb=0,
                                   destinations=list(destinations), **{"retry.base_delay_s": 0.2,
                                                                       "retry.max_delay_s": 1.0, **cfg})
        self.env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests'}:{REPO}", **(env or {})}
        self.log_pipe = log_pipe
        self.wrapper = tuple(wrapper)
        self.cwd = cwd
        self.proc: subprocess.Popen | None = None
        self.cat: subprocess.Popen | None = None

    def command(self, *extra: str) -> list[str]:
        job = ["--job", self.job] if self.job else []
        return [sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(self.config), *job, *extra]

    def start(self, *extra: str) -> NodeProcess:
        """Start `serve` (with `extra` flags, e.g. --rebuild-state) and wait for its DICOM port."""
        log = open(self.log_path, "ab")
        out = log
        if self.log_pipe:
            self.cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=log)
            out = self.cat.stdin
            fcntl.fcntl(out.fileno(), 1031, 4096)  # F_SETPIPE_SZ: one page, so a reader that stops is felt at once
        self.proc = subprocess.Popen([*self.wrapper, *self.command(*extra)], stdout=out, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=self.cwd)
        if self.cat is not None:
            self.cat.stdin.close()  # the node holds the write end; the pipe breaks when cat goes
        wait_for_port(self.port, proc=self.proc, timeout=60)
        return self

    @property
    def pid(self) -> int:
        """The node's process id (not the wrapper's)."""
        if not self.wrapper:
            return self.proc.pid
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return int(children[0])

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.wrapper and self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)  # the wrapper ends with the node
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        terminate(self.proc, 20)
        if self.cat is not None:
            if self.cat.poll() is None:
                self.cat.send_signal(signal.SIGCONT)
            terminate(self.cat, 5)

    def events(self) -> list[dict]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out


def incoming_empties(folder: Path, timeout: float = 10.0) -> None:
    """The node's `incoming/` holds nothing once the associations have ended: no partial or refused data
    set, and no spare file (the fast C-STORE path keeps one ready while an association is open and removes
    it when the association's thread ends, a moment after the peer has seen the release)."""
    wait_until(lambda: not list(folder.iterdir()), timeout, f"{folder} empty (left: {sorted(p.name for p in folder.iterdir())})")


def wait_until(predicate, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what} not reached after {timeout:.0f} s")
