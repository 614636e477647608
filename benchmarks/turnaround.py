"""Turnaround: last CT instance acknowledged -> SR stored in a real Orthanc, quiet period excluded.

    .venv/bin/python benchmarks/turnaround.py [--slices 300] [--size 512] [--models demo paper]

For each model a real `dicom-node serve` process (its own data folder) receives one phantom CTPA
series from dcmtk `storescu`, completes it after `--quiet-period` seconds, runs the real pipeline
(load, preprocess, two ONNX stages, SR + heatmap SCs + summary SC) and delivers into a real Orthanc.
Printed per model: the wall time from storescu's last acknowledged instance to the SR being listed
by Orthanc, minus the quiet period, and the node's own stage durations (from its `job_finished` event).

Models: `demo` = the bundled demo model (dicom_node/model/demo); `paper` = a random-weight export of
the paper-size network (R3D-18 width 64 on 3x10x192x192 windows, TCN 128) — timing only, its calls
mean nothing. Goals on the 2-core reference machine: demo <= 3 s, paper-size <= 45 s (300 slices).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.tools.pacs import OrthancPeer, free_port, wait_for_port  # noqa: E402

GOALS = {"demo": 3.0, "paper": 45.0}  # demo: issue 17 item 5 (was 10 s)


def phantom_series(root: Path, slices: int, size: int) -> list[Path]:
    from dicom_node_phantoms import PhantomConfig, generate_study, write_study

    study = generate_study(11, PhantomConfig(rows=size, cols=size, n_slices=slices, slice_thickness_mm=1.25),
                           kind="positive")
    return sorted(write_study(study, root))


def paper_bundle(out: Path) -> Path:
    import torch

    from dicom_node.imaging.preprocess import PreprocessConfig
    from dicom_node.labels import ALL_LABELS
    from dicom_node_export.bundle import write_bundle
    from dicom_node_training.models import r3d_18, sequence_model

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m1 = r3d_18(width=64).eval()
        m2 = sequence_model(in_features=512, hidden=128).eval()
        write_bundle(m1, m2, out, name="paper-size-random", version="0.0.0", preprocess=PreprocessConfig(),
                     sequence_length=40, thresholds={k: 0.5 for k in ALL_LABELS},
                     metrics={"data": "random weights (timing only)"}, parity_batches=(1,))
    return out


def run_one(name: str, bundle: str, files: list[Path], work: Path, quiet: float) -> dict:
    orthanc = OrthancPeer(work / f"orthanc-{name}").start()
    port = free_port()
    log_path = work / f"node-{name}.log"
    cmd = [sys.executable, "-m", "dicom_node.cli", "serve", "--ae-title", "PENODE", "--port", str(port),
           "--data-dir", str(work / f"data-{name}"), "--quiet-period", str(quiet),
           "--destination", f"ORTHANC@127.0.0.1:{orthanc.dicom_port}"]
    if bundle:
        cmd += ["--bundle", bundle]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DICOM_NODE_MIN_FREE_DISK_MB": "0", "DICOM_NODE_HOST": "127.0.0.1",
           "DICOM_NODE_LOG_JSON": "true"}
    with open(log_path, "w") as log:
        node = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_port(port, proc=node, timeout=120)
        r = subprocess.run(["/usr/bin/storescu", "-aec", "PENODE", "127.0.0.1", str(port), *map(str, files)],
                           capture_output=True, text=True)
        t_last = time.perf_counter()
        if r.returncode != 0 or "E:" in r.stderr:
            raise RuntimeError(f"storescu failed: {r.stderr[-400:]}")
        deadline = t_last + 600
        while time.perf_counter() < deadline:
            if any(orthanc.instance_tags(i).get("Modality") == "SR" for i in orthanc.instances()):
                break
            if node.poll() is not None:
                raise RuntimeError(f"node exited {node.returncode}; see {log_path}")
            time.sleep(0.1)
        else:
            raise TimeoutError(f"no SR in Orthanc after 600 s; see {log_path}")
        turnaround = time.perf_counter() - t_last - quiet
    finally:
        node.terminate()
        node.wait(30)
        orthanc.stop()
    stages = {}
    for line in log_path.read_text().splitlines():
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if ev.get("event") in ("job_finished", "results_built"):
            stages.update({k: v for k, v in ev.items() if k.endswith("_s")})
    return {"model": name, "turnaround_s": round(turnaround, 2), "goal_s": GOALS[name], "stages": stages}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--quiet-period", type=float, default=2.0)
    ap.add_argument("--models", nargs="+", choices=sorted(GOALS), default=["demo", "paper"])
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="turnaround-"))
    files = phantom_series(work / "series", args.slices, args.size)
    print(f"series: {len(files)} slices of {args.size}x{args.size}; quiet period {args.quiet_period:g} s (excluded)")
    failed = False
    for name in args.models:
        bundle = "" if name == "demo" else str(paper_bundle(work / "paper-bundle"))
        res = run_one(name, bundle, files, work, args.quiet_period)
        ok = res["turnaround_s"] <= res["goal_s"]
        failed |= not ok
        print(f"{name:>6}: {res['turnaround_s']:.2f} s last instance -> SR in Orthanc "
              f"(goal <= {res['goal_s']:g} s: {'PASS' if ok else 'FAIL'})")
        print(f"        node stages: {json.dumps(res['stages'])}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
