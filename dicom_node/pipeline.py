"""One job: load -> preprocess -> infer -> explain/report -> results to deliver.

`run_job(ctx)` is the product's job body for `dicom_node.engine.worker.Worker`: it loads the spooled
series into a `CtSeries`, preprocesses it with the bundle's own preprocessing parameters, runs the
two ONNX stages through a `Predictor` (cached per bundle and provider settings, so the graphs are
loaded and warmed up once per process; `[inference] engine = "triton"` runs them on a Triton server
instead, `dicom_node.model.triton`), and builds the SR, heatmap Secondary Captures, summary SC
and optional KOS with deterministic UIDs. Delivery, retries and durability are the worker's and
the sender's business.

Incomplete series (docs/results.md): `analyse_series` fills gaps of missing slices up to
`[selection] max_gap_factor` (the SR names them); a series the imaging stages refuse (`SeriesError`,
`PreprocessError`: a gap too wide, too few slices, irregular geometry, no lungs found) is answered
with a "not analysed" SR giving the reason in plain words (`[results] not_analysed_sr`, on by
default; off, the job fails as before). Errors of the node itself (a missing spool file, the model
failing) still fail the job: those are attempts, not answers.

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

import pydicom

from dicom_node.engine.priority import Findings
from dicom_node.engine.worker import JobBody, JobContext, JobResult
from dicom_node.imaging.preprocess import PreprocessError, preprocess
from dicom_node.imaging.series import SeriesError, load_series
from dicom_node.log import get_logger
from dicom_node.model.bundle import default_bundle_path, load_bundle
from dicom_node.model.inference import Predictor
from dicom_node.model.triton import TritonPredictor, TritonSettings
from dicom_node.results import ResultOptions, ResultSet, build_results
from dicom_node.results.incomplete import build_not_analysed_sr
from dicom_node.results.sr import predecessor_reference

if TYPE_CHECKING:
    from dicom_node.config import Config

__all__ = ["JOB_BODY", "run_job", "prepare", "analyse_series", "get_predictor", "predictor_for", "bundle_dir"]

log = get_logger("dicom_node.pipeline")
_predictors: dict[tuple[object, ...], Predictor] = {}
_lock = threading.Lock()


def bundle_dir(configured: str) -> Path:
    """The configured bundle directory, or the bundled demo model when none is configured."""
    return Path(configured).expanduser() if configured else default_bundle_path()


def get_predictor(bundle: str = "", providers: Sequence[str] = ("CUDAExecutionProvider", "CPUExecutionProvider"),
                  require_gpu: bool = False, *, triton: TritonSettings | None = None, **session: Any) -> Predictor:
    """One verified, warmed-up Predictor per (bundle, providers, require_gpu, engine, session options) in this process.

    `session` passes onnxruntime settings through to `Predictor` (intra_op_threads, graph_optimization,
    batch_size, precision). With `triton` settings the stages run on that Triton server instead
    (`TritonPredictor`: the manifest is read from `bundle`, the server checked against it; of the
    session settings only batch_size applies).
    """
    path = bundle_dir(bundle).resolve()
    key = (str(path), tuple(providers), bool(require_gpu), triton, tuple(sorted(session.items())))
    with _lock:
        if key not in _predictors:
            if triton is not None:
                _predictors[key] = TritonPredictor(path, triton, batch_size=int(session.get("batch_size", 8)))
            else:
                _predictors[key] = Predictor(load_bundle(path), providers=providers, require_gpu=require_gpu,
                                             **session)
        return _predictors[key]


def predictor_for(config: Config, bundle: str = "") -> Predictor:
    """The Predictor the configuration asks for (`[inference]`: engine, bundle and its settings); cached."""
    inf = config.inference
    threads = inf.intra_op_threads or None
    triton = TritonSettings.from_config(inf) if inf.engine == "triton" else None
    return get_predictor(bundle or inf.bundle, inf.providers, inf.require_gpu, triton=triton,
                         intra_op_threads=threads, graph_optimization=inf.graph_optimization,
                         batch_size=inf.batch_size, precision=inf.precision)


def prepare(config: Config) -> None:
    """Node start-up: load and verify the bundle, honour require_gpu, warm up; with engine = triton check the
    server, its models and their signatures against the manifest (raises on any failure)."""
    predictor_for(config)


def _options(ctx: JobContext) -> ResultOptions:
    # the worker counts revisions from 1, the result builders from 0
    return ResultOptions.from_config(ctx.config.results, revision=max(0, ctx.revision - 1))


#: the result options of a node with the default configuration
_DEFAULT_OPTIONS = ResultOptions()


def _no_mark(stage: str) -> None:
    """`analyse_series` without stage marks."""


def analyse_series(paths: Iterable[str | Path], predictor: Predictor, options: ResultOptions = _DEFAULT_OPTIONS,
                   *, predecessor_sr_uid: str | None = None, mark: Callable[[str], None] = _no_mark,
                   min_slices: int = 20, max_gap_factor: float = 1.0) -> ResultSet:
    """Library entry point: spooled files of one series -> `ResultSet` (SR first).

    `max_gap_factor` > 1 fills gaps of missing slices up to that many times the median spacing
    (`dicom_node.imaging.series.load_series`); the SR then names them."""
    series = load_series(list(paths), min_slices=min_slices, max_gap_factor=max_gap_factor)
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
    predictor = predictor_for(ctx.config, ctx.bundle)
    predictor.check_available()  # a Triton server that is away: deferred before the series is loaded
    timings: dict[str, float] = {}

    def mark(stage: str) -> None:
        timings[stage] = time.perf_counter() - t0
        ctx.mark(stage)

    options = _options(ctx)
    predecessor = ctx.predecessor_result_uids[0] if ctx.revision > 1 and ctx.predecessor_result_uids else None
    try:
        results = analyse_series(ctx.instance_paths, predictor, options, predecessor_sr_uid=predecessor, mark=mark,
                                 min_slices=ctx.config.selection.min_slices,
                                 max_gap_factor=ctx.config.selection.max_gap_factor)
    except (SeriesError, PreprocessError) as e:
        if not ctx.config.results.not_analysed_sr:
            raise
        return _not_analysed(ctx, predictor, options, predecessor, _plain(e), t0)
    inference_s = timings.get("inferred", 0.0) - timings.get("preprocessed", 0.0)
    log.info("results_built", job_id=ctx.job_id, series_uid=ctx.series_uid, revision=ctx.revision,
             objects=len(results.datasets()), sr_uid=str(results.sr.SOPInstanceUID),
             key_slices=[k.z for k in results.key_slices], provider=predictor.execution_provider,
             preprocess_s=round(timings.get("preprocessed", 0.0), 3), inference_s=round(inference_s, 3),
             total_s=round(time.perf_counter() - t0, 3))
    findings = Findings.from_prediction(results.prediction) if results.prediction is not None else None
    return JobResult(datasets=tuple(results.datasets()), result_uids=results.sop_instance_uids,
                     inference_s=inference_s, findings=findings)


def _plain(e: Exception) -> str:
    """A refusal's reason in plain words (no UIDs): `SeriesError.plain`, else the message after "Series <UID>: "."""
    plain = getattr(e, "plain", None)
    if plain:
        return str(plain)
    text = str(e)
    return text.split(": ", 1)[-1] if text.startswith("Series ") else text


def _not_analysed(ctx: JobContext, predictor: Predictor, options: ResultOptions, predecessor_uid: str | None,
                  reason: str, t0: float) -> JobResult:
    """The short "not analysed" SR for a series the imaging stages refused (module docstring)."""
    headers = []
    for p in ctx.instance_paths:
        try:
            headers.append(pydicom.dcmread(p, stop_before_pixels=True))
        except Exception:  # an unreadable instance is no evidence; the reason already says what is wrong
            continue
    m = predictor.manifest
    predecessor = None
    if predecessor_uid and options.revision > 0:
        predecessor = predecessor_reference(ctx.study_uid, ctx.series_uid, m.model_uid, options.revision, predecessor_uid)
    sr = build_not_analysed_sr(headers, reason, m, series_number=options.sr_series_number,
                               series_description=options.sr_series_description, revision=options.revision,
                               predecessor=predecessor)
    log.warning("series_not_analysed", job_id=ctx.job_id, series_uid=ctx.series_uid, revision=ctx.revision,
                reason=reason, sr_uid=str(sr.SOPInstanceUID), total_s=round(time.perf_counter() - t0, 3))
    return JobResult(datasets=(sr,), result_uids=(str(sr.SOPInstanceUID),), summary={"not_analysed": True})


#: the product's job body: `run_job` per job, `prepare` once at node start (before accepting studies)
JOB_BODY = JobBody(run=run_job, prepare=prepare)
