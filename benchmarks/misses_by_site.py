"""Which emboli does a trained model miss? Study-level PE flag by embolus site and kind.

    .venv/bin/python benchmarks/misses_by_site.py --out /work/bench/p600h      # a train_phantom.py --out folder

For the validation and test studies of a `benchmarks/train_phantom.py` run, the phantom studies are
generated again from their seeds (same --studies/--seed/geometry as the run; nothing is read from
DICOM) to learn where each embolus sits. A study is flagged as the node flags it: its highest
phase-1 window probability (RUN/features/<study>.probs.npy) >= the run's validation-chosen
threshold (report.json `thresholds.pe_present_on_window`) and, as a second reading, at the
threshold that leaves 90 % of the validation negatives unflagged. Printed per split: specificity on
the PE-negative studies and, for the PE-positive ones, how many are flagged, grouped by the largest
artery holding an embolus (central = main/left/right pulmonary artery, else lobar or smaller) and
by acute / chronic / both.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def site_group(emboli) -> str:
    """'central/acute', 'lobar or smaller/acute+chronic', ... for a study's (vessel, kind) emboli."""
    from dicom_node_phantoms.anatomy import CENTRAL_KINDS

    where = "central" if any(v in CENTRAL_KINDS for v, _ in emboli) else "lobar or smaller"
    return f"{where}/{'+'.join(sorted({k for _, k in emboli}))}"


def main(argv=None) -> int:
    from benchmarks.train_phantom import add_phantom_arguments, phantom_config
    from dicom_node_phantoms import dataset_plan, generate_study, phantom_study_uid
    from dicom_node_training.data import load_split

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path, help="the --out folder of benchmarks/train_phantom.py (OUT/run)")
    add_phantom_arguments(ap)  # the run's own data set options (defaults: train_phantom.py's)
    args = ap.parse_args(argv)

    run = args.out / "run"
    for need in (run / "split.json", run / "report.json", run / "features"):
        if not need.exists():
            ap.error(f"{need}: not found; pass the --out folder of a finished benchmarks/train_phantom.py run")
    config = phantom_config(args)
    plan = {phantom_study_uid(s): (s, kind) for s, kind in dataset_plan(args.studies, args.seed, config)}
    split = load_split(run / "split.json")
    threshold = float(json.loads((run / "report.json").read_text())["thresholds"]["pe_present_on_window"])
    rows = []  # (split, kind, group or "", highest window probability)
    for part in ("validation", "test"):
        for uid in split[part]:
            if uid not in plan:
                ap.error(f"study {uid} of {run} is not in the plan of --studies {args.studies} --seed {args.seed}; "
                         "pass the data set's own --studies/--seed")
            seed, kind = plan[uid]
            top = float(np.load(run / "features" / f"{uid}.probs.npy").max())
            group = site_group(generate_study(seed, config, kind=kind).extra["emboli"]) if kind == "positive" else ""
            rows.append((part, kind, group, top))
    val_negatives = [top for part, kind, _, top in rows if part == "validation" and kind != "positive"]
    thresholds = {"report": threshold, "spec90": float(np.quantile(val_negatives, 0.9))}
    print(f"{args.out}: a study is flagged when its highest window probability >= the threshold: "
          f"A = {thresholds['report']:.3f} (report.json, validation-chosen), "
          f"B = {thresholds['spec90']:.3f} (90 % specificity on the validation negatives)")
    for part in ("validation", "test"):
        mine = [r for r in rows if r[0] == part]
        spec = {k: np.mean([top < t for _, kind, _, top in mine if kind != "positive"]) for k, t in thresholds.items()}
        print(f"{part}: specificity A {spec['report']:.2f}, B {spec['spec90']:.2f}")
        for group in sorted({g for _, kind, g, _ in mine if kind == "positive"}):
            tops = [top for _, kind, g, top in mine if kind == "positive" and g == group]
            hits = {k: sum(top >= t for top in tops) for k, t in thresholds.items()}
            print(f"  {group:32s} flagged A {hits['report']:3d}, B {hits['spec90']:3d} of {len(tops):3d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
