"""Where the node's time goes while it receives a series: per-thread CPU and wall time of each receive stage.

    .venv/bin/python benchmarks/receive_profile.py [--data DIR] [--pynetdicom]

Runs an in-process node (stand-in job, quiet period of an hour so nothing is analysed) with its data
folder's `incoming/` as the temporary folder (as `dicom-node serve` does), sends the series of
benchmarks/receive.py with dcmtk storescu (`TCP_NODELAY=1`), and prints the process's CPU seconds and,
for each wrapped stage, the CPU seconds of the calling thread (`time.thread_time`), the wall seconds and
the number of calls, and the CPU seconds of each of the node's threads (the association's DUL thread,
"run_reactor", does the whole receive path). Stages nest (the decision is part of handling a PDU), so they do not add up. By
default the node's own C-STORE path (`fast_store = true`); `--pynetdicom` profiles pynetdicom's.

On the node's path it also prints each instance's timeline (medians over the series): the sender's turn
(from the node's C-STORE-RSP to the next C-STORE-RQ read), the data set arriving (to its last fragment),
and the decision (`Receiver.store`: checks, rename, flushes, the row), and inside the decision when each
step ran, from the decision's start: the file's flush started (`Spool.start_flush`, at the last
fragment), the element walk, the folder's flush started, the row's commit, the waits for the two flushes
and the response; then dcmtk storescp receives the same series in the same call, for its time per
instance. The flushes run in the C library's POSIX AIO where it has it (`dicom_node.durability.flush`);
`--pool-flush` runs them in Python pool threads instead, as the node did before, for comparison.
storescu sends the next instance only after the response, so the decision is not overlapped by anything.

`--no-flush` is a diagnostic, never a configuration: the node's code with its flushes stubbed out and
SQLite at `synchronous=OFF`, to show what the receive path costs without any durability.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from receive import NO_NAGLE, phantom_files  # noqa: E402

CPU: collections.Counter[str] = collections.Counter()
WALL: collections.Counter[str] = collections.Counter()
CALLS: collections.Counter[str] = collections.Counter()
ORDER: list[str] = []
STAMPS: collections.defaultdict[str, list[tuple[float, float]]] = collections.defaultdict(list)  # (start, end)


FLUSH_START = "      a flush started (the file's before the decision, the folder's in adopt)"
FLUSH_WAIT = "      waiting for a flush (the file's, then the folder's, after the row)"


def wrap(owner: Any, name: str, label: str) -> None:
    """Replace owner.name by a wrapper adding the calling thread's CPU time to CPU[label]."""
    fn: Callable[..., Any] = getattr(owner, name)
    if label not in ORDER:
        ORDER.append(label)

    @functools.wraps(fn)
    def timed(*a: Any, **kw: Any) -> Any:
        t0, w0 = time.thread_time(), time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            w1 = time.perf_counter()
            CPU[label] += time.thread_time() - t0
            WALL[label] += w1 - w0
            CALLS[label] += 1
            STAMPS[label].append((w0, w1))

    setattr(owner, name, timed)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "receive_bench_series")
    ap.add_argument("--pynetdicom", action="store_true", help="profile pynetdicom's C-STORE path (fast_store = false)")
    ap.add_argument("--no-flush", action="store_true",
                    help="diagnostic: stub out the node's fsync calls and run SQLite with synchronous=OFF")
    ap.add_argument("--pool-flush", action="store_true",
                    help="comparison: run the flushes in Python pool threads even where POSIX AIO is available")
    args = ap.parse_args(argv)
    files = phantom_files(args.data, 300, 512)
    fast = not args.pynetdicom

    import pynetdicom.dimse as dimse
    import pynetdicom.dimse_messages as dimse_messages
    import pynetdicom.dul as dul
    import pynetdicom.service_class as service_class

    from dicom_node.config import load_config
    from dicom_node.durability import flush, spool, state
    from dicom_node.engine.node import Node
    from dicom_node.log import configure_logging
    from dicom_node.network import connection, dataset_check, fast_store, receive
    from nodekit import sc_job

    if fast:
        wrap(connection.GuardedSocket, "_read_fast", "node's path: one PDU read and handled (DUL thread)")
        wrap(fast_store.FastStore, "take", "  of which P-DATA values handled")
        wrap(fast_store.FastStore, "_append", "    of which file writes")
        wrap(fast_store.FastStore, "_begin", "    of which C-STORE-RQ command sets read, files opened")
        wrap(receive.Receiver, "store", "    of which the node's C-STORE decision")
        wrap(connection.GuardedSocket, "_send_now", "    of which the C-STORE-RSP sent")
    else:
        wrap(dul.DULServiceProvider, "_read_pdu_data", "pynetdicom: read and decode one PDU")
        wrap(dimse.DIMSEServiceProvider, "receive_primitive", "pynetdicom: DIMSE receive (fragments to the file)")
        wrap(dimse_messages, "write_file_meta_info", "  of which the temporary file's meta (pydicom)")
        wrap(service_class.StorageServiceClass, "SCP", "pynetdicom: storage service (handler + response)")
        wrap(dimse.DIMSEServiceProvider, "send_msg", "  of which the C-STORE-RSP (pydicom command set)")
        wrap(receive.Receiver, "store", "  of which the node's C-STORE decision")
    wrap(dataset_check, "check_received", "      element-header walk")
    receive.check_received = dataset_check.check_received  # the name the handler calls
    wrap(spool.Spool, "adopt", "      spool: rename, flush of file and folder, the row's commit meanwhile")
    wrap(state.State, "add_instance", "        SQLite: instance row committed")
    wrap(state.State, "instance", "      SQLite: known-instance lookup")

    if args.pool_flush:
        spool.start_fsync = flush.PoolFlush  # type: ignore[assignment]
    if args.no_flush:
        spool.fsync_dir = lambda path: None  # a new series' folders (make_dirs)
        spool.start_fsync = lambda fd: NO_FLUSH  # type: ignore[assignment]  # the file's and the folder's flush
        open_conn = state.State._conn

        def unsynced(self: Any) -> Any:
            c = open_conn(self)
            c.execute("PRAGMA synchronous=OFF")
            return c

        state.State._conn = unsynced  # type: ignore[method-assign]
    if fast:  # when each flush starts and how long the decision then waits for it
        wrap(spool, "start_fsync", FLUSH_START)
        wrap(flush.NativeFlush, "result", FLUSH_WAIT)
        wrap(flush.PoolFlush, "result", FLUSH_WAIT)
    print("flushes:", "stubbed out (--no-flush)" if args.no_flush else
          "in Python pool threads" if args.pool_flush or not flush.native_available() else
          "in the C library's POSIX AIO (dicom_node.durability.flush)")

    configure_logging(json=True, level="WARNING", stream=open(os.devnull, "w"))  # noqa: SIM115
    data = Path(tempfile.mkdtemp(prefix="recv_profile_"))
    cfg = load_config(None, environ={}, overrides={"port": 0, "host": "127.0.0.1", "data_dir": str(data),
                                                   "quiet_period_s": 3600.0, "min_free_disk_mb": 0,
                                                   "fast_store": fast})
    node = Node(cfg, run_job=sc_job).start()
    tempfile.tempdir = str(node.spool.incoming_dir)
    try:
        threads = ThreadCpu().__enter__()
        c0, t0 = time.process_time(), time.perf_counter()
        r = subprocess.run(["/usr/bin/storescu", "-aec", "PENODE", "127.0.0.1", str(node.port), *map(str, files)],
                           capture_output=True, text=True, env=NO_NAGLE)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        threads.__exit__()
    finally:
        node.stop()
        tempfile.tempdir = None
        shutil.rmtree(data, ignore_errors=True)  # 158 MB a run: repeated runs filled this machine's disk once
    if r.returncode != 0 or "E:" in r.stderr:
        raise RuntimeError(f"storescu failed: {r.stderr[-500:]}")
    print(f"{len(files)} instances: wall {wall:.2f} s, node process CPU {cpu:.2f} s, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("CPU by thread (from /proc; the association's threads summed by kind):")
    for name, secs in threads.by_name():
        if secs >= 0.005:
            print(f"{secs:7.3f} s CPU  {name}")
    for label in ORDER:
        print(f"{CPU[label]:7.3f} s CPU  {WALL[label]:7.3f} s wall  {CALLS[label]:5d} calls  {label}")
    if fast:
        timeline(len(files))
        scp_wall = storescp_wall(files)
        print(f"dcmtk storescp, the same series in this call: {scp_wall:.2f} s, "
              f"{scp_wall / len(files) * 1000:.2f} ms per instance (its start and association included); "
              f"the node {wall:.2f} s, ratio {scp_wall / wall:.2f}")
    return 0


class ThreadCpu:
    """CPU seconds (user + system, from /proc) of this process's threads while it runs, by Python thread
    name with numbers dropped (the threads of each association add up under one name). Sampled every
    20 ms, so that threads which end during the run (an association's) are counted too."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[str, float, float]] = {}  # tid -> (name, first CPU, last CPU)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="profile-sampler", daemon=True)

    def __enter__(self) -> ThreadCpu:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self._sample()

    def _sample(self) -> None:
        names = {t.native_id: re.sub(r"[-_ ]?\d+", "", t.name) or t.name for t in threading.enumerate()}
        tick = os.sysconf("SC_CLK_TCK")
        for task in Path("/proc/self/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            tid, cpu = int(task.name), (int(fields[11]) + int(fields[12])) / tick
            name, first, _ = self._seen.get(tid, (names.get(tid, "(not a Python thread)"), cpu, cpu))
            self._seen[tid] = (names.get(tid, name), first, cpu)

    def by_name(self) -> list[tuple[str, float]]:
        out: collections.defaultdict[str, float] = collections.defaultdict(float)
        for name, first, last in self._seen.values():
            out[name] += last - first
        return sorted(out.items(), key=lambda x: -x[1])


def timeline(n: int) -> None:
    """Per-instance medians from the stamps of the node's path (module docstring)."""
    begins = STAMPS["    of which C-STORE-RQ command sets read, files opened"]
    decisions = STAMPS["    of which the node's C-STORE decision"]
    sends = STAMPS["    of which the C-STORE-RSP sent"]
    if not (len(begins) == len(decisions) == len(sends) == n):
        print(f"timeline: {len(begins)} requests, {len(decisions)} decisions, {len(sends)} responses for {n} instances; "
              "not every C-STORE took the node's path, no timeline")
        return

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values) * 1000:.2f} ms (sum {sum(values):.2f} s)"

    print("per instance, median:")
    print(f"  sender's turn, response sent -> next request read:  {ms([b[0] - s[1] for s, b in zip(sends, begins[1:])])}")
    print(f"  data set arriving, request -> last fragment:        {ms([d[0] - b[0] for b, d in zip(begins, decisions)])}")
    print(f"  decision (checks, rename, flushes, row):            {ms([d[1] - d[0] for d in decisions])}")
    print(f"  response to response:                               {ms([b[1] - a[1] for a, b in zip(sends, sends[1:])])}")
    # Two flushes an instance, in this order: the file's (before the decision) and the folder's (in adopt)
    started, waits = STAMPS[FLUSH_START][-2 * n:], STAMPS[FLUSH_WAIT][-2 * n:]
    walks, rows = STAMPS["      element-header walk"][-n:], STAMPS["        SQLite: instance row committed"][-n:]
    if len(started) != 2 * n or len(waits) != 2 * n or len(walks) != n or len(rows) != n:
        return

    def at(stamps: list[float]) -> str:
        return f"{statistics.median(t - d[0] for t, d in zip(stamps, decisions)) * 1000:+6.2f}"

    steps = [("the file's flush started", f"at {at([a for a, _ in started[0::2]])}"),
             ("the element walk", f"{at([a for a, _ in walks])} to {at([b for _, b in walks])}"),
             ("the folder's flush started", f"at {at([a for a, _ in started[1::2]])}"),
             ("the row's commit (its WAL fsync)", f"{at([a for a, _ in rows])} to {at([b for _, b in rows])}"),
             ("the file's flush awaited until", f"at {at([b for _, b in waits[0::2]])}"),
             ("the folder's flush awaited until", f"at {at([b for _, b in waits[1::2]])}"),
             ("the response sent", f"at {at([a for a, _ in sends])}")]
    print("inside the decision, ms from its start (medians):")
    for name, when in steps:
        print(f"  {name:40s} {when}")


class _NoFlush:
    def result(self) -> None:
        return None


NO_FLUSH = _NoFlush()


def storescp_wall(files: list[Path]) -> float:
    """Seconds dcmtk storescp takes for `files` (storescu and storescp with TCP_NODELAY=1)."""
    from peers import StoreScpPeer

    out = Path(tempfile.mkdtemp(prefix="recv_profile_scp_"))
    peer = StoreScpPeer(out, env=NO_NAGLE).start()
    try:
        t0 = time.perf_counter()
        r = subprocess.run(["/usr/bin/storescu", "-aec", peer.aet, "127.0.0.1", str(peer.port), *map(str, files)],
                           capture_output=True, text=True, env=NO_NAGLE)
        wall = time.perf_counter() - t0
    finally:
        peer.stop()
        shutil.rmtree(out, ignore_errors=True)
    if r.returncode != 0:
        raise RuntimeError(f"storescu to storescp failed: {r.stderr[-500:]}")
    return wall


if __name__ == "__main__":
    sys.exit(main())
