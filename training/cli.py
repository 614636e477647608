"""`dicom-node-train` command line (draft: subcommands are added by each task)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node-train",
        description="Train and evaluate the two-phase PE model (Ma et al. 2022) on RSNA-layout data; generate synthetic CTPA phantoms.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_phantom(subparsers)
    return parser


def _add_phantom(subparsers) -> None:
    p = subparsers.add_parser(
        "phantom",
        help="write synthetic CTPA studies with exact PE labels in the RSNA-STR layout",
        description=(
            "Generate synthetic CT pulmonary angiograms (body, lungs, heart, aorta, contrast-filled pulmonary "
            "arteries down to subsegmental branches, spine, ribs, CT noise) with emboli of varied size, site and "
            "chronicity, plus negative and indeterminate studies. Writes DIR/train/<StudyUID>/<SeriesUID>/<SOPUID>.dcm, "
            "DIR/train.csv (one row per slice, every RSNA column) and DIR/masks/<StudyUID>.npz (embolus voxel mask). "
            "The same --seed always gives the same files."
        ),
        epilog="example: dicom-node-train phantom --out /tmp/p --studies 20 --seed 1 --rows 128 --cols 128 --slices 140 --slice-thickness 2.5",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.add_argument("--studies", type=int, default=20, help="number of studies to generate")
    p.add_argument("--seed", type=int, default=0, help="data set seed; study i uses a seed derived from (seed, i)")
    p.add_argument("--rows", type=int, default=512, help="image rows (pixels)")
    p.add_argument("--cols", type=int, default=512, help="image columns (pixels)")
    p.add_argument("--slices", type=int, default=300, help="slices per study")
    p.add_argument("--slice-thickness", type=float, default=1.25, help="slice thickness and spacing in mm (1-2.5)")
    p.add_argument("--pixel-spacing", type=float, default=None,
                   help="pixel spacing in mm; default: a 330-380 mm field of view drawn per study divided by the image size")
    p.add_argument("--prevalence", type=float, default=0.5, help="share of PE-positive studies")
    p.add_argument("--indeterminate", type=float, default=0.08, help="share of indeterminate (poor contrast / motion) studies")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: min(2, CPU count))")
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    p.set_defaults(func=_run_phantom)


def _run_phantom(args) -> int:
    import time
    from pathlib import Path

    from training.phantom import PhantomConfig, generate_dataset

    try:
        config = PhantomConfig(rows=args.rows, cols=args.cols, n_slices=args.slices,
                               slice_thickness_mm=args.slice_thickness, pixel_spacing_mm=args.pixel_spacing,
                               prevalence=args.prevalence, indeterminate_share=args.indeterminate)
    except ValueError as exc:
        print(f"dicom-node-train phantom: {exc}", file=sys.stderr)
        return 2
    if args.studies < 1:
        print(f"dicom-node-train phantom: --studies {args.studies}; expected at least 1", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out = generate_dataset(Path(args.out), args.studies, args.seed, config, workers=args.workers,
                           progress=not args.no_progress)
    summary = (out / "phantom_summary.txt").read_text().split()
    info = dict(item.split("=", 1) for item in summary)
    print(f"phantom: {info['studies']} studies, {info['positives']} positive, {info['files']} files "
          f"in {time.perf_counter() - t0:.1f} s -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
