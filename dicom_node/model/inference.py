"""onnxruntime inference over a verified model bundle (no torch).

`Predictor` loads the two graphs of a bundle (see `dicom_node.model.bundle`) with explicit execution
providers (CUDA first, CPU fallback by default), warms them up, and turns the `Windows` of one
series into a typed `Prediction`: stage 1 in batches -> fixed-length sequence
(`dicom_node.model.sequence`) -> stage 2 -> sigmoid -> back to the N windows -> RSNA consistency rules
at the manifest's thresholds.

A shi2020 bundle (Shi et al. 2020; `dicom_node.model.bundle`) runs the same way up to stage 1 (slabs in place of
windows); stage 2 reads all the slabs' feature maps at once and gives one probability, PE present
(`Prediction.pe_probability`, the window label's probability). Its `window_probs` are the stage-1 slab
probabilities, its `attention` one row: each slab's share of the attention-map peaks over the study (the
"attention evidence", so the key slices are the slabs where a probable PE draws the most attention), its
`labels` the window label alone, its `window_positive` the slabs at or above 0.5 when the study is called
positive (at least the highest-scoring one).

`Prediction` is the contract between inference and the results (`dicom_node.results`: key slices, SR, SCs, KOS).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicom_node.imaging.cam_grid import CamGrid
from dicom_node.imaging.preprocess import PreprocessConfig, Windows
from dicom_node.labels import ALL_LABELS, STUDY_LABELS, WINDOW_LABEL, make_consistent, sigmoid
from dicom_node.log import get_logger
from dicom_node.model.bundle import Bundle, GraphSpec, load_bundle, onnxruntime_module
from dicom_node.model.sequence import from_fixed_length, to_fixed_length

__all__ = ["Prediction", "Predictor", "InferenceError", "BackendUnavailable", "available_providers"]

log = get_logger("dicom_node.model.inference")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_OPT_LEVELS = ("disable", "basic", "extended", "all")


class InferenceError(RuntimeError):
    """The model cannot run (no usable provider, input that does not match the bundle)."""


class BackendUnavailable(InferenceError):
    """A remote inference backend (a Triton server) did not answer a request and does not answer a
    liveness check either: the job waits and runs again by itself (`[worker] retry_unavailable_s`)."""

    retry_later = True  # what the worker looks for (`dicom_node.engine.worker`: it imports no model code)


@dataclass(frozen=True)
class Prediction:
    """What the two-stage model says about one series.

    - `window_probs` (N,): PE probability per 10-slice window (stage 2 window head).
    - `study_probs`: probability per study label, keys = dicom_node.labels.STUDY_LABELS.
    - `attention` (9, N): attention weight of each study head over the windows (rows sum to 1).
    - `heatmaps` (N, t, h, w): non-negative Grad-CAM/CAM maps of the stage-1 window logit in
      model space (t slices, h x w of the crop), to be mapped back with `Windows.geometry`.
    - `thresholds`: decision threshold per label (WINDOW_LABEL and the nine study labels).
    - `window_positive` (N,) and `labels`: binary decisions after the RSNA consistency rules.
    - `stage1_probs` (N,): sigmoid of the stage-1 window logit (the window encoder on its own).
    - `timings_s`: seconds spent per step ("stage1", "stage2", "total").
    - `heatmap_grid`: where the heatmaps' cells sit in the window (`CamGrid`, from the bundle).
    """

    series_instance_uid: str
    window_probs: np.ndarray
    study_probs: dict[str, float]
    attention: np.ndarray
    heatmaps: np.ndarray
    thresholds: dict[str, float]
    window_positive: np.ndarray
    labels: dict[str, bool]
    model_name: str
    model_version: str
    model_uid: str
    execution_provider: str
    stage1_probs: np.ndarray | None = None
    timings_s: dict[str, float] = field(default_factory=dict)
    #: where the heatmaps' cells sit in the window (the bundle's `heatmap_grid`); None = half-pixel resize
    heatmap_grid: CamGrid | None = None
    #: the bundle's model family ("ma2022" / "shi2020")
    family: str = "ma2022"
    #: shi2020: stage 2's study probability of PE (the window label's probability); None for ma2022
    pe_probability: float | None = None

    @property
    def predicted_labels(self) -> tuple[str, ...]:
        """The labels this prediction carries (the bundle's), in `ALL_LABELS` order."""
        return tuple(k for k in ALL_LABELS if k in self.labels)

    @property
    def positive(self) -> bool:
        """True when the consistent labels call the study PE-positive."""
        return bool(np.any(self.window_positive))

    def label_probabilities(self) -> dict[str, float]:
        """Probability per label (WINDOW_LABEL first, then the study labels); for WINDOW_LABEL
        ("PE present on any window") the highest window probability (0.0 for a series without windows)."""
        wp = np.asarray(self.window_probs, dtype=np.float64).reshape(-1)
        if self.pe_probability is not None:  # shi2020: the study's probability from stage 2
            return {WINDOW_LABEL: float(self.pe_probability)}
        probs = {WINDOW_LABEL: float(wp.max()) if wp.size else 0.0}
        probs.update({k: float(v) for k, v in self.study_probs.items()})
        return probs


def available_providers() -> list[str]:
    return list(onnxruntime_module().get_available_providers())


def _same_preprocessing(a: PreprocessConfig, b: PreprocessConfig) -> list[str]:
    da, db = a.to_dict(), b.to_dict()
    return [f"{k} {da.get(k)!r} (windows) vs {db.get(k)!r} (bundle)" for k in sorted(set(da) | set(db))
            if da.get(k) != db.get(k)]


class Predictor:
    """Run a bundle's two ONNX graphs on one series at a time.

    `providers` are tried in order, keeping only those this onnxruntime build offers;
    `require_gpu=True` refuses to start unless CUDA actually runs the graphs. `intra_op_threads`
    None lets onnxruntime choose; `graph_optimization` is one of disable/basic/extended/all.
    `precision="auto"` uses the bundle's float16 graphs when CUDA runs and the bundle has them.

    The engine is the two stage runners `_stage1` and `_stage2` (and the start-up that makes them):
    `dicom_node.model.triton.TritonPredictor` replaces exactly those to run the stages on a Triton
    server; `check_windows` and `predict`, and so everything downstream, are shared.
    """

    def __init__(
        self,
        bundle: Bundle | str | Path,
        providers: Sequence[str] = (CUDA, CPU),
        require_gpu: bool = False,
        intra_op_threads: int | None = None,
        graph_optimization: str = "all",
        batch_size: int = 8,
        precision: str = "auto",
        warmup: bool = True,
    ) -> None:
        ort = onnxruntime_module()
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        self.manifest = m = self.bundle.manifest
        if batch_size < 1:
            raise InferenceError(f"batch_size must be >= 1, got {batch_size}")
        if graph_optimization not in _OPT_LEVELS:
            raise InferenceError(f"graph_optimization '{graph_optimization}' is not one of {list(_OPT_LEVELS)}")
        if precision not in ("auto", "fp32", "fp16"):
            raise InferenceError(f"precision '{precision}' is not one of auto, fp32, fp16")
        self.batch_size = batch_size
        have = available_providers()
        wanted = list(providers)
        usable = [p for p in wanted if p in have]
        if require_gpu and CUDA not in have:
            raise InferenceError(
                f"require_gpu is set but {CUDA} is not available (onnxruntime {ort.__version__} offers {have}); "
                "install the [gpu] extra (onnxruntime-gpu) on a host with an NVIDIA GPU and CUDA, "
                "or set inference.require_gpu = false to run on the CPU")
        if require_gpu and CUDA not in usable:
            raise InferenceError(f"require_gpu is set but {CUDA} is not in the configured providers {wanted}; "
                                 f"add it to inference.providers")
        if not usable:
            raise InferenceError(f"none of the configured providers {wanted} is available "
                                 f"(onnxruntime {ort.__version__} offers {have}); add {CPU} to inference.providers")
        skipped = [p for p in wanted if p not in have]
        if skipped:
            log.info("providers_unavailable", skipped=skipped, available=have)

        opts = ort.SessionOptions()
        opts.graph_optimization_level = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[graph_optimization]
        if intra_op_threads is not None:
            opts.intra_op_num_threads = int(intra_op_threads)
        opts.log_severity_level = 3

        use_fp16 = bool(m.fp16) and (precision == "fp16" or (precision == "auto" and usable[0] == CUDA))
        if precision == "fp16" and not m.fp16:
            raise InferenceError(f"precision fp16 requested but bundle {self.bundle.path} has no float16 graphs; "
                                 "re-export with --fp16 or use precision auto/fp32")
        self.precision = "fp16" if use_fp16 else "fp32"
        g1: GraphSpec = m.fp16["stage1"] if use_fp16 else m.stage1
        g2: GraphSpec = m.fp16["stage2"] if use_fp16 else m.stage2
        t0 = time.perf_counter()
        self._s1 = ort.InferenceSession(str(self.bundle.file(g1.file)), sess_options=opts, providers=usable)
        self._s2 = ort.InferenceSession(str(self.bundle.file(g2.file)), sess_options=opts, providers=usable)
        self.execution_provider = self._s1.get_providers()[0]
        if require_gpu and (self.execution_provider != CUDA or self._s2.get_providers()[0] != CUDA):
            raise InferenceError(f"require_gpu is set but onnxruntime fell back to {self.execution_provider} "
                                 "(CUDA libraries missing or incompatible?); fix the CUDA install or set require_gpu = false")
        self._in1 = g1.inputs[0].dtype
        self._in2 = g2.inputs[0].dtype
        warm_s = self._warm_up() if warmup else 0.0
        log.info("model_loaded", bundle=str(self.bundle.path), model_name=m.name, model_version=m.version,
                 model_uid=m.model_uid, provider=self.execution_provider, providers=self._s1.get_providers(),
                 precision=self.precision, load_s=round(time.perf_counter() - t0, 3), warmup_s=round(warm_s, 3))

    # ------------------------------------------------------------------------------------------

    def _warm_up(self) -> float:
        """Run both stages once on zeros (one window; one study's stage-2 input of the bundle's family), so a
        graph that loads but cannot run fails now; returns the seconds it took."""
        m = self.manifest
        t0 = time.perf_counter()
        # all int: _parse_manifest checks them against (channels, window_slices, crop, crop)
        window_shape = tuple(int(d) for d in m.stage1.inputs[0].shape[1:])
        self._stage1(np.zeros((1, *window_shape), dtype=np.float32))
        if m.family == "shi2020":
            self._stage2_shi(np.zeros(tuple(int(d) for d in m.stage2.inputs[0].shape[1:]), np.float32))
        else:
            self._stage2(np.zeros((m.sequence_length, m.feature_dim), np.float32), np.ones(m.sequence_length, np.float32))
        return time.perf_counter() - t0

    def _stage1(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        feats, logit, heat = self._s1.run(None, {"windows": batch.astype(self._in1, copy=False)})
        return feats.astype(np.float32), logit.astype(np.float32), heat.astype(np.float32)

    def _stage2(self, x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        wl, sl, att = self._s2.run(None, {"features": x[None].astype(self._in2, copy=False),
                                          "mask": mask[None].astype(np.float32)})
        return wl[0].astype(np.float32), sl[0].astype(np.float32), att[0].astype(np.float32)

    def _stage2_shi(self, features: np.ndarray) -> np.ndarray:
        """Shi stage 2 on one study's slab features (n_slabs, C, H, W): its study logit, shape (1,)."""
        (logit,) = self._s2.run(None, {"features": features[None].astype(self._in2, copy=False)})
        return np.asarray(logit, dtype=np.float32).reshape(-1)

    def check_windows(self, windows: Windows) -> None:
        """Raise `InferenceError` when the windows were not made the way the bundle expects."""
        m = self.manifest
        diffs = _same_preprocessing(windows.config, m.preprocessing)
        if diffs:
            raise InferenceError(f"series {windows.series_instance_uid}: preprocessing does not match bundle "
                                 f"{m.name} {m.version}: {'; '.join(diffs)}; preprocess with the bundle's "
                                 "PreprocessConfig (Predictor.manifest.preprocessing)")
        expect = tuple(m.stage1.inputs[0].shape[1:])
        arr = windows.array
        if arr.ndim != 5 or tuple(arr.shape[1:]) != expect or arr.shape[0] < 1:
            raise InferenceError(f"series {windows.series_instance_uid}: windows array has shape {tuple(arr.shape)}; "
                                 f"bundle {m.name} expects (N >= 1, {', '.join(map(str, expect))})")

    def check_available(self) -> None:
        """Raise `BackendUnavailable` when the engine cannot run now (a remote server that does not answer), so a
        job is deferred before its series is loaded and preprocessed; the local engine always can."""

    def predict(self, windows: Windows) -> Prediction:
        self.check_windows(windows)
        if self.manifest.family == "shi2020":
            return self._predict_shi(windows)
        m = self.manifest
        t0 = time.perf_counter()
        arr = np.ascontiguousarray(windows.array, dtype=np.float32)
        n = arr.shape[0]
        feats, logits, heats = [], [], []
        for i in range(0, n, self.batch_size):
            f, lg, h = self._stage1(arr[i:i + self.batch_size])
            feats.append(f)
            logits.append(lg)
            heats.append(h)
        features = np.concatenate(feats)
        stage1_logits = np.concatenate(logits)
        heatmaps = np.concatenate(heats)
        t1 = time.perf_counter()
        seq = to_fixed_length(features, length=m.sequence_length)
        win_logits, study_logits, attention = self._stage2(seq.x, seq.mask)
        t2 = time.perf_counter()

        window_probs = sigmoid(from_fixed_length(win_logits, n))
        study = sigmoid(study_logits)
        study_probs = {k: float(study[i]) for i, k in enumerate(STUDY_LABELS)}
        att = np.stack([from_fixed_length(row, n) for row in attention]).clip(min=0.0)
        sums = att.sum(axis=1, keepdims=True)
        att = np.where(sums > 0, att / np.where(sums > 0, sums, 1.0), 1.0 / n)
        consistent = make_consistent(window_probs, study_probs, m.thresholds)
        total = time.perf_counter() - t0
        pred = Prediction(
            series_instance_uid=windows.series_instance_uid,
            window_probs=window_probs.astype(np.float32),
            study_probs=study_probs,
            attention=att.astype(np.float32),
            heatmaps=np.maximum(heatmaps, 0.0),
            thresholds=dict(m.thresholds),
            window_positive=np.asarray(consistent.window_positive, dtype=bool),
            labels={WINDOW_LABEL: bool(np.any(consistent.window_positive)), **consistent.study},
            model_name=m.name,
            model_version=m.version,
            model_uid=m.model_uid,
            execution_provider=self.execution_provider,
            stage1_probs=sigmoid(stage1_logits).astype(np.float32),
            timings_s={"stage1": t1 - t0, "stage2": t2 - t1, "total": total},
            heatmap_grid=m.heatmap_grid,
        )
        log.info("inference_finished", series_uid=windows.series_instance_uid, windows=n,
                 positive=pred.positive, max_window_prob=round(float(window_probs.max()), 4),
                 provider=self.execution_provider, stage1_s=round(t1 - t0, 3), stage2_s=round(t2 - t1, 3),
                 duration_s=round(total, 3), consistency_changed=list(consistent.changed))
        return pred

    def _predict_shi(self, windows: Windows) -> Prediction:
        """Shi et al. 2020: slabs -> stage 1 (maps, slab logits, attention maps) -> stage 2 over all slabs (module doc)."""
        m = self.manifest
        t0 = time.perf_counter()
        arr = np.ascontiguousarray(windows.array, dtype=np.float32)
        n = arr.shape[0]
        if n != m.sequence_length:
            raise InferenceError(f"series {windows.series_instance_uid}: {n} slabs; bundle {m.name} reads exactly "
                                 f"{m.sequence_length} (preprocess with the bundle's PreprocessConfig)")
        parts = [self._stage1(arr[i:i + self.batch_size]) for i in range(0, n, self.batch_size)]
        features = np.concatenate([p[0] for p in parts])
        slab_probs = sigmoid(np.concatenate([p[1] for p in parts])).astype(np.float32)
        heatmaps = np.maximum(np.concatenate([p[2] for p in parts]), 0.0)
        t1 = time.perf_counter()
        logit = self._stage2_shi(features)
        pe = float(sigmoid(np.asarray(logit, dtype=np.float64))[0])
        t2 = time.perf_counter()
        peaks = heatmaps.reshape(n, -1).max(axis=1).astype(np.float64)
        evidence = peaks / peaks.sum() if peaks.sum() > 0 else np.full(n, 1.0 / n)
        positive = pe >= m.thresholds[WINDOW_LABEL]
        window_positive = np.zeros(n, dtype=bool)
        if positive:
            window_positive = slab_probs >= 0.5
            window_positive[int(np.argmax(slab_probs * evidence))] = True
        total = time.perf_counter() - t0
        pred = Prediction(
            series_instance_uid=windows.series_instance_uid, window_probs=slab_probs, study_probs={},
            attention=evidence[None].astype(np.float32), heatmaps=heatmaps, thresholds=dict(m.thresholds),
            window_positive=window_positive, labels={WINDOW_LABEL: bool(positive)}, model_name=m.name,
            model_version=m.version, model_uid=m.model_uid, execution_provider=self.execution_provider,
            stage1_probs=slab_probs, timings_s={"stage1": t1 - t0, "stage2": t2 - t1, "total": total},
            heatmap_grid=m.heatmap_grid, family="shi2020", pe_probability=pe)
        log.info("inference_finished", series_uid=windows.series_instance_uid, family="shi2020", slabs=n,
                 positive=pred.positive, pe_probability=round(pe, 4), provider=self.execution_provider,
                 stage1_s=round(t1 - t0, 3), stage2_s=round(t2 - t1, 3), duration_s=round(total, 3))
        return pred
