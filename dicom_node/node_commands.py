"""`dicom-node serve|echo|send|status|resend|complete|rerun|config|hash-password`: the node's operational commands.

The admin actions (`complete`, `rerun`, `resend`) are `dicom_node.engine.actions`, which the web
worklist's buttons and `POST /api/v1/...` call too; these commands print what it returns.

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
    from dicom_node.engine.actions import ActionResult

__all__ = ["add_node_commands", "version_text"]

_CONFIG_HELP = "TOML configuration file (every key: `dicom-node config --defaults`, docs/configuration.md)"
_PIPELINE_JOB = "dicom_node.pipeline:run_job"


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
    p.add_argument("--metrics-port", type=int, help="HTTP port for /metrics, /healthz and /readyz (0 = off)")
    p.add_argument("--job", metavar="MODULE:FUNCTION", default=_PIPELINE_JOB,
                   help="job function run_job(JobContext) -> JobResult; the default is the product pipeline")
    p.add_argument("--rebuild-state", action="store_true",
                   help="before starting, move a damaged, missing or empty state.sqlite aside and rebuild its instance "
                        "records from the spool (every spooled series is analysed again; job history is not rebuilt); "
                        "refused when the database is readable and holds records")
    p.set_defaults(func=_cmd_serve)

    p = subparsers.add_parser("echo", help="C-ECHO a DICOM peer (is it reachable and does it accept us?)",
                              description="Send a C-ECHO to AE@HOST:PORT and print the status; a failure names its "
                                          "cause (connection refused, timed out, TLS, association rejected and why).")
    _common(p, data_dir=False)
    p.add_argument("peer", metavar="AE@HOST:PORT", help="the peer (append +tls for DICOM TLS with the [tls] files)")
    p.add_argument("--calling-aet", metavar="AE",
                   help="calling AE title; the default is ae_title of --config (PENODE without one)")
    p.set_defaults(func=_cmd_echo)

    p = subparsers.add_parser("send", help="C-STORE DICOM files to a peer",
                              description="Send files (and every file under folders) to AE@HOST:PORT over one "
                                          "association. Files are recognised by content (DICM preamble), whatever "
                                          "their extension; files that are not DICOM are listed as skipped. Exit 0 "
                                          "when every instance was stored, 1 when any store failed, 2 when nothing "
                                          "was sendable.")
    _common(p, data_dir=False)
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders (searched recursively)")
    p.add_argument("--to", required=True, metavar="AE@HOST:PORT", help="the peer (append +tls for DICOM TLS)")
    p.add_argument("--calling-aet", metavar="AE",
                   help="calling AE title; the default is ae_title of --config (PENODE without one)")
    p.set_defaults(func=_cmd_send)

    p = subparsers.add_parser("status", help="list jobs: study, series, state, priority, result, deliveries, "
                                             "notifications, errors",
                              description="Read the node's state database (works while the node runs) and print one "
                                          "row per job: study and series (UID suffixes), when it was received, its "
                                          "state, its worklist priority (docs/worklist.md), its result (SR UID "
                                          "suffix) or error, each destination with its delivery state, each "
                                          "notification (webhook, hl7) with its state, the last error, and for "
                                          "failed jobs and dead notifications the exact resend command.")
    _common(p)
    p.add_argument("--json", action="store_true", help="machine-readable output: one object per job")
    p.add_argument("--worklist", action="store_true",
                   help="instead, one row per series in reading order, as the web worklist ranks them (priority, "
                        "PE probability, state, reason; UIDs, no patient identity)")
    p.set_defaults(func=_cmd_status)

    p = subparsers.add_parser("resend", help="re-queue a failed job's deliveries (or the job itself) and its dead "
                                             "notifications",
                              description="Failed deliveries of JOB become pending with fresh attempts, addressed to "
                                          "the destination as configured now (matched by AE title), or to --to; a "
                                          "job that failed before building results is queued again. Dead "
                                          "notifications of JOB (webhook, hl7) become pending with fresh attempts, "
                                          "also for a job that is done. A job waiting for its inference backend "
                                          "(job_deferred: the Triton server did not answer) runs at once instead of "
                                          "at its next try. The running node picks it up.")
    _common(p)
    p.add_argument("job_id", type=int, metavar="JOB")
    p.add_argument("--to", metavar="AE@HOST:PORT",
                   help="send to this address instead (replaces the failed delivery with the same AE title, or the "
                        "only failed one)")
    p.set_defaults(func=_cmd_resend)

    p = subparsers.add_parser("complete", help="declare a series complete now (skip the quiet period)",
                              description="The running node (or the next start) completes SERIES_UID at its next poll.")
    _common(p)
    p.add_argument("series_uid", metavar="SERIES_UID")
    p.set_defaults(func=_cmd_complete)

    p = subparsers.add_parser("rerun", help="analyse a finished series again",
                              description="Queue SERIES_UID to be analysed again: a finished series gets a new job (a "
                                          "new revision when its results were delivered, which replaces them in "
                                          "PACS); a series being analysed or sent runs once more when that ends. The "
                                          "running node picks it up. Needs the series' instances still in the spool.")
    _common(p)
    p.add_argument("series_uid", metavar="SERIES_UID")
    p.set_defaults(func=_cmd_rerun)

    p = subparsers.add_parser("hash-password", help="make a [web] users entry (argon2 hash) or an API token",
                              description="Print a `[web] users` entry NAME:HASH for the worklist login: the password "
                                          "is read from standard input (twice when it is a terminal, not echoed) and "
                                          "hashed with argon2id and a random salt. With --token, print a new random "
                                          "API bearer token (give it to the API client) and the `[web] api_tokens` "
                                          "entry NAME:SHA256 that the node keeps instead.")
    p.add_argument("name", metavar="NAME", help="the user (or token) name shown in the audit log, e.g. dr.jones")
    p.add_argument("--token", action="store_true", help="make an API token instead of hashing a password")
    p.set_defaults(func=_cmd_hash_password)

    p = subparsers.add_parser("check", help="is this installation ready? permissions, data folder, state, TLS, model, "
                                            "ports, destinations, notification targets",
                              description="Check, without changing anything, what the node needs with this "
                                          "configuration: file permissions, the data folder (writable, free space), "
                                          "the state database (read-only quick_check, schema version), the TLS files, "
                                          "the model (loaded and warmed up as at start; the Triton server when "
                                          "engine = triton), the DICOM and HTTP ports, a C-ECHO to each destination "
                                          "as the node's AE title, and a connection to the webhook and HL7 "
                                          "receiver. One line per check with what was found or the fix. Exit 0 when "
                                          "every check passed, 1 when any failed, 2 for a configuration error.")
    _common(p)
    p.add_argument("--json", action="store_true",
                   help="machine-readable output: {\"ok\", \"checks\": [{\"name\", \"ok\", \"detail\"}]}")
    p.set_defaults(func=_cmd_check)

    p = subparsers.add_parser("config", help="print the effective configuration (secrets masked) or every key with "
                                             "its default")
    _common(p)
    p.add_argument("--defaults", action="store_true", help="print a TOML file with every key, its default and meaning")
    p.set_defaults(func=_cmd_config)


def version_text(config_path: str | None = None) -> str:
    """`dicom-node --version`: the package version and the model bundle the node would load (name, version)."""
    from pathlib import Path

    from dicom_node import __version__
    from dicom_node.config import ConfigError, load_config
    from dicom_node.model.bundle import MANIFEST_NAME, default_bundle_path

    lines = [f"dicom-node {__version__}"]
    try:
        inference = load_config(config_path).inference
    except ConfigError as e:
        return "\n".join(lines + [f"model bundle: unknown (configuration error: {e})"])
    bundle = inference.bundle
    path = Path(bundle) if bundle else default_bundle_path()
    where = f"inference.bundle {path}" if bundle else f"bundled demo model {path}"
    if inference.engine == "triton":
        scheme = inference.triton_protocol + ("s" if inference.triton_tls else "")
        where += f", run on Triton {scheme}://{inference.triton_url}"
    mpath = path if path.is_file() else path / MANIFEST_NAME  # engine = triton: the repository's manifest copy
    try:
        manifest = json.loads(mpath.read_text())
        lines.append(f"model bundle: {manifest['name']} {manifest['version']} ({where})")
    except (OSError, ValueError, KeyError, TypeError) as e:
        lines.append(f"model bundle: unreadable {mpath} ({type(e).__name__}: {e}) ({where})")
    return "\n".join(lines)


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
    from dicom_node.durability.state import State, StateSchemaError

    cfg = _load(args)
    path = cfg.data_path / "state.sqlite"
    if not path.exists():
        print(f"dicom-node: no state database at {path}; pass --data-dir or --config of the node", file=sys.stderr)
        raise SystemExit(2)
    try:
        return cfg, State(path)
    except StateSchemaError as e:  # a database written by a newer dicom-node: one line, never a traceback
        print(f"dicom-node: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _cmd_serve(args: argparse.Namespace) -> int:
    import os

    from dicom_node.config import insecure_files
    from dicom_node.durability.state import StateSchemaError
    from dicom_node.engine.node import Node, NodeError, default_job_body
    from dicom_node.engine.worker import JobBody
    from dicom_node.log import configure_logging

    overrides = dict(ae_title=args.ae_title, host=args.host, port=args.port, destinations=args.destination,
                     quiet_period_s=args.quiet_period, metrics_port=args.metrics_port,
                     **({"inference.bundle": args.bundle} if args.bundle is not None else {}))
    cfg = _load(args, **overrides)
    for problem in insecure_files(cfg, args.config):  # before anything is opened or written
        print(f"dicom-node serve: refused: {problem}", file=sys.stderr)
        return 2
    # everything the node writes (spool, outbox, state.sqlite) holds patient data: owner only
    os.umask(0o077)
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # before any import loads onnxruntime (model.bundle)
    configure_logging(json=cfg.log.json, level=cfg.log.level, stream=sys.stdout)
    module, _, attr = args.job.partition(":")
    if args.rebuild_state:
        from dicom_node.durability.rebuild import RebuildRefused, rebuild_state

        try:
            rebuild_state(cfg.data_path)
        except (RebuildRefused, StateSchemaError, OSError) as e:
            print(f"dicom-node serve: {e}", file=sys.stderr)
            return 2
    try:
        if args.job == _PIPELINE_JOB:
            body = default_job_body()  # run_job with its prepare step
        else:
            body = JobBody.of(getattr(importlib.import_module(module), attr))
        node = Node(cfg, run_job=body)
    except (NodeError, StateSchemaError, ImportError, AttributeError) as e:
        print(f"dicom-node serve: {e}", file=sys.stderr)
        return 2
    import signal
    import tempfile

    # pynetdicom streams each received data set into tempfile.gettempdir(): in the data folder it is on
    # the spool's filesystem (adopted by a rename, not a copy) and nothing is written outside data_dir
    tempfile.tempdir = str(node.spool.incoming_dir)

    from dicom_node.config import load_config

    def reload_config() -> Config:  # same sources as at start: the file, the environment, these flags
        return load_config(args.config, overrides={**({"data_dir": args.data_dir} if args.data_dir else {}), **overrides})

    def relog(new: Config) -> None:
        configure_logging(json=new.log.json, level=new.log.level, stream=sys.stdout)

    node.reloader, node.on_reloaded = reload_config, relog
    signal.signal(signal.SIGTERM, lambda *_: node.request_stop())
    signal.signal(signal.SIGHUP, lambda *_: node.request_reload())
    try:
        node.start(block=True)
    except NodeError as e:
        print(f"dicom-node serve: {e}", file=sys.stderr)
        return 2
    return 0


def _client_config(args: argparse.Namespace) -> tuple[Config, str]:
    """The configuration (file, environment) and the calling AE title: --calling-aet, else ae_title."""
    cfg = _load(args)
    return cfg, args.calling_aet or cfg.ae_title


def _cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node.config import ConfigError, parse_destination
    from dicom_node.network.send import SendError, echo

    cfg, calling = _client_config(args)
    try:
        status = echo(parse_destination(args.peer, "peer"), calling_aet=calling, config=cfg)
    except (ConfigError, SendError) as e:
        print(f"dicom-node echo: {e}", file=sys.stderr)
        return 1
    print(f"C-ECHO {args.peer} as {calling}: status 0x{status:04X}")
    return 0 if status == 0 else 1


def _cmd_send(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dicom_node.config import ConfigError, parse_destination
    from dicom_node.network.send import SendError, read_instances, send_datasets

    try:
        dest = parse_destination(args.to, "--to")
    except ConfigError as e:
        print(f"dicom-node send: {e}", file=sys.stderr)
        return 2
    cfg, calling = _client_config(args)
    found, skipped = read_instances([Path(p) for p in args.paths])
    for sk in skipped:
        print(f"skipped {sk.path}: {sk.reason}", file=sys.stderr)
    if not found:
        print(f"dicom-node send: nothing to send: no DICOM instance among {', '.join(args.paths)} "
              f"({len(skipped)} file(s) skipped); pass DICOM files or folders holding them", file=sys.stderr)
        return 2
    try:
        res = send_datasets([ds for _, ds in found], dest, calling_aet=calling, config=cfg)
    except SendError as e:
        if e.failed:
            print(f"sent {e.sent} of {len(found)} instance(s) to {dest}; failed:", file=sys.stderr)
            paths = {str(ds.SOPInstanceUID): path for path, ds in found}
            from dicom_node.network.send import status_text

            for uid, code in e.failed:
                print(f"  {paths.get(uid, uid)}: {status_text(code)}", file=sys.stderr)
        print(f"dicom-node send: {e}", file=sys.stderr)
        return 1
    print(f"sent {res.sent} instance(s) to {res.destination} in {res.seconds:.2f} s"
          + (f" ({len(skipped)} file(s) skipped)" if skipped else ""))
    return 0


def _suffix(uid: str | None, n: int = 8) -> str:
    if not uid:
        return "-"
    return uid if len(uid) <= n + 2 else ".." + uid[-n:]


def _when(t: float | None) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _resend_command(args: argparse.Namespace, job_id: int) -> str:
    import shlex
    from pathlib import Path

    parts = ["dicom-node", "resend", str(job_id)]
    if args.config:
        parts += ["--config", str(Path(args.config).resolve())]
    if args.data_dir:
        parts += ["--data-dir", str(Path(args.data_dir).resolve())]
    return " ".join(shlex.quote(x) for x in parts)


def _delivery_text(state: str, attempts: int) -> str:
    if state == "done":
        return "delivered"
    if state == "failed":
        return f"failed after {attempts} attempt(s)"
    return f"retrying ({attempts} failed attempt(s))" if attempts else "pending"


def _status_rows(args: argparse.Namespace, st: State) -> list[dict[str, Any]]:
    from dicom_node.durability.state import DeliveryState, JobState

    rows = []
    by_job: dict[int, list[Any]] = {}
    for d in st.deliveries():
        by_job.setdefault(d.job_id, []).append(d)
    notes: dict[int, list[Any]] = {}
    for n in st.notifications():
        notes.setdefault(n.job_id, []).append(n)
    for j in st.jobs():
        ds = by_job.get(j.id, [])
        errors = [d.last_error.removeprefix(f"{d.destination}: ") for d in ds
                  if d.last_error and d.state is not DeliveryState.DONE]
        waiting = j.deferred  # its inference backend did not answer
        last_error = errors[-1] if errors else (j.error if j.state is JobState.FAILED or waiting else None)
        rows.append({
            "job_id": j.id, "study_uid": j.study_uid, "series_uid": j.series_uid, "revision": j.revision,
            "received_at": _when(j.times.get("received")), "state": j.state.value,
            "next_try_at": _when(j.not_before) if waiting else None,
            "backend_tries_failed": j.deferrals,  # tries while the inference backend was away, since the last resend
            "sr_uid": j.result_uids[0] if j.result_uids else None, "result_uids": list(j.result_uids),
            "error": j.error,
            "destinations": [{"destination": d.destination, "state": d.state.value, "attempts": d.attempts,
                              "delivery": _delivery_text(d.state.value, d.attempts), "last_error": d.last_error}
                             for d in ds],
            "priority": j.priority_class, "priority_reason": j.priority_reason, "priority_score": j.priority_score,
            "notifications": [{"target": n.target, "state": n.state.value, "attempts": n.attempts,
                               "last_error": n.last_error} for n in notes.get(j.id, [])],
            "last_error": last_error,
            "resend_command": _resend_command(args, j.id) if j.state is JobState.FAILED or waiting
            or any(n.state.value == "dead" for n in notes.get(j.id, [])) else None})
    return rows


def _cmd_worklist(st: State, as_json: bool) -> int:
    """`status --worklist`: the web worklist's query and state words (`dicom_node.web.views`), without
    the patient columns the web page reads from the spool."""
    from dicom_node.web.views import READING_ORDER_VALUES, display_state

    rows = st.worklist(READING_ORDER_VALUES, limit=1_000_000)
    out: list[dict[str, Any]] = [{"rank": i + 1, "study_uid": r.study_uid, "series_uid": r.series_uid, "priority": r.priority,
            "pe_probability": r.job.priority_score if r.job else None, "state": display_state(r.series_state, r.job),
            "reason": (r.job.priority_reason if r.job else None) or r.skip_reason, "job_id": r.job.id if r.job else None,
            "received_at": _when(r.first_instance_at)} for i, r in enumerate(rows)]
    if as_json:
        print(json.dumps({"reading_order": list(READING_ORDER_VALUES), "worklist": out}, indent=2))
        return 0
    head = ("#", "PRIORITY", "PE", "STATE", "RECEIVED", "STUDY", "SERIES", "REASON")
    table: list[tuple[str, ...]] = [head]
    for r in out:
        table.append((str(r["rank"]), str(r["priority"] or "pending"),
                      f"{r['pe_probability']:.2f}" if r["pe_probability"] is not None else "-", str(r["state"]),
                      str(r["received_at"]), _suffix(str(r["study_uid"])), _suffix(str(r["series_uid"])),
                      _clip(str(r["reason"] or "-"))))
    widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    cfg, st = _state(args)
    if args.worklist:
        return _cmd_worklist(st, args.json)
    counts = st.job_counts()
    rows = _status_rows(args, st)
    with_job = {r["series_uid"] for r in rows}
    other = [s for s in st.all_series() if s.series_uid not in with_job]
    if args.json:
        print(json.dumps({"counts": counts, "notifications": st.notification_counts(), "jobs": rows,
                          "series_without_job": [{"series_uid": s.series_uid, "study_uid": s.study_uid,
                                                  "state": s.state.value, "instances": s.n_instances,
                                                  "skip_reason": s.skip_reason} for s in other]}, indent=2))
        return 0
    print("jobs: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    print("notifications: " + ", ".join(f"{k}={v}" for k, v in st.notification_counts().items()))
    if rows:
        head = ("JOB", "STUDY", "SERIES", "RECEIVED", "STATE", "PRIORITY", "RESULT", "DESTINATIONS", "NOTIFICATIONS",
                "LAST ERROR")
        table = [head] + [(
            str(r["job_id"]), _suffix(r["study_uid"]), _suffix(r["series_uid"]), r["received_at"],
            f"queued, next try {r['next_try_at'][11:]}" if r["next_try_at"] else r["state"],
            r["priority"] or "-",
            f"SR {_suffix(r['sr_uid'])}" if r["sr_uid"] else ("error" if r["state"] == "failed" else "-"),
            ", ".join(f"{d['destination']} {d['delivery']}" for d in r["destinations"]) or "-",
            ", ".join(f"{n['target']} {_notification_text(n['state'], n['attempts'])}" for n in r["notifications"]) or "-",
            _clip(r["last_error"]) if r["last_error"] else "-") for r in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
        for row in table:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    for r in rows:
        for n in r["notifications"]:
            if n["state"] == "dead":
                print(f"job {r['job_id']} {n['target']} notification dead after {n['attempts']} attempt(s): "
                      f"{_clip(n['last_error'] or '')}")
        if r["resend_command"] and r["next_try_at"]:
            tries = cfg.worker.retry_unavailable_max + 1
            print(f"job {r['job_id']} waits for its inference backend ({r['backend_tries_failed']} of {tries} tries "
                  f"failed, next try {r['next_try_at']}); run it now with: {r['resend_command']}")
        elif r["resend_command"]:
            what = "failed" if r["state"] == "failed" else "has dead notifications"
            print(f"job {r['job_id']} {what}; re-send with: {r['resend_command']}")
    for s in other:
        print(f"series {s.series_uid} ({s.n_instances} instance(s)): {s.state.value}"
              + (f", {s.skip_reason}" if s.skip_reason else ""))
    return 0


def _notification_text(state: str, attempts: int) -> str:
    if state == "sent":
        return "sent"
    if state == "dead":
        return f"dead after {attempts} attempt(s)"
    return f"retrying ({attempts} failed attempt(s))" if attempts else "pending"


def _clip(text: str, n: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _print_action(command: str, res: ActionResult) -> int:
    for line in res.lines:
        print(line)
    if res.error:
        print(f"dicom-node {command}: {res.error}", file=sys.stderr)
    return res.code


def _cmd_resend(args: argparse.Namespace) -> int:
    from dicom_node.engine.actions import resend_job

    cfg, st = _state(args)
    return _print_action("resend", resend_job(cfg, st, args.job_id, args.to))


def _cmd_complete(args: argparse.Namespace) -> int:
    from dicom_node.engine.actions import complete_series

    _cfg, st = _state(args)
    return _print_action("complete", complete_series(st, args.series_uid))


def _cmd_rerun(args: argparse.Namespace) -> int:
    from dicom_node.engine.actions import rerun_series

    _cfg, st = _state(args)
    return _print_action("rerun", rerun_series(st, args.series_uid))


def _cmd_hash_password(args: argparse.Namespace) -> int:
    import getpass
    import re

    from dicom_node.web.auth import hash_password, new_token

    if not re.fullmatch(r"[A-Za-z0-9._@-]{1,64}", args.name):
        print(f"dicom-node hash-password: NAME {args.name!r} is not allowed; use 1-64 letters, digits or ._@-",
              file=sys.stderr)
        return 2
    if args.token:
        token, digest = new_token()
        print(f"token (give it to the API client; it is not stored): {token}")
        print(f'[web] api_tokens entry: "{args.name}:{digest}"')
        return 0
    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("dicom-node hash-password: the two passwords differ; nothing printed", file=sys.stderr)
            return 2
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        print("dicom-node hash-password: the password has fewer than 8 characters; choose a longer one",
              file=sys.stderr)
        return 2
    print(f'"{args.name}:{hash_password(password)}"')
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    import os

    from dicom_node.log import configure_logging
    from dicom_node.tools.check import format_checks, run_checks

    cfg = _load(args)
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # as serve: before onnxruntime is imported
    configure_logging(json=False, level="ERROR", stream=sys.stderr)  # the report is the output, not the events
    where = args.config or "the defaults and DICOM_NODE_* environment variables (no --config)"
    if not args.json:
        print(f"dicom-node check: {where}", flush=True)
    checks = run_checks(cfg, args.config)
    ok = all(c.ok for c in checks)
    if args.json:
        print(json.dumps({"config": args.config, "ok": ok,
                          "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks]}, indent=2))
    else:
        print(format_checks(checks))
    return 0 if ok else 1


def _cmd_config(args: argparse.Namespace) -> int:
    import dataclasses

    from dicom_node.config import default_config_toml

    if args.defaults:
        print(default_config_toml(), end="")
        return 0
    effective = dataclasses.asdict(_load(args))
    if effective["notify"]["webhook_secret"]:  # a key, not for terminals and support tickets
        effective["notify"]["webhook_secret"] = "(set; not shown)"
    for key in ("users", "api_tokens"):  # hashes: useless to show, and an offline guessing target
        effective["web"][key] = [f"{e.partition(':')[0]}:(hash not shown)" for e in effective["web"][key]]
    print(json.dumps(effective, indent=2))
    return 0
