"""Typed, validated node configuration: TOML file, then environment, then command line.

Precedence (last wins): built-in defaults < TOML file < environment < CLI overrides.

* TOML: top-level keys are the node's own (`ae_title`, `port`, ...); sections `[timeouts]`,
  `[tls]`, `[retry]`, `[spool]`, `[worker]`, `[selection]`, `[results]`, `[inference]`, `[log]`,
  `[health]`, `[priority]`, `[notify]`, `[web]`;
  arrays of tables `[[destinations]]` and `[[peers]]`.
* Environment: `DICOM_NODE_<KEY>` for top-level keys (`DICOM_NODE_PORT=11112`) and
  `DICOM_NODE_<SECTION>_<KEY>` for section keys (`DICOM_NODE_RETRY_MAX_ATTEMPTS=5`).
  Lists are comma-separated; destinations/peers as `AE@HOST:PORT[,AE@HOST:PORT]`.
* CLI: `load_config(path, overrides={"port": 0, "retry.max_attempts": 3})`.

Every key is declared once below with its default and its meaning (field metadata `doc`);
`default_config_toml()` and `configuration_markdown()` are generated from those declarations, so
the documentation cannot drift from the code. Validation runs in `load_config`; a bad value
raises `ConfigError` naming the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from dicom_node.model import builtin_bundle_path

__all__ = [
    "Config", "ConfigError", "Destination", "TimeoutConfig", "TlsConfig", "RetryConfig",
    "SpoolConfig", "WorkerConfig", "SelectionConfig", "ResultsConfig", "InferenceConfig",
    "LogConfig", "HealthConfig", "PriorityConfig", "NotifyConfig", "WebConfig", "PRIORITY_VALUES", "load_config", "parse_destination", "default_config_toml",
    "configuration_markdown", "ENV_PREFIX", "insecure_files",
]

ENV_PREFIX = "DICOM_NODE_"
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # default character repertoire, no backslash


class ConfigError(ValueError):
    """A configuration value is not allowed; the message names key, value and what is allowed."""


def _doc(text: str, **kw: Any) -> dict[str, Any]:
    return {"doc": text, **kw}


@dataclass(frozen=True)
class Destination:
    """A DICOM peer results are sent to (`AE@HOST:PORT`)."""

    ae_title: str = field(metadata=_doc("Called AE title of the peer"))
    host: str = field(metadata=_doc("Host name or IP address of the peer"))
    port: int = field(metadata=_doc("TCP port of the peer"))
    tls: bool = field(default=False, metadata=_doc("Use DICOM TLS (the [tls] cert/key/ca) for this peer"))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """How the node stores and shows the peer (a delivery row, `dicom-node status`): AE@HOST:PORT, with
        `+tls` for a TLS peer, so that a delivery stays on TLS whatever the configuration says later
        (`parse_destination` reads it back)."""
        return f"{self}+tls" if self.tls else str(self)


def parse_destination(text: str, key: str = "destination") -> Destination:
    """Parse `AE@HOST:PORT` (append `+tls` for TLS) into a `Destination`."""
    tls = text.endswith("+tls")
    core = text[:-4] if tls else text
    m = re.fullmatch(r"([^@]{1,16})@(.+):(\d{1,5})", core.strip())
    if not m:
        raise ConfigError(f"{key}: {text!r} is not AE@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242)")
    d = Destination(m.group(1), m.group(2), int(m.group(3)), tls)
    _check_destination(d, key)
    return d


def _check_destination(d: Destination, key: str) -> None:
    if not _AE_RE.match(d.ae_title) or not d.ae_title.strip():
        raise ConfigError(f"{key}.ae_title: {d.ae_title!r} is not an AE title (1-16 printable ASCII characters, no backslash)")
    if not d.host:
        raise ConfigError(f"{key}.host: empty; give a host name or IP address")
    if not 1 <= d.port <= 65535:
        raise ConfigError(f"{key}.port: {d.port} is outside 1-65535")


@dataclass(frozen=True)
class TimeoutConfig:
    acse_s: float = field(default=30.0, metadata=_doc("Seconds to wait for association negotiation/release messages"))
    dimse_s: float = field(default=60.0, metadata=_doc("Seconds to wait for a DIMSE message (e.g. a C-STORE response)"))
    network_s: float = field(default=60.0, metadata=_doc("Seconds an idle association is kept open before it is aborted; also the most one PDU may take to arrive"))
    associate_s: float = field(default=10.0, metadata=_doc("Seconds from accepting a connection to its complete A-ASSOCIATE-RQ, TLS handshake included; a slower connection is closed"))


@dataclass(frozen=True)
class TlsConfig:
    enabled: bool = field(default=False, metadata=_doc("Accept DICOM TLS instead of plain TCP on `port` (needs cert and key)"))
    cert: str = field(default="", metadata=_doc("PEM certificate of this node (server side and as client for TLS destinations)"))
    key: str = field(default="", metadata=_doc("PEM private key for `cert`"))
    ca: str = field(default="", metadata=_doc("PEM CA bundle used to verify peers (clients when verify_client, servers when sending)"))
    verify_client: bool = field(default=False, metadata=_doc("Require and verify a client certificate signed by `ca`"))


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = field(default=8, metadata=_doc("Delivery attempts per destination before the delivery is kept as failed"))
    base_delay_s: float = field(default=2.0, metadata=_doc("First retry delay; doubles each attempt (with +-25 % jitter)"))
    max_delay_s: float = field(default=300.0, metadata=_doc("Cap on the retry delay"))


@dataclass(frozen=True)
class SpoolConfig:
    keep_days: float = field(default=7.0, metadata=_doc("Delete spooled instances of delivered series older than this many days (0 = keep forever)"))
    delete_after_delivery: bool = field(default=False, metadata=_doc("Delete a series' spooled instances as soon as its results are delivered"))


@dataclass(frozen=True)
class WorkerConfig:
    concurrency: int = field(default=1, metadata=_doc("Jobs run at the same time (each job may use several cores)"))
    poll_s: float = field(default=0.2, metadata=_doc("How often the completion scheduler and the queues are polled"))
    retry_unavailable_s: float = field(default=30.0, metadata=_doc("Wait before a job whose inference backend (a Triton server) did not answer runs again; doubles with each try, at most 15 minutes"))
    retry_unavailable_max: int = field(default=10, metadata=_doc("Tries after the first for a job whose inference backend does not answer (about 90 minutes with the default wait); then the job fails and `dicom-node resend` runs it with fresh tries (a restart keeps the count). 0 = fail at once"))


@dataclass(frozen=True)
class SelectionConfig:
    modality: str = field(default="CT", metadata=_doc("Required Modality"))
    image_type: tuple[str, ...] = field(default=("ORIGINAL", "PRIMARY", "AXIAL"), metadata=_doc("Values that must all appear in ImageType (empty = any)"))
    min_slice_thickness_mm: float = field(default=0.0, metadata=_doc("Smallest accepted SliceThickness"))
    max_slice_thickness_mm: float = field(default=3.0, metadata=_doc("Largest accepted SliceThickness (thin CTPA reconstructions)"))
    min_slices: int = field(default=20, metadata=_doc("Fewest instances a series needs"))
    description_include: tuple[str, ...] = field(default=(), metadata=_doc("Regexes; when not empty SeriesDescription must match one (case-insensitive)"))
    description_exclude: tuple[str, ...] = field(default=("localizer", "scout", "topogram", "dose"), metadata=_doc("Regexes; a SeriesDescription matching one is skipped (case-insensitive)"))
    require_contrast: bool = field(default=False, metadata=_doc("Skip series without ContrastBolusAgent"))
    max_gap_factor: float = field(default=2.5, metadata=_doc("Missing slices: a gap between slices up to this many times the median slice spacing (a multiple of it) is filled by interpolation and named in the SR; a larger gap makes the series \"not analysed\" (1 = no gap allowed)"))


@dataclass(frozen=True)
class ResultsConfig:
    series_number: int = field(default=9901, metadata=_doc("SeriesNumber of result series"))
    series_description: str = field(default="PE detection (research use only)", metadata=_doc("SeriesDescription of result series"))
    send_kos: bool = field(default=False, metadata=_doc("Also send a Key Object Selection pointing at the key slices"))
    top_k_heatmaps: int = field(default=3, metadata=_doc("Number of Grad-CAM Secondary Capture images sent"))
    heatmaps_for_negative: bool = field(default=False, metadata=_doc("Also send heatmap Secondary Captures for a study called PE absent (their captions say \"below threshold: not a finding\")"))
    omit_weak_labels: bool = field(default=False, metadata=_doc("Leave labels the bundle marks weak (validation AUROC below its floor) out of the SR instead of reporting them marked \"not validated\""))
    not_analysed_sr: bool = field(default=True, metadata=_doc("When a selected series cannot be analysed (slices missing beyond selection.max_gap_factor, too few slices, irregular geometry), send a short \"not analysed\" SR saying why instead of nothing (false = the job fails, listed by `dicom-node status`)"))


@dataclass(frozen=True)
class InferenceConfig:
    engine: str = field(default="onnxruntime", metadata=_doc("Where the two ONNX stages run: onnxruntime (in the node process) or triton (an NVIDIA Triton Inference Server at triton_url, serving the repository `dicom-node-export triton` wrote; docs/scaling.md)"))
    bundle: str = field(default="", metadata=_doc("Model bundle directory (empty = the bundled demo model; `builtin:ma2022` or `builtin:shi2020` = a shipped demo model); with engine = triton also the repository's <model>.manifest.json"))
    providers: tuple[str, ...] = field(default=("CUDAExecutionProvider", "CPUExecutionProvider"), metadata=_doc("onnxruntime execution providers in order of preference"))
    require_gpu: bool = field(default=False, metadata=_doc("Refuse to start when the CUDA provider is not available"))
    intra_op_threads: int = field(default=0, metadata=_doc("onnxruntime intra-op threads per session (0 = onnxruntime's default: all cores)"))
    graph_optimization: str = field(default="all", metadata=_doc("onnxruntime graph optimisation level: disable, basic, extended or all"))
    batch_size: int = field(default=8, metadata=_doc("Windows per stage-1 run (larger uses more memory, can be faster on a GPU)"))
    precision: str = field(default="auto", metadata=_doc("auto (float16 graphs on CUDA when the bundle has them), fp32 or fp16"))
    triton_url: str = field(default="127.0.0.1:8001", metadata=_doc("engine = triton: HOST:PORT of the Triton server (gRPC 8001 or HTTP 8000 by default)"))
    triton_protocol: str = field(default="grpc", metadata=_doc("engine = triton: grpc or http (KServe v2 protocol)"))
    triton_model: str = field(default="", metadata=_doc("engine = triton: model name prefix on the server (<prefix>_stage1, <prefix>_stage2); empty = <bundle name>-<bundle version>, as dicom-node-export triton names them"))
    triton_wait_at_start: bool = field(default=True, metadata=_doc("engine = triton: when the server does not answer at start, start anyway (triton_unavailable_at_start): the node receives and spools, jobs wait for the server (job_deferred) and the server is checked against the manifest when it first answers; false = refuse to start (exit status 2). A server that answers with other models than the manifest's always refuses the start"))
    triton_timeout_s: float = field(default=30.0, metadata=_doc("engine = triton: seconds one request (start checks, one stage-1 batch, stage 2) may take before the job fails"))
    triton_tls: bool = field(default=False, metadata=_doc("engine = triton: talk TLS to the server (gRPC; HTTP behind a TLS proxy)"))
    triton_ca: str = field(default="", metadata=_doc("engine = triton, triton_tls: PEM CA bundle that verifies the server (empty = the system's)"))
    triton_cert: str = field(default="", metadata=_doc("engine = triton, triton_tls: PEM client certificate when the server requires one"))
    triton_key: str = field(default="", metadata=_doc("engine = triton, triton_tls: PEM private key of triton_cert"))


@dataclass(frozen=True)
class LogConfig:
    json: bool = field(default=True, metadata=_doc("JSON log lines (false = human-readable console)"))
    level: str = field(default="INFO", metadata=_doc("DEBUG, INFO, WARNING or ERROR"))


@dataclass(frozen=True)
class HealthConfig:
    delivery_failure_s: float = field(default=600.0, metadata=_doc("/healthz turns unhealthy (503) when every delivery to a destination has failed for this many seconds (0 = never)"))


#: the worklist priorities a rule may name, in reading order (the one home of the order is
#: `dicom_node.engine.priority.READING_ORDER`; tests check the two agree)
PRIORITY_VALUES: tuple[str, ...] = ("critical", "urgent", "check", "routine")


@dataclass(frozen=True)
class PriorityConfig:
    critical_labels: tuple[str, ...] = field(default=("central_pe", "rv_lv_ratio_gte_1"), metadata=_doc("A study with PE present is `critical` when the model calls any of these study labels present (label ids of docs/results.md); otherwise `urgent`"))
    pe_min_probability: float = field(default=0.0, metadata=_doc("PE counts as present when the model calls the study positive, or (when > 0) when its highest window PE probability reaches this value: a more sensitive triage operating point than the bundle's threshold"))
    indeterminate_is_check: bool = field(default=True, metadata=_doc("A study without PE that the model calls indeterminate is `check` (false: `routine`)"))
    failed_is_check: bool = field(default=True, metadata=_doc("A study whose analysis failed is `check` (false: `routine`)"))


@dataclass(frozen=True)
class NotifyConfig:
    webhook_url: str = field(default="", metadata=_doc("http(s) URL a JSON notification is POSTed to (empty = no webhook)"))
    webhook_secret: str = field(default="", metadata=_doc("Key of the HMAC-SHA256 signature header X-PE-Node-Signature (empty = unsigned; set it, e.g. by DICOM_NODE_NOTIFY_WEBHOOK_SECRET)"))
    webhook_priorities: tuple[str, ...] = field(default=("critical", "urgent"), metadata=_doc("Priorities that notify the webhook"))
    hl7_host: str = field(default="", metadata=_doc("Host of the RIS/worklist receiving HL7 v2.5 ORU^R01 over MLLP (empty = no HL7)"))
    hl7_port: int = field(default=2575, metadata=_doc("MLLP port of `hl7_host`"))
    hl7_priorities: tuple[str, ...] = field(default=("critical", "urgent", "check"), metadata=_doc("Priorities that send an HL7 ORU^R01"))
    hl7_sending_facility: str = field(default="PENODE", metadata=_doc("MSH-4 sending facility (MSH-3 is the node's ae_title)"))
    hl7_receiving_application: str = field(default="RIS", metadata=_doc("MSH-5 receiving application"))
    hl7_receiving_facility: str = field(default="", metadata=_doc("MSH-6 receiving facility"))
    study_url: str = field(default="", metadata=_doc("Link to the study page put into notifications; `{study_uid}` is replaced (empty = no link)"))
    include_patient_identity: bool = field(default=False, metadata=_doc("Put patient name, ID and birth date into notifications (never into logs)"))
    timeout_s: float = field(default=10.0, metadata=_doc("Seconds to wait for a connection, the HTTP answer or the HL7 ACK"))
    max_attempts: int = field(default=10, metadata=_doc("Attempts per notification before it is kept as dead (listed by `dicom-node status`)"))
    base_delay_s: float = field(default=2.0, metadata=_doc("First retry delay; doubles each attempt (with +-25 % jitter)"))
    max_delay_s: float = field(default=300.0, metadata=_doc("Cap on the retry delay"))


@dataclass(frozen=True)
class WebConfig:
    enabled: bool = field(default=False, metadata=_doc("Serve the worklist pages and the REST API /api/v1 on the node's HTTP port (metrics_port, on metrics_host, 127.0.0.1 by default); off by default because the worklist shows patient identity"))
    users: tuple[str, ...] = field(default=(), metadata=_doc("Users who may log in, each `name:hash` with an argon2 hash from `dicom-node hash-password` (put them in the TOML file: an argon2 hash holds commas, which the environment's list syntax splits)"))
    admins: tuple[str, ...] = field(default=(), metadata=_doc("User (and API token) names allowed the admin actions force complete, re-run and resend (empty = every user)"))
    api_tokens: tuple[str, ...] = field(default=(), metadata=_doc("Bearer tokens of the REST API, each `name:sha256-hex` of the token, from `dicom-node hash-password --token`"))
    tls: bool = field(default=False, metadata=_doc("Serve the HTTP port as HTTPS with the node's [tls] cert and key (needs them set)"))
    session_minutes: float = field(default=480.0, metadata=_doc("A login session ends after this many minutes without a request"))
    login_failures: int = field(default=5, metadata=_doc("Wrong logins in a row for one user name before it must wait login_lockout_s; the password of a login made during the wait is not checked"))
    login_address_failures: int = field(default=20, metadata=_doc("Wrong logins in a row from one client address (any user names) before that address must wait login_lockout_s; 0 = addresses are not counted. Behind a reverse proxy list it in trusted_proxies (else every login comes from the proxy's address, and one user's typos would lock everyone out)"))
    login_lockout_s: float = field(default=60.0, metadata=_doc("The first wait after login_failures wrong logins; each further lockout of the same name or address doubles it, up to 30 minutes"))
    audit_log: str = field(default="", metadata=_doc("File the access audit log is appended to, one JSON line per page, API read or action: time, user, action, study and series UID, outcome (empty = data_dir/audit.log)"))
    refresh_s: int = field(default=30, metadata=_doc("The worklist page reloads itself after this many seconds (0 = never)"))
    max_connections: int = field(default=200, metadata=_doc("Most open connections on the HTTP port; one more evicts the oldest connection still sending its request head, so slow or half-sent requests cannot use up the node's file descriptors"))
    read_timeout_s: float = field(default=10.0, metadata=_doc("Seconds a client has to send a whole request (request line, headers and body) from its first byte or the connection; then the connection is closed"))
    keepalive_s: float = field(default=5.0, metadata=_doc("Seconds an idle keep-alive connection is kept open"))
    trusted_proxies: tuple[str, ...] = field(default=(), metadata=_doc("Addresses or networks (CIDR) of reverse proxies in front of the HTTP port: from them, the client named in X-Forwarded-For (and the scheme in X-Forwarded-Proto) is believed, so the audit log and the login limits see each client rather than the proxy (empty = the header is believed from nobody, not even a local process)"))


@dataclass(frozen=True)
class Config:
    """The whole node configuration (see module docstring for sources and precedence)."""

    ae_title: str = field(default="PENODE", metadata=_doc("AE title of this node"))
    host: str = field(default="0.0.0.0", metadata=_doc("Address the SCP listens on"))
    port: int = field(default=11112, metadata=_doc("DICOM port (0 = any free port, for tests)"))
    data_dir: str = field(default="./dicom-node-data", metadata=_doc("Folder holding spool/, outbox/ and state.sqlite"))
    quiet_period_s: float = field(default=30.0, metadata=_doc("A series is complete after this many seconds without a new instance"))
    metrics_port: int = field(default=0, metadata=_doc("HTTP port for /metrics, /healthz, /readyz and, with [web] enabled, the worklist and /api/v1 (0 = off)"))
    metrics_host: str = field(default="127.0.0.1", metadata=_doc("Address the HTTP port listens on (127.0.0.1: this machine only)"))
    allowed_calling_aets: tuple[str, ...] = field(default=(), metadata=_doc("Calling AE titles allowed to associate, optionally `AET@host` (empty = anyone)"))
    require_called_aet: bool = field(default=True, metadata=_doc("Reject associations whose called AE title is not `ae_title`"))
    accept_other_storage: str = field(default="ignore", metadata=_doc("Other storage SOP classes: `ignore` (accept, answer success, discard) or `reject` (no presentation context)"))
    max_associations: int = field(default=10, metadata=_doc("Simultaneous associations accepted"))
    max_pdu: int = field(default=262144, metadata=_doc("Maximum PDU size received (0 = unlimited); a longer P-DATA-TF aborts the association"))
    max_connections_per_address: int = field(default=32, metadata=_doc("Connections open at once from one IP address, negotiated or not; more are closed at once (keep above the parallel associations one sender opens)"))
    fast_store: bool = field(default=True, metadata=_doc("Receive C-STOREs on the node's own DIMSE path (data set fragments straight to a file, the response encoded directly; the same checks and durability); false = pynetdicom's path for every message, about half as fast"))
    max_instance_mb: int = field(default=512, metadata=_doc("Largest data set of one instance in MiB, as sent and as inflated from Deflated Explicit VR; larger ones are refused"))
    max_image_size: int = field(default=2048, metadata=_doc("Largest Rows or Columns of a received CT image; larger ones are refused with 0xC000 (a CTPA slice is 512 or 1024 pixels a side, and the worker decodes every slice of a series in memory: a compressed 4096 x 4096 slice is small on the wire and 32 MiB decoded)"))
    min_free_disk_mb: int = field(default=1024, metadata=_doc("Answer Out of Resources (0xA700) when the spool disk has less free space"))
    send_back_to_sender: bool = field(default=False, metadata=_doc("Also send results to the calling AE when it is listed in [[peers]]"))
    destinations: tuple[Destination, ...] = field(default=(), metadata=_doc("[[destinations]] results are sent to: ae_title, host, port, tls"))
    peers: tuple[Destination, ...] = field(default=(), metadata=_doc("[[peers]] addresses of known calling AEs, used by send_back_to_sender"))
    timeouts: TimeoutConfig = field(default_factory=TimeoutConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    log: LogConfig = field(default_factory=LogConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    priority: PriorityConfig = field(default_factory=PriorityConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    web: WebConfig = field(default_factory=WebConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def replace(self, **overrides: Any) -> Config:
        """Return a validated copy with dotted-key overrides (`{"retry.max_attempts": 2}`)."""
        raw = _to_raw(self)
        for k, v in overrides.items():
            _set_dotted(raw, k, v)
        return _build(raw)




def _hints(cls: type[Any]) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_classes() -> dict[str, type[Any]]:
    hints = _hints(Config)
    return {name: t for name, t in hints.items() if isinstance(t, type) and dataclasses.is_dataclass(t)}


def _coerce(key: str, value: Any, typ: Any) -> Any:
    """Convert a TOML/env/CLI value into `typ` or raise ConfigError naming the key."""
    origin = typing.get_origin(typ)
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{key}: {value!r} is not a boolean (true/false)")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not an integer")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {value!r} is not an integer") from None
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: {value!r} is not a number") from None
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not a string")
        return str(value)
    if origin is tuple:
        (item,) = [a for a in typing.get_args(typ) if a is not Ellipsis]
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: {value!r} is not a list")
        if item is Destination:
            out = []
            for i, v in enumerate(value):
                k = f"{key}[{i}]"
                if isinstance(v, Destination):
                    out.append(v)
                elif isinstance(v, str):
                    out.append(parse_destination(v, k))
                elif isinstance(v, Mapping):
                    unknown = set(v) - {"ae_title", "host", "port", "tls"}
                    if unknown:
                        raise ConfigError(f"{k}: unknown key(s) {sorted(unknown)}; allowed: ae_title, host, port, tls")
                    try:
                        d = Destination(str(v["ae_title"]), str(v["host"]), _coerce(f"{k}.port", v["port"], int),
                                        _coerce(f"{k}.tls", v.get("tls", False), bool))
                    except KeyError as e:
                        raise ConfigError(f"{k}: missing {e.args[0]!r}; a destination needs ae_title, host and port") from None
                    _check_destination(d, k)
                    out.append(d)
                else:
                    raise ConfigError(f"{k}: {v!r} is neither AE@HOST:PORT nor a table")
            return tuple(out)
        return tuple(_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value))
    raise ConfigError(f"{key}: unsupported type {typ}")  # pragma: no cover


def _to_raw(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    target = raw
    for p in parts[:-1]:
        if p not in raw or not isinstance(target.get(p), dict):
            raise ConfigError(f"{key}: unknown section {p!r}; sections: {sorted(_section_classes())}")
        target = target[p]
    target[parts[-1]] = value


def _build_section(cls: type[Any], raw: Mapping[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    unknown = set(raw) - set(hints)
    if unknown:
        where = f"[{prefix[:-1]}]" if prefix else "top level"
        raise ConfigError(f"{prefix}{sorted(unknown)[0]}: unknown key at {where}; allowed: {', '.join(sorted(hints))}")
    kwargs = {}
    for name, typ in hints.items():
        if name in raw:
            if isinstance(typ, type) and dataclasses.is_dataclass(typ):
                if not isinstance(raw[name], Mapping):
                    raise ConfigError(f"{name}: expected a [{name}] table, got {raw[name]!r}")
                kwargs[name] = _build_section(typ, raw[name], f"{name}.")
            else:
                kwargs[name] = _coerce(prefix + name, raw[name], typ)
    return cls(**kwargs)


def _build(raw: Mapping) -> Config:
    cfg = _build_section(Config, raw, "")
    _validate(cfg)
    return cfg


def _validate(c: Config) -> None:
    def need(ok: bool, key: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {value!r} is not allowed; {allowed}")

    need(bool(_AE_RE.match(c.ae_title)) and bool(c.ae_title.strip()), "ae_title", c.ae_title, "1-16 printable ASCII characters, no backslash")
    need(0 <= c.port <= 65535, "port", c.port, "0-65535 (0 = any free port)")
    need(c.metrics_port == 0 or 1 <= c.metrics_port <= 65535, "metrics_port", c.metrics_port, "0 (off) or 1-65535")
    need(bool(c.data_dir), "data_dir", c.data_dir, "a folder path")
    need(c.quiet_period_s > 0, "quiet_period_s", c.quiet_period_s, "a number of seconds > 0")
    need(c.accept_other_storage in ("ignore", "reject"), "accept_other_storage", c.accept_other_storage, "'ignore' or 'reject'")
    need(1 <= c.max_associations <= 1000, "max_associations", c.max_associations, "1-1000")
    need(c.max_pdu == 0 or 4096 <= c.max_pdu <= 2**32 - 1, "max_pdu", c.max_pdu, "0 (unlimited) or 4096-4294967295 bytes")
    need(c.min_free_disk_mb >= 0, "min_free_disk_mb", c.min_free_disk_mb, "a number of MiB >= 0")
    for i, a in enumerate(c.allowed_calling_aets):
        ae = a.split("@", 1)[0]
        need(bool(_AE_RE.match(ae)) and ("@" not in a or bool(a.split("@", 1)[1])), f"allowed_calling_aets[{i}]", a, "AET or AET@host")
    need(1 <= c.max_connections_per_address <= 10000, "max_connections_per_address", c.max_connections_per_address, "1-10000")
    need(1 <= c.max_instance_mb <= 65536, "max_instance_mb", c.max_instance_mb, "1-65536 MiB")
    need(64 <= c.max_image_size <= 65535, "max_image_size", c.max_image_size, "64-65535 pixels")
    for k in ("acse_s", "dimse_s", "network_s", "associate_s"):
        v = getattr(c.timeouts, k)
        need(v > 0, f"timeouts.{k}", v, "a number of seconds > 0")
    if c.tls.enabled or any(d.tls for d in c.destinations):
        for k in ("cert", "key"):
            v = getattr(c.tls, k)
            need(bool(v) and Path(v).is_file(), f"tls.{k}", v, "an existing PEM file (TLS is enabled)")
    if c.tls.verify_client:
        need(bool(c.tls.ca) and Path(c.tls.ca).is_file(), "tls.ca", c.tls.ca, "an existing PEM CA file (verify_client is true)")
    need(c.retry.max_attempts >= 1, "retry.max_attempts", c.retry.max_attempts, "an integer >= 1")
    need(c.retry.base_delay_s >= 0, "retry.base_delay_s", c.retry.base_delay_s, "a number of seconds >= 0")
    need(c.retry.max_delay_s >= c.retry.base_delay_s, "retry.max_delay_s", c.retry.max_delay_s, f">= retry.base_delay_s ({c.retry.base_delay_s})")
    need(c.spool.keep_days >= 0, "spool.keep_days", c.spool.keep_days, "a number of days >= 0 (0 = keep forever)")
    need(1 <= c.worker.concurrency <= 64, "worker.concurrency", c.worker.concurrency, "1-64")
    need(0 < c.worker.poll_s <= 10, "worker.poll_s", c.worker.poll_s, "0-10 seconds")
    need(0 < c.worker.retry_unavailable_s <= 900, "worker.retry_unavailable_s", c.worker.retry_unavailable_s,
         "0-900 seconds")
    need(0 <= c.worker.retry_unavailable_max <= 1000, "worker.retry_unavailable_max", c.worker.retry_unavailable_max,
         "0-1000 tries")
    s = c.selection
    need(0 <= s.min_slice_thickness_mm <= s.max_slice_thickness_mm, "selection.max_slice_thickness_mm", s.max_slice_thickness_mm,
         f">= selection.min_slice_thickness_mm ({s.min_slice_thickness_mm}) >= 0")
    need(s.min_slices >= 1, "selection.min_slices", s.min_slices, "an integer >= 1")
    need(1.0 <= s.max_gap_factor <= 10.0, "selection.max_gap_factor", s.max_gap_factor,
         "a number from 1 (no missing slice allowed) to 10 (times the median slice spacing)")
    for name in ("description_include", "description_exclude"):
        for i, pattern in enumerate(getattr(s, name)):
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"selection.{name}[{i}]: {pattern!r} is not a regular expression ({e})") from None
    need(1 <= c.results.series_number <= 2**31 - 1, "results.series_number", c.results.series_number, "1-2147483647")
    need(len(c.results.series_description) <= 64, "results.series_description", c.results.series_description, "at most 64 characters")
    need(1 <= c.results.top_k_heatmaps <= 50, "results.top_k_heatmaps", c.results.top_k_heatmaps, "1-50")
    known = {"CUDAExecutionProvider", "CPUExecutionProvider", "TensorrtExecutionProvider", "ROCMExecutionProvider",
             "CoreMLExecutionProvider", "DmlExecutionProvider", "OpenVINOExecutionProvider"}
    for i, p in enumerate(c.inference.providers):
        need(p in known, f"inference.providers[{i}]", p, f"one of {sorted(known)}")
    need(bool(c.inference.providers), "inference.providers", c.inference.providers, "at least one provider")
    need(c.inference.intra_op_threads >= 0, "inference.intra_op_threads", c.inference.intra_op_threads, ">= 0 (0 = default)")
    need(c.inference.graph_optimization in ("disable", "basic", "extended", "all"), "inference.graph_optimization",
         c.inference.graph_optimization, "one of disable, basic, extended, all")
    need(c.inference.batch_size >= 1, "inference.batch_size", c.inference.batch_size, ">= 1")
    need(c.inference.precision in ("auto", "fp32", "fp16"), "inference.precision", c.inference.precision,
         "one of auto, fp32, fp16")
    inf = c.inference
    need(inf.engine in ("onnxruntime", "triton"), "inference.engine", inf.engine, "onnxruntime or triton")
    if inf.bundle and inf.engine == "triton":
        need(Path(inf.bundle).is_dir() or Path(inf.bundle).is_file(), "inference.bundle", inf.bundle,
             "an existing bundle directory or <model>.manifest.json of a Triton repository, or empty for the demo model")
    elif inf.bundle:
        need(Path(inf.bundle).is_dir(), "inference.bundle", inf.bundle, "an existing bundle directory or empty for the demo model")
    need(inf.triton_protocol in ("grpc", "http"), "inference.triton_protocol", inf.triton_protocol, "grpc or http")
    need(bool(re.fullmatch(r"[^\s/]+:\d{1,5}", inf.triton_url)), "inference.triton_url", inf.triton_url,
         "HOST:PORT without a scheme, e.g. 127.0.0.1:8001 (set TLS with inference.triton_tls)")
    need(inf.triton_timeout_s > 0, "inference.triton_timeout_s", inf.triton_timeout_s, "a number of seconds > 0")
    need(bool(inf.triton_cert) == bool(inf.triton_key), "inference.triton_key", inf.triton_key,
         "set together with inference.triton_cert (a client certificate needs its key)")
    if inf.engine == "triton" and inf.triton_tls:
        for k in ("triton_ca", "triton_cert", "triton_key"):
            v = getattr(inf, k)
            need(not v or Path(v).is_file(), f"inference.{k}", v, "an existing PEM file or empty")
    need(c.health.delivery_failure_s >= 0, "health.delivery_failure_s", c.health.delivery_failure_s,
         "a number of seconds >= 0 (0 = deliveries never make /healthz unhealthy)")
    _validate_priority(c.priority)
    _validate_notify(c.notify)
    _validate_web(c)
    need(c.log.level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"), "log.level", c.log.level, "DEBUG, INFO, WARNING or ERROR")


def _validate_priority(p: PriorityConfig) -> None:
    from dicom_node.labels import STUDY_LABELS

    for i, label in enumerate(p.critical_labels):
        if label not in STUDY_LABELS:
            raise ConfigError(f"priority.critical_labels[{i}]: {label!r} is not a study label; use one of {', '.join(STUDY_LABELS)}")
    if not 0.0 <= p.pe_min_probability <= 1.0:
        raise ConfigError(f"priority.pe_min_probability: {p.pe_min_probability!r} is not allowed; "
                          "a probability 0-1 (0 = the model's own PE call only)")


def _validate_notify(n: NotifyConfig) -> None:
    for key in ("webhook_priorities", "hl7_priorities"):
        for i, v in enumerate(getattr(n, key)):
            if v not in PRIORITY_VALUES:
                raise ConfigError(f"notify.{key}[{i}]: {v!r} is not a priority; use some of {', '.join(PRIORITY_VALUES)}")
    if n.webhook_url and not re.match(r"^https?://[^/\s]+", n.webhook_url):
        raise ConfigError(f"notify.webhook_url: {n.webhook_url!r} is not an http(s) URL; e.g. https://ris.example/pe-hook")
    if not 1 <= n.hl7_port <= 65535:
        raise ConfigError(f"notify.hl7_port: {n.hl7_port} is outside 1-65535")
    for key in ("hl7_sending_facility", "hl7_receiving_application", "hl7_receiving_facility"):
        v = getattr(n, key)
        if any(ch in v for ch in "|^~\\&\r\n"):
            raise ConfigError(f"notify.{key}: {v!r} contains an HL7 delimiter (| ^ ~ \\ & or a line break); remove it")
    if n.study_url and not re.match(r"^https?://", n.study_url):
        raise ConfigError(f"notify.study_url: {n.study_url!r} is not an http(s) URL; e.g. https://pe-node:8443/studies/{{study_uid}}")
    if n.timeout_s <= 0:
        raise ConfigError(f"notify.timeout_s: {n.timeout_s!r} is not allowed; a number of seconds > 0")
    if n.max_attempts < 1:
        raise ConfigError(f"notify.max_attempts: {n.max_attempts!r} is not allowed; an integer >= 1")
    if not 0 <= n.base_delay_s <= n.max_delay_s:
        raise ConfigError(f"notify.max_delay_s: {n.max_delay_s!r} is not allowed; >= notify.base_delay_s ({n.base_delay_s}) >= 0")


_ARGON2_RE = re.compile(r"^\$argon2(id|i|d)\$v=\d+\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+$")
_WEB_NAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


def _validate_web(c: Config) -> None:
    w = c.web
    names: set[str] = set()
    for key, entries, check, what in (
            ("users", w.users, _ARGON2_RE.match, "an argon2 hash from `dicom-node hash-password`"),
            ("api_tokens", w.api_tokens, re.compile(r"^[0-9a-f]{64}$").match,
             "the sha256 hex digest from `dicom-node hash-password --token`")):
        for i, entry in enumerate(entries):
            name, sep, secret = entry.partition(":")
            if not sep or not _WEB_NAME_RE.match(name) or not check(secret):
                shown = f"{name}:(not shown)" if sep else "(not shown)"  # never print a hash or token back
                raise ConfigError(f"web.{key}[{i}]: {shown} is not NAME:HASH; NAME is 1-64 letters, digits or ._@- "
                                  f"and HASH {what}")
            if name in names:
                raise ConfigError(f"web.{key}[{i}]: the name {name!r} is used twice; give each user and token its own name")
            names.add(name)
    for i, name in enumerate(w.admins):
        if name not in names:
            raise ConfigError(f"web.admins[{i}]: {name!r} is not a name in web.users or web.api_tokens; add it there or remove it")
    if w.enabled and not c.metrics_port:
        raise ConfigError("web.enabled: true needs the node's HTTP port; set metrics_port (--metrics-port), e.g. 8080")
    if w.enabled and not names:
        raise ConfigError("web.enabled: true with no web.users and no web.api_tokens: nobody could log in; add a user "
                          "with `dicom-node hash-password`")
    if w.tls and not (c.tls.cert and Path(c.tls.cert).is_file() and c.tls.key and Path(c.tls.key).is_file()):
        raise ConfigError(f"web.tls: true needs tls.cert and tls.key (PEM files); got cert {c.tls.cert!r}, key {c.tls.key!r}")
    if not 1 <= w.session_minutes <= 7 * 24 * 60:
        raise ConfigError(f"web.session_minutes: {w.session_minutes!r} is not allowed; 1-10080 minutes")
    if not 1 <= w.login_failures <= 100:
        raise ConfigError(f"web.login_failures: {w.login_failures!r} is not allowed; 1-100 wrong logins")
    if not 0 <= w.login_address_failures <= 10000:
        raise ConfigError(f"web.login_address_failures: {w.login_address_failures!r} is not allowed; 0 (off) to 10000")
    if not 1 <= w.login_lockout_s <= 1800:
        raise ConfigError(f"web.login_lockout_s: {w.login_lockout_s!r} is not allowed; 1-1800 seconds")
    if not 0 <= w.refresh_s <= 3600:
        raise ConfigError(f"web.refresh_s: {w.refresh_s!r} is not allowed; 0 (never) to 3600 seconds")
    if not 8 <= w.max_connections <= 10000:
        raise ConfigError(f"web.max_connections: {w.max_connections!r} is not allowed; 8-10000 (keep it well below the "
                          "process's open-file limit, `ulimit -n`)")
    for i, proxy in enumerate(w.trusted_proxies):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"web.trusted_proxies[{i}]: {proxy!r} is not an IP address or network; give the proxy's "
                              "address (e.g. 10.0.0.5) or its network in CIDR (e.g. 10.0.0.0/24)") from None
    for key in ("read_timeout_s", "keepalive_s"):
        v = getattr(w, key)
        if not 0 < v <= 300:
            raise ConfigError(f"web.{key}: {v!r} is not allowed; a number of seconds > 0 and <= 300")


def _env_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    """Map DICOM_NODE_* variables to dotted keys; unknown names raise ConfigError."""
    sections = _section_classes()
    top = {n for n, t in _hints(Config).items() if n not in sections}
    out: dict[str, str] = {}
    for name, value in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX):].lower()
        if rest in top:
            out[rest] = value
            continue
        for sec, cls in sections.items():
            if rest.startswith(sec + "_") and rest[len(sec) + 1:] in _hints(cls):
                out[f"{sec}.{rest[len(sec) + 1:]}"] = value
                break
        else:
            raise ConfigError(f"{name}: unknown setting; use DICOM_NODE_<KEY> or DICOM_NODE_<SECTION>_<KEY> (see docs/configuration.md)")
    return out


def load_config(path: str | os.PathLike | None = None, *, overrides: Mapping[str, Any] | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Load defaults < TOML file < environment < `overrides` (dotted keys), then validate."""
    raw: dict = _to_raw(Config())
    if path:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {p}: not found; pass an existing TOML file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config file {p}: not valid TOML ({e})") from None
        _build_section(Config, data, "")  # type/unknown-key check with file-relative key names
        for k, v in data.items():
            if isinstance(v, dict) and k in raw and isinstance(raw[k], dict):
                raw[k].update(v)
            else:
                raw[k] = v
    env = os.environ if environ is None else environ
    for k, v in _env_overrides(env).items():
        _set_dotted(raw, k, v)
    for k, v in (overrides or {}).items():
        if v is not None:
            _set_dotted(raw, k, v)
    inference = raw.get("inference")
    if isinstance(inference, dict) and isinstance(inference.get("bundle"), str):
        try:
            inference["bundle"] = builtin_bundle_path(inference["bundle"])
        except ValueError as e:
            raise ConfigError(f"config inference.bundle: {e}") from None
    return _build(raw)


def insecure_files(config: Config, config_path: str | os.PathLike[str] | None = None) -> list[str]:
    """Why the node must not start on these files, one line each naming the file, its mode and the fix.

    Refused rather than warned about, because either hands the node to anyone with a login on the
    host: a world-writable configuration lets them redirect results (patient data) to their own
    destination or turn the allow-list off; a world-readable TLS key lets them impersonate the node
    to the PACS and read its traffic. A warning in a log nobody reads protects nothing; the fix is one
    chmod. Group permissions are left alone (a key shared with an `ssl-cert` group is common)."""
    problems = []
    if config_path:
        p = Path(config_path)
        mode = p.stat().st_mode & 0o777
        if mode & 0o002:
            problems.append(f"config file {p} is writable by every user (mode {mode:03o}); anyone on this host could "
                            f"change where results go: chmod o-w {p}")
    if (config.tls.enabled or any(d.tls for d in config.destinations)) and config.tls.key:
        p = Path(config.tls.key)
        mode = p.stat().st_mode & 0o777
        if mode & 0o004:
            problems.append(f"tls.key {p} is readable by every user (mode {mode:03o}); anyone on this host could "
                            f"impersonate the node: chmod o-r {p} (e.g. chmod 600)")
    return problems


# ---- documentation generated from the declarations ---------------------------------------------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(v)  # pragma: no cover


def _rows() -> Iterator[tuple[str, str, Any, str]]:
    """(section, key, default, doc) for every key, in declaration order."""
    sections = _section_classes()
    for f in dataclasses.fields(Config):
        if f.name not in sections:
            yield "", f.name, f.default if f.default is not dataclasses.MISSING else (), f.metadata["doc"]
    for name, cls in sections.items():
        for f in dataclasses.fields(cls):
            yield name, f.name, f.default, f.metadata["doc"]


def default_config_toml() -> str:
    """A complete TOML file with every key at its default and a comment saying what it means."""
    lines = ["# dicom-node configuration (every key, at its default). Environment: DICOM_NODE_<KEY>,",
             "# DICOM_NODE_<SECTION>_<KEY>; command-line flags override both.", ""]
    current = ""
    for sec, key, default, doc in _rows():
        if sec != current:
            lines += ["", f"[{sec}]"]
            current = sec
        if key in ("destinations", "peers"):
            lines += [f"# {doc}", f"# [[{key}]]", '# ae_title = "ORTHANC"', '# host = "127.0.0.1"', "# port = 4242", "# tls = false"]
            continue
        lines += [f"# {doc}", f"{key} = {_toml_value(default)}"]
    return "\n".join(lines) + "\n"


def configuration_markdown() -> str:
    """Markdown table of every key (used to write docs/configuration.md)."""
    out = ["| key | default | environment | meaning |", "|---|---|---|---|"]
    for sec, key, default, doc in _rows():
        dotted = f"{sec}.{key}" if sec else key
        env = ENV_PREFIX + (f"{sec}_{key}" if sec else key).upper()
        out.append(f"| `{dotted}` | `{_toml_value(default) if key not in ('destinations', 'peers') else '[]'}` | `{env}` | {doc} |")
    return "\n".join(out) + "\n"


DEFAULT_CONFIG_TOML = default_config_toml()
