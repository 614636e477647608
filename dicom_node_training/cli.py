"""`dicom-node-train` command line: `phantom` (synthetic CTPA studies with exact labels, RSNA layout),
`fit` (cache -> phase1 -> features -> phase2 -> evaluate, skipping finished steps) and each step as
its own subcommand on the same run directory."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from dicom_node import tool_versions

if TYPE_CHECKING:  # the command line imports torch only inside the subcommands that need it
    from dicom_node_training.config import TrainConfig
    from dicom_node_training.distributed import DistContext

    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node-train",
        description="Train and evaluate the two-phase PE models (Ma et al. 2022; Shi et al. 2020 with --family shi2020) "
                    "on RSNA-layout data; generate synthetic CTPA phantoms.",
    )
    parser.add_argument("--version", action="version", version=tool_versions("dicom-node-train", ("torch",)),
                        help="print the package version and the torch it would train with, then exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_phantom(subparsers)
    _add_fit(subparsers)
    _add_steps(subparsers)
    return parser


class _DefaultsOnce(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only where the help does not already say the default and X means something."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or action.default is False or action.required:
            return text
        return super()._get_help_string(action)


def _add_phantom(subparsers: _Subparsers) -> None:
    from dicom_node_phantoms import SMALLEST_EMBOLUS_VESSELS  # numpy + pydicom only, no torch

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
        formatter_class=_DefaultsOnce,
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
    p.add_argument("--smallest-embolus-vessel", choices=SMALLEST_EMBOLUS_VESSELS, default="subsegmental",
                   help="smallest artery that may hold an embolus (default: subsegmental, every site); use lobar for "
                        "coarse phantoms (128 px) whose 2.6-3 mm pixels are as wide as a segmental artery; central keeps "
                        "emboli in the main, left and right pulmonary arteries")
    p.add_argument("--mediastinal-fat", type=float, default=0.0, metavar="MM",
                   help="wrap the main, left and right pulmonary arteries in a fat sleeve this thick (mm) where they "
                        "cross the mediastinum, so that a wall-adherent embolus changes the artery's outline")
    p.add_argument("--workers", type=int, default=None, help="parallel processes (default: min(2, CPU count))")
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")
    p.set_defaults(func=_run_phantom)


def _run_phantom(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from dicom_node_phantoms import PhantomConfig, generate_dataset

    try:
        config = PhantomConfig(rows=args.rows, cols=args.cols, n_slices=args.slices,
                               slice_thickness_mm=args.slice_thickness, pixel_spacing_mm=args.pixel_spacing,
                               prevalence=args.prevalence, indeterminate_share=args.indeterminate,
                               smallest_embolus_vessel=args.smallest_embolus_vessel,
                               mediastinal_fat_mm=args.mediastinal_fat)
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


_FLOW = (
    "The flow: cache (DICOM -> preprocessed uint8 windows, once) -> phase1 (Ma: 3D ResNet-18 on 10-slice "
    "windows, best validation AUROC kept; Shi: attention-guided 2D ResNet-18 on 5-slice slabs) -> features "
    "(best phase-1 model -> per-window features) -> phase2 (Ma: TCN/GRU + attention on sequences of 40, best "
    "validation loss kept; Shi: bidirectional Conv-LSTM over the slabs) -> evaluate "
    "(RUN/report.json, report.md, ROC plots). `fit` runs them all and skips finished steps; each step "
    "is also its own subcommand on the same --out. Multi-GPU / multi-node: "
    "torchrun --nproc_per_node=G -m dicom_node_training.cli fit|phase1|... (DDP; rank 0 writes)."
)


#: the flags beyond --out/--preset/--config/--device/--workers/--log-json that each subcommand uses
_RUN_FLAGS: dict[str, frozenset[str]] = {
    "fit": frozenset({"data", "pretrained", "progress"}),
    "cache": frozenset({"data", "progress"}),
    "phase1": frozenset({"pretrained", "progress"}),
    "features": frozenset({"progress"}),
    "phase2": frozenset({"progress"}),
    "evaluate": frozenset(),
}


def _add_run_args(p: argparse.ArgumentParser, command: str) -> None:
    flags = _RUN_FLAGS[command]
    if "data" in flags:
        p.add_argument("--data", required=True,
                       help="RSNA-layout data directory: DATA/train.csv + DATA/train/<study>/<series>/<sop>.dcm")
    p.add_argument("--out", required=True, help="run directory RUN (config.json, split.json, cache/, phase1/, features/, phase2/, report.json)")
    p.add_argument("--preset", choices=("paper", "tiny", "shi-paper", "shi-tiny"), default=None,
                   help="settings: 'paper' = Ma et al. 2022 (224/192 px, batch 16, 20 + 200 epochs); 'tiny' = narrow "
                        "network on 96/80 px for CPU; 'shi-paper' = Shi et al. 2020 (50 slabs of 5 slices, 384 px, 2D ResNet-18 "
                        "with attention loss + bidirectional Conv-LSTM); 'shi-tiny' = the same, narrow, 96/80 px for CPU. "
                        "Default: the run's stored config.json, else 'paper'")
    p.add_argument("--family", choices=("ma2022", "shi2020"), default=None,
                   help="model family without naming a preset: ma2022 = --preset paper, shi2020 = --preset shi-paper "
                        "(with --preset, it must agree with the preset's family)")
    p.add_argument("--config", default=None, help="TOML/JSON file overriding preset settings, e.g. [phase1] epochs = 2")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: the config's)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers and cache processes (default: the config's)")
    if "pretrained" in flags:
        p.add_argument("--pretrained", default=None, metavar="PATH",
                       help="local Kinetics-400 r3d_18 state_dict to start phase 1 from (torchvision parameter names; "
                            "never downloaded); for shi-* presets a torchvision resnet18 ImageNet state_dict, its RGB "
                            "conv1 averaged over colour and repeated for the 5 slab slices x 3/5. Without it phase 1 "
                            "starts from random weights")
    if "progress" in flags:
        p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars (log events only)")
    p.add_argument("--log-json", action="store_true", help="log events as JSON lines")


def _add_fit(subparsers: _Subparsers) -> None:
    p = subparsers.add_parser(
        "fit", help="run the whole training: cache -> phase1 -> features -> phase2 -> evaluate",
        description="Train the two-phase PE model end to end on RSNA-layout data. " + _FLOW,
        epilog=("examples:\n"
                "  dicom-node-train phantom --out P --studies 40 --rows 128 --cols 128 --slices 140 --slice-thickness 2.5\n"
                "  dicom-node-train fit --data P --out R --preset tiny\n"
                "  dicom-node-train fit --data P --out R --resume      # after an interruption\n"
                "  torchrun --nproc_per_node=4 -m dicom_node_training.cli fit --data D --out R --preset paper --device cuda"),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_run_args(p, "fit")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out: skip finished steps, continue a phase from its last.pt "
                        "(without it, an --out that already holds a run is refused)")
    p.set_defaults(func=_run_fit)


_STEP_HELP = {
    "cache": "split the studies (RUN/split.json) and preprocess every study once into RUN/cache",
    "phase1": "train the window classifier, 3D ResNet-18 or Shi's 2D ResNet-18 (resumes from RUN/phase1/last.pt)",
    "features": "best phase-1 model -> RUN/features/<study>.npy (N, F) + <study>.probs.npy",
    "phase2": "train the sequence model on the features (resumes from RUN/phase2/last.pt)",
    "evaluate": "best phase-2 model on validation + test -> RUN/report.json, report.md, ROC plots",
}


def _add_steps(subparsers: _Subparsers) -> None:
    for step, help_text in _STEP_HELP.items():
        p = subparsers.add_parser(step, help=help_text, description=help_text + ". " + _FLOW)
        _add_run_args(p, step)
        p.set_defaults(func=_run_step, step=step)


def _start(args: argparse.Namespace, *, new_run: bool) -> tuple[TrainConfig, DistContext]:
    from dicom_node.log import configure_logging
    from dicom_node_training.distributed import setup
    from dicom_node_training.fit import resolve_config

    configure_logging(json=args.log_json)
    preset = args.preset
    if args.family is not None:
        from dicom_node_training.config import PRESETS, ConfigError

        if preset is None:
            preset = "paper" if args.family == "ma2022" else "shi-paper"
        elif PRESETS[preset].family != args.family:
            raise ConfigError(f"--family {args.family} with --preset {preset} (family {PRESETS[preset].family}); "
                              "drop one, or choose a preset of that family (shi-paper / shi-tiny for shi2020)")
    config = resolve_config(args.out, preset, args.config, device=args.device, workers=args.workers,
                            new_run=new_run, pretrained=getattr(args, "pretrained", None))
    return config, setup(config.device)


def _run_fit(args: argparse.Namespace) -> int:
    from dicom_node_training.config import ConfigError
    from dicom_node_training.data import DataError
    from dicom_node_training.distributed import teardown
    from dicom_node_training.fit import RunError, fit

    try:
        config, ctx = _start(args, new_run=not args.resume)
    except (ConfigError, RunError) as exc:
        print(f"dicom-node-train fit: {exc}", file=sys.stderr)
        return 2
    try:
        fit(args.data, args.out, config, progress=not args.no_progress, ctx=ctx)
    except DataError as exc:  # raised before anything is written to --out
        print(f"dicom-node-train fit: {exc}", file=sys.stderr)
        return 2
    finally:
        teardown(ctx)
    if ctx.is_main:
        print(f"fit: done -> {args.out}/report.json")
    return 0


def _run_step(args: argparse.Namespace) -> int:
    from dicom_node_training.config import ConfigError
    from dicom_node_training.data import DataError
    from dicom_node_training.distributed import teardown
    from dicom_node_training.fit import RunError, run_step

    try:
        config, ctx = _start(args, new_run=False)
    except (ConfigError, RunError) as exc:
        print(f"dicom-node-train {args.step}: {exc}", file=sys.stderr)
        return 2
    try:
        run_step(args.step, config, getattr(args, "data", None), args.out, ctx,
                 progress=not getattr(args, "no_progress", False))
    except DataError as exc:  # bad --data, found before anything is written
        print(f"dicom-node-train {args.step}: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RunError, ValueError) as exc:
        print(f"dicom-node-train {args.step}: {exc}", file=sys.stderr)
        return 1
    finally:
        teardown(ctx)
    return 0


#: option -> the _RUN_FLAGS key it belongs to
_FLAG_OF = {"--data": "data", "--pretrained": "pretrained", "--no-progress": "progress"}


def _not_used_here(command: str | None, extra: list[str]) -> str | None:
    """One line for a run option given to a subcommand that does not use it (`evaluate --pretrained`)."""
    for arg in extra:
        flag = _FLAG_OF.get(arg.split("=", 1)[0])
        if command in _RUN_FLAGS and flag is not None:
            users = ", ".join(c for c, flags in _RUN_FLAGS.items() if flag in flags)
            return (f"dicom-node-train {command}: {arg.split('=', 1)[0]} is not used by {command} (only by {users}); "
                    f"drop it (`dicom-node-train {command} --help` lists its options)")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        message = _not_used_here(getattr(args, "command", None), extra)
        if message is None:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        print(message, file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
