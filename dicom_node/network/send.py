"""The C-STORE and C-ECHO SCU: `send_files` (one association per call), `echo`, and the backoff rule.

`send_files` opens one association proposing only the SOP classes (and transfer syntaxes) of the
files it sends and stores every file. Success (0x0000) and the warning statuses 0xB000, 0xB006 and
0xB007 count as delivered (`DELIVERED_STATUSES`). `backoff_delay` is the retry rule the delivery
loop (`dicom_node.engine.delivery.Sender`) applies: `min(max_delay_s, base_delay_s * 2**(attempt-1))`
+-25 % jitter. `dicom-node send` and `dicom-node echo` use these functions directly.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import uid as U
from pynetdicom import AE
from pynetdicom.sop_class import Verification as VerificationSOPClass  # type: ignore[attr-defined]  # made at import

from dicom_node.config import Config, Destination
from dicom_node.network.tls import client_ssl_context

__all__ = ["DELIVERED_STATUSES", "SendError", "SendResult", "backoff_delay", "echo", "send_files"]

DELIVERED_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007})


class SendError(RuntimeError):
    """A delivery attempt failed; the message names the destination and the status or error."""


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


def _client_ae(config: Config | None, ae_title: str) -> AE:
    ae = AE(ae_title=ae_title)
    if config is not None:
        ae.acse_timeout = config.timeouts.acse_s
        ae.dimse_timeout = config.timeouts.dimse_s
        ae.network_timeout = config.timeouts.network_s
    return ae


def send_files(paths: Iterable[Path], dest: Destination, *, calling_aet: str = "PENODE",
               config: Config | None = None) -> SendResult:
    """C-STORE every file to `dest` over one association; raise SendError unless all delivered."""
    t0 = time.perf_counter()
    datasets = [pydicom.dcmread(p) for p in paths]
    if not datasets:
        return SendResult(str(dest), 0, (), 0.0)
    ae = _client_ae(config, calling_aet)
    contexts: dict[str, set[str]] = {}
    for ds in datasets:
        contexts.setdefault(str(ds.SOPClassUID), set()).add(str(ds.file_meta.TransferSyntaxUID))
    for sop, syntaxes in contexts.items():
        ae.add_requested_context(sop, sorted(syntaxes | {U.ExplicitVRLittleEndian, U.ImplicitVRLittleEndian}))
    tls_args = None
    if dest.tls:
        if config is None:
            raise SendError(f"{dest}: TLS destination needs a Config with [tls] cert/key/ca")
        tls_args = (client_ssl_context(config), None)
    try:
        # pynetdicom annotates tls_args as (context, str); the server_hostname None (no SNI) is valid for ssl
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)  # type: ignore[arg-type]
    except Exception as e:  # socket errors surface here on some platforms
        raise SendError(f"{dest}: association failed: {type(e).__name__}: {e}") from None
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "no answer"
        raise SendError(f"{dest}: association {why}; check that the peer is running and knows AE {calling_aet}")
    statuses: list[int] = []
    try:
        for ds in datasets:
            st = assoc.send_c_store(ds)
            code = int(st.Status) if st and "Status" in st else -1
            statuses.append(code)
            if code not in DELIVERED_STATUSES:
                raise SendError(f"{dest}: C-STORE of {ds.SOPInstanceUID} answered "
                                f"{'no response' if code < 0 else f'0x{code:04X}'}")
    finally:
        if assoc.is_established:
            assoc.release()
    return SendResult(str(dest), len(datasets), tuple(statuses), time.perf_counter() - t0)


def echo(dest: Destination, *, calling_aet: str = "ECHOSCU", config: Config | None = None) -> int:
    """C-ECHO `dest`; return the status (raises SendError when no association)."""
    ae = _client_ae(config, calling_aet)
    ae.add_requested_context(VerificationSOPClass)
    tls_args = (client_ssl_context(config), None) if dest.tls and config else None
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)  # type: ignore[arg-type]
    if not assoc.is_established:
        raise SendError(f"{dest}: association {'rejected' if assoc.is_rejected else 'failed'}")
    try:
        st = assoc.send_c_echo()
        return int(st.Status) if st and "Status" in st else -1
    finally:
        assoc.release()
