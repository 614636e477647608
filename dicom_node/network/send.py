"""The C-STORE and C-ECHO SCU: `send_files` (one association per call), `echo`, and the backoff rule.

`send_files` opens one association proposing only the SOP classes (and transfer syntaxes) of the
files it sends and stores every file. Success (0x0000) and the warning statuses 0xB000, 0xB006 and
0xB007 count as delivered (`DELIVERED_STATUSES`). `backoff_delay` is the retry rule the delivery
loop (`dicom_node.engine.delivery.Sender`) applies: `min(max_delay_s, base_delay_s * 2**(attempt-1))`
+-25 % jitter. `dicom-node send` and `dicom-node echo` use these functions directly.

A failure is a `SendError` whose message names the real cause and whose `cause` is one word for it:
`connection_refused`, `timed_out`, `unreachable` (DNS or routing), `tls_failed` (TLS handshake),
`rejected` (A-ASSOCIATE-RJ, with its result, source and reason), `no_contexts` (the peer accepted
none of the proposed SOP classes), `aborted`, or `store_failed` (the C-STORE status of every
instance that was not stored). Before associating, the TCP connection (and for a TLS destination
the TLS handshake) is opened once with the configured `timeouts.acse_s` so refused, timed out and
TLS errors are told apart instead of all surfacing as an aborted association.
"""

from __future__ import annotations

import errno
import random
import socket
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom import uid as U
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification as VerificationSOPClass  # type: ignore[attr-defined]  # made at import
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS

from dicom_node.config import Config, Destination
from dicom_node.imaging.files import SkippedFile, read_dicom_files
from dicom_node.network.tls import client_ssl_context

__all__ = ["DELIVERED_STATUSES", "SendError", "SendResult", "associate", "backoff_delay", "client_ae", "echo",
           "read_instances", "send_datasets", "send_files", "status_text"]

DELIVERED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})
_DEFAULT_CONNECT_S = 30.0


class SendError(RuntimeError):
    """A delivery attempt failed; the message names the destination and the real cause.

    `cause` is one word (see the module docstring); `failed` lists (SOP Instance UID, status) of the
    instances a peer did not store (status -1: no response); `sent` counts those it did store."""

    def __init__(self, message: str, cause: str, *, failed: Sequence[tuple[str, int]] = (), sent: int = 0) -> None:
        super().__init__(message)
        self.cause = cause
        self.failed = tuple(failed)
        self.sent = sent


@dataclass(frozen=True)
class SendResult:
    destination: str
    sent: int
    statuses: tuple[int, ...]
    seconds: float


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (1-based): capped exponential with +-25 % jitter."""
    d = min(max_s, base_s * 2 ** max(0, attempt - 1))
    return min(max_s, d * (rng or random).uniform(0.75, 1.25))


def status_text(code: int) -> str:
    """`0xA700 (Refused: Out of Resources)`; `no response` for -1."""
    if code < 0:
        return "no response"
    meaning = (STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code) or ("", ""))[1]
    if not meaning and 0xA700 <= code <= 0xA7FF:
        meaning = "Refused: Out of Resources"
    elif not meaning and 0xC000 <= code <= 0xCFFF:
        meaning = "Error: Cannot Understand"
    return f"0x{code:04X}" + (f" ({meaning})" if meaning else "")


def read_instances(paths: Iterable[Path]) -> tuple[list[tuple[Path, Dataset]], list[SkippedFile]]:
    """Every storable instance under `paths` and the files skipped with the reason
    (`dicom_node.imaging.files.read_dicom_files`: by content, whatever the extension)."""
    found: list[tuple[Path, Dataset]] = []
    skipped: list[SkippedFile] = []
    for item in read_dicom_files(paths):
        if isinstance(item, SkippedFile):
            skipped.append(item)
        else:
            found.append(item)
    return found, skipped


def client_ae(config: Config | None, ae_title: str) -> AE:
    """The node's SCU application entity (`ae_title`, the timeouts of `config`); add the contexts to request."""
    ae = AE(ae_title=ae_title)
    if config is not None:
        ae.acse_timeout = config.timeouts.acse_s
        ae.dimse_timeout = config.timeouts.dimse_s
        ae.network_timeout = config.timeouts.network_s
    ae.connection_timeout = _connect_timeout(config)
    return ae


def _connect_timeout(config: Config | None) -> float:
    return config.timeouts.acse_s if config is not None else _DEFAULT_CONNECT_S


def _tls_context(dest: Destination, config: Config | None) -> ssl.SSLContext | None:
    if not dest.tls:
        return None
    if config is None:
        raise SendError(f"{dest}: TLS destination needs a Config with [tls] cert/key/ca; pass --config", "tls_failed")
    return client_ssl_context(config)


def _tls_reason(e: OSError) -> str:
    """An SSL error's short reason (`CERTIFICATE_VERIFY_FAILED`, `TLSV13_ALERT_CERTIFICATE_REQUIRED`), else its text."""
    return getattr(e, "reason", None) or str(e) or type(e).__name__


def _probe(dest: Destination, timeout: float, ctx: ssl.SSLContext | None) -> None:
    """Open (and close) a TCP connection, and the TLS handshake when `ctx`; SendError naming the cause."""
    try:
        sock = socket.create_connection((dest.host, dest.port), timeout=timeout)
    except ConnectionRefusedError:
        raise SendError(f"{dest}: connection refused by {dest.host}:{dest.port}; nothing listens there - check that "
                        "the peer is running and the host and port are right", "connection_refused") from None
    except TimeoutError:
        raise SendError(f"{dest}: connecting to {dest.host}:{dest.port} timed out after {timeout:g} s; check the "
                        "host, the port and any firewall between (timeouts.acse_s sets the wait)", "timed_out") from None
    except socket.gaierror as e:
        raise SendError(f"{dest}: host {dest.host!r} cannot be resolved ({e.strerror}); check the host name",
                        "unreachable") from None
    except OSError as e:
        why = "connection refused" if e.errno == errno.ECONNREFUSED else (e.strerror or str(e))
        raise SendError(f"{dest}: cannot connect to {dest.host}:{dest.port} ({why}); check the host, the port and "
                        "the network", "connection_refused" if e.errno == errno.ECONNREFUSED else "unreachable") from None
    try:
        if ctx is not None:
            try:
                tls = ctx.wrap_socket(sock, server_hostname=None)
            except (ssl.SSLError, OSError) as e:
                raise SendError(f"{dest}: TLS handshake failed ({_tls_reason(e)}); check that the peer speaks TLS on port "
                                f"{dest.port} and that [tls] cert/key/ca match it", "tls_failed") from None
            try:
                # TLS 1.3: the client's handshake ends before the server has checked the client's certificate;
                # a server that refuses it says so in an alert on the first read. A server that accepted it waits
                # for the A-ASSOCIATE-RQ: the read times out, and the cause lies elsewhere.
                tls.settimeout(min(timeout, 2.0))
                tls.recv(1)
            except ssl.SSLError as e:
                raise SendError(f"{dest}: the peer refused this node's TLS certificate ({_tls_reason(e)}); make the peer "
                                "trust the CA of [tls] cert (or set [tls] cert/key to a certificate it trusts)",
                                "tls_failed") from None
            except OSError:
                pass
            finally:
                tls.close()
    finally:
        sock.close()


def _keep_responses_for_the_caller(assoc: Association) -> None:
    """Let only the thread that sent a request take its response off the association's DIMSE queue.

    pynetdicom's requestor runs a reactor thread that polls that queue (`get_msg(block=False)`) for requests
    from the peer, and `send_c_store` pauses it around each request with an Event. The pause has a gap: the
    `set()` ending one C-STORE wakes the reactor, and when the next C-STORE's `clear()` follows at once, the
    woken reactor still runs one poll while the sender already waits. A response that arrives within that
    poll (a peer answering in well under a millisecond on a Nagle-free socket) is taken by the reactor, logged
    as "Received unexpected C-STORE service message" and dropped; the sender then waits out the DIMSE
    timeout and every following instance of the association fails ("no response"). A CI run of the demo hit
    it on the second study. The node's SCU serves no requests from its peers, so the reactor's poll gets
    nothing; the senders' blocking waits get every message."""
    dimse = assoc.dimse
    take = dimse.get_msg

    def get_msg(block: bool = False) -> Any:
        return take(block=True) if block else (None, None)

    dimse.get_msg = get_msg  # type: ignore[method-assign]


def associate(ae: AE, dest: Destination, calling_aet: str, config: Config | None) -> Association:
    """Open the node's SCU association to `dest` with Nagle's algorithm off; returns it established, or
    raises a SendError naming why not (rejected and by whom, no accepted context, TLS, unreachable) with
    the fix. When the association fails without an answer that says why, a TCP (and TLS) probe finds the
    cause; it runs only then, so a peer that works sees one connection per delivery, never an empty one."""
    ctx = _tls_context(dest, config)
    seen: dict[str, Any] = {}

    def on_acse_recv(event: evt.Event) -> None:
        p = event.primitive  # type: ignore[attr-defined]  # set for EVT_ACSE_RECV
        if getattr(p, "result", None) in (0x01, 0x02):
            seen["rj"] = (p.result_str, p.source_str, p.reason_str)

    def on_connected(event: evt.Event) -> None:
        # Nagle off, as on the SCP side: pynetdicom writes a C-STORE's command set and its data set as
        # separate PDUs, and the data set would wait for the peer's delayed ACK of the command (~40 ms an
        # instance: 300 slices took 14 s to send instead of about 1 s)
        sock = event.assoc.dul.socket.socket if event.assoc.dul.socket is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    try:
        # pynetdicom annotates tls_args as (context, str); the server_hostname None (no SNI) is valid for ssl
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title,
                             tls_args=(ctx, None) if ctx is not None else None,  # type: ignore[arg-type]
                             evt_handlers=[(evt.EVT_ACSE_RECV, on_acse_recv), (evt.EVT_CONN_OPEN, on_connected)])
    except Exception as e:  # socket errors surface here on some platforms
        _probe(dest, _connect_timeout(config), ctx)
        raise SendError(f"{dest}: association failed: {type(e).__name__}: {e}", "aborted") from None
    if assoc.is_established:
        _keep_responses_for_the_caller(assoc)
        return assoc
    if assoc.is_rejected:
        result, source, reason = seen.get("rj", ("rejected", "unknown source", "no reason given"))
        why = str(reason).lower()
        hint = (f"the peer does not accept calling AE {calling_aet}: add it to the peer's known AEs" if "calling" in why
                else f"the peer's AE title is not {dest.ae_title}: set the destination's ae_title to it" if "called" in why
                else "check the peer's configuration for this node")
        raise SendError(f"{dest}: association rejected ({result}; source: {source}; reason: {reason}); {hint}",
                        "rejected")
    if assoc.is_aborted and not assoc.accepted_contexts and assoc.rejected_contexts:
        sops = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
        raise SendError(f"{dest}: the peer accepted none of the proposed SOP classes ({', '.join(sops)}); "
                        "configure it to accept them", "no_contexts")
    _probe(dest, _connect_timeout(config), ctx)  # unreachable, refused, TLS: raises naming the cause
    raise SendError(f"{dest}: association aborted after the TCP connection opened (the peer sent "
                    f"A-ABORT, or no A-ASSOCIATE answer came within timeouts.acse_s); check that {dest.host}:{dest.port} is a DICOM port and the peer "
                    f"knows AE {calling_aet}", "aborted")


def send_files(paths: Iterable[Path], dest: Destination, *, calling_aet: str = "PENODE",
               config: Config | None = None) -> SendResult:
    """C-STORE every file to `dest` over one association; raise SendError unless all delivered."""
    return send_datasets([pydicom.dcmread(p) for p in paths], dest, calling_aet=calling_aet, config=config)


def send_datasets(datasets: Sequence[Dataset], dest: Destination, *, calling_aet: str = "PENODE",
                  config: Config | None = None) -> SendResult:
    """C-STORE every dataset over one association; every instance is tried, then a SendError lists
    each one the peer did not store with its status."""
    t0 = time.perf_counter()
    if not datasets:
        return SendResult(str(dest), 0, (), 0.0)
    ae = client_ae(config, calling_aet)
    contexts: dict[str, set[str]] = {}
    for ds in datasets:
        meta = getattr(ds, "file_meta", None)
        ts = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else U.ExplicitVRLittleEndian
        contexts.setdefault(str(ds.SOPClassUID), set()).add(ts)
    for sop, syntaxes in contexts.items():
        ae.add_requested_context(sop, sorted(syntaxes | {U.ExplicitVRLittleEndian, U.ImplicitVRLittleEndian}))
    assoc = associate(ae, dest, calling_aet, config)
    statuses: list[int] = []
    failed: list[tuple[str, int]] = []
    try:
        for ds in datasets:
            try:
                st = assoc.send_c_store(ds)
                code = int(st.Status) if st and "Status" in st else -1
            except (ValueError, RuntimeError):  # no accepted context for this SOP class/syntax
                code = -2
            statuses.append(code)
            if code not in DELIVERED_STATUSES:
                failed.append((str(ds.SOPInstanceUID), code))
            if not assoc.is_established:
                failed += [(str(d.SOPInstanceUID), -1) for d in datasets[len(statuses):]]
                break
    finally:
        if assoc.is_established:
            assoc.release()
    if failed:
        shown = "; ".join(f"{uid}: {'not accepted by the peer (no presentation context)' if c == -2 else status_text(c)}"
                          for uid, c in failed[:5])
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        raise SendError(f"{dest}: C-STORE failed for {len(failed)} of {len(datasets)} instance(s): {shown}{more}",
                        "store_failed", failed=failed, sent=len(datasets) - len(failed))
    return SendResult(str(dest), len(datasets), tuple(statuses), time.perf_counter() - t0)


def echo(dest: Destination, *, calling_aet: str = "PENODE", config: Config | None = None) -> int:
    """C-ECHO `dest`; return the status (raises SendError naming the cause when no association)."""
    ae = client_ae(config, calling_aet)
    ae.add_requested_context(VerificationSOPClass)
    assoc = associate(ae, dest, calling_aet, config)
    try:
        st = assoc.send_c_echo()
        return int(st.Status) if st and "Status" in st else -1
    finally:
        if assoc.is_established:
            assoc.release()
