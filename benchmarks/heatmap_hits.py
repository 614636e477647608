"""Do the heatmaps point at the clot? A localisation benchmark on held-out positive phantoms.

    .venv/bin/python benchmarks/heatmap_hits.py [--studies 40] [--bundle DIR] [--json OUT.json]

For each PE-positive phantom study (the training distribution of `benchmarks/train_phantom.py`:
128 x 128 px, 140 slices of 2.5 mm, central emboli with mediastinal fat; seeds from 900000, far from
the training seeds 2022...) the node's own path runs: load_series -> preprocess -> Predictor ->
select_key_slices, and the hottest heatmap point over the top-k key slices (`hottest_point`, the
point the SR marks) is scored against the phantom's embolus mask:

* the 3-D distance from that point to the nearest embolus voxel, in mm (median with its bootstrap
  95 % CI, and the interquartile range);
* the share within 10 mm and within 20 mm (Wilson 95 % CIs);
* the share whose key slice (the one holding the hottest point) contains embolus voxels;
* the pointing game: the point inside the embolus mask dilated by half a CAM cell per axis (an
  ellipsoid of half-axes = half the cell size in mm, measured on each study's own geometry).

Each figure is printed for every positive and for the detected positives (the model's PE flag on),
next to two baselines computed in the same run on the same studies:

* chance: 200 uniformly random points inside the study's lung box (the region the model sees);
* ceiling: the perfect CAM on the same grid, i.e. each window's heatmap replaced by the share of
  each cell's receptive-field region that is embolus (the mask pooled to the bundle's `CamGrid`),
  with windows ranked by that share, through the same key-slice rule and mapping.

The cell size in mm is reported from the data (median over studies), not assumed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import distance_transform_edt

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

TOLERANCES_MM = (10.0, 20.0)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95 % interval of a share k / n."""
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, centre - half), min(1.0, centre + half))


def median_ci(values: np.ndarray, rng: np.random.Generator, n_boot: int = 2000) -> tuple[float, float]:
    """Percentile bootstrap 95 % interval of the median."""
    if values.size == 0:
        return (math.nan, math.nan)
    boots = np.median(rng.choice(values, size=(n_boot, values.size), replace=True), axis=1)
    return (float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5)))


def oracle_heatmaps(series: Any, embolus_mask: np.ndarray, windows: Any, config: Any, grid: Any,
                    cells: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """The perfect CAM: per window and cell, the share of the cell's region that is embolus; and per window its total."""
    from dicom_node.imaging.preprocess import mask_to_windows, prepare

    full = prepare(series, config)
    model_mask = mask_to_windows(series, embolus_mask, full.geometry, config).astype(np.float32)
    off = full.geometry.crop_offset[0] + (config.resize - config.crop) // 2
    model_mask = model_mask[..., off:off + config.crop, off:off + config.crop]
    shape = model_mask.shape[1:]
    members = [grid.membership(a, n, s).astype(np.float32) for a, (n, s) in enumerate(zip(cells, shape))]
    members = [m / np.maximum(m.sum(axis=1, keepdims=True), 1.0) for m in members]
    heat = np.einsum("ntyx,at,by,cx->nabc", model_mask, *members)
    return heat.astype(np.float32), heat.reshape(len(heat), -1).sum(axis=1)


def cell_size_mm(windows: Any, grid: Any) -> tuple[float, float, float]:
    """(t, h, w) size of one CAM cell in mm on this study: stride x the model voxel size."""
    g = windows.geometry
    # slabs (Shi et al.): the box's z range is resized to z_resize slices, so a slab slice is box / z_resize thick
    z_mm = g.box_slices * g.spacing_mm / g.z_resize if g.z_resize else g.spacing_mm
    return (grid.stride[0] * z_mm,
            grid.stride[1] * (g.lung_box[3] - g.lung_box[2]) * g.spacing_mm / g.resize,
            grid.stride[2] * (g.lung_box[5] - g.lung_box[4]) * g.spacing_mm / g.resize)


def score_point(point: tuple[int, int, int], dist: np.ndarray, half_cell_dist: np.ndarray,
                mask: np.ndarray) -> dict[str, Any]:
    z, y, x = point
    return {"d_mm": float(dist[z, y, x]), "pointing": bool(half_cell_dist[z, y, x] <= 1.0),
            "slice_has_embolus": bool(mask[z].any())}


def summarise(rows: list[dict[str, Any]], rng: np.random.Generator) -> dict[str, Any]:
    d = np.array([r["d_mm"] for r in rows], dtype=np.float64)
    n = len(rows)
    out: dict[str, Any] = {"n": n}
    if not n:
        return out
    out["median_mm"] = float(np.median(d))
    out["median_ci_mm"] = median_ci(d, rng)
    out["iqr_mm"] = (float(np.percentile(d, 25)), float(np.percentile(d, 75)))
    for tol in TOLERANCES_MM:
        k = int((d <= tol).sum())
        out[f"within_{tol:g}mm"] = k / n
        out[f"within_{tol:g}mm_ci"] = wilson(k, n)
    for key in ("slice_has_embolus", "pointing"):
        k = sum(bool(r[key]) for r in rows)
        out[key] = k / n
        out[f"{key}_ci"] = wilson(k, n)
    return out


def fmt_row(name: str, s: dict[str, Any]) -> str:
    if not s.get("n"):
        return f"  {name:<34} (no studies)"
    ci = s["median_ci_mm"]
    parts = [f"median {s['median_mm']:5.1f} mm [{ci[0]:.1f}, {ci[1]:.1f}]",
             f"IQR {s['iqr_mm'][0]:.1f}-{s['iqr_mm'][1]:.1f}"]
    for key, label in (("within_10mm", "<=10 mm"), ("within_20mm", "<=20 mm"), ("slice_has_embolus", "slice"),
                       ("pointing", "pointing")):
        lo, hi = s[f"{key}_ci"]
        parts.append(f"{label} {s[key]:.2f} [{lo:.2f}, {hi:.2f}]")
    return f"  {name:<34} n={s['n']:<3} " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    from train_phantom import add_phantom_arguments, phantom_config

    from dicom_node.imaging.preprocess import preprocess
    from dicom_node.imaging.series import load_series
    from dicom_node.log import configure_logging
    from dicom_node.pipeline import get_predictor
    from dicom_node.results.key_slices import select_key_slices
    from dicom_node_phantoms import generate_study, hottest_point, study_datasets

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--positives", type=int, default=40, help="held-out positive phantom studies (at least 30)")
    ap.add_argument("--first-seed", type=int, default=900_000, help="first phantom seed (far from training seeds)")
    ap.add_argument("--bundle", default="", help="model bundle (default: the bundled demo model)")
    ap.add_argument("--top-k", type=int, default=3, help="key slices per study, as the node's [results] key_slices")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    add_phantom_arguments(ap)  # the training distribution's phantom options (--studies and --seed are unused here)
    args = ap.parse_args(argv)
    configure_logging(level="WARNING")

    predictor = get_predictor(args.bundle, ("CPUExecutionProvider",))
    m = predictor.manifest
    grid, cells, pp = m.heatmap_grid, m.heatmap_shape, m.preprocessing
    cfg = phantom_config(args)
    rng = np.random.default_rng(0)
    model_rows, chance_rows, ceiling_rows, flagged, sizes = [], [], [], [], []
    for i in range(args.positives):
        st = generate_study(args.first_seed + i, cfg, kind="positive")
        series = load_series(study_datasets(st))
        windows = preprocess(series, pp)
        pred = predictor.predict(windows)
        keys = select_key_slices(series, windows, pred, k=args.top_k)
        spacing = np.array([st.spacing_between_slices_mm, *st.pixel_spacing_mm])
        mask = st.embolus_mask  # phantom slice order = load_series order (sorted along the normal)
        dist = distance_transform_edt(~mask, sampling=spacing)
        size = cell_size_mm(windows, grid)
        sizes.append(size)
        half_cell = distance_transform_edt(~mask, sampling=spacing / (np.array(size) / 2.0))
        model_rows.append(score_point(hottest_point(keys), dist, half_cell, mask))
        flagged.append(bool(pred.labels["pe_present_on_window"]))
        # chance: uniform points in the lung box (resampled box corners -> original voxel coordinates)
        g = windows.geometry
        box = [(g.lung_box[2 * a] * g.spacing_mm / g.original_spacing_mm[a],
                (g.lung_box[2 * a + 1] - 1) * g.spacing_mm / g.original_spacing_mm[a]) for a in range(3)]
        pts = np.stack([rng.uniform(a, b, 200) for a, b in box], axis=1)
        pts = np.clip(np.rint(pts).astype(int), 0, np.array(mask.shape) - 1)
        chance_rows += [score_point((int(a), int(b), int(c)), dist, half_cell, mask) for a, b, c in pts]
        # ceiling: the perfect CAM on the same grid, through the same rule
        heat, totals = oracle_heatmaps(series, mask, windows, pp, grid, cells)
        perfect = replace(pred, heatmaps=heat, window_probs=(totals / max(totals.max(), 1e-9)).astype(np.float32),
                          attention=np.ones_like(pred.attention))
        ceiling_rows.append(score_point(hottest_point(select_key_slices(series, windows, perfect, k=args.top_k)),
                                        dist, half_cell, mask))
        print(f"study {i + 1:>3}/{args.positives}: {model_rows[-1]['d_mm']:5.1f} mm from the embolus "
              f"(perfect CAM {ceiling_rows[-1]['d_mm']:5.1f} mm); PE {'flagged' if flagged[-1] else 'missed'}", flush=True)

    detected = [r for r, f in zip(model_rows, flagged) if f]
    cell = np.median(np.array(sizes), axis=0)
    results = {
        "model": f"{m.name} {m.version}", "grid": grid.to_dict(), "cells": list(cells), "top_k": args.top_k,
        "cell_size_mm": [round(float(v), 1) for v in cell],
        "positives": args.positives, "detected": len(detected),
        "model_all": summarise(model_rows, rng), "model_detected": summarise(detected, rng),
        "chance_lung_box": summarise(chance_rows, rng), "ceiling_perfect_cam": summarise(ceiling_rows, rng),
    }
    print(f"\n{args.positives} held-out positive phantom studies (seeds {args.first_seed}-{args.first_seed + args.positives - 1}), "
          f"model '{m.name}' {m.version}, top-{args.top_k} key slices, CAM {cells[0]} x {cells[1]} x {cells[2]} cells "
          f"of {cell[0]:.1f} x {cell[1]:.1f} x {cell[2]:.1f} mm (median over studies), grid {grid.to_dict()}")
    print(f"PE flagged in {len(detected)}/{args.positives}; figures: median distance to the nearest embolus voxel "
          "(bootstrap 95 % CI), IQR, shares with Wilson 95 % CIs")
    print(fmt_row("model, every positive", results["model_all"]))
    print(fmt_row("model, detected positives", results["model_detected"]))
    print(fmt_row("chance: random point in lung box", results["chance_lung_box"]))
    print(fmt_row("ceiling: perfect CAM, same grid", results["ceiling_perfect_cam"]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
