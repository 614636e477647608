"""One job: load -> preprocess -> infer -> explain/report -> results to deliver.

`run_job(ctx)` is the product's job body for `dicom_node.engine.worker.Worker`: it loads the spooled
series into a `CtSeries`, preprocesses it with the bundle's own preprocessing parameters, runs the
two ONNX stages through a `Predictor` (cached per bundle and provider settings, so the graphs are
loaded and warmed up once per process), and builds the SR, heatmap Secondary Captures, summary SC
and optional KOS with deterministic UIDs. Delivery, retries and durability are the worker's and
the sender's business.

`JOB_BODY` is what the node runs by default: `run_job` per job and `prepare` once at start (load
and verify the bundle, honour `require_gpu`, warm the graphs up), so a broken bundle or a missing
GPU stops `Node.start` instead of failing the first study.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.engine.priority import Findings
from dicom_node.engine.worker import JobBody, JobContext, JobResult
from dicom_node.imaging.preprocess import preprocess
from dicom_node.imaging.series import load_series
from dicom_node.log import get_logger
from dicom_node.model.bundle import default_bundle_path, load_bundle
from dicom_node.model.inference import Predictor
from dicom_node.results import ResultOptions, ResultSet, build_results
from dicom_node.results.sr import predecessor_reference

if TYPE_CHECKING:
    from dicom_node.config import Config

__all__ = ["JOB_BODY", "run_job", "prepare", "analyse_series", "get_predictor", "bundle_dir"]

log = get_logger("dicom_node.pipeline")
_predictors: dict[tuple[object, ...], Predictor] = {}
_lock = threading.Lock()


def bundle_dir(configured: str) -> Path:
    """The configured bundle directory, or the bundled demo model when none is configured."""
    return Path(configured).expanduser() if configured else default_bundle_path()


def get_predictor(bundle: str = "", providers: Sequence[str] = ("CUDAExecutionProvider", "CPUExecutionProvider"),
                  require_gpu: bool = False, **session: Any) -> Predictor:
    """One verified, warmed-up Predictor per (bundle, providers, require_gpu, session options) in this process.

    `session` passes onnxruntime settings through to `Predictor` (intra_op_threads, graph_optimization,
    batch_size, precision).
    """
    path = bundle_dir(bundle).resolve()
    key = (str(path), tuple(providers), bool(require_gpu), tuple(sorted(session.items())))
    with _lock:
        if key not in _predictors:
            _predictors[key] = Predictor(load_bundle(path), providers=providers, require_gpu=require_gpu, **session)
        return _predictors[key]


def _predictor_for(config: Config, bundle: str = "") -> Predictor:
    inf = config.inference
    threads = inf.intra_op_threads or None
    return get_predictor(bundle or inf.bundle, inf.providers, inf.require_gpu, intra_op_threads=threads,
                         graph_optimization=inf.graph_optimization, batch_size=inf.batch_size,
                         precision=inf.precision)


def prepare(config: Config) -> None:
    """Node start-up: load and verify the bundle, honour require_gpu, warm up (raises on any failure)."""
    _predictor_for(config)


def _options(ctx: JobContext) -> ResultOptions:
    # the worker counts revisions from 1, the result builders from 0
    return ResultOptions.from_config(ctx.config.results, revision=max(0, ctx.revision - 1))


#: the result options of a node with the default configuration
_DEFAULT_OPTIONS = ResultOptions()


def _no_mark(stage: str) -> None:
    """`analyse_series` without stage marks."""


def analyse_series(paths: Iterable[str | Path], predictor: Predictor, options: ResultOptions = _DEFAULT_OPTIONS,
                   *, predecessor_sr_uid: str | None = None, mark: Callable[[str], None] = _no_mark) -> ResultSet:
    """Library entry point: spooled files of one series -> `ResultSet` (SR first)."""
    series = load_series(list(paths))
    m = predictor.manifest
    windows = preprocess(series, m.preprocessing)
    mark("preprocessed")
    prediction = predictor.predict(windows)
    mark("inferred")
    predecessor = None
    if predecessor_sr_uid and options.revision > 0:
        predecessor = predecessor_reference(series.study_instance_uid, series.series_instance_uid, m.model_uid,
                                            options.revision, predecessor_sr_uid)
    return build_results(series, windows, prediction, m, options, predecessor=predecessor)


def run_job(ctx: JobContext) -> JobResult:
    """The worker's job body (see module docstring)."""
    t0 = time.perf_counter()
    predictor = _predictor_for(ctx.config, ctx.bundle)
    timings: dict[str, float] = {}

    def mark(stage: str) -> None:
        timings[stage] = time.perf_counter() - t0
        ctx.mark(stage)

    predecessor = ctx.predecessor_result_uids[0] if ctx.revision > 1 and ctx.predecessor_result_uids else None
    results = analyse_series(ctx.instance_paths, predictor, _options(ctx), predecessor_sr_uid=predecessor, mark=mark)
    inference_s = timings.get("inferred", 0.0) - timings.get("preprocessed", 0.0)
    log.info("results_built", job_id=ctx.job_id, series_uid=ctx.series_uid, revision=ctx.revision,
             objects=len(results.datasets()), sr_uid=str(results.sr.SOPInstanceUID),
             key_slices=[k.z for k in results.key_slices], provider=predictor.execution_provider,
             preprocess_s=round(timings.get("preprocessed", 0.0), 3), inference_s=round(inference_s, 3),
             total_s=round(time.perf_counter() - t0, 3))
    findings = Findings.from_prediction(results.prediction) if results.prediction is not None else None
    return JobResult(datasets=tuple(results.datasets()), result_uids=results.sop_instance_uids,
                     inference_s=inference_s, findings=findings)


#: the product's job body: `run_job` per job, `prepare` once at node start (before accepting studies)
JOB_BODY = JobBody(run=run_job, prepare=prepare)
