"""`dicom-node check`: is this installation ready to go live? Every check a PACS administrator would
otherwise make by hand, against the configuration the node would start with, one line each.

    dicom-node check --config /etc/dicom-node/node.toml      # exit 0: all passed; 1: any failed

Contract:

* It changes nothing: no folder is created, the state database is opened read-only (it is neither
  migrated nor repaired), the listening ports are bound for a moment only to see whether they are free,
  and the only data written is one empty temporary file in the data folder (created and removed) to
  prove the node may write there.
* The checks, in order: file permissions (what `serve` refuses: `config.insecure_files`); the data
  folder (exists or can be made, writable, free space against `min_free_disk_mb`); the state database
  (readable, `quick_check`, schema version); the TLS certificate and key when TLS is on (they load, and
  the node's certificate and the CA's are valid now); the model
  (the same load and warm-up as at start, and for `engine = triton` the server's start checks and a
  liveness request); the DICOM port (free, or answered by a node with this AE title: already running);
  the HTTP port when set; each destination (a C-ECHO with the node's AE title, over TLS for `+tls`);
  the notification targets (a TCP connection to the webhook's and the HL7 receiver's address).
* A failed check says what failed and the fix in one line, as the node's own errors do; a failure does
  not stop the checks after it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from dicom_node.config import Config, Destination, insecure_files

__all__ = ["Check", "run_checks", "format_checks"]


@dataclass(frozen=True)
class Check:
    """One line of the report: what was checked, whether it passed, and what was found (or the fix)."""

    name: str
    ok: bool
    detail: str


def _permissions(cfg: Config, config_path: str | None) -> Iterator[Check]:
    problems = insecure_files(cfg, config_path)
    if problems:
        yield from (Check("file permissions", False, p) for p in problems)
    else:
        parts = [f"configuration file {config_path} not world-writable" if config_path else "no configuration file"]
        if cfg.tls.key:
            parts.append(f"TLS key {cfg.tls.key} not world-readable")
        yield Check("file permissions", True, "; ".join(parts))


def _data_folder(cfg: Config) -> Iterator[Check]:
    folder = cfg.data_path.absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        yield Check("data folder", False, f"{folder}: {existing} is not a folder; set data_dir to a folder")
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=".dicom-node-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        yield Check("data folder", False, f"{existing} is not writable by this user ({e.strerror}); run the check as "
                                          "the node's user, or give that user the folder (chown)")
        return
    st = os.statvfs(existing)
    free_mb = st.f_bavail * st.f_frsize / 2**20
    made = "" if folder.exists() else f" (made at first start under {existing})"
    if cfg.min_free_disk_mb and free_mb < cfg.min_free_disk_mb:
        yield Check("data folder", False, f"{folder}{made}: {free_mb:.0f} MiB free, below min_free_disk_mb "
                                          f"{cfg.min_free_disk_mb}: the node would refuse every instance (0xA700); "
                                          "free disk space or lower min_free_disk_mb")
        return
    yield Check("data folder", True, f"{folder}{made}: writable, {free_mb / 1024:.1f} GiB free "
                                     f"(min_free_disk_mb {cfg.min_free_disk_mb})")


def _state_database(cfg: Config) -> Iterator[Check]:
    from dicom_node.durability.state import SCHEMA_VERSION

    path = cfg.data_path.absolute() / "state.sqlite"
    if not path.exists():
        yield Check("state database", True, f"{path}: none yet (made at first start)")
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0)) as c:
            version = int(c.execute("PRAGMA user_version").fetchone()[0])
            verdict = str(c.execute("PRAGMA quick_check").fetchone()[0])
            jobs = int(c.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]) if version else 0
    except sqlite3.Error as e:
        yield Check("state database", False, f"{path}: cannot be read ({e}); see docs/operations.md, \"State database "
                                             "damaged or lost\" (`dicom-node serve --rebuild-state`)")
        return
    if verdict != "ok":
        yield Check("state database", False, f"{path}: quick_check says {verdict[:200]!r}; the node refuses to start "
                                             "on it: see docs/operations.md, \"State database damaged or lost\"")
    elif version > SCHEMA_VERSION:
        yield Check("state database", False, f"{path}: schema version {version} is newer than this dicom-node knows "
                                             f"({SCHEMA_VERSION}); upgrade dicom-node to the release that wrote it")
    else:
        upgrade = f", migrated to {SCHEMA_VERSION} at the next start" if version < SCHEMA_VERSION else ""
        yield Check("state database", True, f"{path}: schema version {version}{upgrade}, quick_check ok, {jobs} job(s)")


def _tls(cfg: Config) -> Iterator[Check]:
    import ssl

    from dicom_node.network.tls import (
        CERTIFICATE_WARN_DAYS,
        certificate_dates,
        client_ssl_context,
        server_ssl_context,
        uses_own_certificate,
    )

    needs_client = any(d.tls for d in (*cfg.destinations, *cfg.peers))
    if not cfg.tls.enabled and not needs_client and not cfg.web.tls:
        return
    try:
        if cfg.tls.enabled:
            server_ssl_context(cfg)
        if needs_client:
            client_ssl_context(cfg)
    except (OSError, ssl.SSLError) as e:
        yield Check("TLS", False, f"tls.cert {cfg.tls.cert!r} / tls.key {cfg.tls.key!r} / tls.ca {cfg.tls.ca!r}: "
                                  f"{e}; give PEM files that belong together and that this user can read")
        return
    validity = ""
    if uses_own_certificate(cfg):
        try:
            own = certificate_dates(cfg.tls.cert)
        except (OSError, ValueError) as e:
            yield Check("TLS", False, str(e))
            return
        if not own.valid_now:
            yield Check("TLS", False, f"certificate {cfg.tls.cert} is {own.span}, not now: TLS peers would refuse the "
                                      "node; install a valid certificate")
            return
        soon = f"; renew it within {own.days_left:.0f} days" if own.days_left < CERTIFICATE_WARN_DAYS else ""
        validity = f", valid until {own.not_after:%Y-%m-%d} ({own.days_left:.0f} days){soon}"
    yield Check("TLS", True, f"certificate {cfg.tls.cert or '-'} and key load{validity}"
                             + (f", client certificates checked against {cfg.tls.ca}" if cfg.tls.verify_client else ""))
    if cfg.tls.ca:
        yield from _ca_bundle(cfg.tls.ca)


def _ca_bundle(path: str) -> Iterator[Check]:
    """Every certificate of `[tls] ca` (a bundle may hold several): one ended or not yet valid fails,
    since what it signed no longer verifies."""
    from dicom_node.network.tls import bundle_dates

    try:
        dates = bundle_dates(path)
    except (OSError, ValueError) as e:
        yield Check("TLS CA", False, str(e))
        return
    n = len(dates)
    bad = [(i, d) for i, d in enumerate(dates, 1) if not d.valid_now]
    for i, d in bad:
        which = f"certificate {i} of {n} in {path}" if n > 1 else f"CA certificate {path}"
        yield Check("TLS CA", False, f"{which} is {d.span}, not now: the certificates it signed no longer verify; "
                                     "install the renewed CA certificate" + (" or remove it from the bundle" if n > 1 else ""))
    if bad:
        return
    first = min(dates, key=lambda d: d.not_after)
    what = f"CA certificate {path}" if n == 1 else f"{n} CA certificates in {path}, the first to end"
    yield Check("TLS CA", True, f"{what} valid until {first.not_after:%Y-%m-%d}")


def _model(cfg: Config) -> Iterator[Check]:
    from dicom_node.model.inference import InferenceError
    from dicom_node.pipeline import bundle_dir, predictor_for

    t0 = time.perf_counter()
    try:
        predictor = predictor_for(cfg)
        predictor.check_available()  # Triton: the start checks, or a liveness request; local: nothing to do
    except (InferenceError, OSError, ValueError) as e:
        where = str(bundle_dir(cfg.inference.bundle))
        yield Check("model", False, str(e) if where in str(e) else f"inference.bundle {where}: {e}")
        return
    m = predictor.manifest
    yield Check("model", True, f"{m.name} {m.version} ({m.family}) on {predictor.execution_provider}, loaded and "
                               f"warmed up in {time.perf_counter() - t0:.1f} s")


def _port(name: str, host: str, port: int, in_use: Callable[[], Check | None]) -> Check:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return Check(name, True, f"{host}:{port} is free")
        except OSError as e:
            return in_use() or Check(name, False, f"{host}:{port} cannot be listened on ({e.strerror}); stop what "
                                                  "uses it or choose another port")


def _dicom_port(cfg: Config) -> Iterator[Check]:
    from dicom_node.network.send import SendError, echo

    def running_node() -> Check | None:
        here = Destination(cfg.ae_title, "127.0.0.1" if cfg.host in ("", "0.0.0.0", "::") else cfg.host, cfg.port,
                           tls=cfg.tls.enabled)
        try:
            if echo(here, calling_aet=cfg.ae_title, config=cfg) == 0:
                return Check("DICOM port", True, f"{cfg.host}:{cfg.port} answers C-ECHO as {cfg.ae_title}: the node "
                                                 "is running already")
        except SendError:
            pass
        return None

    if cfg.port:
        yield _port("DICOM port", cfg.host, cfg.port, running_node)
    if cfg.metrics_port:
        yield _port("HTTP port", cfg.metrics_host, cfg.metrics_port, lambda: None)


def _destinations(cfg: Config) -> Iterator[Check]:
    from dicom_node.network.send import SendError, echo, status_text

    if not cfg.destinations and not cfg.send_back_to_sender:
        yield Check("destination", False, "none configured: results would go nowhere; add [[destinations]] "
                                          "(AE@HOST:PORT of the PACS)")
    for d in cfg.destinations:
        try:
            status = echo(d, calling_aet=cfg.ae_title, config=cfg)
        except SendError as e:
            yield Check("destination", False, str(e))
            continue
        if status == 0:
            yield Check("destination", True, f"{d.address}: C-ECHO as {cfg.ae_title} answered 0x0000")
        else:
            yield Check("destination", False, f"{d.address}: C-ECHO as {cfg.ae_title} answered 0x{status:04X} "
                                              f"({status_text(status)})")


def _reachable(name: str, host: str, port: int, timeout_s: float) -> Check:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as e:
        return Check(name, False, f"{host}:{port} does not accept a connection ({e.strerror or e}); check the address "
                                  "and that the receiver runs")
    return Check(name, True, f"{host}:{port} accepts connections")


def _notifications(cfg: Config) -> Iterator[Check]:
    n = cfg.notify
    timeout = min(n.timeout_s, 5.0)
    if n.webhook_url:
        u = urllib.parse.urlsplit(n.webhook_url)
        yield _reachable("webhook", u.hostname or "", u.port or (443 if u.scheme == "https" else 80), timeout)
    if n.hl7_host:
        yield _reachable("HL7 receiver", n.hl7_host, n.hl7_port, timeout)


def run_checks(cfg: Config, config_path: str | None = None) -> list[Check]:
    """Every check of the module docstring, in order; none stops the others."""
    out: list[Check] = []
    for step in (lambda: _permissions(cfg, config_path), lambda: _data_folder(cfg), lambda: _state_database(cfg),
                 lambda: _tls(cfg), lambda: _model(cfg), lambda: _dicom_port(cfg), lambda: _destinations(cfg),
                 lambda: _notifications(cfg)):
        out.extend(step())
    return out


def format_checks(checks: list[Check]) -> str:
    """The report: `ok` or `FAIL`, the check's name and what was found, then a summary line."""
    width = max((len(c.name) for c in checks), default=0)
    lines = [f"  {'ok  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}" for c in checks]
    failed = sum(not c.ok for c in checks)
    lines.append(f"{failed} of {len(checks)} checks failed" if failed else f"all {len(checks)} checks passed")
    return "\n".join(lines)
