"""Results build time: SR + 3 heatmap SCs + summary SC + KOS of one 300-slice 512 x 512 series, old and new code.

    .venv/bin/python benchmarks/results_build.py [--slices 300] [--size 512] [--repeat 3] [--old-rev ae3b281]
                                                 [--profile OUT.prof]

One PE-positive phantom series (seed 11, 1.25 mm slices, as `benchmarks/turnaround.py` sends) is
loaded, preprocessed and run through the bundled demo model once; then `build_results(...,
ResultOptions(kos=True))` is timed `--repeat` times with the working tree's `dicom_node.results`
and with the `dicom_node/results` package of git revision `--old-rev` (default: the last commit
before the issue-17 SR rewrite), extracted into a temporary folder with `git archive` and imported
in this same process in place of the current package. The inputs are the same objects for both.
Printed: the best and median wall time of each and the ratio. Goal on the 2-core reference machine:
new <= 0.5 s. `--profile` writes a cProfile of one new build (and one old build to OUT.old.prof).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GOAL_S = 0.5
#: the last commit whose SR carried a 300-entry image library (before issue 17)
OLD_REV = "ae3b281"


def inputs(slices: int, size: int) -> tuple[Any, Any, Any, Any]:
    """(series, windows, prediction, manifest) of one phantom series run through the demo model."""
    from dicom_node.imaging.preprocess import preprocess
    from dicom_node.imaging.series import load_series
    from dicom_node.pipeline import get_predictor
    from dicom_node_phantoms import PhantomConfig, generate_study, study_datasets

    study = generate_study(11, PhantomConfig(rows=size, cols=size, n_slices=slices, slice_thickness_mm=1.25),
                           kind="positive")
    series = load_series(study_datasets(study))
    predictor = get_predictor(providers=("CPUExecutionProvider",))
    windows = preprocess(series, predictor.manifest.preprocessing)
    return series, windows, predictor.predict(windows), predictor.manifest


def old_results_package(rev: str, into: Path) -> Path:
    """`dicom_node/results` of git revision `rev`, extracted under `into`; returns the package folder."""
    tar = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", rev, "dicom_node/results"],
                         capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(tar)) as t:
        t.extractall(into, filter="data")
    return into / "dicom_node" / "results"


def load_old(package: Path) -> tuple[Callable[..., Any], Callable[..., Any], dict[str, ModuleType]]:
    """Import the old package as `dicom_node.results` (its own absolute imports resolve into it).

    Returns (build_results, ResultOptions, the current modules to put back with `restore`).
    """
    saved = {k: v for k, v in sys.modules.items() if k == "dicom_node.results" or k.startswith("dicom_node.results.")}
    for k in saved:
        del sys.modules[k]
    spec = importlib.util.spec_from_file_location("dicom_node.results", package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["dicom_node.results"] = module
    spec.loader.exec_module(module)
    return module.build_results, module.ResultOptions, saved


def restore(saved: dict[str, ModuleType]) -> None:
    for k in [k for k in sys.modules if k == "dicom_node.results" or k.startswith("dicom_node.results.")]:
        del sys.modules[k]
    sys.modules.update(saved)


def timed(build: Callable[[Any], Any], series: Any, repeat: int) -> list[float]:
    """Wall times of `repeat` builds, each on a fresh copy of the series object: nothing cached per
    series (the source-slice datasets) carries over from one build to the next, as in the node."""
    out = []
    for _ in range(repeat):
        fresh = replace(series)
        t0 = time.perf_counter()
        result = build(fresh)
        out.append(time.perf_counter() - t0)
        assert len(result.datasets()) == 6, "SR, 3 heatmap SCs, summary SC and KOS expected"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--old-rev", default=OLD_REV, help="git revision of the old dicom_node/results ('' to skip)")
    ap.add_argument("--profile", type=Path, help="write a cProfile of one new (and one old) build here")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    series, windows, prediction, manifest = inputs(args.slices, args.size)
    print(f"series: {len(series.sop_instance_uids)} slices of {args.size}x{args.size}, {len(windows.slice_uids)} "
          f"windows (inputs ready in {time.perf_counter() - t0:.1f} s, not timed)")

    from dicom_node.results import ResultOptions, build_results

    # every object is built, whatever the call (a newer ResultOptions skips heatmaps of a negative study)
    every = {"heatmaps_for_negative": True} if "heatmaps_for_negative" in ResultOptions.__dataclass_fields__ else {}

    def new(s: Any) -> Any:
        return build_results(s, windows, prediction, manifest, ResultOptions(kos=True, **every))

    new(replace(series))  # warm-up: first-import costs (highdicom, fonts) are not the build
    if args.profile:
        cProfile.runctx("new(s)", globals(), {"new": new, "s": replace(series)}, str(args.profile))
    new_times = timed(new, series, args.repeat)

    old_times: list[float] = []
    if args.old_rev:
        with tempfile.TemporaryDirectory(prefix="old-results-") as tmp:
            old_build, old_options, saved = load_old(old_results_package(args.old_rev, Path(tmp)))
            try:
                def old(s: Any) -> Any:
                    return old_build(s, windows, prediction, manifest, old_options(kos=True))

                old(replace(series))
                if args.profile:
                    cProfile.runctx("old(s)", globals(), {"old": old, "s": replace(series)},
                                    str(args.profile.with_suffix(".old.prof")))
                old_times = timed(old, series, args.repeat)
            finally:
                restore(saved)

    def line(name: str, times: list[float]) -> str:
        return f"{name}: best {min(times):.3f} s, median {statistics.median(times):.3f} s over {len(times)} builds"

    if old_times:
        print(line(f"old ({args.old_rev})", old_times))
    print(line("new (working tree)", new_times))
    if old_times:
        print(f"speed-up: {statistics.median(old_times) / statistics.median(new_times):.1f}x")
    ok = statistics.median(new_times) <= GOAL_S
    print(f"goal: new <= {GOAL_S} s: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
