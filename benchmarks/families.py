"""Head to head: the Ma et al. 2022 family (`--preset tiny`) against the Shi et al. 2020 family (`--preset shi-tiny`)
on the same phantoms and the same split, plus Shi's own ablation (stage I without the attention loss).

    .venv/bin/python benchmarks/families.py --out /work/bench/families                  # 600 studies (the full check)
    .venv/bin/python benchmarks/families.py --out /tmp/fam --studies 40 --rows 64 --slices 60 \\
        --shi-stage1-epochs 2 --shi-stage2-epochs 5 --skip-ma --positives 6             # a quick try
    .venv/bin/python benchmarks/families.py --out /tmp/fam --models ma ...   # one model (another process the rest)

Phantoms as `benchmarks/train_phantom.py` makes them (the same options, reused when OUT/data holds the same);
each family trains in its own run directory (OUT/run-ma, OUT/run-shi, OUT/run-shi-noattention) with the
same seed, so `make_split` gives the same train/validation/test studies. Re-running resumes every run.
`--ma-run DIR` takes a finished Ma run on the same phantoms (e.g. train_phantom.py's OUT/run) instead of
training one; `--skip-ma` leaves the Ma family out.

Printed per model: study-level PE AUROC on test with its bootstrap 95 % CI (Ma: a study's highest window
probability, how the node flags a study; Shi: stage II's probability), sensitivity and specificity at the
threshold chosen on validation, the heatmap localisation of `benchmarks/heatmap_hits.py` on held-out positive
phantoms (detected positives: within 10 mm, within 20 mm, median mm), inference seconds per study on this CPU
(the node's path: preprocess + onnxruntime, median of `--timing-studies` studies), the bundle's size, and the
training seconds of every step. Targets of issue 19 for shi-tiny: study AUROC >= 0.95, hottest point within
10 mm in >= 80 % of detected positives, and localisation with the attention loss better than without.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# torch looks for the `triton` package when its compiler stack is first imported (Adam's first step, the ONNX
# exporter); with benchmarks/ on sys.path (python puts a script's folder first) it finds benchmarks/triton.py,
# the Triton serving benchmark, and fails. Import that stack with benchmarks/ off the path, then put it back.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "benchmarks"]
import torch._dynamo  # noqa: E402,F401  (for its side effect)

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

#: model name -> (preset, config overrides)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "ma": ("tiny", {}),
    "shi": ("shi-tiny", {}),
    "shi-noattention": ("shi-tiny", {"shi1": {"attention_loss_weight": 0.0}}),
}


def train(name: str, data: Path, out: Path, args: argparse.Namespace) -> tuple[Path, dict[str, float]]:
    """Fit (or resume) one model; returns its run directory and the seconds of each step run now."""
    from dicom_node_training.distributed import setup
    from dicom_node_training.fit import STEPS, resolve_config, run_step, step_done

    preset, overrides = MODELS[name]
    overrides = json.loads(json.dumps(overrides))
    overrides["num_workers"] = args.workers
    if name.startswith("shi"):
        for key, value in (("shi1", args.shi_stage1_epochs), ("shi2", args.shi_stage2_epochs)):
            if value:
                overrides.setdefault(key, {})["epochs"] = value
    elif args.phase1_epochs or args.phase2_epochs:
        for key, value in (("phase1", args.phase1_epochs), ("phase2", args.phase2_epochs)):
            if value:
                overrides.setdefault(key, {})["epochs"] = value
    run = out / f"run-{name}"
    cfg_file = out / f"config-{name}.json"
    cfg_file.write_text(json.dumps(overrides))
    config = resolve_config(run, preset, cfg_file, device="cpu", workers=args.workers)
    ctx = setup("cpu")
    seconds: dict[str, float] = {}
    for step in STEPS:
        if not step_done(step, run):
            t0 = time.perf_counter()
            run_step(step, config, data, run, ctx, progress=False)
            seconds[step] = round(time.perf_counter() - t0, 1)
    return run, seconds


def study_figures(run: Path) -> dict[str, Any]:
    """Study-level PE AUROC (CI), sensitivity and specificity at the validation threshold, from report.json."""
    report = json.loads((run / "report.json").read_text())
    test = report["test"]
    if report.get("family") == "shi2020":
        w = "pe_present_on_window"
        return {"auroc": test["auroc"][w], "auroc_ci": test["auroc_ci"][w], "sensitivity": test["sensitivity"][w],
                "specificity": test["specificity"][w], "slab_auroc": test.get("slab_auroc"), "n": test["n_studies"]}
    flag = test["study_flag"]
    return {"auroc": flag["auroc"], "auroc_ci": flag["auroc_ci"], "sensitivity": flag["sensitivity"],
            "specificity": flag["specificity"], "n": test["n_studies"]}


def export(run: Path, bundle: Path, name: str) -> int:
    """The run's bundle (made once); returns its size in bytes."""
    if not (bundle / "manifest.json").is_file():
        from dicom_node_export.bundle import bundle_from_run

        bundle_from_run(run, bundle, name=f"bench-{name}", version="0.0.0",
                        data_description="synthetic phantoms (benchmarks/families.py)",
                        commands=[shlex.join(["benchmarks/families.py", *sys.argv[1:]])])
    return sum(f.stat().st_size for f in bundle.iterdir() if f.is_file())


def inference_seconds(bundle: Path, args: argparse.Namespace) -> float:
    """Median seconds of preprocess + predict per held-out phantom study with the node's Predictor on CPU."""
    from train_phantom import phantom_config

    from dicom_node.imaging.preprocess import preprocess
    from dicom_node.imaging.series import load_series
    from dicom_node.model.inference import Predictor
    from dicom_node_phantoms import generate_study, study_datasets

    predictor = Predictor(bundle, providers=("CPUExecutionProvider",))
    times = []
    for i in range(args.timing_studies):
        series = load_series(study_datasets(generate_study(800_000 + i, phantom_config(args), kind="positive")))
        t0 = time.perf_counter()
        predictor.predict(preprocess(series, predictor.manifest.preprocessing))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def localisation(bundle: Path, out: Path, name: str, args: argparse.Namespace) -> dict[str, Any]:
    import heatmap_hits

    path = out / f"localisation-{name}.json"
    if not path.is_file():
        heatmap_hits.main(["--bundle", str(bundle), "--positives", str(args.positives), "--json", str(path),
                           "--rows", str(args.rows), "--slices", str(args.slices),
                           "--slice-thickness", str(args.slice_thickness),
                           "--smallest-embolus-vessel", args.smallest_embolus_vessel,
                           "--mediastinal-fat", str(args.mediastinal_fat)])
    data = json.loads(path.read_text())
    return {"detected": data["detected"], "positives": data["positives"], **data["model_detected"]}


def main(argv: list[str] | None = None) -> int:
    from train_phantom import STAMP, add_phantom_arguments, phantom_config, phantom_stamp, reuse_phantoms

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/families", help="working directory (OUT/data, OUT/run-*, OUT/bundle-*)")
    add_phantom_arguments(ap)
    ap.add_argument("--workers", type=int, default=2, help="cache processes and DataLoader workers")
    ap.add_argument("--ma-run", type=Path, default=None, help="a finished Ma run on the same phantoms (not retrained)")
    ap.add_argument("--skip-ma", action="store_true", help="leave the Ma family out")
    ap.add_argument("--models", default=",".join(MODELS),
                    help=f"which models, comma-separated (of {', '.join(MODELS)}); two processes with different "
                         "--models may share one --out")
    ap.add_argument("--phase1-epochs", type=int, default=None, help="Ma phase 1 (default: the tiny preset's)")
    ap.add_argument("--phase2-epochs", type=int, default=None, help="Ma phase 2 (default: the tiny preset's)")
    ap.add_argument("--shi-stage1-epochs", type=int, default=None, help="default: the shi-tiny preset's")
    ap.add_argument("--shi-stage2-epochs", type=int, default=None, help="default: the shi-tiny preset's")
    ap.add_argument("--positives", type=int, default=40, help="held-out positive phantoms for the localisation")
    ap.add_argument("--timing-studies", type=int, default=5, help="held-out phantoms timed per model")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    args = ap.parse_args(argv)

    from dicom_node.log import configure_logging
    from dicom_node_phantoms import generate_dataset

    configure_logging(level="WARNING")
    out = Path(args.out)
    data = out / "data"
    t_all = time.perf_counter()
    try:
        if not reuse_phantoms(data, args):
            generate_dataset(data, args.studies, args.seed, phantom_config(args), workers=args.workers)
            (data / STAMP).write_text(json.dumps(phantom_stamp(args), indent=1))
    except ValueError as exc:
        print(f"families: {exc}", file=sys.stderr)
        return 2
    asked = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in asked if n not in MODELS]
    if unknown:
        print(f"families: --models {args.models}: unknown {unknown}; choose from {', '.join(MODELS)}", file=sys.stderr)
        return 2
    names = [n for n in MODELS if n in asked and not (n == "ma" and args.skip_ma)]
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        if name == "ma" and args.ma_run is not None:
            run, seconds = args.ma_run, dict[str, float]()
        else:
            run, seconds = train(name, data, out, args)
        bundle = out / f"bundle-{name}"
        size = export(run, bundle, name)
        results[name] = {"study": study_figures(run), "bundle_mb": round(size / 1e6, 2),
                         "inference_s": round(inference_seconds(bundle, args), 3),
                         "localisation": localisation(bundle, out, name, args), "train_seconds": seconds}

    print(f"\nfamilies: {args.studies} phantom studies {args.rows}x{args.rows} px, {args.slices} slices of "
          f"{args.slice_thickness} mm (seed {args.seed}); localisation on {args.positives} held-out positives")
    print(f"{'model':18s} {'study AUROC (95% CI)':>24s} {'sens':>5s} {'spec':>5s} {'<=10mm':>7s} {'<=20mm':>7s} "
          f"{'median':>7s} {'detected':>8s} {'s/study':>8s} {'MB':>6s}")
    for name, r in results.items():
        s, loc = r["study"], r["localisation"]
        ci = s["auroc_ci"]
        auroc = "n/a" if s["auroc"] is None else f"{s['auroc']:.3f} ({ci[0]:.2f}-{ci[1]:.2f})"
        w10, w20, median = ((f"{loc['within_10mm']:.2f}", f"{loc['within_20mm']:.2f}", f"{loc['median_mm']:.1f}")
                            if loc.get("n") else ("n/a", "n/a", "n/a"))
        print(f"{name:18s} {auroc:>24s} {s['sensitivity']:5.2f} {s['specificity']:5.2f} {w10:>7s} "
              f"{w20:>7s} {median:>7s} {loc['detected']:>4d}/{loc['positives']:<3d} "
              f"{r['inference_s']:8.3f} {r['bundle_mb']:6.2f}")
    for name, r in results.items():
        if r["train_seconds"]:
            print(f"{name}: training seconds " + ", ".join(f"{k} {v:.0f}" for k, v in r["train_seconds"].items()))
    checks = []
    if "shi" in results:
        s, loc = results["shi"]["study"], results["shi"]["localisation"]
        checks.append(("shi-tiny study AUROC >= 0.95", s["auroc"] is not None and s["auroc"] >= 0.95))
        checks.append(("shi-tiny hottest point within 10 mm in >= 80 % of detected positives",
                       bool(loc.get("n")) and loc["within_10mm"] >= 0.80))
        if "shi-noattention" in results:
            other = results["shi-noattention"]["localisation"]
            checks.append(("attention loss localises better than without (within 10 mm, then median)",
                           bool(loc.get("n")) and bool(other.get("n")) and
                           (loc["within_10mm"], -loc["median_mm"]) > (other["within_10mm"], -other["median_mm"])))
    for text, ok in checks:
        print(f"target: {text}: {'met' if ok else 'MISSED'}")
    print(f"wall time: {(time.perf_counter() - t_all) / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
