"""TLS for both sides of the node's associations, from the `[tls]` section of the config.

- `server_ssl_context`: the SCP's context (None when `[tls] enabled` is false); TLS 1.2 or newer,
  and a client certificate signed by `[tls] ca` when `verify_client` is on (mutual TLS).
- `client_ssl_context`: the SCU's context for destinations marked `tls`; the peer is authenticated
  by the CA, not by host name (DICOM peers are addressed by IP), and our own certificate is
  presented when `[tls] cert` and `key` are set.
"""

from __future__ import annotations

import ssl

from dicom_node.config import Config

__all__ = ["client_ssl_context", "server_ssl_context"]


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
