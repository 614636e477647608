"""A model bundle on disk: `manifest.json` + `stage1.onnx` + `stage2.onnx` + `MODEL_CARD.md`.

This module is the ONE place that decides whether a bundle is acceptable. The node calls
`load_bundle` at start (hashes, schema, opset, preprocessing version); `dicom-node-export verify`
calls `verify_bundle(path, run_graphs=True)`, which also runs both graphs on random input of the
declared shapes. Every refusal is a `BundleError` that names the file or manifest key and why.

Weak labels: a bundle exported by `dicom-node-export bundle --weak-auroc-floor F` (default 0.70)
records `weak_labels` (the labels whose validation AUROC is below F, missing or undefined) and
`weak_auroc_floor` in its manifest. For an older bundle without them, `weak_labels` is computed at
load from `metrics.validation_auroc` with `DEFAULT_WEAK_AUROC_FLOOR` when the manifest has it, and
is None (unknown) otherwise; `weak_labels_source` says which ("manifest", "metrics", "unknown").
The results mark those labels ("low confidence, not validated"); `label_validation_of` reads the
same from whatever the results get as the bundle (a manifest, its JSON dict, or an object with
the attributes).

Families: `family` says which model the graphs hold; a manifest without it is "ma2022" (every bundle made
before the Shi family). "ma2022" (Ma et al. 2022): stage 1 windows -> features (B, F), window logit, heatmap;
stage 2 features (B, L, F) + mask -> window logits, nine study logits, attention; labels = the window label and
the nine study labels. "shi2020" (Shi et al. 2020): stage 1 slabs (B, 1, 5, H, W) -> feature maps (B, F, h, w),
slab logit, attention map (B, 1, h, w) under the same names; stage 2 the fixed L = 50 slabs' maps
(B, L, F, h, w) -> `study_logit` (B,); labels = the window label only ("PE present": the study's probability),
with its one threshold. `BundleManifest.labels` is what a bundle predicts; the results carry only those.

No torch here (the node never imports torch); onnxruntime is imported only to run graphs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar, cast, overload

import numpy as np

from dicom_node.imaging.cam_grid import CamGrid
from dicom_node.imaging.preprocess import PREPROCESSING_VERSION, PreprocessConfig
from dicom_node.labels import ALL_LABELS, STUDY_LABELS, WINDOW_LABEL

__all__ = [
    "MANIFEST_NAME",
    "onnxruntime_module",
    "SCHEMA_VERSION",
    "DEFAULT_WEAK_AUROC_FLOOR",
    "R3D18_HEATMAP_GRID",
    "LabelValidation",
    "label_validation_of",
    "weak_labels_below",
    "KNOWN_PREPROCESSING_VERSIONS",
    "SUPPORTED_OPSETS",
    "STAGE1_INPUTS",
    "STAGE1_OUTPUTS",
    "STAGE2_INPUTS",
    "STAGE2_OUTPUTS",
    "SHI_STAGE2_INPUTS",
    "SHI_STAGE2_OUTPUTS",
    "FAMILIES",
    "BundleError",
    "TensorSpec",
    "GraphSpec",
    "BundleManifest",
    "Bundle",
    "VerifyReport",
    "sha256_file",
    "read_onnx_opset",
    "load_bundle",
    "load_manifest_only",
    "verify_bundle",
    "default_bundle_path",
]

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
#: preprocessing versions this node can produce input for (dicom_node.imaging.preprocess)
KNOWN_PREPROCESSING_VERSIONS: frozenset[str] = frozenset({PREPROCESSING_VERSION})
#: ONNX default-domain opsets the node accepts (onnxruntime >= 1.18 runs all of them)
SUPPORTED_OPSETS = range(13, 22)

#: labels whose validation AUROC is below this (or undefined) are weak: shown, marked "not validated"
DEFAULT_WEAK_AUROC_FLOOR = 0.70

#: heatmap cell centres of an R3D-18 window encoder (stem stride 1 x 2 x 2, three stride-2 stages, symmetric
#: padding): slice 8 j, pixel 16 j of the window. The export derives it from the model
#: (`dicom_node_training.models.r3d.cam_grid`) and records it; this is the value for bundles made before that.
R3D18_HEATMAP_GRID = CamGrid(stride=(8.0, 16.0, 16.0), offset=(0.0, 0.0, 0.0))

STAGE1_INPUTS = ("windows",)
STAGE1_OUTPUTS = ("features", "window_logit", "heatmap")
STAGE2_INPUTS = ("features", "mask")
STAGE2_OUTPUTS = ("window_logits", "study_logits", "attention")
SHI_STAGE2_INPUTS = ("features",)
SHI_STAGE2_OUTPUTS = ("study_logit",)
#: model families a bundle may declare (module docstring); the first is the default of manifests without `family`
FAMILIES: tuple[str, ...] = ("ma2022", "shi2020")


class BundleError(ValueError):
    """The bundle cannot be used; the message names the bundle, the file or key, and why."""


def weak_labels_below(validation_auroc: Mapping[str, Any], floor: float = DEFAULT_WEAK_AUROC_FLOOR,
                      labels: tuple[str, ...] = ALL_LABELS) -> tuple[str, ...]:
    """The `labels` (in that order; default `ALL_LABELS`) whose AUROC in `validation_auroc` is below `floor`,
    missing, null or NaN: a label without a validation figure is not validated either."""
    if not 0.0 <= float(floor) <= 1.0:
        raise ValueError(f"weak AUROC floor {floor}; expected a value in [0, 1]")
    out = []
    for label in labels:
        v = validation_auroc.get(label)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(float(v)) or float(v) < floor:
            out.append(label)
    return tuple(out)


@dataclass(frozen=True)
class LabelValidation:
    """Which labels are weak (validation AUROC below `floor`); `weak` None = unknown (no validation figures).

    `source`: "manifest" (recorded at export), "metrics" (computed at load from the manifest's
    `metrics.validation_auroc`) or "unknown".
    """

    weak: tuple[str, ...] | None = None
    floor: float = DEFAULT_WEAK_AUROC_FLOOR
    source: str = "unknown"

    @property
    def known(self) -> bool:
        return self.weak is not None

    def is_weak(self, label: str) -> bool:
        """True only for a label known to be weak (unknown validation is not called weak here; see `known`)."""
        return self.weak is not None and label in self.weak


def _validation_from(weak: Any, floor: Any, metrics: Any, where: str,
                     labels: tuple[str, ...] = ALL_LABELS) -> LabelValidation:
    """The manifest's recorded `weak_labels`/`weak_auroc_floor`, else computed from `metrics.validation_auroc`."""
    if floor is None:
        floor = DEFAULT_WEAK_AUROC_FLOOR
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0.0 <= float(floor) <= 1.0:
        raise BundleError(f"{where}: weak_auroc_floor = {floor!r}; expected a number in [0, 1]")
    if weak is not None:
        if not isinstance(weak, (list, tuple)) or any(w not in ALL_LABELS for w in weak):
            raise BundleError(f"{where}: weak_labels = {weak!r}; expected a list of labels of {list(ALL_LABELS)}")
        return LabelValidation(tuple(w for w in ALL_LABELS if w in weak), float(floor), "manifest")
    val = metrics.get("validation_auroc") if isinstance(metrics, Mapping) else None
    if isinstance(val, Mapping):
        return LabelValidation(weak_labels_below(val, float(floor), labels), float(floor), "metrics")
    return LabelValidation(None, float(floor), "unknown")


def label_validation_of(bundle: Any) -> LabelValidation:
    """The `LabelValidation` of what the results get as the bundle: a `BundleManifest`, a `Bundle`,
    the manifest's JSON dict, or any object with `weak_labels` (and optionally `weak_auroc_floor`);
    None or anything else: unknown."""
    if isinstance(bundle, LabelValidation):
        return bundle
    if isinstance(bundle, Bundle):
        bundle = bundle.manifest
    if isinstance(bundle, BundleManifest):
        return bundle.label_validation
    if isinstance(bundle, Mapping):
        try:
            return _validation_from(bundle.get("weak_labels"), bundle.get("weak_auroc_floor"), bundle.get("metrics"),
                                    MANIFEST_NAME)
        except BundleError:
            return LabelValidation()
    weak = getattr(bundle, "weak_labels", None)
    if weak is not None:
        floor = getattr(bundle, "weak_auroc_floor", None)
        return LabelValidation(tuple(w for w in ALL_LABELS if w in tuple(weak)),
                               DEFAULT_WEAK_AUROC_FLOOR if floor is None else float(floor), "manifest")
    return LabelValidation()


@dataclass(frozen=True)
class TensorSpec:
    """One graph input/output: dims are ints or symbolic names (e.g. "batch")."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class GraphSpec:
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_json(self) -> dict[str, Any]:
        return {"file": self.file, "inputs": [t.to_json() for t in self.inputs],
                "outputs": [t.to_json() for t in self.outputs]}


@dataclass(frozen=True)
class BundleManifest:
    """The parsed, validated `manifest.json` of a bundle."""

    name: str
    version: str
    model_uid: str
    created: str
    window_label: str
    study_labels: tuple[str, ...]
    thresholds: dict[str, float]
    preprocessing: PreprocessConfig
    preprocessing_version: str
    sequence_length: int
    feature_dim: int
    opset: int
    stage1: GraphSpec
    stage2: GraphSpec
    files: dict[str, str]  # relative file name -> sha256 hex
    versions: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)
    #: optional float16 variants for GPUs: {"stage1": GraphSpec, "stage2": GraphSpec}
    fp16: dict[str, GraphSpec] = field(default_factory=dict)
    export_checks: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    #: labels whose validation AUROC is below `weak_auroc_floor` (or undefined); None = unknown (see module doc)
    weak_labels: tuple[str, ...] | None = None
    weak_auroc_floor: float = DEFAULT_WEAK_AUROC_FLOOR
    #: "manifest" (recorded at export, written by `to_json`), "metrics" (computed at load) or "unknown"
    weak_labels_source: str = "unknown"
    #: where the stage-1 heatmap's cells sit in the window (`CamGrid`); bundles exported before it was
    #: recorded are R3D-18 window models, whose grid follows from the architecture (R3D18_HEATMAP_GRID)
    heatmap_grid: CamGrid = R3D18_HEATMAP_GRID
    #: "ma2022" or "shi2020" (module docstring)
    family: str = "ma2022"

    @property
    def labels(self) -> tuple[str, ...]:
        """The labels this bundle predicts, in order: the window label, then its study labels (none for shi2020)."""
        return (self.window_label, *self.study_labels)

    @property
    def label_validation(self) -> LabelValidation:
        return LabelValidation(self.weak_labels, self.weak_auroc_floor, self.weak_labels_source)

    @property
    def parameters(self) -> tuple[str, ...]:
        """What the SR's algorithm parameters say about how the heatmap was made and how well it localises."""
        g = self.heatmap_grid
        params = [f"heatmap_grid=stride {'x'.join(f'{v:g}' for v in g.stride)} offset {'x'.join(f'{v:g}' for v in g.offset)}"]
        weight = (self.metrics.get("training") or {}).get("attention_loss_weight")
        if weight is not None:
            params.append(f"attention_loss_weight={float(weight):g}")
        loc = self.metrics.get("localisation") or {}
        if loc.get("detected"):
            d = loc["detected"]
            params.append(f"heatmap_within_20mm={d['within_20mm']:.2f} within_10mm={d['within_10mm']:.2f} "
                          f"median_mm={d['median_mm']:.1f} (n={d['n']} phantoms)")
        return tuple(params)

    @property
    def heatmap_shape(self) -> tuple[int, int, int]:
        dims = self.stage1.outputs[STAGE1_OUTPUTS.index("heatmap")].shape[1:]
        # three dims: _parse_manifest accepts only a [batch, t, h, w] heatmap with int t, h, w
        return cast("tuple[int, int, int]", tuple(int(d) for d in dims))

    @classmethod
    def from_json(cls, data: Any, *, where: str = MANIFEST_NAME) -> BundleManifest:
        return _parse_manifest(data, where)

    def to_json(self) -> dict[str, Any]:
        p = self.preprocessing
        return {
            "schema_version": self.schema_version,
            "family": self.family,
            "name": self.name,
            "version": self.version,
            "model_uid": self.model_uid,
            "created": self.created,
            "labels": {"window": self.window_label, "study": list(self.study_labels)},
            "thresholds": dict(self.thresholds),
            "preprocessing": {k: v for k, v in p.to_dict().items() if k != "version"},
            "preprocessing_version": self.preprocessing_version,
            "sequence_length": self.sequence_length,
            "feature_dim": self.feature_dim,
            "opset": self.opset,
            "graphs": {"stage1": self.stage1.to_json(), "stage2": self.stage2.to_json()},
            "fp16": {k: g.to_json() for k, g in self.fp16.items()},
            "files": dict(self.files),
            "versions": dict(self.versions),
            "metrics": self.metrics,
            "export_checks": self.export_checks,
            "heatmap_grid": self.heatmap_grid.to_dict(),
            # only what was recorded: a value computed at load from an older manifest is not written back
            **({"weak_labels": list(self.weak_labels) if self.weak_labels is not None else None,
                "weak_auroc_floor": self.weak_auroc_floor} if self.weak_labels_source == "manifest" else {}),
        }


@dataclass(frozen=True)
class Bundle:
    """A bundle whose hashes and manifest were verified when it was loaded."""

    path: Path
    manifest: BundleManifest

    def file(self, name: str) -> Path:
        return self.path / name


@dataclass(frozen=True)
class VerifyReport:
    bundle: Bundle
    files_checked: tuple[str, ...]
    #: graph key ("stage1", "stage2", "fp16.stage1", ...) -> {output name: shape seen}
    graph_runs: dict[str, dict[str, tuple[int, ...]]]

    def summary(self) -> str:
        m = self.bundle.manifest
        lines = [
            f"bundle {self.bundle.path}: OK",
            f"  name {m.name} version {m.version} model UID {m.model_uid}",
            f"  preprocessing version {m.preprocessing_version}, crop {m.preprocessing.crop}, "
            f"{m.preprocessing.window_slices}-slice windows, sequence length {m.sequence_length}, opset {m.opset}",
            f"  sha256 verified: {', '.join(self.files_checked)}",
        ]
        for key, outs in self.graph_runs.items():
            shapes = ", ".join(f"{k} {tuple(v)}" for k, v in outs.items())
            lines.append(f"  {key} ran on random input: {shapes}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# manifest schema


_T = TypeVar("_T")


@overload
def _req(d: object, key: str, typ: type[_T], where: str) -> _T: ...


@overload
def _req(d: object, key: str, typ: tuple[type[Any], ...], where: str) -> Any: ...


def _req(d: object, key: str, typ: type[Any] | tuple[type[Any], ...], where: str) -> Any:
    """`d[key]`, checked to be of type `typ`; `BundleError` otherwise.

    Parameters
    ----------
    d
        A parsed JSON value that must be an object (a dict).
    key
        The required key.
    typ
        The type or tuple of types the value must have (a bool is accepted only when `bool` is named).
    where
        The manifest and the place in it, for the error message.
    """
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if key not in d:
        raise BundleError(f"{where}: required key '{key}' is missing")
    value = d[key]
    types = typ if isinstance(typ, tuple) else (typ,)
    if isinstance(value, bool) and bool not in types:
        raise BundleError(f"{where}: key '{key}' must be {'/'.join(t.__name__ for t in types)}, got bool")
    if not isinstance(value, types):
        raise BundleError(f"{where}: key '{key}' must be {'/'.join(t.__name__ for t in types)}, "
                          f"got {type(value).__name__} ({value!r:.60})")
    return value


def _tensor(d: Any, where: str) -> TensorSpec:
    name = _req(d, "name", str, where)
    shape = _req(d, "shape", list, where)
    for dim in shape:
        if isinstance(dim, bool) or not isinstance(dim, (int, str)):
            raise BundleError(f"{where}: shape of '{name}' has dim {dim!r}; dims must be ints or symbolic names")
    dtype = _req(d, "dtype", str, where)
    if dtype not in ("float32", "float16"):
        raise BundleError(f"{where}: dtype of '{name}' is '{dtype}'; expected float32 or float16")
    return TensorSpec(name=name, shape=tuple(shape), dtype=dtype)


def _graph(d: Any, where: str, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> GraphSpec:
    file = _req(d, "file", str, where)
    ins = tuple(_tensor(t, f"{where}.inputs[{i}]") for i, t in enumerate(_req(d, "inputs", list, where)))
    outs = tuple(_tensor(t, f"{where}.outputs[{i}]") for i, t in enumerate(_req(d, "outputs", list, where)))
    if tuple(t.name for t in ins) != inputs:
        raise BundleError(f"{where}.inputs: names {[t.name for t in ins]}; the node expects {list(inputs)}")
    if tuple(t.name for t in outs) != outputs:
        raise BundleError(f"{where}.outputs: names {[t.name for t in outs]}; the node expects {list(outputs)}")
    return GraphSpec(file=file, inputs=ins, outputs=outs)


def _parse_manifest(data: Any, where: str) -> BundleManifest:
    schema = _req(data, "schema_version", int, where)
    if schema != SCHEMA_VERSION:
        raise BundleError(f"{where}: schema_version {schema} is not supported (this node reads {SCHEMA_VERSION}); "
                          "re-export the bundle with this version of dicom-node-export")
    family = data.get("family", FAMILIES[0]) if isinstance(data, dict) else FAMILIES[0]
    if family not in FAMILIES:
        raise BundleError(f"{where}: family {family!r} is unknown to this node (it runs {list(FAMILIES)}); "
                          "export the bundle with a matching dicom-node-export or upgrade the node")
    labels = _req(data, "labels", dict, where)
    window_label = _req(labels, "window", str, f"{where}: labels")
    study_labels = tuple(_req(labels, "study", list, f"{where}: labels"))
    expected_study = STUDY_LABELS if family == "ma2022" else ()
    if window_label != WINDOW_LABEL or study_labels != expected_study:
        raise BundleError(f"{where}: labels {[window_label, *study_labels]} differ from what a {family} bundle "
                          f"predicts, {[WINDOW_LABEL, *expected_study]} (dicom_node.labels); the model heads must "
                          "use that order")
    thresholds = _req(data, "thresholds", dict, where)
    for label in (WINDOW_LABEL, *expected_study):
        t = _req(thresholds, label, (int, float), f"{where}: thresholds")
        if not (0.0 <= float(t) <= 1.0) or math.isnan(float(t)):
            raise BundleError(f"{where}: thresholds.{label} = {t}; expected a probability in [0, 1]")
    pre = _req(data, "preprocessing", dict, where)
    pwhere = f"{where}: preprocessing"
    hu = _req(pre, "hu_windows", list, pwhere)
    if not hu or any(not isinstance(w, list) or len(w) != 2 for w in hu):
        raise BundleError(f"{pwhere}: hu_windows must be a list of [level, width] pairs, got {hu!r}")
    version = _req(data, "preprocessing_version", str, where)
    if version not in KNOWN_PREPROCESSING_VERSIONS:
        raise BundleError(f"{where}: preprocessing_version '{version}' is unknown to this node "
                          f"(it knows {sorted(KNOWN_PREPROCESSING_VERSIONS)}); export the model with a matching "
                          "preprocessing or upgrade the node")
    for key, typ in (("spacing_mm", (int, float)), ("resize", int), ("crop", int), ("window_slices", int)):
        _req(pre, key, typ, pwhere)
    try:
        preprocessing = PreprocessConfig.from_dict({**pre, "version": version})
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{pwhere}: {exc}") from exc
    opset = _req(data, "opset", int, where)
    if opset not in SUPPORTED_OPSETS:
        raise BundleError(f"{where}: opset {opset} is outside the supported range "
                          f"{SUPPORTED_OPSETS.start}-{SUPPORTED_OPSETS.stop - 1}; re-export with --opset 17")
    graphs = _req(data, "graphs", dict, where)
    stage1 = _graph(_req(graphs, "stage1", dict, f"{where}: graphs"), f"{where}: graphs.stage1",
                    STAGE1_INPUTS, STAGE1_OUTPUTS)
    s2_in, s2_out = (STAGE2_INPUTS, STAGE2_OUTPUTS) if family == "ma2022" else (SHI_STAGE2_INPUTS, SHI_STAGE2_OUTPUTS)
    stage2 = _graph(_req(graphs, "stage2", dict, f"{where}: graphs"), f"{where}: graphs.stage2", s2_in, s2_out)
    fp16 = {k: _graph(g, f"{where}: fp16.{k}", STAGE1_INPUTS if k == "stage1" else s2_in,
                      STAGE1_OUTPUTS if k == "stage1" else s2_out)
            for k, g in (data.get("fp16") or {}).items()}
    if set(fp16) - {"stage1", "stage2"}:
        raise BundleError(f"{where}: fp16 has keys {sorted(fp16)}; expected stage1 and stage2")
    files = _req(data, "files", dict, where)
    for name, digest in files.items():
        if not isinstance(digest, str) or len(digest) != 64:
            raise BundleError(f"{where}: files.{name} must be a 64-hex-digit sha256, got {digest!r}")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{where}: files.{name}: file names must be relative to the bundle directory")
    for g in (stage1, stage2, *fp16.values()):
        if g.file not in files:
            raise BundleError(f"{where}: graph file {g.file} has no sha256 in 'files'")
    metrics = _req(data, "metrics", dict, where)
    validation = _validation_from(data.get("weak_labels"), data.get("weak_auroc_floor"), metrics, where,
                                  (WINDOW_LABEL, *expected_study))
    seq = _req(data, "sequence_length", int, where)
    feat = _req(data, "feature_dim", int, where)
    win_shape = stage1.inputs[0].shape
    expect = (preprocessing.channels, preprocessing.window_slices, preprocessing.crop, preprocessing.crop)
    if len(win_shape) != 5 or tuple(win_shape[1:]) != expect:
        raise BundleError(f"{where}: graphs.stage1 input 'windows' has shape {list(win_shape)}; with the "
                          f"manifest's preprocessing it must be [batch, {', '.join(map(str, expect))}]")
    if len(stage1.outputs[2].shape) != 4 or not all(isinstance(d, int) for d in stage1.outputs[2].shape[1:]):
        raise BundleError(f"{where}: graphs.stage1 output 'heatmap' must be [batch, t, h, w] with fixed t, h, w")
    if family == "shi2020" and preprocessing.slabs != seq:
        raise BundleError(f"{where}: sequence_length {seq} differs from preprocessing.slabs {preprocessing.slabs}; "
                          "a shi2020 stage 2 reads every slab of the study")
    # ma2022: one feature vector per window; shi2020: the stage-1 feature maps, on the heatmap's cells
    feat_shape = (seq, feat) if family == "ma2022" else (seq, feat, *stage1.outputs[2].shape[2:])
    if tuple(stage2.inputs[0].shape[1:]) != feat_shape:
        raise BundleError(f"{where}: graphs.stage2 input 'features' has shape {list(stage2.inputs[0].shape)}; "
                          f"expected [batch, {', '.join(map(str, feat_shape))}] (sequence_length, feature_dim"
                          f"{', heatmap h, w' if family == 'shi2020' else ''})")
    try:
        grid = CamGrid.from_dict(data["heatmap_grid"]) if data.get("heatmap_grid") is not None else R3D18_HEATMAP_GRID
    except (TypeError, ValueError) as exc:
        raise BundleError(f"{where}: heatmap_grid: {exc}; re-export the bundle with dicom-node-export") from None
    return BundleManifest(
        heatmap_grid=grid,
        name=_req(data, "name", str, where),
        version=_req(data, "version", str, where),
        model_uid=_req(data, "model_uid", str, where),
        created=_req(data, "created", str, where),
        window_label=window_label,
        study_labels=study_labels,
        thresholds={k: float(thresholds[k]) for k in (WINDOW_LABEL, *expected_study)},
        preprocessing=preprocessing,
        preprocessing_version=version,
        sequence_length=seq,
        feature_dim=feat,
        opset=opset,
        stage1=stage1,
        stage2=stage2,
        files=dict(files),
        versions={str(k): str(v) for k, v in _req(data, "versions", dict, where).items()},
        metrics=metrics,
        fp16=fp16,
        export_checks=data.get("export_checks") or {},
        schema_version=schema,
        weak_labels=validation.weak,
        weak_auroc_floor=validation.floor,
        weak_labels_source=validation.source,
        family=family,
    )


# --------------------------------------------------------------------------------------------
# files


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def read_onnx_opset(path: str | Path) -> int:
    """The default-domain opset of an ONNX file, read from its protobuf without the `onnx` package.

    ModelProto field 8 is `opset_import` (OperatorSetIdProto: 1 = domain, 2 = version).
    """
    buf = Path(path).read_bytes()
    i, found = 0, None
    while i < len(buf):
        key, i = _varint(buf, i)
        fnum, wtype = key >> 3, key & 7
        if wtype == 0:
            _, i = _varint(buf, i)
        elif wtype == 1:
            i += 8
        elif wtype == 5:
            i += 4
        elif wtype == 2:
            n, i = _varint(buf, i)
            if fnum == 8:
                sub, j, domain, version = buf[i:i + n], 0, "", None
                while j < len(sub):
                    k, j = _varint(sub, j)
                    if k == (1 << 3 | 2):
                        m, j = _varint(sub, j)
                        domain = sub[j:j + m].decode("utf-8", "replace")
                        j += m
                    elif k == (2 << 3 | 0):
                        version, j = _varint(sub, j)
                    else:
                        raise ValueError(f"unexpected field {k >> 3} in opset_import")
                if domain in ("", "ai.onnx") and version is not None:
                    found = version
            i += n
        else:
            raise ValueError(f"unexpected protobuf wire type {wtype}")
        if i > len(buf):
            raise ValueError("truncated protobuf")
    if found is None:
        raise ValueError("no default-domain opset_import")
    return found


def _check_files(path: Path, manifest: BundleManifest) -> tuple[str, ...]:
    checked = []
    for name, digest in manifest.files.items():
        f = path / name
        if not f.is_file():
            raise BundleError(f"bundle {path}: {name} is missing (listed in {MANIFEST_NAME} 'files'); "
                              "copy the complete bundle directory or re-export it")
        actual = sha256_file(f)
        if actual != digest:
            raise BundleError(f"bundle {path}: {name} sha256 mismatch (manifest {digest[:12]}..., file "
                              f"{actual[:12]}...): the file was changed or corrupted; re-export or re-copy the bundle")
        checked.append(name)
    for g in (manifest.stage1, manifest.stage2, *manifest.fp16.values()):
        try:
            opset = read_onnx_opset(path / g.file)
        except ValueError as exc:
            raise BundleError(f"bundle {path}: {g.file} is not a readable ONNX model ({exc})") from exc
        if opset != manifest.opset:
            raise BundleError(f"bundle {path}: {g.file} has opset {opset} but {MANIFEST_NAME} says {manifest.opset}")
    return tuple(checked)


def load_bundle(path: str | Path) -> Bundle:
    """Read and verify a bundle directory (schema, sha256 of every file, opset); raise `BundleError`."""
    path = Path(path)
    mpath = path / MANIFEST_NAME
    if not path.is_dir():
        raise BundleError(f"bundle {path}: not a directory; point the node at a bundle directory "
                          f"(with {MANIFEST_NAME}) or leave it unset for the bundled demo model")
    if not mpath.is_file():
        raise BundleError(f"bundle {path}: {MANIFEST_NAME} is missing; is this an exported bundle?")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {path}: {MANIFEST_NAME} is not valid JSON ({exc})") from exc
    manifest = _parse_manifest(data, f"bundle {path}: {MANIFEST_NAME}")
    _check_files(path, manifest)
    return Bundle(path=path, manifest=manifest)


def load_manifest_only(path: str | Path) -> Bundle:
    """The manifest of a bundle whose graphs live elsewhere (on a Triton server): `path` is a bundle
    directory or a manifest file (the `<model>.manifest.json` copy `dicom-node-export triton` writes).

    Schema and values are checked as by `load_bundle`; the graph files are not read: the remote engine
    compares their sha256 from the manifest with what the server says it serves
    (`dicom_node.model.triton`). The returned `Bundle.path` is the directory of the manifest.
    """
    path = Path(path)
    mpath = path / MANIFEST_NAME if path.is_dir() else path
    if not mpath.is_file():
        raise BundleError(f"bundle {path}: no {MANIFEST_NAME} there and not a manifest file; point inference.bundle "
                          "at a bundle directory or at the <model>.manifest.json of a Triton model repository")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"bundle {mpath}: not valid JSON ({exc})") from exc
    return Bundle(path=mpath.parent, manifest=_parse_manifest(data, f"bundle {mpath}"))


def _random_feed(graph: GraphSpec, batch: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feed = {}
    for t in graph.inputs:
        shape = tuple(batch if isinstance(d, str) else d for d in t.shape)
        if t.name == "mask":
            arr = np.ones(shape, dtype=np.float32)
            arr[..., shape[-1] // 2:] = 0.0
        else:
            arr = rng.random(shape, dtype=np.float32)
        feed[t.name] = arr.astype(t.dtype)
    return feed


def onnxruntime_module() -> types.ModuleType:
    """onnxruntime, with its telemetry off (once per process).

    A hospital network node sends nothing anywhere it was not told to. onnxruntime builds with 1DS
    telemetry create a device-id store under `~/.cache/Microsoft/DeveloperTools/` when the library
    loads and may upload events; `ORT_DISABLE_TELEMETRY=1`, read when the library loads, stops both
    (so it is set before the first import, unless the environment says otherwise), and
    `disable_telemetry_events()` stops the events of a library someone imported earlier. Every
    place that makes an onnxruntime session gets the module from here (`Predictor`, the bundle check)."""
    global _telemetry_off
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime as ort

    if not _telemetry_off:
        off = getattr(ort, "disable_telemetry_events", None)
        if off is not None:  # absent from builds compiled without telemetry
            off()
        _telemetry_off = True
    return ort


_telemetry_off = False


def _run_graph(path: Path, key: str, graph: GraphSpec, batch: int) -> dict[str, tuple[int, ...]]:
    ort = onnxruntime_module()

    try:
        sess = ort.InferenceSession(str(path / graph.file), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(f"bundle {path}: {graph.file} does not load in onnxruntime {ort.__version__}: {exc}") from exc
    names = [i.name for i in sess.get_inputs()]
    if names != [t.name for t in graph.inputs]:
        raise BundleError(f"bundle {path}: {graph.file} inputs are {names}; {MANIFEST_NAME} declares "
                          f"{[t.name for t in graph.inputs]}")
    try:
        outs = sess.run([t.name for t in graph.outputs], _random_feed(graph, batch, seed=batch))
    except Exception as exc:
        raise BundleError(f"bundle {path}: {graph.file} failed on random input of the declared shapes: {exc}") from exc
    seen = {}
    for spec, arr in zip(graph.outputs, outs):
        expect = tuple(batch if isinstance(d, str) else d for d in spec.shape)
        if tuple(arr.shape) != expect:
            raise BundleError(f"bundle {path}: {graph.file} output '{spec.name}' has shape {tuple(arr.shape)} "
                              f"for batch {batch}; {MANIFEST_NAME} declares {list(spec.shape)}")
        if arr.dtype != np.dtype(spec.dtype):
            raise BundleError(f"bundle {path}: {graph.file} output '{spec.name}' is {arr.dtype}; "
                              f"{MANIFEST_NAME} declares {spec.dtype}")
        if not np.all(np.isfinite(arr)):
            raise BundleError(f"bundle {path}: {graph.file} output '{spec.name}' has non-finite values on random input")
        seen[spec.name] = tuple(arr.shape)
    return seen


def verify_bundle(path: str | Path, *, run_graphs: bool = True, batch: int = 2) -> VerifyReport:
    """Everything `load_bundle` checks, then (optionally) run each graph on random input with onnxruntime CPU."""
    bundle = load_bundle(path)
    m = bundle.manifest
    runs: dict[str, dict[str, tuple[int, ...]]] = {}
    if run_graphs:
        runs["stage1"] = _run_graph(bundle.path, "stage1", m.stage1, batch)
        runs["stage2"] = _run_graph(bundle.path, "stage2", m.stage2, batch)
        for key, g in m.fp16.items():
            runs[f"fp16.{key}"] = _run_graph(bundle.path, f"fp16.{key}", g, batch)
    return VerifyReport(bundle=bundle, files_checked=tuple(m.files), graph_runs=runs)


def default_bundle_path() -> Path:
    """The demo bundle shipped inside the installed package (`dicom_node/model/demo/`)."""
    return Path(str(resources.files("dicom_node.model") / "demo"))
