"""The remote engine: a bundle's two stages run on an NVIDIA Triton Inference Server (KServe v2 protocol).

`TritonPredictor` is a `Predictor` (same `predict`, same `Prediction`; everything downstream is
unchanged) whose two stages are requests to a Triton server instead of local onnxruntime sessions:
stage 1 in batches of `batch_size` windows (Ma) or slabs (Shi) (at most the server's `max_batch_size`),
stage 2 once per study (Ma: the fixed-length feature sequence and its mask; Shi: the feature maps of all
slabs). Triton batches the requests of several nodes dynamically on its GPUs.

The repository the server serves is written by `dicom-node-export triton` (`dicom_node_export.triton`):
models `<model>_stage1` and `<model>_stage2` (`<model>` = `triton_model_name(manifest)`, the bundle's
name and version unless the export named it otherwise), each carrying in its config `parameters`
the bundle's version, model UID and the sha256 of the ONNX graph it serves (`PARAM_*`). The node
reads the manifest only (`inference.bundle` = the bundle directory or the repository's
`<model>.manifest.json`) and at start checks, before it accepts any study:

- the server is live (one request within `triton_timeout_s`);
- both models are ready;
- their config parameters name this bundle's version, model UID and graph sha256 (so a node never
  reports results of a graph other than the one its manifest describes);
- their input/output names, datatypes and dims equal the manifest's graph specs (`triton_dims`).

Any difference refuses the start with one line naming the model, what differs and the fix, as a bad
bundle does (`InferenceError`). A server that does not answer at all (its port refuses or drops the
connection: stopped, restarting, unreachable) does not stop the node (`wait_at_start`, the default of
`[inference] triton_wait_at_start`): it starts and receives, logs `triton_unavailable_at_start`, and runs
the start checks when a job first needs the server (until then jobs are deferred). When the port accepts
connections but the client cannot talk to the server (protocol, TLS settings), that is a setting, not an
outage, and the start is refused. During a job a failed request (server gone, timeout, model unloaded)
names the server, the model and the cause. When the server then does not answer a liveness check either
(stopped, restarting, unreachable) it raises `BackendUnavailable`: the worker defers the job and runs it
again by itself (`[worker] retry_unavailable_s`, `retry_unavailable_max`). When the server is live (the
model unloaded, a request it refused) it raises `InferenceError`: the job fails like any other job
failure, keeps its spooled instances and is run again by `dicom-node resend` (or a re-sent instance).

`tritonclient` (the `[triton]` extra) is imported only here and only when the engine is used. One
client per thread: the HTTP client (geventhttpclient) must not be shared between OS threads, and the
worker runs `worker.concurrency` jobs on their own threads.
"""

from __future__ import annotations

import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dicom_node.log import get_logger
from dicom_node.model.bundle import Bundle, BundleManifest, GraphSpec, TensorSpec, load_manifest_only
from dicom_node.model.inference import BackendUnavailable, InferenceError, Prediction, Predictor

if TYPE_CHECKING:
    from dicom_node.config import InferenceConfig
    from dicom_node.imaging.preprocess import Windows

__all__ = ["TritonSettings", "TritonPredictor", "triton_model_name", "triton_dims", "triton_datatype",
           "PARAM_BUNDLE_NAME", "PARAM_BUNDLE_VERSION", "PARAM_MODEL_UID", "PARAM_ONNX_SHA256", "PARAM_STAGE",
           "STAGES"]

log = get_logger("dicom_node.model.triton")

#: config.pbtxt `parameters` the export writes and the node checks (string values)
PARAM_BUNDLE_NAME = "bundle_name"
PARAM_BUNDLE_VERSION = "bundle_version"
PARAM_MODEL_UID = "model_uid"
PARAM_ONNX_SHA256 = "onnx_sha256"
PARAM_STAGE = "stage"
STAGES = ("stage1", "stage2")
_DATATYPES = {"float32": "FP32", "float16": "FP16"}


def triton_model_name(manifest: BundleManifest) -> str:
    """The default Triton model name prefix of a bundle: `<name>-<version>`, characters outside
    `[A-Za-z0-9_.-]` replaced by `_`, so two versions of one model sit side by side in one repository."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{manifest.name}-{manifest.version}")


def triton_dims(spec: TensorSpec) -> tuple[int, ...]:
    """The Triton `dims` of a batched tensor: the manifest shape without its batch dim, symbolic dims as -1.
    A tensor that is only the batch dim (the stage-1 `window_logit`) is `[1]` (the export reshapes it to `[]`)."""
    dims = tuple(d if isinstance(d, int) else -1 for d in spec.shape[1:])
    return dims or (1,)


def triton_datatype(spec: TensorSpec) -> str:
    """The KServe v2 datatype of a manifest tensor (FP32 or FP16)."""
    return _DATATYPES[spec.dtype]


@dataclass(frozen=True)
class TritonSettings:
    """Where the Triton server is and how to talk to it (the `[inference] triton_*` keys).

    `url` is `host:port` (gRPC port 8001 or HTTP port 8000 of the official container); `model` empty
    = `triton_model_name(manifest)`; `timeout_s` bounds every request (start checks and inference);
    `tls` with `ca` (server verification) and optionally `cert`/`key` (client certificate).
    """

    url: str = "127.0.0.1:8001"
    protocol: str = "grpc"
    model: str = ""
    timeout_s: float = 30.0
    tls: bool = False
    ca: str = ""
    cert: str = ""
    key: str = ""
    #: a server that does not answer at start: True starts without it (module docstring); False refuses the start
    wait_at_start: bool = True

    @classmethod
    def from_config(cls, inf: InferenceConfig) -> TritonSettings:
        return cls(url=inf.triton_url, protocol=inf.triton_protocol, model=inf.triton_model,
                   timeout_s=inf.triton_timeout_s, tls=inf.triton_tls, ca=inf.triton_ca, cert=inf.triton_cert,
                   key=inf.triton_key, wait_at_start=inf.triton_wait_at_start)

    @property
    def where(self) -> str:
        """The server as logs and messages name it, e.g. `grpc://127.0.0.1:8001` (TLS: `grpcs://`)."""
        scheme = {"grpc": "grpc", "http": "http"}[self.protocol] + ("s" if self.tls else "")
        return f"{scheme}://{self.url}"


class _Client:
    """The few KServe v2 calls the node makes, over gRPC or HTTP, answers normalised to plain dicts."""

    def __init__(self, s: TritonSettings) -> None:
        self.s = s
        try:
            if s.protocol == "grpc":
                import tritonclient.grpc as mod
            else:
                import tritonclient.http as mod
        except ImportError as exc:
            raise InferenceError(f"inference.engine = triton needs the Triton client ({exc}); install the [triton] "
                                 "extra: pip install -c constraints.txt 'dicom-node-pe[triton]'") from None
        self.mod = mod
        if s.protocol == "grpc":
            self.c: Any = mod.InferenceServerClient(
                s.url, ssl=s.tls, root_certificates=s.ca or None, private_key=s.key or None,
                certificate_chain=s.cert or None)
        else:
            ssl_options = {k: v for k, v in (("ca_certs", s.ca), ("certfile", s.cert), ("keyfile", s.key)) if v}
            self.c = mod.InferenceServerClient(s.url, ssl=s.tls, ssl_options=ssl_options or None,
                                               connection_timeout=s.timeout_s, network_timeout=s.timeout_s)

    def _kw(self) -> dict[str, Any]:
        # gRPC takes a deadline per call; the HTTP client's timeouts were set when it was made
        return {"client_timeout": self.s.timeout_s} if self.s.protocol == "grpc" else {}

    def live(self) -> bool:
        return bool(self.c.is_server_live(**self._kw()))

    def ready(self, model: str) -> bool:
        return bool(self.c.is_model_ready(model, **self._kw()))

    def config(self, model: str) -> dict[str, Any]:
        cfg = self.c.get_model_config(model, as_json=True, **self._kw()) if self.s.protocol == "grpc" \
            else self.c.get_model_config(model)
        return dict(cfg.get("config", cfg))

    def metadata(self, model: str) -> dict[str, Any]:
        meta = self.c.get_model_metadata(model, as_json=True, **self._kw()) if self.s.protocol == "grpc" \
            else self.c.get_model_metadata(model)
        return dict(meta)

    def infer(self, model: str, feed: dict[str, np.ndarray], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        inputs = []
        for name, arr in feed.items():
            t = self.mod.InferInput(name, list(arr.shape), "FP16" if arr.dtype == np.float16 else "FP32")
            t.set_data_from_numpy(arr)
            inputs.append(t)
        wanted = [self.mod.InferRequestedOutput(n) for n in outputs]
        res = self.c.infer(model, inputs, outputs=wanted, **self._kw())
        return {n: res.as_numpy(n) for n in outputs}


class TritonPredictor(Predictor):
    """A `Predictor` whose stages run on a Triton server (see the module docstring for the start checks).

    `bundle` is a `Bundle`, a bundle directory or a `<model>.manifest.json` file; `batch_size` is the
    stage-1 request size (capped at the server's `max_batch_size`); `warmup` sends one window and one
    sequence at start, so a model that loads but cannot run refuses the start too.
    """

    def __init__(self, bundle: Bundle | str | Path, settings: TritonSettings, *, batch_size: int = 8,
                 warmup: bool = True) -> None:
        if settings.protocol not in ("grpc", "http"):
            raise InferenceError(f"triton protocol '{settings.protocol}' is not one of grpc, http")
        if batch_size < 1:
            raise InferenceError(f"batch_size must be >= 1, got {batch_size}")
        self.bundle = bundle if isinstance(bundle, Bundle) else load_manifest_only(bundle)
        self.manifest = m = self.bundle.manifest
        self.settings = settings
        self.precision = "fp32"
        self.execution_provider = f"triton {settings.where}"
        prefix = settings.model or triton_model_name(m)
        self.models = {stage: f"{prefix}_{stage}" for stage in STAGES}
        self._local = threading.local()
        self.batch_size, self._warmup = batch_size, warmup
        self._connected = False
        self._connect_lock = threading.Lock()
        try:
            self._connect()
        except BackendUnavailable as e:
            if not settings.wait_at_start:
                raise
            if _port_open(settings.url, settings.timeout_s):  # something answers there: a setting, not an outage
                raise InferenceError(f"{e}; its port accepts connections, so the server is up and the client "
                                     "settings do not match it: check inference.triton_protocol and the "
                                     "triton_tls/ca/cert/key settings") from None
            log.warning("triton_unavailable_at_start", server=settings.where, error=str(e),
                        note="the node starts and receives; jobs wait for the server (job_deferred), and the "
                             "server is checked against the manifest when it first answers")

    def check_available(self) -> None:
        """The start checks when they have not run yet (a start without the server), else one liveness request:
        `BackendUnavailable` when the server does not answer, before the job loads its series."""
        if not self._connected:
            with self._connect_lock:
                if not self._connected:
                    self._connect()
        elif not self._live():
            raise self._refuse(f"does not answer a liveness request; {_RUNS_AGAIN}", unavailable=True)

    def predict(self, windows: Windows) -> Prediction:
        """As `Predictor.predict`; the first call after a start without the server runs the start checks first."""
        if not self._connected:
            self.check_available()
        return super().predict(windows)

    def _connect(self) -> None:
        """The start checks (`_check_server`), the batch cap and the warm-up; `BackendUnavailable` when the
        server does not answer, `InferenceError` when it answers with other models than the manifest's."""
        m = self.manifest
        requested = self.batch_size
        max_batch = self._check_server()
        self.batch_size = min(requested, max_batch)
        if self.batch_size < requested:
            log.info("triton_batch_capped", requested=requested, max_batch_size=max_batch, model=self.models["stage1"])
        warm_s = self._warm_up() if self._warmup else 0.0
        self._connected = True
        log.info("model_loaded", engine="triton", server=self.settings.where, models=list(self.models.values()),
                 model_name=m.name, model_version=m.version, model_uid=m.model_uid, batch_size=self.batch_size,
                 warmup_s=round(warm_s, 3))

    # ------------------------------------------------------------------------------------------ start checks

    def _client(self) -> _Client:
        c: _Client | None = getattr(self._local, "client", None)
        if c is None:
            c = self._local.client = _Client(self.settings)
        return c

    def _drop_client(self) -> None:
        c: _Client | None = getattr(self._local, "client", None)
        self._local.client = None
        if c is not None:
            try:
                c.c.close()
            except Exception:  # closing a broken connection may fail too; the new client does not need it
                pass

    def _live(self) -> bool:
        """Whether the server answers a liveness request now (a fresh connection; any error is a no)."""
        try:
            return self._client().live()
        except Exception:  # tritonclient raises its own and socket errors: all mean "not answering"
            self._drop_client()
            return False

    def _refuse(self, what: str, *, unavailable: bool = False) -> InferenceError:
        """`InferenceError` naming the server and `what`; `BackendUnavailable` (the job is deferred) when the
        server does not answer (`unavailable`)."""
        return (BackendUnavailable if unavailable else InferenceError)(f"Triton server {self.settings.where}: {what}")

    def _check_server(self) -> int:
        """Live, both models ready, parameters and signatures equal to the manifest; returns stage 1's max batch."""
        m, c = self.manifest, self._client()
        try:
            live = c.live()
        except Exception as exc:  # tritonclient raises its own and socket errors
            self._drop_client()
            raise self._refuse(f"not reachable ({_cause(exc)}); start the server or fix inference.triton_url and "
                               "inference.triton_protocol", unavailable=True) from None
        if not live:
            raise self._refuse("is not live; check the server's log", unavailable=True)
        max_batch = 0
        for stage, graph in (("stage1", m.stage1), ("stage2", m.stage2)):
            name = self.models[stage]
            try:
                ready = c.ready(name)
                cfg = c.config(name) if ready else {}
                meta = c.metadata(name) if ready else {}
            except Exception as exc:
                raise self._refuse(f"model {name}: {_cause(exc)}; generate the repository with "
                                   "`dicom-node-export triton BUNDLE --out REPO` and serve it") from None
            if not ready:
                raise self._refuse(f"model {name} is not ready (not in the repository, or it failed to load); "
                                   f"serve the repository `dicom-node-export triton` wrote for bundle {m.name} "
                                   f"{m.version}, or set inference.triton_model to its model name")
            self._check_parameters(name, stage, graph, cfg)
            self._check_signature(name, graph, meta)
            if stage == "stage1":
                max_batch = int(cfg.get("max_batch_size") or 0)
            elif int(cfg.get("max_batch_size") or 0) < 1:
                raise self._refuse(f"model {name} has max_batch_size {cfg.get('max_batch_size')!r}; expected >= 1")
        if max_batch < 1:
            raise self._refuse(f"model {self.models['stage1']} has max_batch_size {max_batch}; expected >= 1 "
                               "(dicom-node-export triton --max-batch N)")
        return max_batch

    def _check_parameters(self, name: str, stage: str, graph: GraphSpec, cfg: dict[str, Any]) -> None:
        m = self.manifest
        params = {k: (v or {}).get("string_value", "") for k, v in (cfg.get("parameters") or {}).items()}
        expect = {PARAM_BUNDLE_VERSION: m.version, PARAM_MODEL_UID: m.model_uid,
                  PARAM_ONNX_SHA256: m.files.get(graph.file, ""), PARAM_STAGE: stage}
        for key, want in expect.items():
            have = params.get(key)
            if have is None:
                raise self._refuse(f"model {name} has no config parameter '{key}'; it was not made from this bundle "
                                   f"by `dicom-node-export triton`; regenerate the repository from bundle {m.name} "
                                   f"{m.version}")
            if have != want:
                raise self._refuse(f"model {name} serves {key} {have!r} but bundle {m.name} {m.version} "
                                   f"({self.bundle.path}) has {want!r}; serve the repository generated from this "
                                   "bundle, or point inference.bundle at the manifest of the served one")

    def _check_signature(self, name: str, graph: GraphSpec, meta: dict[str, Any]) -> None:
        for kind, specs in (("inputs", graph.inputs), ("outputs", graph.outputs)):
            served = [(str(t.get("name")), str(t.get("datatype")), tuple(int(d) for d in t.get("shape", ())))
                      for t in meta.get(kind, [])]
            expect = [(s.name, triton_datatype(s), (-1, *triton_dims(s))) for s in specs]
            if sorted(served) != sorted(expect):
                raise self._refuse(f"model {name} {kind} are {_sig(served)}; bundle {self.manifest.name} "
                                   f"{self.manifest.version} needs {_sig(expect)}; regenerate the repository with "
                                   "dicom-node-export triton")

    # ------------------------------------------------------------------------------------------ the stages

    def _run(self, stage: str, feed: dict[str, np.ndarray], graph: GraphSpec) -> list[np.ndarray]:
        name = self.models[stage]
        try:
            out = self._client().infer(name, feed, tuple(s.name for s in graph.outputs))
        except Exception as exc:
            # a fresh connection for the next request of this thread: a gRPC channel to a server that went away
            # backs off before it reconnects, and the job's re-run should find the server as soon as it is back
            self._drop_client()
            failed = f"{stage} request to model {name} failed ({_cause(exc)})"
            if not self._live():
                raise self._refuse(f"{failed}; the server does not answer: {_RUNS_AGAIN}", unavailable=True) from None
            raise self._refuse(f"{failed}; the server is live: check its log, then `dicom-node resend` runs the job "
                               "again") from None
        batch = next(iter(feed.values())).shape[0]
        arrays = []
        for spec in graph.outputs:
            dims = tuple(d for d in spec.shape[1:] if isinstance(d, int))
            arr = np.asarray(out[spec.name], dtype=np.float32)
            arrays.append(arr.reshape(batch, *dims) if len(dims) == len(spec.shape) - 1 else arr)
        return arrays

    def _stage1(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g = self.manifest.stage1
        feats, logit, heat = self._run("stage1", {"windows": np.ascontiguousarray(batch, dtype=np.float32)}, g)
        return feats, logit, heat

    def _stage2(self, x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g = self.manifest.stage2
        feed = {"features": np.ascontiguousarray(x[None], dtype=np.float32),
                "mask": np.ascontiguousarray(mask[None], dtype=np.float32)}
        wl, sl, att = self._run("stage2", feed, g)
        return wl[0], sl[0], att[0]

    def _stage2_shi(self, features: np.ndarray) -> np.ndarray:
        # one request per study: the whole study's slab features (Shi's Conv-LSTM reads them all at once)
        (logit,) = self._run("stage2", {"features": np.ascontiguousarray(features[None], dtype=np.float32)},
                             self.manifest.stage2)
        return logit.reshape(-1)


#: what a deferred job does (`BackendUnavailable`), in the messages that defer it
_RUNS_AGAIN = "the job runs again by itself ([worker] retry_unavailable_s) or at once with `dicom-node resend`"


def _port_open(url: str, timeout_s: float) -> bool:
    """Whether a TCP connection to `url` (HOST:PORT) is accepted within `timeout_s` (at most 5 s)."""
    host, _, port = url.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=min(timeout_s, 5.0)).close()
        return True
    except (OSError, ValueError):
        return False


def _cause(exc: BaseException) -> str:
    """One line: the exception's type and first line (tritonclient's messages can run to many lines)."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


def _sig(items: list[tuple[str, str, tuple[int, ...]]]) -> str:
    return ", ".join(f"{n} {dt} {list(shape)}" for n, dt, shape in items)
