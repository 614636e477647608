"""Webhook notification: one HTTP POST of the notification document, signed with HMAC-SHA256.

Contract: `post_webhook(url, body, secret=..., delivery_id=..., timeout_s=...)` POSTs `body` (the
JSON document of `dicom_node.notify.document`, UTF-8) with
- `Content-Type: application/json`,
- `X-PE-Node-Signature: sha256=<hex HMAC-SHA256 of the exact body bytes under the secret>` (when a
  secret is configured; a receiver checks it with `verify_signature`, in constant time),
- `X-PE-Node-Delivery: <id>`: the notification's id, the same on every retry, so a receiver that
  answered but whose answer was lost can drop the repeat.
Any 2xx answer is success. Anything else (connection refused, timeout, 3xx-5xx) raises
`NotificationError` with a message naming the URL and the cause; the outbox retries it.
"""

from __future__ import annotations

import hashlib
import hmac
import urllib.error
import urllib.request

__all__ = ["SIGNATURE_HEADER", "DELIVERY_HEADER", "NotificationError", "sign", "verify_signature", "post_webhook"]

SIGNATURE_HEADER = "X-PE-Node-Signature"
DELIVERY_HEADER = "X-PE-Node-Delivery"


class NotificationError(RuntimeError):
    """A notification attempt failed; `final` = retrying the same message cannot help (HL7 AR)."""

    def __init__(self, message: str, *, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


def sign(secret: str, body: bytes) -> str:
    """`sha256=<hex>`: HMAC-SHA256 of `body` under `secret`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify_signature(secret: str, body: bytes, header: str | None) -> bool:
    """True when `header` is the signature of `body` under `secret` (constant-time compare)."""
    return header is not None and hmac.compare_digest(sign(secret, body), header)


def _no_redirects() -> urllib.request.OpenerDirector:
    class Refuse(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: object, **kwargs: object) -> None:
            return None  # a redirect is an answer to fix in the config, not to follow with the document

    return urllib.request.build_opener(Refuse)


def post_webhook(url: str, body: str, *, secret: str = "", delivery_id: str = "", timeout_s: float = 10.0) -> int:
    """POST `body`; return the HTTP status (2xx) or raise `NotificationError`."""
    data = body.encode("utf-8")
    headers = {"Content-Type": "application/json", "User-Agent": "dicom-node-pe"}
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, data)
    if delivery_id:
        headers[DELIVERY_HEADER] = delivery_id
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with _no_redirects().open(req, timeout=timeout_s) as resp:
            status: int = resp.status
    except urllib.error.HTTPError as e:
        raise NotificationError(f"webhook {url}: answered HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise NotificationError(f"webhook {url}: {type(reason).__name__}: {reason}") from None
    if not 200 <= status < 300:
        raise NotificationError(f"webhook {url}: answered HTTP {status}; expected 2xx")
    return status
