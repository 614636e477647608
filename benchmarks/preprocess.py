"""Benchmark: load + preprocess one phantom CTPA study (default 300 slices of 512 x 512).

Prints phantom generation time per study, then wall time of `load_series` + `preprocess` (first
call in a fresh process and best of N), numpy peak allocation (tracemalloc) and the resident peak
of a child process that does one load + preprocess (`getrusage(RUSAGE_CHILDREN).ru_maxrss`), and a
PASS/FAIL line against the budget (3 s, 1.5 GB on the reference 2-core machine).

    .venv/bin/python benchmarks/preprocess.py                 # 300 x 512 x 512, reuses /tmp data
    .venv/bin/python benchmarks/preprocess.py --slices 120 --size 256 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

BUDGET_S = 3.0
BUDGET_BYTES = 1.5 * 1024**3


def _run_once(series_dir: Path) -> tuple[float, float, tuple]:
    from dicom_node.imaging.preprocess import preprocess
    from dicom_node.imaging.series import load_series

    c0 = time.process_time()
    t0 = time.perf_counter()
    series = load_series(series_dir)
    t1 = time.perf_counter()
    windows = preprocess(series)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, windows.array.shape, time.process_time() - c0


def _child(series_dir: Path) -> int:
    """One load + preprocess in a fresh interpreter (for first-call time and resident peak)."""
    from dicom_node.log import configure_logging

    configure_logging(level="WARNING")
    import dicom_node.imaging.preprocess  # noqa: F401  (imports are not part of the measured work)
    import dicom_node.imaging.series  # noqa: F401

    rss_after_imports = _vm_hwm()
    load_s, prep_s, shape, cpu_s = _run_once(series_dir)
    print(json.dumps({"load_s": load_s, "prep_s": prep_s, "shape": list(shape), "cpu_s": cpu_s,
                      "rss_after_imports": rss_after_imports, "vm_hwm": _vm_hwm()}))
    return 0


def _vm_hwm() -> int:
    """This process' own resident high-water mark (bytes), from /proc (0 where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _measure(series_dir: Path) -> int:
    """Run the child from this small process, so that RUSAGE_CHILDREN sees only that child.

    (Linux carries a parent's resident peak into a forked child's ru_maxrss, so the child must
    be started by a process that never held the phantom study.)
    """
    out = subprocess.run([sys.executable, __file__, "--child", str(series_dir)], capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stdout, out.stderr, file=sys.stderr)
        return 1
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["ru_maxrss_children"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(json.dumps(result))
    return 0


def _ensure_study(root: Path, seed: int, size: int, slices: int, thickness: float) -> tuple[Path, float | None, float | None]:
    from dicom_node_phantoms import PhantomConfig, generate_study, write_study

    marker = root / "series_dir.txt"
    if marker.exists() and Path(marker.read_text().strip()).is_dir():
        return Path(marker.read_text().strip()), None, None
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    study = generate_study(seed, PhantomConfig(rows=size, cols=size, n_slices=slices, slice_thickness_mm=thickness))
    gen_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    paths = write_study(study, root)
    write_s = time.perf_counter() - t0
    marker.write_text(str(paths[0].parent))
    return paths[0].parent, gen_s, write_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="rows = columns of the phantom (default 512)")
    parser.add_argument("--slices", type=int, default=300, help="number of slices (default 300)")
    parser.add_argument("--thickness", type=float, default=1.25, help="slice thickness/spacing in mm (default 1.25)")
    parser.add_argument("--seed", type=int, default=1, help="phantom seed (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="in-process repetitions for best-of (default 3)")
    parser.add_argument("--data", type=Path, default=None,
                        help="directory for the phantom files, reused when present (default: a fixed dir under the temp dir)")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--measure", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child)
    if args.measure:
        return _measure(args.measure)

    data = args.data or Path(tempfile.gettempdir()) / f"dicom-node-bench-preprocess-{args.size}-{args.slices}-{args.thickness}-{args.seed}"
    series_dir, gen_s, write_s = _ensure_study(data, args.seed, args.size, args.slices, args.thickness)
    print(f"study: {args.slices} slices x {args.size} x {args.size}, {args.thickness} mm, files in {series_dir}")
    if gen_s is not None:
        print(f"phantom generation: {gen_s:.2f} s per study (+ {write_s:.2f} s to write the DICOM files)")
    else:
        print("phantom generation: reused files from an earlier run (delete the directory to time generation)")

    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, __file__, "--measure", str(series_dir)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        print(out.stdout, out.stderr, file=sys.stderr)
        return 1
    child = json.loads(out.stdout.strip().splitlines()[-1])
    rss_peak = child["ru_maxrss_children"]
    first_s = child["load_s"] + child["prep_s"]

    from dicom_node.log import configure_logging

    configure_logging(level="WARNING")
    times = []
    for _ in range(args.repeats):
        times.append(_run_once(series_dir))
    tracemalloc.start()
    _run_once(series_dir)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    best = min(times, key=lambda t: t[0] + t[1])
    best_s = best[0] + best[1]

    gib = 1024**3
    print(f"output: {tuple(child['shape'])} float32")
    print(f"first call (fresh process): load {child['load_s']:.2f} s + preprocess {child['prep_s']:.2f} s = {first_s:.2f} s "
          f"(CPU time {child['cpu_s']:.2f} s)")
    print(f"best of {args.repeats}: load {best[0]:.2f} s + preprocess {best[1]:.2f} s = {best_s:.2f} s "
          f"(CPU time {best[3]:.2f} s)")
    print(f"machine load average while measuring: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"peak numpy/python allocations (tracemalloc): {traced_peak / gib:.2f} GiB")
    print(f"peak resident set of the child process: {rss_peak / gib:.2f} GiB (ru_maxrss; /proc VmHWM "
          f"{child['vm_hwm'] / gib:.2f} GiB, of which {child['rss_after_imports'] / gib:.2f} GiB after imports)")
    ok_time = first_s < BUDGET_S and best_s < BUDGET_S
    ok_mem = rss_peak < BUDGET_BYTES
    print(f"budget time < {BUDGET_S:.0f} s: {'PASS' if ok_time else 'FAIL'}; "
          f"memory < {BUDGET_BYTES / gib:.1f} GiB: {'PASS' if ok_mem else 'FAIL'}")
    return 0 if ok_time and ok_mem else 1


if __name__ == "__main__":
    sys.exit(main())
