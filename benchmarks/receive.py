"""Receive throughput, measured fairly: dcmtk storescu -> the node (fsync + rename + SQLite row per
instance before each acknowledgement) versus dcmtk storescp (plain write, no fsync), the same
300-slice 512x512 phantom series, alternating runs in one call.

    .venv/bin/python benchmarks/receive.py [--data DIR] [--repeats 5]

Both dcmtk processes run with `TCP_NODELAY=1` in their environment. Debian's dcmtk leaves Nagle's
algorithm on unless that variable says otherwise, and then each exchange of small PDUs (the C-STORE
command, the C-STORE response) waits for the peer's delayed ACK: storescp took 13.7 s for this
series that way (docs/benchmarks.md, the earlier "node 3x faster than storescp"), about 0.5 s with
the variable set. That measured the kernel's ACK timer, not the receivers. The node turns Nagle off
on the sockets it accepts (dicom_node/network/connection.py).

Prints each run, then the medians as instances/s and MB/s, the receiving process's CPU seconds
(user + system, from /proc: steadier than wall time on a shared machine) and the ratio node/storescp
throughput (goal >= 0.5): the ratio of the medians, and each run's pair (the node, then storescp right
after it) with their median. The node runs as a real `dicom-node serve` process with a quiet period long enough
that no job starts while measuring; storescp runs with its default options (`-od DIR`). Also measured
in the same call, alternating:

* the node with `fast_store = false` (pynetdicom's C-STORE path, the path before
  `dicom_node/network/fast_store.py`);
* "durability alone": the node's own durability code for the same 300 files with no network and no
  DICOM at all (write to `incoming/`, `Spool.adopt`: rename, fsync of file and folder while
  `State.add_instance` commits the row with synchronous=FULL). storescp writes only to the page cache,
  so "storescp + durability alone" is what a receiver as fast as storescp would take with the node's
  durability: the best ratio any such receiver could reach on this disk.

`--native` also builds `benchmarks/durable_scp.c` (a minimal native storage SCP with the node's
durability: fragments to a file as they arrive, fsync of file, rename, fsync of folder, SQLite row in WAL
mode with synchronous=FULL, then the response; needs `cc` and libsqlite3-dev) and runs it alternating with
the others, twice: as it is, and with the kernel's write-back started for each fragment as it is written.
It is what a receiver with no Python at all reaches with that durability on this machine.

Loopback moves data at memory speed, so the ratio above compares CPU per instance more than anything
a sender on a hospital network would notice. `--link-mbit 1000` runs the same comparison with the
loopback interface shaped to a 1 Gb/s wire for the duration of the call (Linux `tc`, token bucket with
a burst of one loopback packet, no extra latency; needs root; the interface is restored afterwards,
also on Ctrl-C or SIGTERM): what a scanner or PACS sending over gigabit Ethernet would see.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from peers import StoreScpPeer, free_port, wait_for_port  # noqa: E402

NO_NAGLE = {**os.environ, "TCP_NODELAY": "1"}


@contextlib.contextmanager
def shaped_loopback(mbit: int) -> Iterator[None]:
    """Shape the loopback interface to `mbit` Mbit/s (a token bucket whose burst is one loopback packet,
    so a pause between instances earns no credit, as on a wire) while the block runs, then remove the
    shaping again. Refuses with one line when not root, when `tc` is missing, or when `lo` already has a
    root qdisc of someone else's (it is never replaced)."""
    tc = shutil.which("tc") or "/usr/sbin/tc"
    if os.geteuid() != 0 or not Path(tc).exists():
        raise SystemExit("--link-mbit: shaping the loopback interface needs root and tc (Debian package iproute2); "
                         "run as root or leave --link-mbit out")
    shown = subprocess.run([tc, "qdisc", "show", "dev", "lo"], capture_output=True, text=True).stdout
    if shown.split()[1:2] != ["noqueue"]:
        raise SystemExit(f"--link-mbit: lo already has a root qdisc ({shown.strip()}); remove it "
                         "(tc qdisc del dev lo root) or leave --link-mbit out")
    burst = int(Path("/sys/class/net/lo/mtu").read_text()) + 1000
    subprocess.run([tc, "qdisc", "add", "dev", "lo", "root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst),
                    "latency", "20ms"], check=True)
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally below on SIGTERM too
    try:
        yield
    finally:
        subprocess.run([tc, "qdisc", "del", "dev", "lo", "root"], check=False)
        signal.signal(signal.SIGTERM, previous)


def phantom_files(data: Path, n_slices: int, size: int) -> list[Path]:
    files = sorted(data.rglob("*.dcm"))
    if len(files) == n_slices:
        return files
    import dicom_node_phantoms as phantom

    study = phantom.generate_study(1, phantom.PhantomConfig(rows=size, cols=size, n_slices=n_slices))
    return sorted(phantom.write_study(study, data))


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def storescu(port: int, aet: str, files: list[Path]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(["/usr/bin/storescu", "-aec", aet, "127.0.0.1", str(port), *map(str, files)],
                       capture_output=True, text=True, env=NO_NAGLE)
    dt = time.perf_counter() - t0
    if r.returncode != 0 or "E:" in r.stderr:
        raise RuntimeError(f"storescu to {aet} failed: {r.stderr[-500:]}")
    return dt


def durability_alone(files: list[Path]) -> float:
    """Seconds for the node's durability steps on `files` (no network, no DICOM decoding): each file is
    written to `incoming/` and adopted into the spool while its row commits, as `Receiver.store` does."""
    from dicom_node.durability.spool import Spool
    from dicom_node.durability.state import InstanceRow, State

    work = Path(tempfile.mkdtemp(prefix="durability_bench_"))
    spool, state = Spool(work), State(work / "state.sqlite")
    blobs = [f.read_bytes() for f in files]
    try:
        t0 = time.perf_counter()
        for i, data in enumerate(blobs):
            tmp = spool.incoming_dir / f"{i}.dcm"
            with open(tmp, "wb") as out:
                out.write(data)
            sop = f"1.2.3.{i}"
            path = spool.instance_path("1.2", "1.2.3", sop)
            row = InstanceRow(sop, "1.2.3", "1.2", str(path), "1.2.840.10008.5.1.4.1.1.2",
                              "1.2.840.10008.1.2.1", time.time(), len(data), "BENCH")
            spool.adopt(path, tmp, during=lambda row=row: state.add_instance(row))
        return time.perf_counter() - t0
    finally:
        state.close()
        shutil.rmtree(work, ignore_errors=True)


def build_native() -> Path:
    """Compile benchmarks/durable_scp.c into a temporary folder; the executable's path."""
    exe = Path(tempfile.mkdtemp(prefix="durable_scp_")) / "durable_scp"
    r = subprocess.run(["cc", "-O2", "-o", str(exe), str(REPO / "benchmarks" / "durable_scp.c"), "-lsqlite3"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"--native: compiling benchmarks/durable_scp.c failed (needs cc and libsqlite3-dev):\n{r.stderr}")
    return exe


def native_run(exe: Path, files: list[Path], writeback: bool) -> tuple[float, float]:
    """storescu -> the native durable SCP on `files`: (seconds, receiver CPU seconds)."""
    work = Path(tempfile.mkdtemp(prefix="durable_scp_run_"))
    port = free_port()
    proc = subprocess.Popen([str(exe), str(port), str(work), *(["--writeback"] if writeback else [])])
    try:
        wait_for_port(port, proc=proc, timeout=10)
        c0 = cpu_s(proc.pid)
        t = storescu(port, "NATIVE", files)
        cpu = cpu_s(proc.pid) - c0
    finally:
        proc.terminate()
        proc.wait(10)
    n = len(list(work.glob("*.dcm")))
    shutil.rmtree(work, ignore_errors=True)
    if n != len(files):
        raise RuntimeError(f"native durable SCP kept {n} of {len(files)} instances")
    return t, cpu


def start_node(workdir: Path, repo: Path = REPO, python: str = sys.executable,
               fast_store: bool = True) -> tuple[subprocess.Popen, int]:
    port = free_port()
    cfg = workdir / "node.toml"
    cfg.write_text(f'ae_title = "PENODE"\nhost = "127.0.0.1"\nport = {port}\ndata_dir = "{workdir / "data"}"\n'
                   f'quiet_period_s = 3600.0\nmin_free_disk_mb = 0\n'
                   + ("" if fast_store else "fast_store = false\n") + '[log]\nlevel = "WARNING"\n')
    proc = subprocess.Popen([python, "-m", "dicom_node.cli", "serve", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=repo,
                            env={**os.environ, "PYTHONPATH": str(repo), "PYTHONDONTWRITEBYTECODE": "1"})
    wait_for_port(port, proc=proc, timeout=60)
    return proc, port


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(tempfile.gettempdir()) / "receive_bench_series",
                    help="folder for the phantom series (reused when it holds the right number of files)")
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5, help="alternating runs per receiver; the median is reported")
    ap.add_argument("--baseline-repo", type=Path, default=None,
                    help="also run the node of this checkout (with its .venv), alternating, e.g. the main branch")
    ap.add_argument("--native", action="store_true",
                    help="also run benchmarks/durable_scp.c, a native receiver with the node's durability (needs cc)")
    ap.add_argument("--link-mbit", type=int, default=None, metavar="MBIT",
                    help="shape loopback to this many Mbit/s for the call, e.g. 1000 for gigabit Ethernet (root, tc)")
    args = ap.parse_args(argv)
    files = phantom_files(args.data, args.slices, args.size)
    if args.link_mbit is not None:
        if args.link_mbit <= 0:
            ap.error(f"--link-mbit {args.link_mbit}: give a rate in Mbit/s, e.g. 1000")
        with shaped_loopback(args.link_mbit):
            return compare(args, files)
    return compare(args, files)


def compare(args: argparse.Namespace, files: list[Path]) -> int:
    """Run the receivers alternately on `files` and print the report (module docstring)."""
    mb = sum(f.stat().st_size for f in files) / 1e6
    node_t: list[float] = []
    scp_t: list[float] = []
    node_cpu: list[float] = []
    scp_cpu: list[float] = []
    base_t: list[float] = []
    base_cpu: list[float] = []
    slow_t: list[float] = []
    slow_cpu: list[float] = []
    floor_t: list[float] = []
    native: dict[bool, list[tuple[float, float]]] = {False: [], True: []}  # writeback -> (s, CPU s) per run
    exe = build_native() if args.native else None

    def run_node(repo: Path, python: str, times: list[float], cpus: list[float], fast_store: bool = True) -> None:
        work = Path(tempfile.mkdtemp(prefix="recv_bench_"))
        proc, port = start_node(work, repo, python, fast_store)
        try:
            c0 = cpu_s(proc.pid)
            times.append(storescu(port, "PENODE", files))
            cpus.append(cpu_s(proc.pid) - c0)
        finally:
            proc.terminate()
            proc.wait(30)
        n_spooled = len(list((work / "data" / "spool").rglob("*.dcm")))
        shutil.rmtree(work, ignore_errors=True)
        if n_spooled != len(files):
            raise RuntimeError(f"node of {repo} spooled {n_spooled} of {len(files)} instances")

    def run_storescp() -> None:
        scp_dir = Path(tempfile.mkdtemp(prefix="scp_bench_"))
        peer = StoreScpPeer(scp_dir, env=NO_NAGLE).start()
        try:
            assert peer.proc is not None
            c0 = cpu_s(peer.proc.pid)
            scp_t.append(storescu(peer.port, peer.aet, files))
            scp_cpu.append(cpu_s(peer.proc.pid) - c0)
        finally:
            peer.stop()
            shutil.rmtree(scp_dir, ignore_errors=True)

    for rep in range(args.repeats):
        # The node and storescp back to back, so that each run's pair meets the machine in the same state (a
        # shared VM's speed drifts within a minute; the per-run ratios below show by how much)
        run_node(REPO, sys.executable, node_t, node_cpu)
        run_storescp()
        run_node(REPO, sys.executable, slow_t, slow_cpu, fast_store=False)
        floor_t.append(durability_alone(files))
        if exe is not None:
            for writeback in (False, True):
                native[writeback].append(native_run(exe, files, writeback))
        if args.baseline_repo:
            run_node(args.baseline_repo, str(args.baseline_repo / ".venv" / "bin" / "python"), base_t, base_cpu)
        base = f", baseline node {base_t[-1]:.2f} s ({base_cpu[-1]:.2f} s CPU)" if base_t else ""
        print(f"run {rep + 1}: node {node_t[-1]:.2f} s ({node_cpu[-1]:.2f} s CPU), pynetdicom path {slow_t[-1]:.2f} s "
              f"({slow_cpu[-1]:.2f} s CPU){base}, storescp {scp_t[-1]:.2f} s ({scp_cpu[-1]:.2f} s CPU), durability "
              f"alone {floor_t[-1]:.2f} s, load average {os.getloadavg()[0]:.1f}"
              + (f", native durable SCP {native[False][-1][0]:.2f} s, with write-back {native[True][-1][0]:.2f} s"
                 if exe is not None else ""), flush=True)
    tn, ts = statistics.median(node_t), statistics.median(scp_t)
    link = f"loopback shaped to {args.link_mbit} Mbit/s" if args.link_mbit else "loopback, not shaped"
    print(f"series: {len(files)} instances, {mb:.0f} MB ({args.size}x{args.size}, uncompressed); "
          f"both dcmtk sides with TCP_NODELAY=1; {link}; load average {os.getloadavg()[0]:.1f}")
    print(f"node (fsync + rename + SQLite row, synchronous=FULL): {tn:.2f} s  {len(files) / tn:.0f} inst/s  {mb / tn:.0f} MB/s"
          f"  receiver CPU {statistics.median(node_cpu):.2f} s")
    print(f"dcmtk storescp (default options, no fsync):           {ts:.2f} s  {len(files) / ts:.0f} inst/s  {mb / ts:.0f} MB/s"
          f"  receiver CPU {statistics.median(scp_cpu):.2f} s")
    tp, tf = statistics.median(slow_t), statistics.median(floor_t)
    print(f"node, pynetdicom's C-STORE path (fast_store = false): {tp:.2f} s  {len(files) / tp:.0f} inst/s  {mb / tp:.0f} MB/s"
          f"  receiver CPU {statistics.median(slow_cpu):.2f} s; ratio to storescp {ts / tp:.2f}")
    print(f"durability alone (write, rename, fsync file + folder, SQLite row FULL; no network): {tf:.2f} s; storescp + "
          f"that = {ts + tf:.2f} s: the best ratio a receiver as fast as storescp could reach with this durability "
          f"is {ts / (ts + tf):.2f}; the node takes {tn - ts - tf:+.2f} s more than that")
    if exe is not None:
        for writeback, label in ((False, "native durable SCP (durable_scp.c):"), (True, "  the same, write-back per fragment:")):
            tw, cw = (statistics.median(x) for x in zip(*native[writeback]))
            print(f"{label:52s} {tw:.2f} s  {len(files) / tw:.0f} inst/s  {mb / tw:.0f} MB/s  receiver CPU {cw:.2f} s;"
                  f" ratio to storescp {ts / tw:.2f}")
    if base_t:
        tb = statistics.median(base_t)
        print(f"baseline node ({args.baseline_repo}):  {tb:.2f} s  {len(files) / tb:.0f} inst/s  {mb / tb:.0f} MB/s"
              f"  receiver CPU {statistics.median(base_cpu):.2f} s; ratio baseline/storescp {ts / tb:.2f}")
    per_run = sorted(s / n for s, n in zip(scp_t, node_t))
    print(f"ratio node/storescp throughput: {ts / tn:.2f} (goal >= 0.5); each run's pair: median "
          f"{statistics.median(per_run):.2f}, {' '.join(f'{r:.2f}' for r in per_run)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
