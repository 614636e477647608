"""TLS for both sides of the node's associations, from the `[tls]` section of the config.

- `server_ssl_context`: the SCP's context (None when `[tls] enabled` is false); TLS 1.2 or newer,
  and a client certificate signed by `[tls] ca` when `verify_client` is on (mutual TLS).
- `client_ssl_context`: the SCU's context for destinations marked `tls`; the peer is authenticated
  by the CA, not by host name (DICOM peers are addressed by IP), and our own certificate is
  presented when `[tls] cert` and `key` are set.
- `certificate_dates`: when the node's own certificate (the first in `[tls] cert`) starts and stops
  being valid (`bundle_dates`: every certificate of a CA bundle), read from its DER encoding (the `ssl`
  module shows it only for CA certificates). An expired certificate is not refused by the node's own TLS stack: its peers refuse it, so the node
  says it at start (`tls_certificate`), in `dicom-node check` and as a metric.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import Config

__all__ = ["client_ssl_context", "server_ssl_context", "certificate_dates", "bundle_dates", "CertificateDates",
           "uses_own_certificate", "CERTIFICATE_WARN_DAYS"]

#: a certificate ending within this many days is reported as a warning (at start, by `dicom-node check`)
CERTIFICATE_WARN_DAYS = 30

_PEM = re.compile(r"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)
_UTC_TIME, _GENERALIZED_TIME = 0x17, 0x18


def server_ssl_context(config: Config) -> ssl.SSLContext | None:
    """TLS context for the SCP from `[tls]` (None when TLS is off)."""
    t = config.tls
    if not t.enabled:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(t.cert, t.key)
    if t.verify_client:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(t.ca)
    return ctx


def client_ssl_context(config: Config) -> ssl.SSLContext:
    """TLS context for an outgoing association (C-STORE of results, C-ECHO) to a `tls` destination."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.tls.ca or None)
    ctx.check_hostname = False  # DICOM peers are addressed by IP; the CA still authenticates them
    if config.tls.cert and config.tls.key:
        ctx.load_cert_chain(config.tls.cert, config.tls.key)
    return ctx


def uses_own_certificate(config: Config) -> bool:
    """Whether the node presents `[tls] cert` to anyone: its SCP, its HTTPS port, or TLS destinations."""
    return bool(config.tls.cert) and (config.tls.enabled or config.web.tls
                                      or any(d.tls for d in (*config.destinations, *config.peers)))


def _der(data: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start, end) of the DER item at `pos`: its content is data[start:end]."""
    tag, length = data[pos], data[pos + 1]
    pos += 2
    if length & 0x80:
        n = length & 0x7F
        length, pos = int.from_bytes(data[pos:pos + n], "big"), pos + n
    if pos + length > len(data):
        raise ValueError("truncated")
    return tag, pos, pos + length


def _time(tag: int, raw: bytes) -> dt.datetime:
    text = raw.decode("ascii")
    if tag == _UTC_TIME:  # YYMMDDHHMMSSZ; RFC 5280: YY >= 50 is 19YY
        yy = int(text[:2])
        text = f"{1900 + yy if yy >= 50 else 2000 + yy}{text[2:]}"
    elif tag != _GENERALIZED_TIME:
        raise ValueError(f"validity time of ASN.1 tag 0x{tag:02X}")
    return dt.datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=dt.timezone.utc)


def _block_validity(block: str) -> tuple[dt.datetime, dt.datetime]:
    """(notBefore, notAfter) of one PEM certificate block's base64 text."""
    der = base64.b64decode("".join(block.split()), validate=True)
    _, start, _ = _der(der, 0)  # Certificate
    _, pos, _ = _der(der, start)  # tbsCertificate
    tag, _, end = _der(der, pos)
    if tag == 0xA0:  # [0] version
        pos = end
    for _ in range(3):  # serialNumber, signature, issuer
        pos = _der(der, pos)[2]
    _, start, _ = _der(der, pos)  # validity
    tag_before, a, b = _der(der, start)
    tag_after, c, d = _der(der, b)
    return _time(tag_before, der[a:b]), _time(tag_after, der[c:d])


@dataclass(frozen=True)
class CertificateDates:
    """A certificate's validity and what it means now: the one reading of the start event and `dicom-node check`."""

    not_before: dt.datetime
    not_after: dt.datetime

    @property
    def days_left(self) -> float:
        """Days until notAfter (negative once it has passed)."""
        return (self.not_after.timestamp() - time.time()) / 86400

    @property
    def valid_now(self) -> bool:
        return self.not_before.timestamp() <= time.time() <= self.not_after.timestamp()

    @property
    def span(self) -> str:
        return f"valid from {self.not_before:%Y-%m-%d %H:%M} to {self.not_after:%Y-%m-%d %H:%M} UTC"


def _read_dates(pem_path: str | Path, *, first_only: bool) -> list[CertificateDates]:
    """The dates of the certificates in the PEM file `pem_path` (the first, or all in file order); ValueError
    naming the file, and the certificate's place when it holds several, when one is not readable X.509."""
    blocks = _PEM.findall(Path(pem_path).read_text(errors="replace"))

    def unreadable(n: int, why: object) -> ValueError:
        which = f"certificate {n} of {len(blocks)}" if len(blocks) > 1 else "not a readable PEM X.509 certificate"
        return ValueError(f"{pem_path}: {which} ({why}); give the certificate{'s' if len(blocks) > 1 else ''} in PEM")

    if not blocks:
        raise unreadable(1, "no BEGIN CERTIFICATE block")
    out = []
    for n, block in enumerate(blocks[:1] if first_only else blocks, 1):
        try:
            out.append(CertificateDates(*_block_validity(block)))
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise unreadable(n, e) from None
    return out


def certificate_dates(pem_path: str | Path) -> CertificateDates:
    """The validity of the first certificate in the PEM file `pem_path`: the node's own (the first block of
    `[tls] cert`; the chain after it is not read)."""
    return _read_dates(pem_path, first_only=True)[0]


def bundle_dates(pem_path: str | Path) -> list[CertificateDates]:
    """The validity of every certificate in the PEM file `pem_path` (a CA bundle holds several), in file order."""
    return _read_dates(pem_path, first_only=False)
