"""Do the heatmaps point at the embolus? Share of positive phantom studies whose hottest heatmap
point (over the key slices the node would send) lies on the phantom's embolus mask.

    .venv/bin/python benchmarks/heatmap_hits.py [--studies 40] [--bundle DIR]

For each PE-positive phantom study (the demo model's geometry: 128 x 128 px, 140 slices of 2.5 mm,
seeds not used in training) the node's own path runs: load_series -> preprocess -> Predictor ->
select_key_slices. A hit is the hottest point falling on the embolus mask dilated by a tolerance:
in-plane only on the same slice (2 px, the strict rule of `heatmap_hits_embolus`), and in 3-D
within 10 mm / 20 mm (the tiny model's last conv block has 5 x 5 cells over the ~28 cm lung box,
so one cell spans ~56 mm). Printed next to each: the chance rate of a uniformly random voxel of the
volume landing as close to the embolus, so the share can be read against luck.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy.ndimage import distance_transform_edt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    from dicom_node.imaging.preprocess import preprocess
    from dicom_node.imaging.series import load_series
    from dicom_node.pipeline import get_predictor
    from dicom_node.results.key_slices import select_key_slices
    from dicom_node.tools.demo import DEMO_PHANTOM
    from dicom_node_phantoms import PhantomConfig, generate_study, heatmap_hits_embolus, hottest_point, study_datasets

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=40)
    ap.add_argument("--seed", type=int, default=900_000, help="first phantom seed (far from training seeds)")
    ap.add_argument("--bundle", default="", help="model bundle (default: the bundled demo model)")
    ap.add_argument("--top-k", type=int, default=3)
    args = ap.parse_args(argv)

    predictor = get_predictor(args.bundle, ("CPUExecutionProvider",))
    cfg = PhantomConfig(**DEMO_PHANTOM)
    rows = []
    for i in range(args.studies):
        st = generate_study(args.seed + i, cfg, kind="positive")
        series = load_series(study_datasets(st))
        windows = preprocess(series, predictor.manifest.preprocessing)
        pred = predictor.predict(windows)
        keys = select_key_slices(series, windows, pred, k=args.top_k)
        z, y, x = hottest_point(keys)
        spacing = np.array([st.spacing_between_slices_mm, *st.pixel_spacing_mm])
        # the mask is in the phantom's slice order; load_series sorts by position along the normal (same order)
        dist = distance_transform_edt(~st.embolus_mask, sampling=spacing)
        rows.append({
            "strict": heatmap_hits_embolus(keys, st.embolus_mask, tolerance_px=2),
            "d_mm": float(dist[z, y, x]),
            "dist": dist,
            "flagged": bool(pred.labels["pe_present_on_window"]),
        })
        print(f"study {i + 1:>3}/{args.studies}: hottest point {(z, y, x)} is {rows[-1]['d_mm']:.1f} mm from the "
              f"embolus; PE {'flagged' if rows[-1]['flagged'] else 'missed'}", flush=True)

    rng = np.random.default_rng(0)
    def chance(tol_mm: float) -> float:
        hits = []
        for r in rows:
            d = r["dist"]
            zz, yy, xx = (rng.integers(0, n, 200) for n in d.shape)
            hits.append(np.mean(d[zz, yy, xx] <= tol_mm))
        return float(np.mean(hits))

    n = len(rows)
    print(f"\n{n} positive phantom studies, top-{args.top_k} key slices, model "
          f"'{predictor.manifest.name}' {predictor.manifest.version}")
    print(f"  hottest point on the embolus, same slice, 2 px in-plane tolerance: "
          f"{sum(r['strict'] for r in rows)}/{n} = {np.mean([r['strict'] for r in rows]):.2f}")
    for tol in (10.0, 20.0):
        share = np.mean([r["d_mm"] <= tol for r in rows])
        print(f"  hottest point within {tol:g} mm of the embolus (3-D): {share:.2f}   (random point in the volume: "
              f"{chance(tol):.2f})")
    print(f"  median distance hottest point -> embolus: {np.median([r['d_mm'] for r in rows]):.1f} mm; "
          f"studies flagged PE: {sum(r['flagged'] for r in rows)}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
