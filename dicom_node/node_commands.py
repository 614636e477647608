"""`dicom-node serve|echo|send|status|resend|complete|config`: the node's operational commands.

Registered into `dicom_node.cli` by `add_node_commands(subparsers)`. Heavy imports stay inside the
command functions so `dicom-node --help` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dicom_node.config import Config
    from dicom_node.durability.state import State

__all__ = ["add_node_commands"]

_CONFIG_HELP = "TOML configuration file (every key: `dicom-node config --defaults`, docs/configuration.md)"


def _common(p: argparse.ArgumentParser, *, data_dir: bool = True) -> None:
    p.add_argument("--config", metavar="FILE", help=_CONFIG_HELP)
    if data_dir:
        p.add_argument("--data-dir", metavar="DIR", help="folder with spool/, outbox/ and state.sqlite (overrides data_dir)")


def add_node_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "serve", help="run the DICOM node (SCP, completion, worker, delivery, metrics)",
        description="Receive CT series by C-STORE, analyse the selected series and send the results to the "
                    "destinations. Settings come from --config, then DICOM_NODE_* environment variables, then "
                    "these flags. Stop with Ctrl-C; a restart resumes every unfinished job.")
    _common(p)
    p.add_argument("--ae-title", help="AE title of this node (ae_title)")
    p.add_argument("--host", help="listen address (host)")
    p.add_argument("--port", type=int, help="DICOM port (port; 0 = any free port)")
    p.add_argument("--destination", action="append", metavar="AE@HOST:PORT",
                   help="send results here (repeatable; replaces [[destinations]]; append +tls for TLS)")
    p.add_argument("--quiet-period", type=float, metavar="SECONDS", help="series complete after this quiet time")
    p.add_argument("--bundle", metavar="DIR", help="model bundle directory (inference.bundle)")
    p.add_argument("--metrics-port", type=int, help="HTTP port for /metrics and /healthz (0 = off)")
    p.add_argument("--job", metavar="MODULE:FUNCTION", default="dicom_node.pipeline:run_job",
                   help="job function run_job(JobContext) -> JobResult (default: the product pipeline)")
    p.set_defaults(func=_cmd_serve)

    p = subparsers.add_parser("echo", help="C-ECHO a DICOM peer (is it reachable and does it accept us?)",
                              description="Send a C-ECHO to AE@HOST:PORT and print the status.")
    _common(p, data_dir=False)
    p.add_argument("peer", metavar="AE@HOST:PORT")
    p.add_argument("--calling-aet", default="ECHOSCU")
    p.set_defaults(func=_cmd_echo)

    p = subparsers.add_parser("send", help="C-STORE DICOM files to a peer",
                              description="Send files (or every .dcm under folders) to AE@HOST:PORT over one association.")
    _common(p, data_dir=False)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--to", required=True, metavar="AE@HOST:PORT")
    p.add_argument("--calling-aet", default="STORESCU")
    p.set_defaults(func=_cmd_send)

    p = subparsers.add_parser("status", help="list series, jobs and failed deliveries",
                              description="Read the node's state database (works while the node runs).")
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_cmd_status)

    p = subparsers.add_parser("resend", help="re-queue a failed job's deliveries (or the job itself)",
                              description="Failed deliveries of JOB become pending with fresh attempts; a job that "
                                          "failed before building results is queued again. The running node picks it up.")
    _common(p)
    p.add_argument("job_id", type=int, metavar="JOB")
    p.set_defaults(func=_cmd_resend)

    p = subparsers.add_parser("complete", help="declare a series complete now (skip the quiet period)",
                              description="The running node (or the next start) completes SERIES_UID at its next poll.")
    _common(p)
    p.add_argument("series_uid", metavar="SERIES_UID")
    p.set_defaults(func=_cmd_complete)

    p = subparsers.add_parser("config", help="print the effective configuration or every key with its default")
    _common(p)
    p.add_argument("--defaults", action="store_true", help="print a TOML file with every key, its default and meaning")
    p.set_defaults(func=_cmd_config)


def _load(args: argparse.Namespace, **overrides: Any) -> Config:
    from dicom_node.config import ConfigError, load_config

    if getattr(args, "data_dir", None):
        overrides["data_dir"] = args.data_dir
    try:
        return load_config(args.config, overrides=overrides)
    except ConfigError as e:
        print(f"dicom-node: configuration error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _state(args: argparse.Namespace) -> tuple[Config, State]:
    from dicom_node.durability.state import State

    cfg = _load(args)
    path = cfg.data_path / "state.sqlite"
    if not path.exists():
        print(f"dicom-node: no state database at {path}; pass --data-dir or --config of the node", file=sys.stderr)
        raise SystemExit(2)
    return cfg, State(path)


def _cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.durability.state import StateSchemaError
    from dicom_node.engine.node import Node, NodeError, default_job_body
    from dicom_node.engine.worker import JobBody
    from dicom_node.log import configure_logging

    cfg = _load(args, ae_title=args.ae_title, host=args.host, port=args.port, destinations=args.destination,
                quiet_period_s=args.quiet_period, metrics_port=args.metrics_port,
                **({"inference.bundle": args.bundle} if args.bundle is not None else {}))
    configure_logging(json=cfg.log.json, level=cfg.log.level, stream=sys.stdout)
    module, _, attr = args.job.partition(":")
    try:
        if args.job == "dicom_node.pipeline:run_job":
            body = default_job_body()  # run_job with its prepare step
        else:
            body = JobBody.of(getattr(importlib.import_module(module), attr))
        node = Node(cfg, run_job=body)
    except (NodeError, StateSchemaError, ImportError, AttributeError) as e:
        print(f"dicom-node serve: {e}", file=sys.stderr)
        return 2
    import signal

    signal.signal(signal.SIGTERM, lambda *_: node.request_stop())
    try:
        node.start(block=True)
    except NodeError as e:
        print(f"dicom-node serve: {e}", file=sys.stderr)
        return 2
    return 0


def _cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node.config import ConfigError, parse_destination
    from dicom_node.network.send import SendError, echo

    try:
        status = echo(parse_destination(args.peer, "peer"), calling_aet=args.calling_aet,
                      config=_load(args) if args.config else None)
    except (ConfigError, SendError) as e:
        print(f"dicom-node echo: {e}", file=sys.stderr)
        return 1
    print(f"C-ECHO {args.peer}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def _cmd_send(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dicom_node.config import ConfigError, parse_destination
    from dicom_node.network.send import SendError, send_files

    files: list[Path] = []
    for p in map(Path, args.paths):
        files += sorted(p.rglob("*.dcm")) if p.is_dir() else [p]
    try:
        res = send_files(files, parse_destination(args.to, "--to"), calling_aet=args.calling_aet,
                         config=_load(args) if args.config else None)
    except (ConfigError, SendError) as e:
        print(f"dicom-node send: {e}", file=sys.stderr)
        return 1
    print(f"sent {res.sent} instance(s) to {res.destination} in {res.seconds:.2f} s")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from dicom_node.durability.state import DeliveryState, JobState

    _cfg, st = _state(args)
    counts = st.job_counts()
    failed_jobs = st.jobs(JobState.FAILED)
    failed_deliveries = st.deliveries(state=DeliveryState.FAILED)
    pending = st.deliveries(state=DeliveryState.PENDING)
    series = st.all_series()
    if args.json:
        print(json.dumps({
            "jobs": counts,
            "series": [{"series_uid": s.series_uid, "state": s.state.value, "instances": s.n_instances,
                        "skip_reason": s.skip_reason} for s in series],
            "failed_jobs": [{"id": j.id, "series_uid": j.series_uid, "revision": j.revision, "error": j.error} for j in failed_jobs],
            "failed_deliveries": [{"job_id": d.job_id, "destination": d.destination, "attempts": d.attempts,
                                   "last_error": d.last_error} for d in failed_deliveries],
            "pending_deliveries": len(pending)}, indent=2))
        return 0
    print("jobs: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    print(f"series: {len(series)}  (" + ", ".join(f"{s.series_uid} {s.state.value}"
                                                + (f" [{s.skip_reason}]" if s.skip_reason else "") for s in series[-10:]) + ")")
    for j in failed_jobs:
        print(f"FAILED job {j.id} series {j.series_uid} rev {j.revision}: {j.error}")
    for d in failed_deliveries:
        print(f"FAILED delivery job {d.job_id} -> {d.destination} after {d.attempts} attempts: {d.last_error}")
    if failed_jobs:
        print("re-send with: dicom-node resend JOB")
    return 0


def _cmd_resend(args: argparse.Namespace) -> int:
    from dicom_node.durability.state import JobState

    _cfg, st = _state(args)
    job = st.job(args.job_id)
    if job is None:
        print(f"dicom-node resend: job {args.job_id} does not exist; `dicom-node status` lists jobs", file=sys.stderr)
        return 1
    if job.state is not JobState.FAILED:
        print(f"dicom-node resend: job {job.id} is {job.state.value}, not failed; nothing to do", file=sys.stderr)
        return 1
    n = st.reset_deliveries(job.id)
    if st.deliveries(job.id) and job.result_uids:
        st.transition(job.id, JobState.SENDING, stage="resend")
        print(f"job {job.id}: {n} delivery(ies) pending again")
    else:
        st.transition(job.id, JobState.QUEUED, stage="requeued")
        print(f"job {job.id}: queued to run again")
    return 0


def _cmd_complete(args: argparse.Namespace) -> int:
    from dicom_node.durability.spool import InvalidUid, validate_uid

    _cfg, st = _state(args)
    try:
        uid = validate_uid(args.series_uid, "SERIES_UID")
    except InvalidUid as e:
        print(f"dicom-node complete: {e}", file=sys.stderr)
        return 2
    s = st.series(uid)
    if s is None:
        print(f"dicom-node complete: series {uid} is unknown to this node", file=sys.stderr)
        return 1
    if not st.force_complete(uid):
        print(f"dicom-node complete: series {uid} is {s.state.value}, not receiving; nothing to do", file=sys.stderr)
        return 1
    print(f"series {uid}: will be completed at the node's next poll")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import dataclasses

    from dicom_node.config import default_config_toml

    if args.defaults:
        print(default_config_toml(), end="")
        return 0
    print(json.dumps(dataclasses.asdict(_load(args)), indent=2))
    return 0
