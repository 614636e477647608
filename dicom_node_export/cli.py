"""`dicom-node-export` command line: `bundle` (a trained run -> verified ONNX model bundle for the node),
`verify` (check a bundle as the node does and run both graphs on random input) and `triton` (a bundle ->
a Triton Inference Server model repository, `dicom_node_export.triton`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node import tool_versions

if TYPE_CHECKING:
    _Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicom-node-export",
        description="Export trained weights to a verified ONNX model bundle for the node, and verify bundles.",
    )
    parser.add_argument("--version", action="version",
                        version=tool_versions("dicom-node-export", ("torch", "onnx", "onnxruntime")),
                        help="print the package version and the torch/onnx/onnxruntime it would export with, then exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_bundle(sub)
    _add_verify(sub)
    _add_triton(sub)
    return parser


def _add_bundle(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "bundle",
        help="export a trained run (or two checkpoints) to a verified ONNX model bundle",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Export the phase-1 and phase-2 models of a training run to a model bundle the node loads:
stage1.onnx (windows -> features, window logit, CAM/Grad-CAM heatmap), stage2.onnx (feature
sequence + mask -> window logits, nine study logits, attention), manifest.json (labels,
thresholds from the evaluation report, preprocessing, shapes, versions, sha256 of every file,
a new model UID) and MODEL_CARD.md. Checks: onnx.checker, onnxruntime vs torch at batch sizes
1 and 8 (max abs difference on logits <= 1e-4), then the node's own verification.

examples:
  dicom-node-export bundle --run runs/tiny --out bundles/tiny --name pe-tiny --version 1.0.0
  dicom-node-export bundle --stage1 RUN/phase1/best.pt --stage2 RUN/phase2/best.pt \\
      --report RUN/report.json --out bundles/x --name pe --version 2.0.0 --fp16""",
    )
    src = p.add_argument_group("source (either --run, or --stage1 and --stage2)")
    src.add_argument("--run", type=Path, help="training run directory (RUN/phase1/best.pt, RUN/phase2/best.pt, RUN/report.json)")
    src.add_argument("--stage1", type=Path, help="phase-1 checkpoint (.pt) when not using --run")
    src.add_argument("--stage2", type=Path, help="phase-2 checkpoint (.pt) when not using --run")
    src.add_argument("--report", type=Path, help="evaluation report.json with thresholds.<label> and test.auroc.<label> "
                                                 "(without one, thresholds are 0.5 and a warning is printed)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to create (must not exist or be empty)")
    p.add_argument("--name", required=True, help="bundle name shown in results and logs, e.g. pe-r3d18-tcn")
    p.add_argument("--version", required=True, help="bundle version, e.g. 1.0.0")
    p.add_argument("--data-description", help="what the metrics come from, e.g. 'synthetic phantoms (dicom_node_phantoms.study)'")
    p.add_argument("--fp16", action="store_true", help="also write float16 graphs (stage1.fp16.onnx, stage2.fp16.onnx) "
                                                       "for GPUs; checked at 1e-2 on probabilities")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    p.add_argument("--weak-auroc-floor", type=float, default=0.70, metavar="AUROC",
                   help="labels whose validation AUROC (report.json validation.auroc) is below this, or undefined, are "
                        "written to manifest.json as weak_labels and marked 'low confidence, not validated' by the "
                        "node (default 0.70)")
    p.add_argument("--localisation", type=Path, default=None, metavar="JSON",
                   help="heatmap localisation figures to record in the manifest, the model card and every SR's "
                        "algorithm parameters: the file `benchmarks/heatmap_hits.py --json` wrote for this model "
                        "(measure a first export, then export again with it)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.set_defaults(func=_cmd_bundle)


def _cmd_bundle(args: argparse.Namespace) -> int:
    from dicom_node_export.bundle import bundle_from_checkpoints, bundle_from_run, portable_command

    if args.run is None and (args.stage1 is None or args.stage2 is None):
        print("dicom-node-export bundle: give --run RUN, or both --stage1 CKPT and --stage2 CKPT", file=sys.stderr)
        return 2
    if args.run is not None and (args.stage1 or args.stage2):
        print("dicom-node-export bundle: give either --run or --stage1/--stage2, not both", file=sys.stderr)
        return 2
    if not 0.0 <= args.weak_auroc_floor <= 1.0:
        print(f"dicom-node-export bundle: --weak-auroc-floor {args.weak_auroc_floor}; expected a value in [0, 1]",
              file=sys.stderr)
        return 2
    command = portable_command(sys.argv[1:] if args.argv is None else args.argv)
    kw: dict[str, Any] = dict(name=args.name, version=args.version, fp16=args.fp16, opset=args.opset, force=args.force,
              commands=[command], data_description=args.data_description, weak_auroc_floor=args.weak_auroc_floor,
              localisation=args.localisation)
    try:
        if args.run is not None:
            result = bundle_from_run(args.run, args.out, **kw)
        else:
            result = bundle_from_checkpoints(args.stage1, args.stage2, args.report, args.out, **kw)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as exc:
        print(f"dicom-node-export bundle: {exc}", file=sys.stderr)
        return 1
    checks = result.manifest.export_checks
    print(f"wrote {result.path}: {result.manifest.name} {result.manifest.version}, model UID {result.manifest.model_uid}")
    print(f"  parity onnxruntime vs torch (max abs diff on logits, batch 1 and 8): "
          f"stage1 {checks['stage1']['worst_logit_diff']:.2e}, stage2 {checks['stage2']['worst_logit_diff']:.2e}")
    if "fp16" in checks:
        print(f"  float16 (max abs diff on probabilities): stage1 {checks['fp16']['stage1']['worst_logit_diff']:.2e}, "
              f"stage2 {checks['fp16']['stage2']['worst_logit_diff']:.2e}")
    weak = result.manifest.weak_labels
    print(f"  weak labels (validation AUROC < {result.manifest.weak_auroc_floor:.2f}): "
          + ("unknown (no validation AUROC in the report)" if weak is None else ", ".join(weak) or "none"))
    for w in result.warnings:
        print(f"  warning: {w}")
    return 0


def _add_verify(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "verify",
        help="check a bundle as the node does, and run both graphs on random input",
        description="Re-check the sha256 of every file listed in manifest.json, the manifest schema, the opset and "
                    "the preprocessing version against this node, then run stage1/stage2 (and float16 variants) "
                    "with onnxruntime on random input of the declared shapes and check the output shapes. "
                    "Exit code 0 when the bundle is good, 1 with the file/key and reason otherwise.",
    )
    p.add_argument("bundle", type=Path, metavar="DIR", help="bundle directory (with manifest.json)")
    p.add_argument("--no-run", action="store_true", help="skip running the graphs (hashes, schema, opset only)")
    p.set_defaults(func=_cmd_verify)


def _cmd_verify(args: argparse.Namespace) -> int:
    from dicom_node_export.verify import BundleError, verify

    try:
        report = verify(args.bundle, run_graphs=not args.no_run)
    except BundleError as exc:
        print(f"verify failed: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    return 0


def _add_triton(sub: _Subparsers) -> None:
    p = sub.add_parser(
        "triton",
        help="write a Triton Inference Server model repository for a bundle (docs/scaling.md)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Write a model repository for NVIDIA Triton Inference Server from a verified bundle:
REPO/<model>_stage1/1/model.onnx and config.pbtxt, the same for stage 2 (ONNX Runtime backend,
dims and dtypes from the manifest, dynamic batching, instance groups, optional TensorRT with FP16 and
an engine cache) and REPO/<model>.manifest.json, the manifest the node reads with
[inference] engine = "triton". <model> is the bundle's <name>-<version>, so several versions share
one repository. Every config.pbtxt is checked by parsing it into Triton's ModelConfig (tritonclient).

examples:
  dicom-node-export triton bundles/pe-1.0.0 --out /srv/triton-models --max-batch 16 --instances 2
  dicom-node-export triton bundles/pe-1.0.0 --out /srv/triton-models --tensorrt --fp16
  docker run --gpus all -p 8001:8001 -v /srv/triton-models:/models nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \\
      tritonserver --model-repository=/models""",
    )
    p.add_argument("bundle", type=Path, metavar="BUNDLE", help="bundle directory (verified as the node does)")
    p.add_argument("--out", type=Path, required=True, metavar="REPO",
                   help="model repository to write or add to (created when missing)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="max_batch_size and preferred dynamic batch of both models (default 8)")
    p.add_argument("--instances", type=int, default=1, metavar="K", help="model instances per device (default 1)")
    p.add_argument("--kind", choices=("gpu", "cpu"), default="gpu",
                   help="instance group kind: gpu (default; every visible GPU) or cpu")
    p.add_argument("--tensorrt", action="store_true",
                   help="use the TensorRT accelerator of the ONNX Runtime backend (engines cached, see --trt-cache)")
    p.add_argument("--fp16", action="store_true", help="TensorRT precision FP16 (needs --tensorrt)")
    p.add_argument("--trt-cache", default="/trt-cache", metavar="DIR",
                   help="TensorRT engine cache directory inside the server, one sub-directory per model "
                        "(default /trt-cache: mount a volume there)")
    p.add_argument("--model-name", default="", metavar="NAME",
                   help="model name prefix instead of <name>-<version> (set the node's inference.triton_model to it)")
    p.add_argument("--model-version", type=int, default=1, metavar="V", help="Triton version directory (default 1)")
    p.add_argument("--queue-delay-us", type=int, default=2000, metavar="US",
                   help="longest wait for a fuller dynamic batch, in microseconds (default 2000)")
    p.add_argument("--force", action="store_true", help="replace models of the same name already in REPO")
    p.set_defaults(func=_cmd_triton)


def _cmd_triton(args: argparse.Namespace) -> int:
    from dicom_node.model.bundle import BundleError
    from dicom_node_export.triton import TritonExportError, TritonRepoOptions, write_triton_repository

    options = TritonRepoOptions(max_batch=args.max_batch, instances=args.instances, kind=args.kind,
                                tensorrt=args.tensorrt, fp16=args.fp16, trt_cache=args.trt_cache,
                                model_name=args.model_name, version=args.model_version,
                                queue_delay_us=args.queue_delay_us)
    try:
        repo = write_triton_repository(args.bundle, args.out, options, force=args.force)
    except (BundleError, TritonExportError, OSError) as exc:
        print(f"dicom-node-export triton: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {repo.path}: models {repo.model}_stage1 and {repo.model}_stage2 (version {options.version}), "
          "configs parsed into Triton's ModelConfig")
    print(f"  node: [inference] engine = \"triton\", bundle = \"{repo.manifest}\"")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
