"""Trained checkpoints -> a verified model bundle directory for the node.

`write_bundle` exports both graphs (`dicom_node_export.onnx_export`), checks them (onnx.checker, onnxruntime
vs torch at batch sizes 1 and 8), optionally adds float16 variants, writes `MODEL_CARD.md` and
`manifest.json` (sha256 of every file, a fresh model UID), then re-loads the result with the
node's own `dicom_node.model.bundle.verify_bundle` so nothing is written that the node would refuse.
The bundle is built in a temporary sibling directory and renamed into place at the end.

Weak labels: the labels whose validation AUROC (the report's `validation.auroc`, kept in the
manifest as `metrics.validation_auroc`) is below `weak_auroc_floor` (default 0.70) or undefined are
written to the manifest as `weak_labels` (with `weak_auroc_floor`) and listed in the model card;
without validation figures `weak_labels` is null (unknown). The model card records the export
command shell-quoted (`portable_command`): absolute paths become relative to the working directory
or placeholders (`<RUN_DIR>`, `<OUT_DIR>`, ...), so the card names no machine-specific path.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.imaging.cam_grid import CamGrid
from dicom_node.imaging.preprocess import PreprocessConfig
from dicom_node.labels import STUDY_LABELS, WINDOW_LABEL
from dicom_node.log import get_logger
from dicom_node.model.bundle import (
    DEFAULT_WEAK_AUROC_FLOOR,
    MANIFEST_NAME,
    R3D18_HEATMAP_GRID,
    SCHEMA_VERSION,
    BundleManifest,
    GraphSpec,
    VerifyReport,
    sha256_file,
    verify_bundle,
    weak_labels_below,
)

if TYPE_CHECKING:  # torch and training load only when a bundle is made
    from torch import nn

    from dicom_node_training.config import TrainConfig

__all__ = ["ExportResult", "write_bundle", "load_checkpoint_models", "read_report", "bundle_from_checkpoints",
           "bundle_from_run", "describe_data", "portable_command", "portable_path", "MODEL_CARD_NAME"]

log = get_logger("dicom_node_export.bundle")
MODEL_CARD_NAME = "MODEL_CARD.md"
STAGE1_FILE, STAGE2_FILE = "stage1.onnx", "stage2.onnx"
STAGE1_FP16_FILE, STAGE2_FP16_FILE = "stage1.fp16.onnx", "stage2.fp16.onnx"


@dataclass(frozen=True)
class ExportResult:
    path: Path
    manifest: BundleManifest
    verify: VerifyReport
    warnings: tuple[str, ...] = field(default_factory=tuple)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch

    import dicom_node

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "dicom_node": getattr(dicom_node, "__version__", "0.1.0")}


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"


def _sci(v: Any) -> str:
    return f"{v:.2e}" if isinstance(v, (int, float)) else "n/a"


#: options of `dicom-node-export bundle` whose absolute path (outside the working directory) is shown as a placeholder
PATH_PLACEHOLDERS: dict[str, str] = {"--run": "<RUN_DIR>", "--out": "<OUT_DIR>", "--stage1": "<STAGE1_CKPT>",
                                     "--stage2": "<STAGE2_CKPT>", "--report": "<REPORT>"}


def portable_path(value: str | os.PathLike[str], *, cwd: Path, anchors: Mapping[Path, str] = {},
                  placeholder: str = "<PATH>") -> str:
    """`value` without machine-specific absolute paths: a relative path stays as it is; an absolute one
    under `cwd` becomes relative to it; under an anchor directory `<ANCHOR>/rest`; otherwise `placeholder`."""
    path = Path(value)
    if not path.is_absolute():
        return str(value)
    path = Path(os.path.normpath(path))
    for base, name in (*anchors.items(), (Path(os.path.normpath(cwd)), "")):
        base = Path(os.path.normpath(base))
        if path == base or base in path.parents:
            rest = path.relative_to(base).as_posix()
            if not name:
                return rest or "."
            return name if rest == "." else f"{name}/{rest}"
    return placeholder


def portable_command(argv: Sequence[str], *, prog: str = "dicom-node-export", cwd: str | os.PathLike[str] | None = None) -> str:
    """The command line `prog argv...`, shell-quoted (`shlex.join`), with absolute paths made portable.

    The value of a path option (`PATH_PLACEHOLDERS`) that is absolute becomes relative to `cwd`
    (default: the working directory) when under it, `<RUN_DIR>/...` when under an absolute `--run`
    directory, else the option's placeholder; other options' values (names, descriptions) are kept.
    """
    here = Path(cwd) if cwd is not None else Path.cwd()
    args = list(argv)
    anchors: dict[Path, str] = {}
    for i, a in enumerate(args):
        run = a.partition("=")[2] if a.startswith("--run=") else (args[i + 1] if a == "--run" and i + 1 < len(args) else "")
        if run and Path(run).is_absolute() and not _under(Path(run), here):
            anchors[Path(run)] = PATH_PLACEHOLDERS["--run"]

    def shown(value: str, opt: str) -> str:
        if opt not in PATH_PLACEHOLDERS:
            return value
        return portable_path(value, cwd=here, anchors=anchors, placeholder=PATH_PLACEHOLDERS[opt])

    out = [prog]
    pending: str | None = None  # the option whose value is the next argument
    for a in args:
        if pending is not None:
            out.append(shown(a, pending))
            pending = None
        elif a.startswith("--") and "=" in a:
            opt, _, val = a.partition("=")
            out.append(f"{opt}={shown(val, opt)}")
        else:
            out.append(a)
            pending = a if a.startswith("--") else None
    return shlex.join(out)


def _under(path: Path, base: Path) -> bool:
    path, base = Path(os.path.normpath(path)), Path(os.path.normpath(base))
    return path == base or base in path.parents


def _portable_source(source: Mapping[str, Any], cwd: Path) -> dict[str, Any]:
    """The source record with its paths made portable like the command (run dir -> <RUN_DIR>)."""
    run = source.get("run")
    anchors = {Path(run): "<RUN_DIR>"} if isinstance(run, str) and Path(run).is_absolute() and not _under(Path(run), cwd) else {}
    out: dict[str, Any] = {}
    for k, v in source.items():
        if k in ("run", "stage1", "stage2", "report") and isinstance(v, str):
            out[k] = portable_path(v, cwd=cwd, anchors=anchors, placeholder=PATH_PLACEHOLDERS.get(f"--{k}", "<PATH>"))
        else:
            out[k] = v
    return out


def _weak_section(weak: tuple[str, ...] | None, floor: float) -> str:
    if weak is None:
        return ("Unknown: the evaluation report has no validation AUROC, so no label is known to be validated. "
                "The node marks label validation as unknown.")
    if not weak:
        return f"None: every label has a validation AUROC of at least {floor:.2f}."
    return (f"Validation AUROC below {floor:.2f} (or undefined): {', '.join(weak)}. These labels are reported by the "
            "node but marked \"low confidence, not validated\" (`weak_labels` in manifest.json).")


def _fp16_line(checks: dict) -> str:
    f = checks.get("fp16")
    if not f:
        return ""
    return (f" Float16 graphs (for GPUs): max abs difference on probabilities stage 1 "
            f"{_sci(f['stage1']['worst_logit_diff'])}, stage 2 {_sci(f['stage2']['worst_logit_diff'])} "
            f"(tolerance {_sci(f['stage1']['tolerance'])}).")


def _heatmap_section(metrics: dict, grid: CamGrid) -> str:
    training = metrics.get("training") or {}
    weight = training.get("attention_loss_weight")
    lines = [f"Cells of the last conv block centred on window slice {grid.stride[0]:g} j + {grid.offset[0]:g} and crop "
             f"pixel {grid.stride[1]:g} j + {grid.offset[1]:g} (`heatmap_grid`, from the architecture)."]
    if weight is None:
        lines.append("Attention loss: not recorded in the training run.")
    elif weight > 0:
        lines.append(f"Trained with the attention loss of Shi et al. 2020 (continuous Dice of the CAM against the "
                     f"embolus mask), lambda = {weight:g}.")
    else:
        lines.append("Trained without an attention loss (window label only): the heatmap shows where the logit comes "
                     "from, which need not be the clot.")
    loc = metrics.get("localisation")
    if loc:
        d, c, r = loc["detected"], loc.get("ceiling", {}), loc.get("chance", {})
        lines.append(
            f"Localisation on {loc['positives']} held-out positive phantoms ({d['n']} detected; "
            f"`benchmarks/heatmap_hits.py`, cells {' x '.join(f'{v:g}' for v in loc['cell_size_mm'])} mm): hottest point "
            f"within 20 mm of the embolus in {d['within_20mm']:.0%} ({d['within_20mm_ci'][0]:.0%}-{d['within_20mm_ci'][1]:.0%}), "
            f"within 10 mm in {d['within_10mm']:.0%} ({d['within_10mm_ci'][0]:.0%}-{d['within_10mm_ci'][1]:.0%}), "
            f"median {d['median_mm']:.1f} mm; a perfect CAM on the same cells: {c.get('within_20mm', float('nan')):.0%} "
            f"within 20 mm; a random point in the lung box: {r.get('within_20mm', float('nan')):.0%}.")
    else:
        lines.append("Localisation: not measured for this export (`--localisation`).")
    return "\n".join(lines)


def _model_card(*, name: str, version: str, model_uid: str, created: str, metrics: dict, thresholds: dict,
                preprocess: PreprocessConfig, sequence_length: int, feature_dim: int, checks: dict,
                commands: list[str], source: dict, weak_labels: tuple[str, ...] | None = None,
                weak_auroc_floor: float = DEFAULT_WEAK_AUROC_FLOOR, grid: CamGrid | None = None,
                family: str = "ma2022") -> str:
    grid = grid or R3D18_HEATMAP_GRID
    labels = (WINDOW_LABEL, *STUDY_LABELS) if family == "ma2022" else (WINDOW_LABEL,)
    auroc = metrics.get("test_auroc") or {}
    val = metrics.get("validation_auroc") or {}
    rows = "\n".join(f"| {k} | {_fmt(val.get(k))} | {_fmt(auroc.get(k))} | {thresholds[k]:.3f} | "
                     f"{'weak' if weak_labels and k in weak_labels else ''} |".replace("|  |", "| |")
                     for k in labels)
    p1, p2 = checks.get("stage1", {}), checks.get("stage2", {})
    if family == "ma2022":
        model = f"""Two stages after Ma et al. 2022: a 3D ResNet-18 window encoder (`stage1.onnx`, {feature_dim}-d
features, window logit, CAM heatmap of the last conv block, which equals Grad-CAM for its
GAP -> linear head) and a sequence model with nine attention heads over {sequence_length} windows
(`stage2.onnx`). Input: {preprocess.window_slices}-slice windows"""
    else:
        model = f"""Two stages after Shi et al. 2020 (family `shi2020`): a 2D ResNet-18 slab encoder trained with an
attention loss (`stage1.onnx`: {feature_dim} feature maps per slab, slab logit, the attention map = Grad-CAM of
the last conv block in closed form) and a bidirectional Conv-LSTM over the {sequence_length} slabs of the study
(`stage2.onnx`, unrolled) giving one probability, PE present (`{WINDOW_LABEL}`); no other label.
Input: {preprocess.slabs} slabs of {preprocess.window_slices} slices (every {preprocess.slab_stride}th of
{preprocess.slabs * preprocess.slab_stride} resized lung slices)"""
    cmd = "\n".join(commands) if commands else "(not recorded)"
    consistency = ("; labels follow the RSNA-STR consistency rules." if family == "ma2022" else
                   "; one label, so no label-consistency rules apply.")
    return f"""# Model card: {name} {version}

Model UID `{model_uid}`, exported {created}.

## Intended use
Research and software testing of the PE-detection DICOM node only.
**Not a medical device; not for diagnosis, triage or any decision about a patient.**{" This model was trained on synthetic phantom data and must never be used on patients." if "synthetic" in str(metrics.get("data", "")).lower() else ""}

## Model
{model}, {preprocess.crop} x {preprocess.crop} crop of
{preprocess.resize} x {preprocess.resize}, {preprocess.spacing_mm} mm spacing, HU windows
{[list(w) for w in preprocess.hu_windows]} (preprocessing version {preprocess.version}).

## Data
{metrics.get("data") or "Not recorded in the training run."}

## Metrics and decision thresholds (chosen on validation data)
| label | validation AUROC | test AUROC | threshold | validation |
|---|---|---|---|---|
{rows}

## Weak labels
{_weak_section(weak_labels, weak_auroc_floor)}

## Heatmap
{_heatmap_section(metrics, grid)}

## Limits
- Metrics hold only for data like the data above; they say nothing about real patients unless that data was real CTPA.
- Thresholds were chosen on the run's validation split{consistency}
- Heatmaps are coarse ({preprocess.window_slices}-slice windows, last-block resolution): they show where the
  window logit comes from, not a segmentation of the clot.

## How it was made
Source: {json.dumps(source)}

Export checks: onnx.checker passed; onnxruntime (CPU) vs torch, max abs difference on logits at
batch sizes 1 and 8: stage 1 {_sci(p1.get("worst_logit_diff"))}, stage 2 {_sci(p2.get("worst_logit_diff"))}
(tolerance {_sci(p1.get("tolerance"))}).{_fp16_line(checks)}

Commands:

```
{cmd}
```
"""


def _heatmap_grid(stage1_model: nn.Module, slices: int = 10) -> CamGrid:
    """Where stage 1's heatmap cells sit in the window, from the model's own convolutions (R3D-18: `cam_grid`;
    the slab ResNet-18 of Shi et al.: `cam_grid_2d`, one cell on the central slice of the slab)."""
    from dicom_node_training.models.r3d import VideoResNet, cam_grid
    from dicom_node_training.models.resnet2d import ResNet2d, cam_grid_2d

    if isinstance(stage1_model, ResNet2d):
        return cam_grid_2d(stage1_model, slices)
    if not isinstance(stage1_model, VideoResNet):
        raise TypeError(f"stage-1 model {type(stage1_model).__name__}; the export knows the heatmap grid of "
                        "VideoResNet (R3D-18) window encoders only")
    return cam_grid(stage1_model)


def write_bundle(
    stage1_model: nn.Module,
    stage2_model: nn.Module,
    out: str | Path,
    *,
    name: str,
    version: str,
    preprocess: PreprocessConfig,
    sequence_length: int,
    thresholds: dict[str, float] | None = None,
    metrics: dict[str, Any] | None = None,
    opset: int = 17,
    fp16: bool = False,
    commands: list[str] | None = None,
    source: dict[str, Any] | None = None,
    parity_batches: tuple[int, ...] = (1, 8),
    force: bool = False,
    stage1_conv_rewrite: str | None = "gather",
    weak_auroc_floor: float = DEFAULT_WEAK_AUROC_FLOOR,
    family: str = "ma2022",
) -> ExportResult:
    """Export, check and write a bundle directory at `out` (which must not exist, be empty, or `force`).

    `stage1_conv_rewrite`: how stage 1's Conv3d are exported (`dicom_node_export.conv_rewrite`: "gather",
    the default, as Conv2d with BatchNorm folded; None as plain Conv3d, for comparison).
    `weak_auroc_floor`: labels whose `metrics["validation_auroc"]` is below it (or missing) are written as
    `weak_labels`; without `validation_auroc` in `metrics`, `weak_labels` is null (unknown).
    `family`: "ma2022" (R3D-18 + sequence model) or "shi2020" (slab ResNet-18 + Conv-LSTM over
    `sequence_length` = `preprocess.slabs` slabs; one label, no float16 variant yet).
    """
    import torch
    from pydicom.uid import generate_uid

    from dicom_node_export.onnx_export import (
        FP16_PROB_TOLERANCE,
        check_parity_shi,
        check_parity_stage1,
        check_parity_stage2,
        convert_fp16,
        export_shi_stage1,
        export_shi_stage2,
        export_stage1,
        export_stage2,
        shi_stage2_specs,
        stage1_specs,
        stage2_specs,
    )

    out = Path(out)
    if not 0.0 <= float(weak_auroc_floor) <= 1.0:
        raise ValueError(f"weak AUROC floor {weak_auroc_floor}; expected a value in [0, 1]")
    if out.exists() and any(out.iterdir()) and not force:
        raise FileExistsError(f"bundle output {out} exists and is not empty; choose a new --out or pass --force")
    if family not in ("ma2022", "shi2020"):
        raise ValueError(f"family {family!r}; expected 'ma2022' or 'shi2020'")
    if family == "shi2020" and fp16:
        raise ValueError("--fp16: float16 graphs are not made for shi2020 bundles yet; export without --fp16")
    labels = (WINDOW_LABEL, *STUDY_LABELS) if family == "ma2022" else (WINDOW_LABEL,)
    notes: list[str] = []
    thresholds = dict(thresholds or {})
    missing = [k for k in labels if k not in thresholds]
    if missing:
        msg = f"no threshold for {', '.join(missing)} in the report; using 0.5 for those"
        warnings.warn(msg, stacklevel=2)
        notes.append(msg)
        thresholds.update({k: 0.5 for k in missing})
    stage1_model = stage1_model.eval()
    stage2_model = stage2_model.eval()
    ws, crop = preprocess.window_slices, preprocess.crop
    in1, out1 = stage1_specs(stage1_model, ws, crop, channels=preprocess.channels, family=family)
    feature_dim = int(out1[0].shape[1])
    feature_shape = tuple(int(d) for d in out1[0].shape[1:])
    if family == "ma2022":
        in2, out2 = stage2_specs(sequence_length, feature_dim)
    else:
        in2, out2 = shi_stage2_specs(sequence_length, feature_shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be read by the node's user
    try:
        checks: dict[str, Any]
        if family == "shi2020":
            with torch.no_grad():
                s1 = export_shi_stage1(stage1_model, tmp / STAGE1_FILE, channels=preprocess.channels,
                                       window_slices=ws, crop=crop, opset=opset)
                s2 = export_shi_stage2(stage2_model, tmp / STAGE2_FILE, sequence_length=sequence_length,
                                       feature_shape=feature_shape, opset=opset)
            checks = {
                "stage1": check_parity_shi(s1, tmp / STAGE1_FILE, "windows", (preprocess.channels, ws, crop, crop),
                                           tuple(t.name for t in out1), "window_logit",
                                           batch_sizes=parity_batches).to_json(),
                "stage2": check_parity_shi(s2, tmp / STAGE2_FILE, "features", (sequence_length, *feature_shape),
                                           tuple(t.name for t in out2), "study_logit",
                                           batch_sizes=parity_batches).to_json(),
                "onnx_checker": "passed", "provider": "CPUExecutionProvider", "stage1_conv_rewrite": "none",
            }
        else:
            with torch.no_grad():
                g1 = export_stage1(stage1_model, tmp / STAGE1_FILE, window_slices=ws, crop=crop, opset=opset,
                                   conv_rewrite=stage1_conv_rewrite)
                g2 = export_stage2(stage2_model, tmp / STAGE2_FILE, sequence_length=sequence_length,
                                   feature_dim=feature_dim, opset=opset)
            checks = {
                "stage1": check_parity_stage1(g1, tmp / STAGE1_FILE, window_slices=ws, crop=crop,
                                              batch_sizes=parity_batches).to_json(),
                "stage2": check_parity_stage2(g2, tmp / STAGE2_FILE, sequence_length=sequence_length,
                                              feature_dim=feature_dim, batch_sizes=parity_batches).to_json(),
                "onnx_checker": "passed",
                "provider": "CPUExecutionProvider",
                "stage1_conv_rewrite": stage1_conv_rewrite or "none",
            }
        log.info("export_parity", family=family, stage1_max_logit_diff=checks["stage1"]["worst_logit_diff"],
                 stage2_max_logit_diff=checks["stage2"]["worst_logit_diff"])
        fp16_specs: dict[str, GraphSpec] = {}
        if fp16:
            convert_fp16(tmp / STAGE1_FILE, tmp / STAGE1_FP16_FILE)
            convert_fp16(tmp / STAGE2_FILE, tmp / STAGE2_FP16_FILE)
            checks["fp16"] = {
                "stage1": check_parity_stage1(g1, tmp / STAGE1_FP16_FILE, window_slices=ws, crop=crop,
                                              batch_sizes=parity_batches, tolerance=FP16_PROB_TOLERANCE,
                                              probabilities=True).to_json(),
                "stage2": check_parity_stage2(g2, tmp / STAGE2_FP16_FILE, sequence_length=sequence_length,
                                              feature_dim=feature_dim, batch_sizes=parity_batches,
                                              tolerance=FP16_PROB_TOLERANCE, probabilities=True).to_json(),
                "compared": "probabilities (sigmoid of logits), float16 graph on onnxruntime CPU vs torch fp32",
            }
            fp16_specs = {"stage1": GraphSpec(STAGE1_FP16_FILE, in1, out1),
                          "stage2": GraphSpec(STAGE2_FP16_FILE, in2, out2)}
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        model_uid = generate_uid()
        metrics = dict(metrics or {})
        val_auroc = metrics.get("validation_auroc")
        weak = weak_labels_below(val_auroc, weak_auroc_floor, labels) if isinstance(val_auroc, Mapping) else None
        source = _portable_source(source or {}, Path.cwd())
        (tmp / MODEL_CARD_NAME).write_text(_model_card(
            name=name, version=version, model_uid=model_uid, created=created, metrics=metrics,
            thresholds=thresholds, preprocess=preprocess, sequence_length=sequence_length,
            feature_dim=feature_dim, checks=checks, commands=list(commands or []), source=source,
            weak_labels=weak, weak_auroc_floor=float(weak_auroc_floor), grid=_heatmap_grid(stage1_model, ws),
            family=family),
            encoding="utf-8")
        files = {f: sha256_file(tmp / f) for f in
                 (STAGE1_FILE, STAGE2_FILE, *(STAGE1_FP16_FILE, STAGE2_FP16_FILE)[: 2 if fp16 else 0], MODEL_CARD_NAME)}
        manifest = BundleManifest(
            name=name, version=version, model_uid=model_uid, created=created,
            window_label=WINDOW_LABEL, study_labels=labels[1:],
            thresholds={k: float(thresholds[k]) for k in labels},
            preprocessing=preprocess, preprocessing_version=preprocess.version,
            sequence_length=sequence_length, feature_dim=feature_dim, opset=opset,
            stage1=GraphSpec(STAGE1_FILE, in1, out1), stage2=GraphSpec(STAGE2_FILE, in2, out2),
            files=files, versions=_versions(), metrics=metrics, fp16=fp16_specs,
            export_checks={**checks, "warnings": notes, "source": source}, schema_version=SCHEMA_VERSION,
            weak_labels=weak, weak_auroc_floor=float(weak_auroc_floor), weak_labels_source="manifest",
            heatmap_grid=_heatmap_grid(stage1_model, ws), family=family,
        )
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n", encoding="utf-8")
        verify_bundle(tmp, run_graphs=True)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = verify_bundle(out, run_graphs=False)
    log.info("bundle_written", path=str(out), model_name=name, model_version=version, model_uid=model_uid)
    return ExportResult(path=out, manifest=report.bundle.manifest, verify=report, warnings=tuple(notes))


# --------------------------------------------------------------------------------------------
# from a training run


def load_checkpoint_models(
    stage1_ckpt: str | Path, stage2_ckpt: str | Path,
) -> tuple[nn.Module, nn.Module, TrainConfig, dict[str, Any], dict[str, Any]]:
    """Rebuild the phase-1 and phase-2 models from their checkpoints -> (stage 1, stage 2, TrainConfig, ck1, ck2):
    R3D-18 + sequence model, or for a shi2020 run the slab ResNet-18 + Conv-LSTM."""
    from dicom_node_training.checkpoint import load_checkpoint
    from dicom_node_training.config import config_from_dict
    from dicom_node_training.models import r3d_18, sequence_model

    ck1, ck2 = load_checkpoint(stage1_ckpt), load_checkpoint(stage2_ckpt)
    for path, ck in ((stage1_ckpt, ck1), (stage2_ckpt, ck2)):
        if not isinstance(ck, dict) or "model" not in ck or "config" not in ck:
            raise ValueError(f"checkpoint {path}: expected a training checkpoint dict with 'model' and 'config' "
                             f"(dicom_node_training.checkpoint); got keys {sorted(ck) if isinstance(ck, dict) else type(ck).__name__}")
    cfg1 = config_from_dict(ck1["config"])
    cfg2 = config_from_dict(ck2["config"])
    if cfg1.family == "shi2020" or cfg2.family == "shi2020":
        from dicom_node_training.shi import build_stage1, build_stage2

        if cfg1.family != cfg2.family or cfg1.shi1 != cfg2.shi1 or cfg1.preprocess != cfg2.preprocess:
            raise ValueError(f"checkpoints {stage1_ckpt} and {stage2_ckpt} come from different runs or families "
                             f"({cfg1.family} / {cfg2.family}); export a stage-2 model trained on these features")
        s1, s2 = build_stage1(cfg1, pretrained=False), build_stage2(cfg2)
        s1.load_state_dict(ck1["model"])
        s2.load_state_dict(ck2["model"])
        return s1.eval(), s2.eval(), cfg2, ck1, ck2
    if cfg1.phase1.width != cfg2.phase1.width or cfg1.preprocess != cfg2.preprocess:
        raise ValueError(f"checkpoints {stage1_ckpt} and {stage2_ckpt} come from different configurations "
                         f"(phase1.width {cfg1.phase1.width} vs {cfg2.phase1.width}, preprocess differs: "
                         f"{cfg1.preprocess != cfg2.preprocess}); export a phase-2 model trained on these features")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no pretrained weights": they come from the checkpoint
        m1 = r3d_18(num_outputs=1, width=cfg1.phase1.width)
    m1.load_state_dict(ck1["model"])
    p2 = cfg2.phase2
    m2 = sequence_model(kind=p2.kind, in_features=cfg1.phase1.feature_dim, hidden=p2.hidden, levels=p2.levels,
                        kernel_size=p2.kernel_size, dropout=p2.dropout, causal=p2.causal)
    m2.load_state_dict(ck2["model"])
    return m1.eval(), m2.eval(), cfg2, ck1, ck2


def read_report(path: str | Path | None) -> tuple[dict[str, float], dict[str, Any], list[str]]:
    """report.json -> (thresholds, metrics, warnings). No report: 0.5 thresholds and a warning."""
    if path is None or not Path(path).is_file():
        msg = (f"no evaluation report at {path}; thresholds default to 0.5 and the bundle has no metrics"
               if path else "no evaluation report given; thresholds default to 0.5 and the bundle has no metrics")
        warnings.warn(msg, stacklevel=2)
        return {}, {}, [msg]
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    thresholds = {k: float(v) for k, v in (report.get("thresholds") or {}).items()}
    test = report.get("test") or {}
    metrics: dict[str, Any] = {"test_auroc": {k: float(v) for k, v in (test.get("auroc") or {}).items()
                                              if isinstance(v, (int, float))}}
    validation = report.get("validation")
    if isinstance(validation, dict) and isinstance(validation.get("auroc"), dict):
        # a null (undefined) AUROC is left out: that label counts as not validated (weak)
        metrics["validation_auroc"] = {k: float(v) for k, v in validation["auroc"].items()
                                       if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for key in ("data", "dataset", "data_description"):
        if report.get(key):
            metrics["data"] = report[key] if isinstance(report[key], str) else json.dumps(report[key])
            break
    n = test.get("n_studies") or test.get("studies")
    if n is not None:
        metrics["test_studies"] = n
    metrics["report"] = str(Path(path).name)
    return thresholds, metrics, []


def read_localisation(path: str | Path) -> dict[str, Any]:
    """The figures of a `benchmarks/heatmap_hits.py --json` file that a bundle records (`metrics.localisation`)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        detected, ceiling, chance = data["model_detected"], data["ceiling_perfect_cam"], data["chance_lung_box"]
        keep = ("n", "median_mm", "median_ci_mm", "within_10mm", "within_10mm_ci", "within_20mm", "within_20mm_ci",
                "pointing", "pointing_ci", "slice_has_embolus")
        return {"model": data["model"], "positives": data["positives"], "cell_size_mm": data["cell_size_mm"],
                "detected": {k: detected[k] for k in keep}, "ceiling": {k: ceiling[k] for k in keep if k in ceiling},
                "chance": {k: chance[k] for k in keep if k in chance}}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"--localisation {path}: {type(exc).__name__}: {exc}; pass the JSON that "
                         "benchmarks/heatmap_hits.py --json wrote") from None


def describe_data(run: str | Path | None, metrics: dict[str, Any], description: str | None) -> str:
    """What the metrics come from: the given description, else the report's, else the run's split sizes."""
    parts = []
    if description:
        parts.append(description)
    elif metrics.get("data"):
        parts.append(str(metrics["data"]))
    else:
        parts.append("data source not recorded in the run (pass --data-description)")
    split = Path(run) / "split.json" if run else None
    if split is not None and split.is_file():
        s = json.loads(split.read_text(encoding="utf-8"))
        n = {k: len(s.get(k, [])) for k in ("train", "validation", "test")}
        parts.append(f"{sum(n.values())} studies: {n['train']} train / {n['validation']} validation / {n['test']} test")
    elif metrics.get("test_studies"):
        parts.append(f"{metrics['test_studies']} test studies")
    return "; ".join(parts)


def bundle_from_checkpoints(stage1: str | Path, stage2: str | Path, report: str | Path | None, out: str | Path, *,
                            name: str, version: str, fp16: bool = False, opset: int = 17, force: bool = False,
                            commands: list[str] | None = None, data_description: str | None = None,
                            run: str | Path | None = None,
                            weak_auroc_floor: float = DEFAULT_WEAK_AUROC_FLOOR,
                            localisation: str | Path | None = None) -> ExportResult:
    from dicom_node_training.checkpoint import git_revision

    m1, m2, cfg, ck1, ck2 = load_checkpoint_models(stage1, stage2)
    thresholds, metrics, _ = read_report(report)
    metrics["data"] = describe_data(run, metrics, data_description)
    shi = cfg.family == "shi2020"
    weight = cfg.shi1.attention_loss_weight if shi else cfg.phase1.attention_loss_weight
    metrics["training"] = {"attention_loss_weight": float(weight)}
    if localisation is not None:
        metrics["localisation"] = read_localisation(localisation)
    source = {"run": str(run) if run else None, "stage1": str(stage1), "stage2": str(stage2),
              "report": str(report) if report else None,
              "git_revision": ck2.get("git_revision") or git_revision(),
              "stage1_best": ck1.get("best"), "stage2_best": ck2.get("best")}
    return write_bundle(m1, m2, out, name=name, version=version, preprocess=cfg.preprocess, family=cfg.family,
                        sequence_length=cfg.preprocess.slabs if shi else cfg.phase2.seq_len, thresholds=thresholds, metrics=metrics, opset=opset,
                        fp16=fp16, commands=commands or [portable_command(sys.argv[1:])],
                        source=source, force=force, weak_auroc_floor=weak_auroc_floor)


def bundle_from_run(run: str | Path, out: str | Path, *, name: str, version: str, **kw: Any) -> ExportResult:
    """`RUN/phase1/best.pt`, `RUN/phase2/best.pt` and `RUN/report.json` (if present) -> bundle at `out`."""
    run = Path(run)
    report = run / "report.json"
    return bundle_from_checkpoints(run / "phase1" / "best.pt", run / "phase2" / "best.pt",
                                   report if report.is_file() else None, out, name=name, version=version,
                                   run=run, **kw)
