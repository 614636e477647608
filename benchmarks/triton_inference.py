"""One 32-window study (a Shi bundle: its 50 slabs) through local onnxruntime and through a Triton server on the
same machine.

    .venv/bin/python benchmarks/triton_inference.py                        # demo bundle, 4 studies per node process
    .venv/bin/python benchmarks/triton_inference.py --studies 8 --protocols grpc http
    .venv/bin/python benchmarks/triton_inference.py --bundle bundles/pe-1.0.0 --json out.json

For each engine (local onnxruntime = the node's `Predictor`; Triton = `TritonPredictor` over gRPC and/or
HTTP), 1 and 2 node processes, and sequential (one study at a time per process) or concurrent (two
studies at a time per process, on two threads, as `worker.concurrency = 2` runs them) studies, it
prints the per-study latency (median and max, seconds) and the throughput (studies per minute over
all processes, from the common start to the last study's end), then the overhead of the remote path
(Triton latency minus local latency, one process, sequential).

Each node process is its own Python process: it builds its predictor, warms it up with one study,
says it is ready, and starts when all are ready. The study is the 32 windows of `benchmarks/inference.py`
(random values, the bundle's crop and window size; timing does not depend on the values): stage 1 in
batches of 8, stage 2 once. The Triton server is `dicom_node.tools.triton_server` (the tritonserver
binary of nvidia-pytriton; the Python backend runs the same ONNX graphs with onnxruntime on the CPU,
one model instance per stage, dynamic batching as exported) serving the repository
`dicom-node-export triton` writes for the bundle. Both paths use the same CPU cores.

Named triton_inference.py, not triton.py: Python puts a script's own folder first on sys.path, and a
benchmarks/triton.py then shadowed the real `triton` package that torch's compiler stack imports
(`import torch._dynamo` failed with "module 'triton' has no attribute 'language'" in every benchmark that
trains or exports).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

N_WINDOWS = 32
BATCH = 8


def _windows(bundle: str):
    """The 32 random windows of `benchmarks/inference.py` with the bundle's preprocessing."""
    from inference import random_windows  # the worker runs as a script: its folder is on sys.path

    from dicom_node.model.bundle import load_manifest_only

    return random_windows(load_manifest_only(bundle).manifest.preprocessing, N_WINDOWS)


def worker(spec: dict) -> None:
    """One node process: build the predictor, warm up, print READY, wait for GO, run, print the result as JSON."""
    from dicom_node.log import configure_logging

    configure_logging(json=True, level="WARNING", stream=sys.stderr)
    windows = _windows(spec["bundle"])
    if spec["engine"] == "onnxruntime":
        from dicom_node.model.inference import Predictor

        pred = Predictor(spec["bundle"], providers=("CPUExecutionProvider",), batch_size=BATCH, precision="fp32")
    else:
        from dicom_node.model.triton import TritonPredictor, TritonSettings

        pred = TritonPredictor(spec["manifest"], TritonSettings(url=spec["url"], protocol=spec["protocol"],
                                                                timeout_s=600), batch_size=BATCH)
    pred.predict(windows)  # warm-up study
    print("READY", flush=True)
    sys.stdin.readline()
    latencies: list[float] = []
    lock = threading.Lock()
    studies, threads = spec["studies"], spec["concurrency"]

    def run(n: int) -> None:
        for _ in range(n):
            t0 = time.perf_counter()
            pred.predict(windows)
            with lock:
                latencies.append(time.perf_counter() - t0)

    start = time.time()
    pool = [threading.Thread(target=run, args=(studies // threads + (i < studies % threads),)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    print(json.dumps({"latencies_s": latencies, "start": start, "end": time.time()}), flush=True)


def run_config(engine: str, processes: int, concurrency: int, studies: int, base: dict) -> dict:
    """Start `processes` node processes, release them together, collect latencies and throughput."""
    spec = {**base, "engine": engine.split("-")[0], "protocol": engine.split("-")[-1], "studies": studies,
            "concurrency": concurrency}
    if spec["engine"] == "triton":
        spec["url"] = base["urls"][spec["protocol"]]
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(processes)]
    for p in procs:
        line = p.stdout.readline() if p.stdout else ""
        if line.strip() != "READY":
            raise RuntimeError(f"{engine}: a node process did not get ready ({line!r}, exit {p.wait()})")
    go = time.time()
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("GO\n")
        p.stdin.flush()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=3600)
        results.append(json.loads(out.strip().splitlines()[-1]))
    lat = [v for r in results for v in r["latencies_s"]]
    wall = max(r["end"] for r in results) - go
    return {"engine": engine, "processes": processes, "concurrency": concurrency, "studies": len(lat),
            "median_s": statistics.median(lat), "max_s": max(lat), "wall_s": wall,
            "studies_per_min": 60.0 * len(lat) / wall}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default="", help="bundle directory (default: the demo bundle of the package)")
    ap.add_argument("--studies", type=int, default=4, help="timed studies per node process (default 4)")
    ap.add_argument("--protocols", nargs="+", choices=("grpc", "http"), default=["grpc"],
                    help="Triton client protocols to time (default grpc)")
    ap.add_argument("--processes", nargs="+", type=int, default=[1, 2], help="node process counts (default 1 2)")
    ap.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0

    from dicom_node.model.bundle import default_bundle_path, load_manifest_only
    from dicom_node.tools.triton_server import TritonServerPeer
    from dicom_node_export.triton import TritonRepoOptions, write_triton_repository

    bundle = str(Path(args.bundle) if args.bundle else default_bundle_path())
    with tempfile.TemporaryDirectory(prefix="bench-triton-") as tmp:
        repo = write_triton_repository(bundle, Path(tmp) / "repo", TritonRepoOptions(max_batch=BATCH))
        server = TritonServerPeer(repo.path, Path(tmp) / "server").start()
        try:
            base = {"bundle": bundle, "manifest": str(repo.manifest),
                    "urls": {"grpc": server.grpc_url, "http": server.http_url}}
            engines = ["onnxruntime", *(f"triton-{p}" for p in args.protocols)]
            rows = []
            m = load_manifest_only(bundle).manifest
            study = f"{m.preprocessing.slabs}-slab" if m.preprocessing.slabs else f"{N_WINDOWS}-window"
            print(f"{m.name} {m.version} ({m.family}): {study} study, stage 1 in batches of {BATCH}; {os.cpu_count()} CPUs "
                  f"({platform.processor() or platform.machine()}), load average {os.getloadavg()[0]:.1f}")
            print(f"{'engine':<14} {'procs':>5} {'mode':<11} {'studies':>7} {'median s':>9} {'max s':>7} {'studies/min':>12}")
            for engine in engines:
                for processes in args.processes:
                    for concurrency in (1, 2):
                        r = run_config(engine, processes, concurrency, args.studies, base)
                        rows.append(r)
                        mode = "sequential" if concurrency == 1 else "concurrent"
                        print(f"{engine:<14} {processes:>5} {mode:<11} {r['studies']:>7} {r['median_s']:>9.3f} "
                              f"{r['max_s']:>7.3f} {r['studies_per_min']:>12.1f}", flush=True)
        finally:
            server.stop()
    local = next(r for r in rows if r["engine"] == "onnxruntime" and r["processes"] == min(args.processes)
                 and r["concurrency"] == 1)
    for engine in engines[1:]:
        remote = next(r for r in rows if r["engine"] == engine and r["processes"] == local["processes"]
                      and r["concurrency"] == 1)
        print(f"remote path overhead ({engine}, {local['processes']} process, sequential): "
              f"{1000 * (remote['median_s'] - local['median_s']):+.0f} ms per study "
              f"({remote['median_s'] / local['median_s']:.2f}x local)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
