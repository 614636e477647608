"""The web worklist under load: p95 of the worklist page and the API with 1,000 studies in the state
database while the node receives a 300-slice study and analyses another (issue 20, item 8).

    .venv/bin/python benchmarks/worklist_load.py [--studies 1000] [--slices 300] [--size 512]

1. Fills a fresh data folder with `--studies` delivered series (`worklist_query.fill`: two job
   revisions each, the newest with a priority), each with one spooled DICOM header file so the
   page's patient columns are read the way the node reads them (once per series, then cached).
2. Starts a real `dicom-node serve` process on it: the product pipeline with the bundled demo
   model, the worklist on, one user.
3. Idle: times `--requests` sequential requests each of the worklist page (default page of 100
   rows), the page with all rows (`limit=1000`) and `GET /api/v1/studies`, logged in.
4. Loaded: sends study B (`--slices` phantom slices) by dcmtk storescu and waits until its job
   runs, then sends study A (`--slices` more) while B is analysed, timing the same requests in a
   loop until A has been received and B analysed; the printed windows say how much of the timing
   overlapped the receive and the analysis.
Printed: p50, p95 and max per request kind, idle and loaded, with the request counts.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))

import sqlite3  # noqa: E402

from worklist_query import fill  # noqa: E402

from dicom_node.tools.pacs import free_port, wait_for_port  # noqa: E402
from webkit import PASSWORD, WebClient, user_entry  # noqa: E402

KINDS = {"page (100 rows)": "/worklist", "page (all rows)": "/worklist?limit=1000", "API list": "/api/v1/studies"}


def spool_headers(data: Path, n: int) -> None:
    """One small DICOM file per filled series (patient, accession, study time), with its instance row."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    c = sqlite3.connect(data / "state.sqlite")
    with c:
        for i in range(n):
            series, study, sop = f"1.2.826.0.1.{i}.1", f"1.2.826.0.1.{i}", f"1.2.826.0.1.{i}.1.1"
            ds = Dataset()
            ds.PatientName, ds.PatientID, ds.AccessionNumber = f"Load^Patient{i:04d}", f"PID{i:06d}", f"ACC{i:06d}"
            ds.StudyDate, ds.StudyTime, ds.StudyDescription = "20261205", "081500", "CT PULMONARY ANGIOGRAM"
            ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = CTImageStorage, sop, study, series
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = CTImageStorage, sop
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            path = data / "spool" / study / series / f"{sop}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            pydicom.dcmwrite(path, ds, enforce_file_format=True)
            c.execute("INSERT INTO instances(sop_uid, series_uid, study_uid, path, sop_class_uid, transfer_syntax,"
                      " received_at, bytes, calling_aet) VALUES (?,?,?,?,?,?,?,?,?)",
                      (sop, series, study, str(path), CTImageStorage, ExplicitVRLittleEndian, float(i), 1000, "LOAD"))
    c.close()


def phantom(root: Path, seed: int, slices: int, size: int) -> list[Path]:
    from dicom_node_phantoms import PhantomConfig, generate_study, write_study

    study = generate_study(seed, PhantomConfig(rows=size, cols=size, n_slices=slices, slice_thickness_mm=1.25),
                           kind="positive")
    return sorted(write_study(study, root))


def timed(client: WebClient, path: str) -> float:
    t0 = time.perf_counter()
    r = client.get(path)
    dt = time.perf_counter() - t0
    if r.status != 200:
        raise RuntimeError(f"GET {path}: HTTP {r.status}")
    return dt


def summary(times: list[float]) -> str:
    q = statistics.quantiles(times, n=20) if len(times) >= 2 else times * 19
    return (f"p50 {statistics.median(times) * 1000:6.1f} ms  p95 {q[18] * 1000:6.1f} ms  "
            f"max {max(times) * 1000:6.1f} ms  (n={len(times)})")


def events(log: Path) -> list[dict]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached after {timeout:.0f} s")
        time.sleep(0.1)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--studies", type=int, default=1000, help="delivered studies in the state database (default 1000)")
    ap.add_argument("--slices", type=int, default=300, help="slices of each of the two live studies (default 300)")
    ap.add_argument("--size", type=int, default=512, help="rows and columns of their slices (default 512)")
    ap.add_argument("--requests", type=int, default=40, help="idle requests per kind (default 40)")
    args = ap.parse_args(list(argv) if argv is not None else None)

    work = Path(tempfile.mkdtemp(prefix="worklist-load-"))
    proc = None
    try:
        data = work / "data"
        data.mkdir()
        t0 = time.perf_counter()
        fill(data / "state.sqlite", args.studies)
        spool_headers(data, args.studies)
        print(f"state database: {args.studies} delivered studies with spooled headers ({time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
        study_b = phantom(work / "b", 31, args.slices, args.size)
        study_a = phantom(work / "a", 32, args.slices, args.size)
        print(f"two {args.slices}-slice {args.size}x{args.size} phantom studies written ({time.perf_counter() - t0:.1f} s)")

        port, http = free_port(), free_port()
        cfg = work / "node.toml"
        cfg.write_text(f'ae_title = "PENODE"\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{data}"\n'
                       f'quiet_period_s = 2.0\nmin_free_disk_mb = 0\nmetrics_port = {http}\n'
                       f'[web]\nenabled = true\nusers = ["{user_entry("bench", PASSWORD)}"]\n'
                       f'[inference]\nproviders = ["CPUExecutionProvider"]\n')
        log = work / "node.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(cfg)],
                                    stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
        wait_for_port(port, proc=proc, timeout=120)
        client = WebClient(http)
        if client.login("bench").status != 303:
            raise RuntimeError("login failed")
        t0 = time.perf_counter()
        client.get("/worklist?limit=1000")  # the first view reads every series' header once
        print(f"first view of all rows (reads {args.studies} headers): {(time.perf_counter() - t0) * 1000:.0f} ms")

        idle = {k: [timed(client, p) for _ in range(args.requests)] for k, p in KINDS.items()}

        loaded: dict[str, list[float]] = {k: [] for k in KINDS}
        storescu = ["/usr/bin/storescu", "-aet", "LOADSCU", "-aec", "PENODE", "127.0.0.1", str(port)]
        subprocess.run([*storescu, *map(str, study_b)], check=True, capture_output=True)
        wait_for(lambda: any(e.get("event") == "job_started" for e in events(log)), 120, "study B analysing")
        b_started = time.time()
        receiving: dict[str, float] = {}

        def send_a() -> None:
            receiving["start"] = time.time()
            subprocess.run([*storescu, *map(str, study_a)], check=True, capture_output=True)
            receiving["end"] = time.time()

        sender = threading.Thread(target=send_a)
        sender.start()
        t_start = time.time()
        while sender.is_alive() or not any(e.get("event") == "job_finished" for e in events(log)):
            for k, p in KINDS.items():
                loaded[k].append(timed(client, p))
            if time.time() - t_start > 600:
                raise TimeoutError("study B not analysed within 600 s")
        t_end = time.time()
        sender.join()
        fin = next(e for e in events(log) if e.get("event") == "job_finished")
        b_end = time.mktime(time.strptime(fin["timestamp"][:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
        print(f"loaded window {t_end - t_start:.1f} s: study A received during {receiving['end'] - receiving['start']:.1f} s "
              f"of it; study B analysed from {b_started - t_start:+.1f} s to {b_end - t_start:+.1f} s "
              f"(load average {os.getloadavg()[0]:.1f})")
        for k in KINDS:
            print(f"{k:16s} idle   {summary(idle[k])}")
            print(f"{k:16s} loaded {summary(loaded[k])}")
        worst = max(statistics.quantiles(loaded[k], n=20)[18] for k in ("page (100 rows)", "API list")) * 1000
        print(f"target p95 < 200 ms for the page and the API under load: {'met' if worst < 200 else 'MISSED'} "
              f"({worst:.0f} ms)")
        return 0
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
