"""torch models -> the two ONNX graphs of a bundle, with parity checks against torch.

- `Stage1Graph` wraps the R3D-18 window encoder: `windows` (B, 3, 10, H, W) -> `features` (B, F),
  `window_logit` (B,), `heatmap` (B, t, h, w). The heatmap is CAM, ReLU(sum_c w_c A_c) of the last
  conv block with the fc weights; for a GAP -> linear head Grad-CAM of the logit over that block
  equals it up to a positive factor 1/(t*h*w), so it lives in the graph and needs no backward pass.
- `ShiStage1Graph` / `ShiStage2Graph`: the Shi et al. 2020 family (slab maps, attention map, unrolled
  Conv-LSTM -> `study_logit`), exported and checked the same way (`check_parity_shi`).
- `Stage2Graph` wraps the sequence model: `features` (B, L, F) + `mask` (B, L) float32 ->
  `window_logits` (B, L), `study_logits` (B, 9), `attention` (B, 9, L). Weight norm is folded.

Uses torch's TorchScript-based exporter (`dynamo=False`): it needs no onnxscript and gives
a plain graph with a symbolic batch dim.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from dicom_node.labels import sigmoid
from dicom_node.model.bundle import (
    SHI_STAGE2_INPUTS,
    SHI_STAGE2_OUTPUTS,
    STAGE1_INPUTS,
    STAGE1_OUTPUTS,
    STAGE2_INPUTS,
    STAGE2_OUTPUTS,
    TensorSpec,
)
from dicom_node_export.conv_rewrite import rewrite_conv3d
from dicom_node_training.models import cam, fold_weight_norm

if TYPE_CHECKING:
    import onnx
    from onnxruntime import InferenceSession

__all__ = [
    "DEFAULT_OPSET",
    "LOGIT_TOLERANCE",
    "FP16_PROB_TOLERANCE",
    "ExportError",
    "Stage1Graph",
    "Stage2Graph",
    "ShiStage1Graph",
    "ShiStage2Graph",
    "ParityResult",
    "export_shi_stage1",
    "export_shi_stage2",
    "check_parity_shi",
    "shi_stage2_specs",
    "export_stage1",
    "export_stage2",
    "convert_fp16",
    "check_parity_stage1",
    "check_parity_stage2",
    "stage1_specs",
    "stage2_specs",
]

DEFAULT_OPSET = 17
#: max abs difference on logits between onnxruntime (fp32, CPU) and torch
LOGIT_TOLERANCE = 1e-4
#: max abs difference on probabilities between the float16 graphs and torch fp32
FP16_PROB_TOLERANCE = 1e-2
BATCH = "batch"


class ExportError(RuntimeError):
    """Export or one of its checks failed; the message names the graph, the check and the figure."""


class Stage1Graph(nn.Module):
    """R3D window encoder with the CAM heatmap as a third output (what `stage1.onnx` computes)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, windows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(windows)
        fc = cast(nn.Linear, self.model.fc)  # the window encoder's 1-output head
        heatmap = cam(out.activations, fc.weight[0])
        return out.features, out.logit, heatmap


class ShiStage1Graph(nn.Module):
    """Slab ResNet-18 (Shi et al.): `features` = the layer4 maps (B, F, h, w) stage 2 reads, the slab logit, and
    the attention map (B, 1, h, w) in closed form, ReLU(sum_k w_k f_k): Grad-CAM of the GAP -> linear head up to
    the factor 1/(h w) (`dicom_node_training.models.resnet2d.grad_cam`; tests/export/test_shi_export.py)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, windows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(windows)
        fc = cast(nn.Linear, self.model.fc)
        return out.activations[:, :, 0], out.logit, cam(out.activations, fc.weight[0])


class ShiStage2Graph(nn.Module):
    """Bidirectional Conv-LSTM over a study's slab maps (B, L, F, h, w) -> `study_logit` (B,), unrolled over L."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, features: Tensor) -> tuple[Tensor]:
        return (self.model(features),)


class Stage2Graph(nn.Module):
    """Sequence model with a float32 mask input (what `stage2.onnx` computes)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = fold_weight_norm(copy.deepcopy(model))

    def forward(self, features: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out = self.model(features, mask)
        return out.window_logits, out.study_logits, out.attention


@dataclass(frozen=True)
class ParityResult:
    graph: str
    #: batch size -> {output name: max abs difference onnxruntime vs torch}
    max_abs_diff: dict[int, dict[str, float]]
    logit_outputs: tuple[str, ...]
    tolerance: float

    @property
    def worst_logit_diff(self) -> float:
        return max(d[k] for d in self.max_abs_diff.values() for k in self.logit_outputs)

    def to_json(self) -> dict[str, Any]:
        return {"max_abs_diff": {str(b): d for b, d in self.max_abs_diff.items()},
                "worst_logit_diff": self.worst_logit_diff, "tolerance": self.tolerance,
                "compared": list(self.logit_outputs)}


def _export(module: nn.Module, args: tuple[Tensor, ...], path: Path, inputs: tuple[str, ...],
            outputs: tuple[str, ...], opset: int) -> None:
    dynamic = {name: {0: BATCH} for name in (*inputs, *outputs)}
    module.eval()
    with warnings.catch_warnings(), torch.no_grad():
        # the TorchScript exporter warns that it is legacy and about shape checks traced as constants
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, str(path), dynamo=False, opset_version=opset, input_names=list(inputs),
                          output_names=list(outputs), dynamic_axes=dynamic, do_constant_folding=True)
    import onnx

    model = onnx.load(str(path))
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # onnx raises ValidationError / InferenceError
        raise ExportError(f"{path.name}: onnx.checker rejected the exported graph: {exc}") from exc


def stage1_specs(model: nn.Module, window_slices: int, crop: int, dtype: str = "float32", *, channels: int = 3,
                 family: str = "ma2022") -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """Input/output specs of stage 1, with the heatmap (and shi2020 feature map) shape found by running the model once."""
    wrap = Stage1Graph if family == "ma2022" else ShiStage1Graph
    with torch.no_grad():
        out = wrap(model).eval()(torch.zeros(1, channels, window_slices, crop, crop))
    feat, heat = tuple(int(d) for d in out[0].shape[1:]), tuple(out[2].shape[1:])
    ins = (TensorSpec("windows", (BATCH, channels, window_slices, crop, crop), dtype),)
    outs = (TensorSpec("features", (BATCH, *feat), dtype), TensorSpec("window_logit", (BATCH,), dtype),
            TensorSpec("heatmap", (BATCH, *map(int, heat)), dtype))
    return ins, outs


def stage2_specs(sequence_length: int, feature_dim: int, num_study: int = 9, dtype: str = "float32") -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    ins = (TensorSpec("features", (BATCH, sequence_length, feature_dim), dtype),
           TensorSpec("mask", (BATCH, sequence_length), "float32"))
    outs = (TensorSpec("window_logits", (BATCH, sequence_length), dtype),
            TensorSpec("study_logits", (BATCH, num_study), dtype),
            TensorSpec("attention", (BATCH, num_study, sequence_length), dtype))
    return ins, outs


def export_stage1(model: nn.Module, path: Path, *, window_slices: int, crop: int, opset: int = DEFAULT_OPSET,
                  conv_rewrite: str | None = "gather") -> Stage1Graph:
    """Export stage 1; returns the torch `Stage1Graph` of the ORIGINAL model, for the parity checks.

    `conv_rewrite` ("gather", default; "concat" or "sum") exports every Conv3d as Conv2d with BatchNorm
    folded (`dicom_node_export.conv_rewrite`; same outputs, several times faster on onnxruntime CPU);
    None exports the plain Conv3d graph.
    """
    graph = Stage1Graph(model).eval()
    exported = graph
    if conv_rewrite is not None:
        exported = Stage1Graph(rewrite_conv3d(model, mode=conv_rewrite)).eval()
    _export(exported, (torch.rand(2, 3, window_slices, crop, crop),), Path(path), STAGE1_INPUTS, STAGE1_OUTPUTS, opset)
    return graph


def shi_stage2_specs(sequence_length: int, feature_shape: tuple[int, ...],
                     dtype: str = "float32") -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    return ((TensorSpec("features", (BATCH, sequence_length, *feature_shape), dtype),),
            (TensorSpec("study_logit", (BATCH,), dtype),))


def export_shi_stage1(model: nn.Module, path: Path, *, channels: int, window_slices: int, crop: int,
                      opset: int = DEFAULT_OPSET) -> ShiStage1Graph:
    graph = ShiStage1Graph(model).eval()
    _export(graph, (torch.rand(2, channels, window_slices, crop, crop),), Path(path), STAGE1_INPUTS, STAGE1_OUTPUTS, opset)
    return graph


def export_shi_stage2(model: nn.Module, path: Path, *, sequence_length: int, feature_shape: tuple[int, ...],
                      opset: int = DEFAULT_OPSET) -> ShiStage2Graph:
    """The Conv-LSTM unrolled for `sequence_length` steps (the Python loop is traced step by step)."""
    graph = ShiStage2Graph(model).eval()
    _export(graph, (torch.rand(2, sequence_length, *feature_shape),), Path(path), SHI_STAGE2_INPUTS,
            SHI_STAGE2_OUTPUTS, opset)
    return graph


def check_parity_shi(graph: nn.Module, onnx_path: Path, input_name: str, input_shape: tuple[int, ...],
                     outputs: tuple[str, ...], logit: str, *, batch_sizes: tuple[int, ...] = (1, 8), tolerance: float = LOGIT_TOLERANCE,
                     probabilities: bool = False, seed: int = 0) -> ParityResult:
    """onnxruntime vs torch on random input (B, *input_shape) at each batch size; fails beyond `tolerance`."""
    rng = np.random.default_rng(seed)
    feeds = {b: {input_name: rng.random((b, *input_shape), dtype=np.float32)} for b in batch_sizes}
    return _compare(Path(onnx_path).name, _session(onnx_path), graph.eval(), feeds, outputs, (logit,), tolerance,
                    probabilities)


def export_stage2(model: nn.Module, path: Path, *, sequence_length: int, feature_dim: int,
                  opset: int = DEFAULT_OPSET) -> Stage2Graph:
    graph = Stage2Graph(model).eval()
    x = torch.randn(2, sequence_length, feature_dim)
    mask = torch.ones(2, sequence_length)
    mask[1, sequence_length // 2:] = 0
    _export(graph, (x, mask), Path(path), STAGE2_INPUTS, STAGE2_OUTPUTS, opset)
    return graph


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder `graph.node` so every node comes after the producers of its inputs (in place)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending: list[onnx.NodeProto] = list(graph.node)
    ordered: list[onnx.NodeProto] = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError(f"float16 conversion left a cycle or dangling input at node {pending[0].name}")
        for n in ready:
            ordered.append(n)
            available.update(n.output)
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    copies = [type(n)() for n in ordered]
    for c, n in zip(copies, ordered):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def convert_fp16(src: Path, dst: Path) -> None:
    """Float16 weights and compute, float32 inputs/outputs (onnxruntime's float16 converter)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    _toposort(model.graph)  # the converter appends its input casts after their consumers
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))


def _session(path: Path) -> InferenceSession:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _compare(graph: str, sess: InferenceSession, torch_fn: nn.Module, feeds: dict[int, dict[str, np.ndarray]], names: tuple[str, ...],
             logit_names: tuple[str, ...], tolerance: float, probabilities: bool) -> ParityResult:
    diffs: dict[int, dict[str, float]] = {}
    for b, feed in feeds.items():
        with torch.no_grad():
            ref = [t.numpy() for t in torch_fn(*[torch.from_numpy(v) for v in feed.values()])]
        got = sess.run(list(names), feed)
        d: dict[str, float] = {}
        for name, r, g in zip(names, ref, got):
            if r.shape != g.shape:
                raise ExportError(f"{graph}: output '{name}' has shape {g.shape} in onnxruntime, {r.shape} in torch (batch {b})")
            if probabilities and name in logit_names:
                r, g = sigmoid(r), sigmoid(g)
            d[name] = float(np.max(np.abs(r.astype(np.float64) - g.astype(np.float64)))) if r.size else 0.0
        diffs[b] = d
    result = ParityResult(graph=graph, max_abs_diff=diffs, logit_outputs=logit_names, tolerance=tolerance)
    if not result.worst_logit_diff <= tolerance:
        what = "probabilities" if probabilities else "logits"
        raise ExportError(f"{graph}: onnxruntime differs from torch by {result.worst_logit_diff:.3g} on {what} "
                          f"(tolerance {tolerance:g}; per batch size {diffs})")
    return result


def check_parity_stage1(graph: Stage1Graph, onnx_path: Path, *, window_slices: int, crop: int,
                        batch_sizes: tuple[int, ...] = (1, 8), tolerance: float = LOGIT_TOLERANCE,
                        probabilities: bool = False, seed: int = 0) -> ParityResult:
    rng = np.random.default_rng(seed)
    feeds = {b: {"windows": rng.random((b, 3, window_slices, crop, crop), dtype=np.float32)} for b in batch_sizes}
    return _compare(Path(onnx_path).name, _session(onnx_path), graph.eval(), feeds, STAGE1_OUTPUTS,
                    ("window_logit",), tolerance, probabilities)


def check_parity_stage2(graph: Stage2Graph, onnx_path: Path, *, sequence_length: int, feature_dim: int,
                        batch_sizes: tuple[int, ...] = (1, 8), tolerance: float = LOGIT_TOLERANCE,
                        probabilities: bool = False, seed: int = 0) -> ParityResult:
    rng = np.random.default_rng(seed)
    feeds: dict[int, dict[str, np.ndarray]] = {}
    for b in batch_sizes:
        mask = np.ones((b, sequence_length), dtype=np.float32)
        for i in range(b):  # a mix of full and padded sequences
            mask[i, sequence_length - (i * 5) % sequence_length:] = 0.0 if i else 1.0
        feeds[b] = {"features": rng.standard_normal((b, sequence_length, feature_dim), dtype=np.float32), "mask": mask}
    return _compare(Path(onnx_path).name, _session(onnx_path), graph.eval(), feeds, STAGE2_OUTPUTS,
                    ("window_logits", "study_logits"), tolerance, probabilities)
